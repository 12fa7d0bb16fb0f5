//! The hulk-vpc node: what the agent does for each CNI request, composing
//! the warm pool (addresses) and the datapath (interfaces), and the one
//! place where their failures become CNI error codes.
//!
//! - [`Node::add`]: an address from the pod's pool, then the interface;
//!   if the interface cannot be built the address goes back. A retried ADD
//!   finds the same address and the same interface and succeeds.
//! - [`Node::del`]: tears down the interface and returns the address;
//!   anything already gone counts as done.
//! - [`Node::restore`]: after a reboot or an agent restart, re-applies the
//!   node-level datapath for the pods that still hold addresses.
//! - [`NodeError::to_cni`]: the mapping to CNI codes (11 try again later,
//!   102 exhausted, 104 datapath, 105 namespace, ...).
//!
//! # Example
//!
//! ```no_run
//! use std::path::PathBuf;
//! use std::sync::Arc;
//! use hulk_ipam::{MockBackend, PoolKey};
//! use hulk_netns::{Datapath, NetlinkKernel, NodeNetwork, SlaveKind};
//! use hulk_node::{Node, PodRequest};
//! use hulk_pool::{MemoryStore, PoolConfig, PoolManager, SystemClock};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pools = PoolManager::open(
//!     Arc::new(MockBackend::new("10.20.0.0/24".parse()?)),
//!     Arc::new(MemoryStore::default()),
//!     Arc::new(SystemClock),
//!     "node-1",
//!     PoolConfig::default(),
//! )
//! .await?;
//! let network = NodeNetwork {
//!     parent: "eth1".into(),
//!     kind: SlaveKind::default(),
//!     host_link: "hulk0".into(),
//!     node_address: "10.20.0.250/24".parse()?,
//!     service_cidrs: vec!["10.96.0.0/12".parse()?],
//! };
//! let key = PoolKey::new("vpc", "subnet-a", ["sg-web"], None);
//! let node = Node::new(pools, Datapath::new(NetlinkKernel::new()?), network, key);
//! node.restore().await?;
//! let pod = PodRequest {
//!     container_id: "5f2c".into(),
//!     ifname: "eth0".into(),
//!     netns: Some(PathBuf::from("/var/run/netns/5f2c")),
//!     pod: Some("default/web-0".into()),
//!     pool: None,
//!     cni_network: Some("vpc".into()),
//!     pod_uid: None,
//!     timeout_ms: None,
//! };
//! let attached = node.add(&pod).await?;
//! println!("{} on interface {}", attached.lease.address, attached.index);
//! node.del(&pod).await?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hulk_cni::{Attachment, CniError, CniResult, ErrorCode, Interface, IpConfig, Route};
use hulk_ipam::{IpamError, Lease, Owner, PoolKey};
use hulk_netns::{
    Datapath, DatapathError, Kernel, Mac, NodeNetwork, NodeState, PodNetwork, RestoreReport,
};
use hulk_netns::{default_destination, format_mac};
use hulk_pool::{AddressState, OrphanSweep, PoolError, PoolManager, ReconcileReport};

use crate::kube::{KubeClient, KubeError};

pub mod agent;
pub mod config;
pub mod del_notes;
pub mod kube;
pub mod lines;
pub mod metrics;
pub mod rescue;

/// One pod interface, as a CNI request names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_NETNS`; DEL may come without it.
    pub netns: Option<PathBuf>,
    /// `namespace/name` from `CNI_ARGS`, when the runtime gave it.
    pub pod: Option<String>,
    /// The pod's own pool (per-pod subnet, security groups, QoS), if any.
    pub pool: Option<PoolKey>,
    /// The CNI network (configuration `name`), when the plugin gave it.
    #[serde(default)]
    pub cni_network: Option<String>,
    /// `K8S_POD_UID` from `CNI_ARGS`, when the runtime gave it.
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// How long the caller waits for the answer (milliseconds), when it
    /// said: an ADD not finished by then is undone, since the runtime has
    /// given up on it and will not use the sandbox.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl PodRequest {
    /// The DEL of an assignment's owner, as a GC or an operator issues it:
    /// no namespace (the pod may be gone) and whichever pool holds it.
    fn teardown_of(owner: &Owner) -> Self {
        Self {
            container_id: owner.container_id.clone(),
            ifname: owner.ifname.clone(),
            netns: None,
            pod: owner.pod.clone(),
            pool: None,
            cni_network: owner.cni_network.clone(),
            pod_uid: owner.pod_uid.clone(),
            timeout_ms: None,
        }
    }

    fn owner(&self) -> Owner {
        Owner {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
            pod: self.pod.clone(),
            cni_network: self.cni_network.clone(),
            pod_uid: self.pod_uid.clone(),
        }
    }
}

