//! [`Controller`]: the runner around [`crate::plan`]. It campaigns for the
//! leader lease, watches the Nodes, and on every pass lists the cluster's
//! allocations, plans, and applies the plan while it leads.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hulk_ipam::{FloatingIpProvider, IpamBackend, IpamError, ListScope};
use hulk_kube::{ClusterNodes, KubeError, LeaderLease, LeaseConfig};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::ControllerConfig;
use crate::metrics::ControllerMetrics;
use crate::plan::{GoneMemory, NodeView, plan};
use crate::release::{ReleaseTally, release_all};

/// The default name of the leader lease.
pub const LEADER_LEASE: &str = "hulk-vpc-controller";

/// Why a pass could not judge anything.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The backend's list of the cluster's allocations failed.
    #[error("cannot list the cluster's allocations")]
    List(#[source] IpamError),
    /// The Node reflector cannot tell which nodes exist (not synced yet, or
    /// its watch is failing).
    #[error("cannot tell which nodes exist")]
    Nodes(#[source] KubeError),
    /// A node the reflector misses could not be looked up to confirm it is
    /// gone.
    #[error("cannot confirm that node {node} is gone")]
    Confirm {
        /// The node.
        node: String,
        /// The GET's failure.
        #[source]
        source: KubeError,
    },
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Allocations the backend listed for the cluster.
    pub listed: usize,
    /// Nodes named by them that the API does not list.
    pub missing_nodes: usize,
    /// Of those, the nodes judged gone on this pass.
    pub gone_nodes: usize,
    /// Whether the cluster's pod UIDs were listed (a holder check).
    pub pods_listed: bool,
    /// What the releases did.
    pub tally: ReleaseTally,
}

/// The cluster-level controller: one active replica (the holder of the
/// leader lease) returns the addresses of nodes gone from the API
/// ([`crate::plan`] says which and why).
///
/// Kubernetes RBAC: `get`, `list`, `watch` on `nodes`; `list` on `pods`
/// (metadata); `get`, `create`, `update` on `leases.coordination.k8s.io` in
/// the lease's namespace.
pub struct Controller {
    backend: Arc<dyn IpamBackend>,
    client: kube::Client,
    config: ControllerConfig,
    leader: LeaseConfig,
    metrics: ControllerMetrics,
    floating_ips: Option<Arc<dyn FloatingIpProvider>>,
}

impl Controller {
    /// A controller over `backend` (built for this cluster: its
    /// `ListScope::Cluster` is this cluster's allocations), electing its
    /// active replica through the lease `leader` describes
    /// ([`LeaseConfig::for_leader`] with [`LEADER_LEASE`] and a holder id
    /// unique to this process, e.g. the pod's name).
    pub fn new(
        backend: Arc<dyn IpamBackend>,
        client: kube::Client,
        config: ControllerConfig,
        leader: LeaseConfig,
    ) -> Self {
        Self {
            backend,
            client,
            config,
            leader,
            metrics: ControllerMetrics::default(),
            floating_ips: None,
        }
    }

    /// Also sweeps the cluster's floating IPs after each pass: a released
    /// node's ports go, and with them the association of their floating
    /// IPs; those under the `release` policy are deleted
    /// ([`FloatingIpProvider::sweep`], tag-scoped to this cluster).
    pub fn with_floating_ips(mut self, provider: Arc<dyn FloatingIpProvider>) -> Self {
        self.floating_ips = Some(provider);
        self
    }

    /// The controller's metrics (shared handles: register them, read them).
    pub fn metrics(&self) -> &ControllerMetrics {
        &self.metrics
    }

    /// Runs until `shutdown` fires: watches the Nodes, campaigns for the
    /// leader lease, and while it leads runs a pass every
    /// [`ControllerConfig::pass_interval`]. A lost lease stops the releases
    /// (checked before each one) and the controller campaigns again with
    /// an empty memory. At shutdown the lease is given up so that the
    /// other replica need not wait for it to expire.
    pub async fn run(&self, shutdown: CancellationToken) {
        let nodes = ClusterNodes::start(self.client.clone(), shutdown.child_token());
        let lease = Arc::new(LeaderLease::new(self.client.clone(), self.leader.clone()));
        let retry = Duration::from_secs(u64::from(self.leader.duration_seconds)) / 3;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = campaign(&lease, retry) => {}
            }
            let leading = shutdown.child_token();
            let keeper = lease.clone().keep_renewed(leading.clone());
            let mut lost = keeper.subscribe();
            let on_loss = leading.clone();
            tokio::spawn(async move {
                // Err: the renewals ended without a loss (we stopped
                // leading ourselves); cancelling again is harmless.
                let _ = lost.wait_for(Option::is_some).await;
                on_loss.cancel();
            });
            self.metrics.leader.set(1);
            self.lead(&nodes, &leading).await;
            self.metrics.leader.set(0);
            leading.cancel();
            drop(keeper);
            if shutdown.is_cancelled() {
                if let Err(error) = lease.release().await {
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "cannot give the leader lease up; the other replica takes it when it expires"
                    );
                }
                return;
            }
            tracing::warn!("leadership lost; campaigning again");
        }
    }

    /// Passes until `leading` fires, starting from an empty memory.
    async fn lead(&self, nodes: &ClusterNodes, leading: &CancellationToken) {
        tokio::select! {
            () = leading.cancelled() => return,
            synced = nodes.wait_synced(Duration::MAX) => if let Err(error) = synced {
                tracing::warn!(error = &error as &dyn std::error::Error, "nodes not synced");
            },
        }
        let mut memory = GoneMemory::default();
        let mut ticker = tokio::time::interval(self.config.pass_interval());
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = leading.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.pass(nodes, &mut memory, leading).await {
                Ok(report) => {
                    if report.missing_nodes > 0 || report.tally != ReleaseTally::default() {
                        tracing::info!(?report, "pass");
                    } else {
                        tracing::debug!(?report, "pass");
                    }
                }
                Err(error) => tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "pass failed; the next one tries again"
                ),
            }
            if let Some(provider) = &self.floating_ips {
                match provider.sweep(&ListScope::Cluster).await {
                    Ok(swept) => {
                        for floating in swept {
                            tracing::info!(
                                target: "hulk_audit",
                                floating_ip = %floating.address,
                                id = %floating.id,
                                "floating IP whose port is gone deleted"
                            );
                        }
                    }
                    Err(error) => tracing::warn!(%error, "floating IP sweep failed"),
                }
            }
        }
    }

    /// One pass: list the cluster's allocations, then (so that every lease
    /// listed was made for a node and a pod created before these reads)
    /// the nodes and, when a holder check needs them, the pods; plan; apply
    /// while `stop` has not fired, dropping before each call the releases
    /// whose node is listed again. `memory` moves on only when the pass
    /// judged.
    ///
    /// # Errors
    ///
    /// [`PassError`] when nothing could be judged.
    pub async fn pass(
        &self,
        nodes: &ClusterNodes,
        memory: &mut GoneMemory,
        stop: &CancellationToken,
    ) -> Result<PassReport, PassError> {
        let judged = self.judge(nodes, memory).await;
        self.metrics.count_pass(judged.is_ok());
        let (mut report, releases) = judged?;
        report.tally = release_all(
            self.backend.as_ref(),
            releases,
            &self.config.release,
            &self.metrics,
            stop,
            |release| matches!(nodes.is_known(&release.lease.node), Ok(false)),
        )
        .await;
        Ok(report)
    }

    async fn judge(
        &self,
        nodes: &ClusterNodes,
        memory: &mut GoneMemory,
    ) -> Result<(PassReport, Vec<crate::plan::Release>), PassError> {
        let leases = self
            .backend
            .list(&ListScope::Cluster)
            .await
            .map_err(PassError::List)?;
        let mut view = NodeView::new(nodes.names().map_err(PassError::Nodes)?);
        let now = Instant::now();
        let grace = self.config.grace_period();
        let mut judged = plan(&view, &leases, memory, now, grace);
        let mut pods_listed = false;
        if judged.wants_pod_uids {
            match hulk_kube::pod_uids(self.client.clone()).await {
                Ok(uids) => {
                    view = view.with_pod_uids(uids);
                    judged = plan(&view, &leases, memory, now, grace);
                    pods_listed = true;
                }
                Err(error) => tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "cannot list the cluster's pods; holders are checked on a later pass"
                ),
            }
        }
        // The reflector's store can be stale (a watch failing for longer
        // than the grace period never learns of a node added meanwhile): a
        // node loses addresses only when a GET confirms it is gone.
        let suspects: BTreeSet<&str> = judged
            .releases
            .iter()
            .map(|release| release.lease.node.as_str())
            .collect();
        let mut present = Vec::new();
        for node in suspects {
            if self.node_exists(node).await? {
                present.push(node.to_owned());
            }
        }
        if !present.is_empty() {
            tracing::warn!(
                nodes = ?present,
                "nodes the watch's cache misses exist: keeping their addresses"
            );
            view.nodes.extend(present);
            judged = plan(&view, &leases, memory, now, grace);
        }
        let gone_nodes = judged.missing.iter().filter(|node| node.gone).count();
        self.metrics
            .missing_nodes
            .set(i64::try_from(judged.missing.len()).unwrap_or(i64::MAX));
        self.metrics
            .gone_nodes
            .set(i64::try_from(gone_nodes).unwrap_or(i64::MAX));
        for node in judged.missing.iter().filter(|node| node.gone) {
            tracing::info!(
                node = %node.name,
                passes = node.missing.passes,
                missing_for = ?now.saturating_duration_since(node.missing.since),
                leases = node.leases,
                "node gone from the API: returning its addresses"
            );
        }
        *memory = judged.memory;
        Ok((
            PassReport {
                listed: leases.len(),
                missing_nodes: judged.missing.len(),
                gone_nodes,
                pods_listed,
                tally: ReleaseTally::default(),
            },
            judged.releases,
        ))
    }
}

impl Controller {
    /// Whether the API has the Node `name` now: one GET of its metadata.
    async fn node_exists(&self, name: &str) -> Result<bool, PassError> {
        Api::<Node>::all(self.client.clone())
            .get_metadata_opt(name)
            .await
            .map(|node| node.is_some())
            .map_err(|source| PassError::Confirm {
                node: name.to_owned(),
                source: KubeError::Request {
                    action: format!("get node {name}"),
                    source: Box::new(source),
                },
            })
    }
}

/// Tries to acquire `lease` every `retry` until it is ours.
async fn campaign(lease: &LeaderLease, retry: Duration) {
    loop {
        match lease.acquire().await {
            Ok(()) => return,
            Err(KubeError::LeaseHeld { holder, .. }) => {
                tracing::debug!(%holder, "the leader lease is held by another replica");
            }
            Err(error) => tracing::warn!(
                error = &error as &dyn std::error::Error,
                configuration = error.is_configuration(),
                "cannot acquire the leader lease"
            ),
        }
        tokio::time::sleep(retry).await;
    }
}
