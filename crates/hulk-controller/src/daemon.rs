//! The controller and the teardown as the `hulk-controller` binary runs
//! them, from a [`ControllerFile`]: [`Daemon`] (`run`) and
//! [`teardown_rounds`] (`teardown`). The binary only parses its arguments,
//! makes one of these calls and maps the result to an exit code.
//!
//! The backend comes from `[backend]` through the node agent's factory
//! ([`hulk_agent::backend::from_section`]) and `/metrics` and `/healthz`
//! from the agent's endpoint ([`hulk_agent::http::serve`]): one backend
//! factory and one endpoint for both daemons.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hulk_agent::backend::BackendError;
use hulk_agent::http::{AlwaysHealthy, HttpLimits};
use hulk_ipam::{FloatingIpProvider, IpamBackend};
use hulk_kube::{ClusterNodes, KubeError, LeaseConfig};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ControllerFile, ReleaseSettings};
use crate::controller::Controller;
use crate::teardown::{
    FloatingIpTeardownReport, Force, TeardownError, TeardownReport, teardown, teardown_floating_ips,
};

/// Why the controller or the teardown could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `[backend]` could not be turned into a backend (a secret file, a
    /// client set-up).
    #[error("cannot build the backend")]
    Backend(#[source] BackendError),
    /// No Kubernetes client could be set up.
    #[error("cannot reach the Kubernetes API")]
    Kubernetes(#[source] KubeError),
    /// The teardown could not read the cluster's Node list.
    #[error(
        "cannot tell whether the cluster's API still lists nodes; if the cluster is gone, \
         run the teardown with --force"
    )]
    Nodes(#[source] KubeError),
    /// `metrics_address` cannot be listened on.
    #[error("cannot serve metrics on {address}")]
    Metrics {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A teardown round was refused ([`TeardownError::NodesListed`]) or
    /// could not list the cluster's allocations.
    #[error("teardown")]
    Teardown(#[source] TeardownError),
}

/// The controller with its backend, Kubernetes client and metrics
/// listener set up from a [`ControllerFile`]; [`Daemon::run`] runs it.
pub struct Daemon {
    controller: Controller,
    metrics: Option<TcpListener>,
}

impl Daemon {
    /// Builds the backend (`[backend]`), the Kubernetes client
    /// (`[kubernetes]`) and the leader lease (`[leader]`; its namespace
    /// defaults to `POD_NAMESPACE` from the environment, else
    /// `kube-system`), held as `holder` with a per-process suffix so that
    /// a restarted replica is a new holder; binds `metrics_address` when
    /// set.
    ///
    /// # Errors
    ///
    /// [`DaemonError::Backend`], [`DaemonError::Kubernetes`] or
    /// [`DaemonError::Metrics`].
    pub async fn from_config(file: ControllerFile, holder: &str) -> Result<Self, DaemonError> {
        let backends = hulk_agent::backend::backends_from_section(&file.backend)
            .map_err(DaemonError::Backend)?;
        let client = hulk_kube::client(&file.client_options())
            .await
            .map_err(DaemonError::Kubernetes)?;
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let namespace = file
            .leader
            .namespace
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| LeaseConfig::DEFAULT_NAMESPACE.to_owned());
        let leader = LeaseConfig::for_leader(file.leader.name, format!("{holder}_{started:x}"))
            .in_namespace(namespace)
            .with_duration_seconds(file.leader.duration_seconds);
        let mut controller = Controller::new(backends.ipam, client, file.controller, leader);
        if let Some(provider) = backends.floating_ips {
            controller = controller.with_floating_ips(provider);
        }
        let metrics = match file.metrics_address {
            None => None,
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|source| DaemonError::Metrics { address, source })?,
            ),
        };
        Ok(Self {
            controller,
            metrics,
        })
    }

    /// The controller, e.g. to read its metrics.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Where `/metrics` and `/healthz` are served (the bound address, so
    /// port 0 reads as the port chosen), if anywhere.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    /// Serves the controller's metrics (when a metrics address was set)
    /// and runs the controller ([`Controller::run`]) until `shutdown`
    /// fires.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Some(listener) = self.metrics {
            let mut registry = Registry::default();
            self.controller.metrics().register(&mut registry);
            tokio::spawn(hulk_agent::http::serve(
                listener,
                HttpLimits::default(),
                Arc::new(AlwaysHealthy),
                registry,
                shutdown.clone(),
            ));
        }
        self.controller.run(shutdown).await;
    }
}

/// How long [`teardown_rounds`] waits for the Node list before it gives
/// up.
const NODE_LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause between two teardown rounds.
const ROUND_PAUSE: Duration = Duration::from_secs(5);

/// What a run of teardown rounds left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeardownOutcome {
    /// The backend lists no allocation of the cluster any more.
    Clean,
    /// This many allocations remain after the last round (or when
    /// stopped): run the teardown again.
    Remaining(usize),
}