/// What ADD built.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodAttachment {
    /// The address and its subnet facts.
    pub lease: Lease,
    /// The interface's index in the pod.
    pub index: u32,
    /// The interface's MAC.
    pub mac: Option<Mac>,
    /// The interface's MTU.
    pub mtu: u32,
}

impl PodAttachment {
    /// The CNI result of this attachment for interface `ifname` in `sandbox`.
    pub fn to_cni_result(&self, ifname: &str, sandbox: &std::path::Path) -> CniResult {
        let lease = &self.lease;
        let default_route = lease
            .gateway
            .map(|gateway| Route::new(default_destination(gateway), Some(gateway)));
        CniResult {
            interfaces: vec![Interface {
                name: ifname.to_owned(),
                mac: self.mac.as_ref().map(format_mac),
                mtu: Some(self.mtu),
                sandbox: Some(sandbox.display().to_string()),
                ..Interface::default()
            }],
            ips: vec![IpConfig {
                address: lease.address,
                gateway: lease.gateway,
                interface: Some(0),
            }],
            routes: default_route.into_iter().collect(),
            dns: Default::default(),
        }
    }
}

/// Node failures.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request is incomplete.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The pool could not give or take the address.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The interface could not be built, checked or removed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The Kubernetes API could not say which pool a pod wants or which
    /// pods live.
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
}

impl NodeError {
    /// The CNI error for this failure: the one mapping of the project.
    pub fn to_cni(&self) -> CniError {
        let code = match self {
            NodeError::InvalidRequest(_) => ErrorCode::InvalidNetworkConfig,
            NodeError::Pool(PoolError::Degraded {
                exhausted: true, ..
            }) => ErrorCode::AddressExhausted,
            NodeError::Pool(
                PoolError::Empty { .. }
                | PoolError::Degraded { .. }
                | PoolError::AddressUnavailable { .. },
            ) => ErrorCode::TryAgainLater,
            // The one request a pod shapes: its fixed address.
            NodeError::Pool(PoolError::Backend(IpamError::InvalidRequest(_))) => {
                ErrorCode::InvalidNetworkConfig
            }
            NodeError::Pool(PoolError::Backend(
                IpamError::Exhausted { .. } | IpamError::Quota(_),
            )) => ErrorCode::AddressExhausted,
            NodeError::Pool(PoolError::Backend(error)) if error.is_retryable() => {
                ErrorCode::TryAgainLater
            }
            NodeError::Pool(PoolError::Backend(_)) => ErrorCode::IpamBackend,
            NodeError::Pool(PoolError::Store(_)) => ErrorCode::StateStore,
            NodeError::Pool(PoolError::InvalidConfig(_)) => ErrorCode::InvalidNetworkConfig,
            NodeError::Datapath(DatapathError::NamespaceNotFound(_)) => ErrorCode::Namespace,
            NodeError::Datapath(DatapathError::Invalid(_)) => ErrorCode::InvalidNetworkConfig,
            NodeError::Datapath(_) => ErrorCode::Datapath,
            // Guessing the pool would risk the wrong subnet or security
            // groups; the runtime retries.
            NodeError::Kubernetes(_) => ErrorCode::TryAgainLater,
        };
        CniError::new(code, self.to_string())
    }
}

