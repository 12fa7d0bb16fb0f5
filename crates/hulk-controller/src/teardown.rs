//! [`teardown`]: every address of a cluster back to the cloud, for the
//! base platform's cluster deletion.

use hulk_ipam::{FloatingIpProvider, IpamBackend, IpamError, ListScope};
use tokio_util::sync::CancellationToken;

use crate::config::ReleaseSettings;
use crate::metrics::ControllerMetrics;
use crate::plan::{Reason, Release};
use crate::release::{ReleaseTally, release_all};

/// Whether to tear down while the cluster's API still lists nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Force {
    /// Refuse while any node is listed ([`TeardownError::NodesListed`]).
    No,
    /// Tear down anyway: the nodes' pods lose their addresses.
    Yes,
}

/// What one teardown round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeardownReport {
    /// Allocations the backend listed for the cluster at the start.
    pub listed: usize,
    /// What the releases did.
    pub tally: ReleaseTally,
    /// Allocations the backend still lists for the cluster at the end; run
    /// again until it is zero.
    pub remaining: usize,
}

/// Why a teardown did not run or could not finish its round.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    /// The cluster's API still lists nodes, and the teardown was not
    /// forced: their pods would lose their addresses.
    #[error(
        "the cluster's API still lists {nodes} node(s): their pods would lose their addresses; \
         delete the nodes first, or force the teardown"
    )]
    NodesListed {
        /// How many.
        nodes: usize,
    },
    /// The backend's list of the cluster's allocations failed.
    #[error("cannot list the cluster's allocations")]
    List(#[source] IpamError),
    /// The provider's list of the cluster's floating IPs failed.
    #[error("cannot list the cluster's floating IPs")]
    ListFloatingIps(#[source] IpamError),
}

/// What one teardown round of floating IPs did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloatingIpTeardownReport {
    /// Floating IPs the provider listed for the cluster at the start.
    pub listed: usize,
    /// Deleted.
    pub deleted: usize,
    /// Already gone (`NotFound`).
    pub already_gone: usize,
    /// Refused or failed; the next round tries them again.
    pub failed: usize,
    /// Floating IPs the provider still lists for the cluster at the end.
    pub remaining: usize,
}

/// Deletes every floating IP `provider` lists for its cluster (tagged
/// `hulk-vpc` and `hulk-cluster=<cluster>`: another cluster's are never
/// touched), kept ones too, then lists again to report what remains. The
/// same refusal as [`teardown`] while nodes are listed; safe to run again;
/// `stop` ends the round early. Floating IPs are few (one per pod at
/// most): they are deleted one after the other, unpaced.
///
/// # Errors
///
/// [`TeardownError::NodesListed`] before anything is touched;
/// [`TeardownError::ListFloatingIps`] when either list fails.
pub async fn teardown_floating_ips(
    provider: &dyn FloatingIpProvider,
    nodes_listed: usize,
    force: Force,
    stop: &CancellationToken,
) -> Result<FloatingIpTeardownReport, TeardownError> {
    if nodes_listed > 0 && force == Force::No {
        return Err(TeardownError::NodesListed {
            nodes: nodes_listed,
        });
    }
    let floating_ips = provider
        .list(&ListScope::Cluster)
        .await
        .map_err(TeardownError::ListFloatingIps)?;
    let mut report = FloatingIpTeardownReport {
        listed: floating_ips.len(),
        ..FloatingIpTeardownReport::default()
    };
    for floating in floating_ips {
        if stop.is_cancelled() {
            break;
        }
        match provider.delete(&floating.id).await {
            Ok(()) => report.deleted += 1,
            Err(IpamError::NotFound(_)) => report.already_gone += 1,
            Err(error) => {
                report.failed += 1;
                tracing::warn!(floating_ip = %floating.address, id = %floating.id, %error, "cluster teardown: cannot delete a floating IP");
                continue;
            }
        }
        tracing::info!(
            target: "hulk_audit",
            floating_ip = %floating.address,
            id = %floating.id,
            pod = floating.pod.as_deref().unwrap_or_default(),
            "cluster teardown: floating IP deleted"
        );
    }
    report.remaining = provider
        .list(&ListScope::Cluster)
        .await
        .map_err(TeardownError::ListFloatingIps)?
        .len();
    Ok(report)
}