/// One teardown round's report, numbered from 1. Displayed as
/// `round N: floating IPs listed L, deleted D, already gone G, failed F,
/// remaining M` (with a floating IP provider) and `round N: listed L,
/// released R, already gone G, failed F, not attempted S, remaining M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TeardownRound {
    /// The round's number, from 1.
    pub number: u32,
    /// What it did to the cluster's floating IPs, when the backend has
    /// them (they go first: each one deleted is one fewer pointing at a
    /// port about to go).
    pub floating_ips: Option<FloatingIpTeardownReport>,
    /// What it did to the cluster's allocations.
    pub report: TeardownReport,
}

impl fmt::Display for TeardownRound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (report, tally) = (&self.report, &self.report.tally);
        if let Some(floating) = &self.floating_ips {
            writeln!(
                f,
                "round {}: floating IPs listed {}, deleted {}, already gone {}, failed {}, \
                 remaining {}",
                self.number,
                floating.listed,
                floating.deleted,
                floating.already_gone,
                floating.failed,
                floating.remaining
            )?;
        }
        write!(
            f,
            "round {}: listed {}, released {}, already gone {}, failed {}, not attempted {}, \
             remaining {}",
            self.number,
            report.listed,
            tally.released,
            tally.already_gone,
            tally.failed,
            tally.skipped,
            report.remaining
        )
    }
}

/// The cluster teardown as `hulk-controller teardown` runs it: builds the
/// backend from `file`; unless `force` is [`Force::Yes`], counts the
/// cluster's Nodes first (30 s at most; with `Force::Yes` the API is not
/// asked, as it may be gone); then runs up to `rounds` (at least one)
/// [`teardown`] rounds, 5 s apart, while allocations remain and
/// `shutdown` has not fired, handing each round's report to `on_round`.
///
/// # Errors
///
/// [`DaemonError::Backend`]; [`DaemonError::Kubernetes`] or
/// [`DaemonError::Nodes`] when the Node list cannot be read;
/// [`DaemonError::Teardown`] when a round is refused
/// ([`TeardownError::NodesListed`]) or a list fails.
pub async fn teardown_rounds(
    file: &ControllerFile,
    force: Force,
    rounds: u32,
    shutdown: &CancellationToken,
    on_round: impl FnMut(&TeardownRound),
) -> Result<TeardownOutcome, DaemonError> {
    let backends =
        hulk_agent::backend::backends_from_section(&file.backend).map_err(DaemonError::Backend)?;
    let nodes_listed = match force {
        Force::Yes => 0,
        Force::No => {
            let client = hulk_kube::client(&file.client_options())
                .await
                .map_err(DaemonError::Kubernetes)?;
            let nodes = ClusterNodes::start(client, shutdown.child_token());
            nodes
                .wait_synced(NODE_LIST_TIMEOUT)
                .await
                .map_err(DaemonError::Nodes)?;
            nodes.names().map_err(DaemonError::Nodes)?.len()
        }
    };
    run_rounds(
        Cloud {
            addresses: backends.ipam.as_ref(),
            floating_ips: backends.floating_ips.as_deref(),
        },
        nodes_listed,
        force,
        &file.controller.release,
        rounds,
        shutdown,
        on_round,
    )
    .await
}

/// What a teardown round returns: the cluster's allocations, and its
/// floating IPs when the backend has them.
#[derive(Clone, Copy)]
struct Cloud<'a> {
    addresses: &'a dyn IpamBackend,
    floating_ips: Option<&'a dyn FloatingIpProvider>,
}

/// The rounds of [`teardown_rounds`] over backends already built.
async fn run_rounds(
    cloud: Cloud<'_>,
    nodes_listed: usize,
    force: Force,
    settings: &ReleaseSettings,
    rounds: u32,
    shutdown: &CancellationToken,
    mut on_round: impl FnMut(&TeardownRound),
) -> Result<TeardownOutcome, DaemonError> {
    let mut remaining = 0;
    for number in 1..=rounds.max(1) {
        let floating_ips = match cloud.floating_ips {
            Some(provider) => Some(
                teardown_floating_ips(provider, nodes_listed, force, shutdown)
                    .await
                    .map_err(DaemonError::Teardown)?,
            ),
            None => None,
        };
        let report = teardown(cloud.addresses, nodes_listed, force, settings, shutdown)
            .await
            .map_err(DaemonError::Teardown)?;
        on_round(&TeardownRound {
            number,
            floating_ips,
            report,
        });
        remaining = report.remaining + floating_ips.map_or(0, |floating| floating.remaining);
        if remaining == 0 || shutdown.is_cancelled() {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(ROUND_PAUSE) => {}
        }
    }
    Ok(match remaining {
        0 => TeardownOutcome::Clean,
        remaining => TeardownOutcome::Remaining(remaining),
    })
}