/// The nftables chains of this namespace that can shadow kube-proxy's
/// iptables rules (`None` without `nft`), or why they could not be read.
pub async fn nftables_shadowing() -> Result<Option<Vec<hulk_netns::NftFinding>>, String> {
    match tokio::task::spawn_blocking(hulk_netns::check_nftables).await {
        Ok(Ok(findings)) => Ok(findings),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// The node: pools, datapath and node network.
#[derive(Debug)]
pub struct Node<K> {
    pools: Arc<PoolManager>,
    datapath: Datapath<K>,
    network: NodeNetwork,
    default_pool: PoolKey,
    kubernetes: Option<KubeClient>,
}

impl<K: Kernel> Node<K> {
    /// A node serving pods from `default_pool` unless a request names its own.
    pub fn new(
        pools: Arc<PoolManager>,
        datapath: Datapath<K>,
        network: NodeNetwork,
        default_pool: PoolKey,
    ) -> Self {
        Node {
            pools,
            datapath,
            network,
            default_pool,
            kubernetes: None,
        }
    }

    /// Reads pods' pool annotations at ADD and the node's pods for
    /// [`Node::collect_dead_pods`] from `kubernetes`.
    pub fn with_kubernetes(mut self, kubernetes: KubeClient) -> Self {
        self.kubernetes = Some(kubernetes);
        self
    }

    /// Whether pods are read from the Kubernetes API.
    pub fn has_kubernetes(&self) -> bool {
        self.kubernetes.is_some()
    }

    /// The node network.
    pub fn network(&self) -> &NodeNetwork {
        &self.network
    }

    /// The pools.
    pub fn pools(&self) -> &Arc<PoolManager> {
        &self.pools
    }

    /// The datapath.
    pub fn datapath(&self) -> &Datapath<K> {
        &self.datapath
    }

    fn pod_network(&self, request: &PodRequest, lease: &Lease) -> Result<PodNetwork, NodeError> {
        let gateway = lease.gateway.ok_or_else(|| {
            NodeError::InvalidRequest(format!("lease {} has no gateway", lease.id))
        })?;
        Ok(PodNetwork {
            parent: self.network.parent.clone(),
            kind: self.network.kind,
            ifname: request.ifname.clone(),
            address: lease.address,
            gateway,
            gateway_mac: lease.gateway_mac.map(|mac| mac.octets()),
            mac: None,
            mtu: lease.mtu,
            service_path: Some(self.network.service_path()),
        })
    }

    /// ADD: an address, then the interface. A retried ADD (same container
    /// and interface) gets the same address, and an interface already built
    /// as it should be counts as success.
    pub async fn add(&self, request: &PodRequest) -> Result<PodAttachment, NodeError> {
        let netns = request.netns.as_deref().ok_or_else(|| {
            NodeError::InvalidRequest("ADD needs the pod's network namespace".into())
        })?;
        let (key, fixed_address) = self.placement_of(request).await?;
        let owner = request.owner();
        let lease = match fixed_address {
            Some(address) => self.pools.assign_address(&key, &owner, address).await?,
            None => self.pools.assign(&key, &owner).await?,
        };
        let spec = self.pod_network(request, &lease)?;
        match self.datapath.attach(netns, &spec).await {
            Ok(attached) => Ok(PodAttachment {
                lease,
                index: attached.index,
                mac: attached.mac,
                mtu: attached.mtu,
            }),
            // A retried ADD: the interface is already there as it should be.
            Err(DatapathError::InterfaceExists(ifname)) => {
                match self.datapath.check(netns, &spec).await {
                    Ok(attached) => Ok(PodAttachment {
                        lease,
                        index: attached.index,
                        mac: attached.mac,
                        mtu: attached.mtu,
                    }),
                    Err(_) => {
                        self.give_back(&key, &owner).await;
                        Err(DatapathError::InterfaceExists(ifname).into())
                    }
                }
            }
            Err(error) => {
                // The interface is rolled back; give the address back too.
                self.give_back(&key, &owner).await;
                Err(error.into())
            }
        }
    }

    /// The pool a pod's address comes from (the request's, its
    /// annotations', or the default) and the fixed address its annotations
    /// ask for, if any.
    async fn placement_of(
        &self,
        request: &PodRequest,
    ) -> Result<(PoolKey, Option<IpAddr>), NodeError> {
        if let Some(key) = &request.pool {
            return Ok((key.clone(), None));
        }
        let (Some(kubernetes), Some(name)) = (&self.kubernetes, &request.pod) else {
            return Ok((self.default_pool.clone(), None));
        };
        let Some(pod) = kubernetes.pod(name).await? else {
            tracing::warn!(pod = %name, "the Kubernetes API does not know the pod; default pool");
            return Ok((self.default_pool.clone(), None));
        };
        let key = pod
            .pool(&self.default_pool)
            .map_err(NodeError::InvalidRequest)?
            .unwrap_or_else(|| self.default_pool.clone());
        let fixed_address = pod.fixed_address().map_err(NodeError::InvalidRequest)?;
        Ok((key, fixed_address))
    }

    /// Returns a failed ADD's address to the pool (logged if that fails:
    /// reconciliation returns it later).
    async fn give_back(&self, key: &PoolKey, owner: &Owner) {
        if let Err(error) = self.pools.release(key, owner).await {
            tracing::error!(%error, "cannot return the address of a failed ADD");
        }
    }

    /// DEL: removes the interface and the host route, and returns the
    /// address. Whatever is already gone counts as done.
    pub async fn del(&self, request: &PodRequest) -> Result<(), NodeError> {
        let owner = request.owner();
        let held = self.pools.lease_of(&owner);
        let service_path = self.network.service_path();
        self.datapath
            .detach(
                request.netns.as_deref(),
                &request.ifname,
                held.as_ref().map(|lease| lease.address.addr()),
                Some(&service_path),
            )
            .await?;
        for key in self.pools.keys() {
            self.pools.release(&key, &owner).await?;
        }
        Ok(())
    }

    /// CHECK: the interface is as ADD built it.
    pub async fn check(&self, request: &PodRequest) -> Result<(), NodeError> {
        let netns = request.netns.as_deref().ok_or_else(|| {
            NodeError::InvalidRequest("CHECK needs the pod's network namespace".into())
        })?;
        let lease = self.pools.lease_of(&request.owner()).ok_or_else(|| {
            NodeError::InvalidRequest(format!(
                "no address is assigned to {}/{}",
                request.container_id, request.ifname
            ))
        })?;
        let spec = self.pod_network(request, &lease)?;
        self.datapath.check(netns, &spec).await?;
        Ok(())
    }

    /// GC of CNI network `cni_network`: tears down, at once, every attachment
    /// of that network holding an address that is not in `valid` (the
    /// runtime is the authority on its attachments). Attachments of other
    /// networks are not judged: GC is per network (CNI 1.1), and one node
    /// may serve several. Returns the owners released.
    pub async fn gc(
        &self,
        cni_network: Option<&str>,
        valid: &[Attachment],
    ) -> Result<Vec<Owner>, NodeError> {
        let valid: HashSet<(&str, &str)> = valid
            .iter()
            .map(|attachment| (attachment.container_id.as_str(), attachment.ifname.as_str()))
            .collect();
        let gone: Vec<Owner> = self
            .assigned_owners()
            .filter(|owner| {
                owner.cni_network.as_deref() == cni_network
                    && !valid.contains(&(owner.container_id.as_str(), owner.ifname.as_str()))
            })
            .collect();
        self.collect_all(gone).await
    }

    /// The owners of every address a pod holds, in every pool.
    fn assigned_owners(&self) -> impl Iterator<Item = Owner> {
        self.pools
            .records()
            .into_iter()
            .filter_map(|record| match record.state {
                AddressState::Assigned(owner) => Some(owner),
                _ => None,
            })
    }

    /// The periodic GC: tears down the attachments of pods the Kubernetes
    /// API no longer shows on this node (or shows finished), once missing
    /// on two passes in a row, since the API may lag behind a pod being
    /// created. Assignments without a pod name are kept: only the
    /// runtime's CNI GC can judge those. Without a Kubernetes client this
    /// does nothing.
    pub async fn collect_dead_pods(&self) -> Result<ReconcileReport, NodeError> {
        let Some(kubernetes) = &self.kubernetes else {
            return Ok(ReconcileReport::default());
        };
        let pods = kubernetes.live_pods_on(self.pools.node_name()).await?;
        let live: HashSet<(String, String)> = self
            .assigned_owners()
            .filter(|owner| {
                owner
                    .pod
                    .as_ref()
                    .is_none_or(|pod| pods.shows(pod, owner.pod_uid.as_deref()))
            })
            .map(|owner| (owner.container_id, owner.ifname))
            .collect();
        let missing = self.pools.find_missing(&live);
        let gone = missing.gone.into_iter().map(|(_, owner)| owner).collect();
        Ok(ReconcileReport {
            released: self.collect_all(gone).await?,
            suspected: missing.suspected,
        })
    }

    /// Tears down each owner's attachment as a DEL would (host route
    /// first, then the address, so the address is never reused while its
    /// old route stands). One failure does not stop the others; the first
    /// is returned after all were tried, and the next GC retries it.
    async fn collect_all(&self, owners: Vec<Owner>) -> Result<Vec<Owner>, NodeError> {
        let mut released = Vec::with_capacity(owners.len());
        let mut first_error = None;
        for owner in owners {
            match self.del(&PodRequest::teardown_of(&owner)).await {
                Ok(()) => {
                    self.pools.metrics().gc_releases.inc();
                    tracing::info!(
                        container = %owner.container_id,
                        ifname = %owner.ifname,
                        "garbage-collected a gone pod's attachment"
                    );
                    released.push(owner);
                }
                Err(error) => {
                    tracing::warn!(container = %owner.container_id, %error, "GC cannot tear down an attachment");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(released),
        }
    }

    /// Runs the periodic GC until `shutdown` turns true: every `interval`
    /// a pass of [`Node::collect_dead_pods`], and every tenth pass an
    /// orphan sweep of the backend (a list call, kept rare for large
    /// clusters).
    pub async fn run_collector(
        self: Arc<Self>,
        interval: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut passes: u64 = 0;
        while !*shutdown.borrow_and_update() {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = tokio::time::sleep(interval) => {}
            }
            passes += 1;
            match self.collect_dead_pods().await {
                Ok(report) if !report.released.is_empty() || !report.suspected.is_empty() => {
                    tracing::info!(
                        released = report.released.len(),
                        suspected = report.suspected.len(),
                        "GC pass"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "GC pass failed"),
            }
            if passes.is_multiple_of(10) {
                match self.pools.sweep_orphans().await {
                    Ok(sweep) if sweep == OrphanSweep::default() => {}
                    Ok(sweep) => tracing::warn!(?sweep, "the backend held addresses nobody knew"),
                    Err(error) => tracing::warn!(%error, "orphan sweep failed"),
                }
            }
        }
    }

    /// Releases the address `address` whatever pod holds it, and removes
    /// its host route: for a pod that vanished without DEL. Returns the
    /// owner, or `None` when no pod holds it.
    pub async fn release_address(&self, address: IpAddr) -> Result<Option<Owner>, NodeError> {
        let Some((_, owner)) = self.pools.holder_of(address) else {
            return Ok(None);
        };
        self.del(&PodRequest::teardown_of(&owner)).await?;
        Ok(Some(owner))
    }

    /// The node-level datapath compared with what the pods holding
    /// addresses need.
    pub async fn inspect(&self) -> Result<NodeState, NodeError> {
        let live: Vec<IpAddr> = self.pools.assigned_addresses();
        Ok(self.datapath.inspect_node(&self.network, &live).await?)
    }

    /// STATUS: error 51 when the node-level datapath is broken (host-side
    /// slave missing or down, node address gone: existing pods lose node
    /// and Service traffic), else 50 while a pool cannot serve ADDs
    /// (degraded after the backend refused to give addresses). Per-pod
    /// host routes are left out: they are in flux while ADDs run, and a
    /// flapping STATUS would mark the node's network not ready.
    pub async fn status(&self) -> Result<(), CniError> {
        let degraded: Vec<String> = self
            .pools
            .keys()
            .into_iter()
            .filter(|key| self.pools.stats(key).degraded)
            .map(|key| key.subnet)
            .collect();
        let pools_degraded = (!degraded.is_empty())
            .then(|| format!("address pools degraded: {}", degraded.join(", ")));
        let broken = match self.inspect().await {
            Ok(state) if !state.host_link_present => {
                Some(format!("{} is missing", self.network.host_link))
            }
            Ok(state) if !state.host_link_up => Some(format!("{} is down", self.network.host_link)),
            Ok(state) if !state.node_address_present => Some(format!(
                "the node address {} is not on {}",
                self.network.node_address, self.network.host_link
            )),
            Ok(_) => None,
            Err(error) => Some(format!("cannot inspect it: {error}")),
        };
        match (broken, pools_degraded) {
            (Some(problem), degraded) => {
                let mut message = format!(
                    "the node's datapath is broken ({problem}); `hulkctl reapply` repairs it"
                );
                if let Some(degraded) = degraded {
                    message = format!("{message}; {degraded}");
                }
                Err(CniError::new(
                    ErrorCode::PluginNotAvailableLimitedConnectivity,
                    message,
                ))
            }
            (None, Some(degraded)) => Err(CniError::new(ErrorCode::PluginNotAvailable, degraded)),
            (None, None) => Ok(()),
        }
    }

    /// Re-applies the node-level datapath (host slave, sysctls, a host
    /// route per pod holding an address) after a reboot or restart.
    pub async fn restore(&self) -> Result<RestoreReport, NodeError> {
        let live: Vec<IpAddr> = self.pools.assigned_addresses();
        Ok(self.datapath.restore_node(&self.network, &live).await?)
    }
}