/// Returns every allocation `backend` lists for its cluster
/// (`ListScope::Cluster`: tagged `hulk-vpc` and `hulk-cluster=<cluster>`,
/// so another cluster's addresses are never touched), paced by `settings`,
/// then lists again to report what remains. `nodes_listed` is how many
/// Node objects the cluster's API lists: more than zero refuses unless
/// `force` says [`Force::Yes`]. Safe to run again (a `NotFound` counts as
/// released) until [`TeardownReport::remaining`] is zero; `stop` ends the
/// round early (what was not attempted counts as
/// [`ReleaseTally::skipped`]).
///
/// # Errors
///
/// [`TeardownError::NodesListed`] before anything is touched;
/// [`TeardownError::List`] when either list fails (releases done before
/// the second list stand).
pub async fn teardown(
    backend: &dyn IpamBackend,
    nodes_listed: usize,
    force: Force,
    settings: &ReleaseSettings,
    stop: &CancellationToken,
) -> Result<TeardownReport, TeardownError> {
    if nodes_listed > 0 && force == Force::No {
        return Err(TeardownError::NodesListed {
            nodes: nodes_listed,
        });
    }
    let leases = backend
        .list(&ListScope::Cluster)
        .await
        .map_err(TeardownError::List)?;
    let listed = leases.len();
    tracing::info!(
        target: "hulk_audit",
        listed,
        nodes_listed,
        forced = force == Force::Yes,
        "cluster teardown: returning every allocation of the cluster"
    );
    let releases = leases
        .into_iter()
        .map(|lease| Release {
            lease,
            reason: Reason::Teardown,
        })
        .collect();
    let metrics = ControllerMetrics::default();
    let tally = release_all(backend, releases, settings, &metrics, stop, |_| true).await;
    let remaining = backend
        .list(&ListScope::Cluster)
        .await
        .map_err(TeardownError::List)?
        .len();
    Ok(TeardownReport {
        listed,
        tally,
        remaining,
    })
}

#[cfg(test)]
mod tests {
    use hulk_ipam::{FloatingIpPolicy, FloatingIpRequest, MemoryFloatingIps};

    use super::*;

    #[tokio::test]
    async fn every_floating_ip_of_the_cluster_goes_kept_ones_too() {
        let provider = MemoryFloatingIps::new("203.0.113.0/28".parse().unwrap());
        for (pod, policy) in [
            ("default/a", FloatingIpPolicy::Release),
            ("default/b", FloatingIpPolicy::Keep),
        ] {
            provider
                .associate(&FloatingIpRequest {
                    network: "public".into(),
                    port: format!("port-{pod}"),
                    fixed_address: "10.0.0.5".parse().unwrap(),
                    pod: pod.into(),
                    node: "node-1".into(),
                    policy,
                })
                .await
                .unwrap();
        }
        let stop = CancellationToken::new();
        let refused = teardown_floating_ips(&provider, 2, Force::No, &stop).await;
        assert!(
            matches!(refused, Err(TeardownError::NodesListed { nodes: 2 })),
            "{refused:?}"
        );
        assert_eq!(
            provider.all().len(),
            2,
            "a refused teardown touches nothing"
        );

        let report = teardown_floating_ips(&provider, 2, Force::Yes, &stop)
            .await
            .unwrap();
        assert_eq!(
            report,
            FloatingIpTeardownReport {
                listed: 2,
                deleted: 2,
                ..FloatingIpTeardownReport::default()
            }
        );
        assert!(provider.all().is_empty());
        let again = teardown_floating_ips(&provider, 0, Force::No, &stop)
            .await
            .unwrap();
        assert_eq!(again, FloatingIpTeardownReport::default());
    }
}