#[cfg(test)]
mod tests {
    use hulk_ipam::{
        AllocationRequest, Fault, FaultPlan, Faulty, IpamError, ListScope, MemoryBackend, PoolKey,
    };

    use super::*;

    /// Only allocations, no floating IPs.
    fn addresses(backend: &dyn IpamBackend) -> Cloud<'_> {
        Cloud {
            addresses: backend,
            floating_ips: None,
        }
    }

    /// A memory backend holding `count` allocations of this cluster.
    async fn holding(count: usize) -> MemoryBackend {
        let backend = MemoryBackend::new("10.20.0.0/24".parse().unwrap());
        let key = PoolKey::new("net", "subnet", ["sg"], None);
        backend
            .allocate(&AllocationRequest::new(key, "node-1", count))
            .await
            .unwrap();
        backend
    }

    /// Call 1 lists, call 2 is the first release: it fails, so round 1
    /// leaves the allocation and round 2 returns it.
    fn first_release_fails() -> FaultPlan {
        FaultPlan {
            on_call: [(2, Fault::Error(IpamError::Transient("refused".into())))].into(),
            ..FaultPlan::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rounds_repeat_while_allocations_remain() {
        let backend = Faulty::new(holding(1).await, first_release_fails());
        let mut lines = Vec::new();
        let outcome = run_rounds(
            addresses(&backend),
            0,
            Force::No,
            &ReleaseSettings::default(),
            3,
            &CancellationToken::new(),
            |round| lines.push(round.to_string()),
        )
        .await
        .unwrap();
        assert_eq!(outcome, TeardownOutcome::Clean);
        assert_eq!(
            lines,
            [
                "round 1: listed 1, released 0, already gone 0, failed 1, not attempted 0, \
                 remaining 1",
                "round 2: listed 1, released 1, already gone 0, failed 0, not attempted 0, \
                 remaining 0",
            ]
        );
        assert!(
            backend
                .inner()
                .list(&ListScope::Cluster)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_round_reports_what_remains() {
        let backend = Faulty::new(holding(1).await, first_release_fails());
        let mut rounds = 0;
        let outcome = run_rounds(
            addresses(&backend),
            0,
            Force::No,
            &ReleaseSettings::default(),
            1,
            &CancellationToken::new(),
            |_| rounds += 1,
        )
        .await
        .unwrap();
        assert_eq!(outcome, TeardownOutcome::Remaining(1));
        assert_eq!(rounds, 1);
    }

    #[tokio::test]
    async fn listed_nodes_refuse_unless_forced() {
        let backend = holding(2).await;
        let settings = ReleaseSettings::default();
        let stop = CancellationToken::new();
        let refused = run_rounds(
            addresses(&backend),
            1,
            Force::No,
            &settings,
            3,
            &stop,
            |_| {},
        )
        .await;
        assert!(
            matches!(
                refused,
                Err(DaemonError::Teardown(TeardownError::NodesListed {
                    nodes: 1
                }))
            ),
            "{refused:?}"
        );
        assert_eq!(backend.list(&ListScope::Cluster).await.unwrap().len(), 2);
        let forced = run_rounds(
            addresses(&backend),
            1,
            Force::Yes,
            &settings,
            3,
            &stop,
            |_| {},
        )
        .await;
        assert_eq!(forced.unwrap(), TeardownOutcome::Clean);
    }

    #[tokio::test(start_paused = true)]
    async fn floating_ips_go_first_and_count_in_what_remains() {
        use hulk_ipam::{FloatingIpPolicy, FloatingIpRequest, MemoryFloatingIps};

        let backend = holding(2).await;
        let floating = MemoryFloatingIps::new("203.0.113.0/28".parse().unwrap());
        floating
            .associate(&FloatingIpRequest {
                network: "public".into(),
                port: "port-a".into(),
                fixed_address: "10.0.0.5".parse().unwrap(),
                pod: "default/a".into(),
                node: "node-1".into(),
                policy: FloatingIpPolicy::Keep,
            })
            .await
            .unwrap();
        let mut lines = Vec::new();
        let outcome = run_rounds(
            Cloud {
                addresses: &backend,
                floating_ips: Some(&floating),
            },
            0,
            Force::No,
            &ReleaseSettings::default(),
            3,
            &CancellationToken::new(),
            |round| lines.push(round.to_string()),
        )
        .await
        .unwrap();
        assert_eq!(outcome, TeardownOutcome::Clean);
        assert!(floating.all().is_empty(), "the kept floating IP went too");
        assert_eq!(
            lines,
            [
                "round 1: floating IPs listed 1, deleted 1, already gone 0, failed 0, remaining 0\n\
              round 1: listed 2, released 2, already gone 0, failed 0, not attempted 0, remaining 0"
            ]
        );
    }
}
