//! [`teardown`]: every address of a cluster back to the cloud, for the
//! base platform's cluster deletion.

use hulk_ipam::{IpamBackend, IpamError, ListScope};
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
