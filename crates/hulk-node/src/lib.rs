//! The hulk-vpc node: what the agent does for each CNI request, composing
//! the warm pool (addresses) and the datapath (interfaces), and the one
//! place where their failures become CNI error codes.
//!
//! The sandbox is the unit of truth: every attachment (container id and
//! interface) is recorded with its sandbox and what ADD built
//! ([`attachments`]) before ADD touches anything, and operations on one
//! attachment run one at a time.
//!
//! - [`Node::add`]: the record, an address from the pod's pool, then the
//!   interface; if the interface cannot be built, or the caller gave up,
//!   everything goes back. A retry after a crash mid-ADD rebuilds a
//!   half-built interface with the same address.
//! - [`Node::del`]: cancels an ADD in progress, then tears down exactly
//!   what the record says, in the recorded sandbox only, and returns the
//!   address; anything already gone counts as done.
//! - [`Node::collect_gone_sandboxes`]: the liveness pass, with or without
//!   Kubernetes; [`Node::replay_del_notes`]: the DELs the plugin did while
//!   the agent was down ([`del_notes`]).
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
//! use hulk_ipam::{MemoryBackend, PoolKey};
//! use hulk_netns::{Datapath, NetlinkKernel, NodeNetwork, SlaveKind};
//! use hulk_node::{Node, PodRequest};
//! use hulk_pool::{MemoryStore, PoolConfig, PoolManager, SystemClock};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pools = PoolManager::open(
//!     Arc::new(MemoryBackend::new("10.20.0.0/24".parse()?)),
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
//!     address: None,
//!     mac: None,
//! };
//! let attached = node.add(&pod).await?;
//! println!("{} on interface {}", attached.lease.address, attached.index);
//! node.del(&pod).await?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hulk_agent_api::codes;
use hulk_agent_api::del_notes::DelNotes;
use hulk_cni::{Attachment, CniError, ErrorCode};
use hulk_ipam::{AttachmentId, Lease, MacAddr, Owner, PoolKey};
use hulk_netns::{
    Attached, Datapath, DatapathError, Kernel, NodeNetwork, NodeState, NsId, Ownership, PodNetwork,
    RestoreReport,
};
use hulk_pool::{AddressState, OrphanSweep, PoolError, PoolManager, ReconcileReport};
use tokio_util::sync::CancellationToken;

pub use hulk_agent_api::{DEFAULT_CALLER_TIMEOUT, PodAttachment, PodRequest};

use crate::attachments::{AttachmentError, AttachmentRecord, Attachments, Phase};
use crate::pods::{PodDirectory, PodDirectoryError, PodEvent};
use crate::serial::Serializer;

pub mod attachments;
pub mod pods;
mod serial;
#[cfg(feature = "testing")]
pub mod testing;

/// When the agent stops working for `request`: a little before the
/// caller's own timeout (the request took time to arrive, and the answer
/// takes time to go back), or [`DEFAULT_CALLER_TIMEOUT`].
fn deadline(request: &PodRequest, received: Instant) -> Instant {
    let timeout = request
        .timeout_ms
        .map_or(DEFAULT_CALLER_TIMEOUT, Duration::from_millis);
    received + timeout.mul_f64(0.9)
}

/// How many liveness passes in a row must find an attachment's sandbox
/// gone before it is torn down: one pass could race a runtime that is
/// still setting the namespace up.
const GONE_PASSES: u32 = 2;

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
    /// The pod directory (Kubernetes) could not say which pool a pod
    /// wants or which pods live.
    #[error("cannot read the pods from Kubernetes")]
    Pods(#[from] PodDirectoryError),
    /// The attachment record could not be written.
    #[error(transparent)]
    Attachment(#[from] AttachmentError),
    /// ADD of an attachment that an earlier ADD completed, in the same
    /// sandbox, without a DEL between (the CNI spec requires an error).
    #[error("{0} is already attached (an earlier ADD built it); DEL it before adding it again")]
    AlreadyAttached(AttachmentId),
    /// The caller gave up (its timeout passed, or a DEL of the same
    /// attachment arrived) before ADD finished; what ADD did is undone.
    #[error("ADD of {id} undone: {reason}")]
    Abandoned {
        /// The attachment.
        id: AttachmentId,
        /// Why: the timeout, or the DEL.
        reason: &'static str,
    },
}

/// What [`Node::restore`] (at start) and [`Node::reapply`] (an
/// operator's `hulkctl reapply`) re-applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reapplied {
    /// The node-level datapath: host slave, sysctls, host routes.
    #[serde(flatten)]
    pub node: RestoreReport,
    /// Pods whose gateway neighbour entry was re-pinned to the MAC the
    /// cloud now reports.
    pub gateways_repinned: usize,
}

impl NodeError {
    /// The CNI error for this failure: the one mapping of the project.
    pub fn to_cni(&self) -> CniError {
        CniError::new(self.code(), self.to_string()).with_causes(self)
    }

    /// The CNI code of a pool failure, as [`NodeError::to_cni`] maps it.
    fn code_of_pool_error(error: &PoolError) -> ErrorCode {
        match error {
            PoolError::Degraded {
                exhausted: true, ..
            } => codes::ADDRESS_EXHAUSTED,
            PoolError::Empty { .. }
            | PoolError::Degraded { .. }
            | PoolError::Full { .. }
            | PoolError::AddressUnavailable { .. } => ErrorCode::TryAgainLater,
            PoolError::Backend(error) => codes::of_ipam_error(error),
            PoolError::Store(_) => codes::STATE_STORE,
            PoolError::InvalidConfig(_) => ErrorCode::InvalidNetworkConfig,
        }
    }

    fn code(&self) -> ErrorCode {
        match self {
            NodeError::InvalidRequest(_) => ErrorCode::InvalidNetworkConfig,
            NodeError::Pool(error) => Self::code_of_pool_error(error),
            NodeError::Datapath(
                DatapathError::NamespaceNotFound(_)
                | DatapathError::NotANamespace(..)
                | DatapathError::HostNamespace(_),
            ) => codes::NAMESPACE,
            NodeError::Datapath(DatapathError::Invalid(_)) => ErrorCode::InvalidNetworkConfig,
            NodeError::Datapath(_) => codes::DATAPATH,
            // A refused token or missing RBAC does not heal by retrying:
            // say it is the configuration.
            NodeError::Pods(PodDirectoryError::Refused(_)) => ErrorCode::InvalidNetworkConfig,
            // Guessing the pool would risk the wrong subnet or security
            // groups; the runtime retries.
            NodeError::Pods(_) => ErrorCode::TryAgainLater,
            NodeError::Attachment(_) => codes::STATE_STORE,
            NodeError::AlreadyAttached(_) => codes::DATAPATH,
            // Nothing is left of the ADD: a retry starts afresh.
            NodeError::Abandoned { .. } => ErrorCode::TryAgainLater,
        }
    }
}

/// What keeps the agent from serving ADDs although it runs: its store
/// cannot write (every ADD and DEL would fail with 106; the store reopens
/// its file before each try), or the backend refuses the node's
/// credentials (no refill can succeed). STATUS answers 50 with these, and
/// `/healthz` reports them (the agent's HTTP status endpoint).
pub fn agent_problems(pools: &PoolManager) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(reason) = pools.store().failing() {
        problems.push(format!("the pool store cannot write: {reason}"));
    }
    let backend = pools.backend_health();
    if backend.auth_failing {
        let last = backend
            .last_error
            .map_or_else(String::new, |failure| format!(": {}", failure.message));
        problems.push(format!(
            "the {} backend refuses the node's credentials{last}",
            pools.backend_name()
        ));
    }
    problems
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
    pods: Option<Arc<dyn PodDirectory>>,
    attachments: Attachments,
    serializer: Serializer,
    /// Attachments whose sandbox the last liveness pass found gone, with
    /// how many passes in a row did.
    gone: Mutex<std::collections::HashMap<AttachmentId, u32>>,
    /// Attachments this agent process completed and answered: a second
    /// ADD of one is the caller's error (one an earlier process completed
    /// may never have been answered).
    answered: Mutex<HashSet<AttachmentId>>,
    del_notes: Option<DelNotes>,
}

/// Whether a teardown touches the pod's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodSide {
    /// What the record says ADD built there: the recorded link, or for an
    /// ADD that never finished, our slave under the interface's name and
    /// our temporary links.
    Recorded,
    /// Nothing: ADD built nothing there.
    Untouched,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

impl<K: Kernel> Node<K> {
    /// A node serving pods from `default_pool` unless a request names its
    /// own, with the attachment records kept in `pools`' store. Records
    /// that cannot be read are logged and left out: without a record an
    /// attachment is never judged dead by the kernel, only by DEL and GC.
    pub fn new(
        pools: Arc<PoolManager>,
        datapath: Datapath<K>,
        network: NodeNetwork,
        default_pool: PoolKey,
    ) -> Self {
        let store = pools.store().clone();
        let attachments = Attachments::load(store.clone()).unwrap_or_else(|error| {
            tracing::error!(%error, "cannot read the attachment records; starting without them");
            Attachments::empty(store)
        });
        Node {
            pools,
            datapath,
            network,
            default_pool,
            pods: None,
            attachments,
            serializer: Serializer::default(),
            gone: Mutex::default(),
            answered: Mutex::default(),
            del_notes: None,
        }
    }

    /// Replays the notes the plugin leaves in `notes` when it tore a pod
    /// down while the agent was unreachable ([`Node::replay_del_notes`]).
    pub fn with_del_notes(mut self, notes: DelNotes) -> Self {
        self.del_notes = Some(notes);
        self
    }

    /// The attachment records.
    pub fn attachments(&self) -> &Attachments {
        &self.attachments
    }

    /// Reads pods' pool annotations at ADD and the node's pods for
    /// [`Node::collect_dead_pods`] from `pods` (the Kubernetes API, in the
    /// agent), and tells it why an ADD waits or fails.
    pub fn with_pods(mut self, pods: Arc<dyn PodDirectory>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Whether pods are known from a directory (Kubernetes).
    pub fn has_pods(&self) -> bool {
        self.pods.is_some()
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

    /// The MAC the pod's interface gets: the one the runtime asked for on
    /// macvlan; on ipvlan, where every slave shares the parent's MAC, a
    /// request for the parent's MAC is met by itself and any other is
    /// refused (7) rather than silently ignored.
    async fn requested_mac(&self, request: &PodRequest) -> Result<Option<MacAddr>, NodeError> {
        let Some(asked) = request.mac else {
            return Ok(None);
        };
        if matches!(self.network.kind, hulk_netns::SlaveKind::MacVlan { .. }) {
            return Ok(Some(asked));
        }
        let kernel = self.datapath.kernel();
        let parent = kernel
            .link(kernel.host(), &self.network.parent)
            .await
            .map_err(DatapathError::from)?
            .and_then(|link| link.mac);
        if parent == Some(asked) {
            return Ok(None);
        }
        Err(NodeError::InvalidRequest(format!(
            "MAC {} cannot be given: an ipvlan interface shares its parent's MAC ({}); use kind = \"macvlan\" for pod MACs",
            asked,
            parent
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), MacAddr::to_string)
        )))
    }

    fn pod_network(
        &self,
        request: &PodRequest,
        lease: &Lease,
        mac: Option<MacAddr>,
    ) -> Result<PodNetwork, NodeError> {
        let gateway = lease.gateway.ok_or_else(|| {
            NodeError::InvalidRequest(format!("lease {} has no gateway", lease.id))
        })?;
        Ok(PodNetwork {
            parent: self.network.parent.clone(),
            kind: self.network.kind,
            ifname: request.owner.ifname.clone(),
            address: lease.address,
            gateway,
            gateway_mac: lease.gateway_mac,
            mac,
            mtu: lease.mtu,
            service_path: Some(self.network.service_path()),
        })
    }

    /// ADD: records the attachment (its sandbox first, so every crash
    /// point leaves a record the next start can judge), takes an address,
    /// builds the interface and records what it built.
    ///
    /// - One operation at a time per attachment; a DEL of the same
    ///   attachment cancels an ADD still waiting for its address.
    /// - An ADD whose caller gave up ([`PodRequest::timeout_ms`] passed, or
    ///   the DEL) is undone, not completed into a sandbox nobody uses
    ///   ([`NodeError::Abandoned`], code 11).
    /// - A retried ADD after a crash or cancellation mid-ADD (record still
    ///   [`Phase::Adding`]) clears the half-built interface and builds it
    ///   again with the same address; an ADD of an attachment an earlier
    ///   ADD completed in the same sandbox is [`NodeError::AlreadyAttached`],
    ///   as the CNI spec requires.
    pub async fn add(&self, request: &PodRequest) -> Result<PodAttachment, NodeError> {
        let deadline = deadline(request, Instant::now());
        let netns = request.netns.as_deref().ok_or_else(|| {
            NodeError::InvalidRequest("ADD needs the pod's network namespace".into())
        })?;
        let id = request.attachment_id();
        let ticket = self.serializer.start_add(&id);
        let abandoned = |reason| NodeError::Abandoned {
            id: id.clone(),
            reason,
        };
        let _turn = tokio::select! {
            turn = self.serializer.turn(&id) => turn,
            () = ticket.cancelled.cancelled() => return Err(abandoned("a DEL of it arrived")),
            () = tokio::time::sleep_until(deadline.into()) => {
                return Err(abandoned("the caller's timeout passed while an earlier operation on it ran"));
            }
        };
        let netns_id = self.sandbox_identity(netns).await?;
        if let Some(done) = self.clear_earlier(request, netns, netns_id).await? {
            return Ok(done);
        }
        let mut record = AttachmentRecord {
            owner: request.owner.clone(),
            netns: netns.to_path_buf(),
            netns_id: Some(netns_id),
            phase: Phase::Adding,
            pool: None,
            address: None,
            created: None,
            since_ms: now_ms(),
        };
        self.attachments.put(record.clone())?;
        let assigned = tokio::select! {
            assigned = self.assign(request) => assigned,
            () = ticket.cancelled.cancelled() => Err(abandoned("a DEL of it arrived")),
            () = tokio::time::sleep_until(deadline.into()) => {
                Err(abandoned("the caller's timeout passed before an address was free"))
            }
        };
        let (key, lease) = match assigned {
            Ok(assigned) => assigned,
            Err(error) => {
                self.undo(&record).await;
                return Err(error);
            }
        };
        record.pool = Some(key.clone());
        record.address = Some(lease.address);
        if let Err(error) = self.attachments.put(record.clone()) {
            self.undo(&record).await;
            return Err(error.into());
        }
        let spec = match self
            .requested_mac(request)
            .await
            .and_then(|mac| self.pod_network(request, &lease, mac))
        {
            Ok(spec) => spec,
            Err(error) => {
                self.undo(&record).await;
                return Err(error);
            }
        };
        // Building the interface is not cancelled half-way (it takes
        // milliseconds, and a half-built interface is what a crash leaves):
        // the caller's giving up is checked once it is done.
        let attached = match self.datapath.attach(netns, &spec).await {
            Ok(attached) => attached,
            Err(error) => {
                // The datapath rolled its own steps back.
                self.undo(&record).await;
                return Err(error.into());
            }
        };
        record.created = Some(attached.clone());
        let gave_up = if ticket.cancelled.is_cancelled() {
            Some("a DEL of it arrived")
        } else if Instant::now() >= deadline {
            Some("the caller's timeout passed while the interface was built")
        } else {
            None
        };
        if let Some(reason) = gave_up {
            self.undo(&record).await;
            return Err(abandoned(reason));
        }
        record.phase = Phase::Ready;
        record.since_ms = now_ms();
        if let Err(error) = self.attachments.put(record.clone()) {
            self.undo(&record).await;
            return Err(error.into());
        }
        lock(&self.answered).insert(id.clone());
        Ok(PodAttachment::of(lease, &attached))
    }

    /// The pool and the address for `request`.
    /// The runtime's requested address (`IP=`, `ips`) and the pod's
    /// annotation must agree when both are given.
    async fn assign(&self, request: &PodRequest) -> Result<(PoolKey, Lease), NodeError> {
        let (key, annotated) = self.placement_of(request).await?;
        let fixed_address = match (request.address, annotated) {
            (Some(asked), Some(annotated)) if asked != annotated => {
                return Err(NodeError::InvalidRequest(format!(
                    "the runtime asks for {asked}, the pod's annotation for {annotated}"
                )));
            }
            (asked, annotated) => asked.or(annotated),
        };
        let owner = request.owner.clone();
        if fixed_address.is_none() && self.pools.stats(&key).idle == 0 {
            self.tell(
                request,
                PodEvent::AddressWaiting {
                    subnet: key.subnet.clone(),
                },
            );
        }
        let assigned = match fixed_address {
            Some(address) => self.pools.assign_address(&key, &owner, address).await,
            None => self.pools.assign(&key, &owner).await,
        };
        let lease = assigned.inspect_err(|error| {
            let message = hulk_cni::describe(error);
            let event = match NodeError::code_of_pool_error(error) {
                code if code == codes::ADDRESS_EXHAUSTED => {
                    Some(PodEvent::AddressExhausted { message })
                }
                ErrorCode::TryAgainLater => Some(PodEvent::CloudUnavailable { message }),
                _ => None,
            };
            if let Some(event) = event {
                self.tell(request, event);
            }
        })?;
        Ok((key, lease))
    }

    /// Tells the pod's owners `event` (a Kubernetes Event), in the
    /// background: an ADD never waits for it.
    fn tell(&self, request: &PodRequest, event: PodEvent) {
        let (Some(pods), Some(pod)) = (&self.pods, &request.owner.pod) else {
            return;
        };
        let (pods, pod) = (pods.clone(), pod.clone());
        tokio::spawn(async move { pods.record(&pod, event).await });
    }

    /// The identity of the sandbox at `netns`, refusing what is not one.
    async fn sandbox_identity(&self, netns: &Path) -> Result<NsId, NodeError> {
        match self.datapath.identify(netns).await? {
            Some(id) => Ok(id),
            None => Err(DatapathError::NamespaceNotFound(netns.to_path_buf()).into()),
        }
    }

    /// Before an ADD: what an earlier ADD of the same attachment left.
    /// - Of another sandbox: torn down as a DEL would.
    /// - Half-built in this sandbox (a crash or cancellation mid-ADD): the
    ///   interface is cleared (the address stays assigned and is reused).
    /// - Completed in this sandbox by this agent process, which answered
    ///   it: the spec's error for a second ADD.
    /// - Completed by an earlier agent process: that agent may have been
    ///   killed between recording the ADD and answering it, so the
    ///   runtime may never have seen the success. If the interface is
    ///   still as built, the recorded result is the answer (returned as
    ///   `Some`); if not, it is cleared and built again.
    async fn clear_earlier(
        &self,
        request: &PodRequest,
        netns: &Path,
        netns_id: NsId,
    ) -> Result<Option<PodAttachment>, NodeError> {
        let id = request.attachment_id();
        let Some(earlier) = self.attachments.get(&id) else {
            return Ok(None);
        };
        if earlier.netns_id != Some(netns_id) {
            tracing::info!(attachment = %id, "ADD in a new sandbox: tearing down the earlier one's");
            self.teardown(&earlier, PodSide::Recorded).await?;
            return Ok(None);
        }
        let ownership = match (&earlier.phase, &earlier.created) {
            (Phase::Ready, _) if lock(&self.answered).contains(&id) => {
                return Err(NodeError::AlreadyAttached(id));
            }
            (Phase::Ready, Some(created)) => {
                if let Some(done) = self.still_built(request, netns, created).await? {
                    tracing::info!(attachment = %id, "ADD repeated after an agent restart: answering what the earlier agent built");
                    lock(&self.answered).insert(id);
                    return Ok(Some(done));
                }
                Ownership::Recorded(created)
            }
            _ => Ownership::Unrecorded,
        };
        let cleared = self
            .datapath
            .detach_owned(Some(netns), &id.ifname, ownership, None)
            .await?;
        tracing::info!(attachment = %id, ?cleared, "rebuilding an interface an earlier ADD left half-built");
        Ok(None)
    }

    /// What an earlier ADD built, if the interface is still as it was.
    async fn still_built(
        &self,
        request: &PodRequest,
        netns: &Path,
        created: &Attached,
    ) -> Result<Option<PodAttachment>, NodeError> {
        let Some(lease) = self.pools.lease_of(&request.owner.clone()) else {
            return Ok(None);
        };
        let mac = self.requested_mac(request).await?;
        let spec = self.pod_network(request, &lease, mac)?;
        Ok(match self.datapath.check(netns, &spec).await {
            Ok(_) => Some(PodAttachment::of(lease, created)),
            Err(_) => None,
        })
    }

    /// Undoes a failed or abandoned ADD: the interface if ADD built it
    /// (a failed build rolled itself back, and whatever else is in the pod
    /// under that name is not ours), the address and the record. Logged on
    /// failure: the record stays, so a DEL, the liveness pass or the GC
    /// finishes it.
    async fn undo(&self, record: &AttachmentRecord) {
        let pod_side = if record.created.is_some() {
            PodSide::Recorded
        } else {
            PodSide::Untouched
        };
        if let Err(error) = self.teardown(record, pod_side).await {
            tracing::error!(attachment = %record.id(), %error, "cannot undo an ADD; DEL or GC will finish it");
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
        let (Some(pods), Some(name)) = (&self.pods, &request.owner.pod) else {
            return Ok((self.default_pool.clone(), None));
        };
        let Some(pod) = pods.pod(name).await? else {
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

    /// DEL: cancels an ADD of the same attachment still in progress, waits
    /// for it, then undoes exactly what ADD recorded: the host route, the
    /// interface in the recorded sandbox (only if that namespace is still
    /// there and still the same one, and only the link ADD built), the
    /// address and the record. The request's own `CNI_NETNS` is not
    /// trusted over the record. Without a record, only an address the pool
    /// still assigns to this attachment (from before records existed) is
    /// torn down, and only an ipvlan or macvlan slave is removed; with
    /// neither, nothing here is ours and nothing is touched. Whatever is
    /// already gone counts as done, so DEL can be repeated.
    pub async fn del(&self, request: &PodRequest) -> Result<(), NodeError> {
        let id = request.attachment_id();
        if self.serializer.cancel_add(&id) {
            tracing::info!(attachment = %id, "DEL during ADD: the ADD is cancelled and undone");
        }
        let _turn = self.serializer.turn(&id).await;
        match self.attachments.get(&id) {
            Some(record) => self.teardown(&record, PodSide::Recorded).await,
            None => self.del_unrecorded(request).await,
        }
    }

    async fn del_unrecorded(&self, request: &PodRequest) -> Result<(), NodeError> {
        let owner = request.owner.clone();
        let Some(held) = self.pools.lease_of(&owner) else {
            return Ok(());
        };
        let host_route = self.host_route(held.address.addr());
        self.datapath
            .detach_owned(
                request.netns.as_deref(),
                &request.owner.ifname,
                Ownership::Unrecorded,
                Some(&host_route),
            )
            .await?;
        self.release_everywhere(&owner).await
    }

    /// The host's route to a pod address through the host-side slave.
    fn host_route(&self, address: IpAddr) -> hulk_netns::Route {
        hulk_netns::Route::direct(ipnet::IpNet::from(address), &self.network.host_link)
    }

    async fn release_everywhere(&self, owner: &Owner) -> Result<(), NodeError> {
        for key in self.pools.keys() {
            self.pools.release(&key, owner).await?;
        }
        Ok(())
    }

    /// Tears one recorded attachment down: the host route first (the
    /// address must not be reused while its old route stands), then the
    /// interface in the recorded sandbox if that namespace still exists as
    /// recorded (a removed or recycled path means the interface died with
    /// the sandbox), then the address, then the record. A sandbox that
    /// cannot be inspected keeps its address: an address is never
    /// released while a live interface may hold it.
    async fn teardown(
        &self,
        record: &AttachmentRecord,
        pod_side: PodSide,
    ) -> Result<(), NodeError> {
        let host_route = record
            .created
            .as_ref()
            .and_then(|created| created.host_route.clone())
            .or_else(|| record.ip().map(|address| self.host_route(address)))
            .or_else(|| {
                self.pools
                    .lease_of(&record.owner)
                    .map(|lease| self.host_route(lease.address.addr()))
            });
        let netns = match pod_side {
            PodSide::Recorded => self
                .same_sandbox(record)
                .await?
                .then_some(record.netns.as_path()),
            PodSide::Untouched => None,
        };
        let ownership = match &record.created {
            Some(created) => Ownership::Recorded(created),
            None => Ownership::Unrecorded,
        };
        let detached = self
            .datapath
            .detach_owned(netns, &record.owner.ifname, ownership, host_route.as_ref())
            .await?;
        if let Some(foreign) = &detached.foreign_link_kept {
            tracing::warn!(attachment = %record.id(), link = %foreign, "left a link that is not ours in place");
        }
        self.release_everywhere(&record.owner).await?;
        self.attachments.remove(&record.id())?;
        lock(&self.answered).remove(&record.id());
        Ok(())
    }

    /// Whether the namespace at the record's path is still the recorded
    /// sandbox: `false` when the path is gone, is no namespace, or names
    /// another namespace now; an error when it cannot be told.
    async fn same_sandbox(&self, record: &AttachmentRecord) -> Result<bool, NodeError> {
        match self.datapath.identify(&record.netns).await {
            Ok(Some(found)) => Ok(record.netns_id.is_none_or(|recorded| recorded == found)),
            Ok(None) | Err(DatapathError::NotANamespace(..)) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// CHECK: the interface is as ADD built it, in the sandbox ADD built
    /// it in. Returns what is there, for a comparison with the runtime's
    /// `prevResult`.
    pub async fn check(&self, request: &PodRequest) -> Result<PodAttachment, NodeError> {
        let netns = request.netns.as_deref().ok_or_else(|| {
            NodeError::InvalidRequest("CHECK needs the pod's network namespace".into())
        })?;
        let id = request.attachment_id();
        let _turn = self.serializer.turn(&id).await;
        if let Some(record) = self.attachments.get(&id) {
            let found = self.sandbox_identity(netns).await?;
            if record.netns_id.is_some_and(|recorded| recorded != found) {
                return Err(DatapathError::Mismatch(vec![format!(
                    "{} is not the sandbox {id} was added to",
                    netns.display()
                )])
                .into());
            }
            if record.phase != Phase::Ready {
                return Err(DatapathError::Mismatch(vec![format!(
                    "the ADD of {id} did not finish"
                )])
                .into());
            }
        }
        let lease = self.pools.lease_of(&request.owner.clone()).ok_or_else(|| {
            NodeError::InvalidRequest(format!(
                "no address is assigned to {}/{}",
                request.owner.container_id, request.owner.ifname
            ))
        })?;
        let mac = self.requested_mac(request).await?;
        let spec = self.pod_network(request, &lease, mac)?;
        let found = self.datapath.check(netns, &spec).await?;
        let mut checked = PodAttachment::of(lease, &found);
        // The routes as ADD chose them (metrics included), when recorded.
        if let Some(created) = self.attachments.get(&id).and_then(|record| record.created) {
            checked.routes = created.routes;
        }
        Ok(checked)
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
        // The spec's `cni.dev/attachments` entries, as the node names them.
        let valid: HashSet<AttachmentId> = valid
            .iter()
            .map(|attachment| AttachmentId {
                container_id: attachment.container_id.clone(),
                ifname: attachment.ifname.clone(),
            })
            .collect();
        let gone: Vec<Owner> = self
            .assigned_owners()
            .filter(|owner| {
                owner.cni_network.as_deref() == cni_network
                    && !valid.contains(&owner.attachment_id())
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
        let Some(pods) = &self.pods else {
            return Ok(ReconcileReport::default());
        };
        let pods = pods.live_pods().await?;
        let live: HashSet<AttachmentId> = self
            .assigned_owners()
            .filter(|owner| {
                owner
                    .pod
                    .as_ref()
                    .is_none_or(|pod| pods.shows(pod, owner.pod_uid.as_deref()))
            })
            .map(|owner| owner.attachment_id())
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
            match self.del(&PodRequest::new(owner.clone())).await {
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

    /// The liveness pass: an attachment whose sandbox is gone (its netns
    /// path removed, no namespace, or another namespace now) on
    /// two passes in a row is torn down and its address goes
    /// back, with or without Kubernetes: a runtime that lost its DEL
    /// (agent down, runtime crashed) never strands an address, and a pod's
    /// old sandbox does not keep one because the pod lives on in a newer
    /// sandbox. Attachments with an ADD in progress are not judged.
    /// Returns the attachments torn down; one failure does not stop the
    /// others (the first is returned after all were tried).
    pub async fn collect_gone_sandboxes(&self) -> Result<Vec<AttachmentId>, NodeError> {
        let mut gone_now = std::collections::HashMap::new();
        let mut due = Vec::new();
        for record in self.attachments.all() {
            let id = record.id();
            if self.serializer.adding(&id) {
                continue;
            }
            match self.same_sandbox(&record).await {
                Ok(true) => {}
                Ok(false) => {
                    let passes = self.gone_passes(&id) + 1;
                    if passes >= GONE_PASSES {
                        due.push(id);
                    } else {
                        gone_now.insert(id, passes);
                    }
                }
                Err(error) => {
                    // Cannot tell: keep the address, judge again next pass.
                    tracing::warn!(attachment = %id, %error, "cannot inspect the sandbox");
                }
            }
        }
        *lock(&self.gone) = gone_now;
        let mut collected = Vec::with_capacity(due.len());
        let mut first_error = None;
        for id in due {
            let _turn = self.serializer.turn(&id).await;
            // Judged again under the lock: a retried ADD may have replaced
            // the record in a new sandbox since.
            let Some(record) = self.attachments.get(&id) else {
                continue;
            };
            let result = match self.same_sandbox(&record).await {
                Ok(false) => self.teardown(&record, PodSide::Recorded).await,
                Ok(true) => continue,
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => {
                    self.pools.metrics().gc_releases.inc();
                    tracing::info!(attachment = %id, netns = %record.netns.display(), "sandbox gone: attachment torn down");
                    collected.push(id);
                }
                Err(error) => {
                    tracing::warn!(attachment = %id, %error, "cannot tear down a gone sandbox's attachment");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(collected),
        }
    }

    fn gone_passes(&self, id: &AttachmentId) -> u32 {
        lock(&self.gone).get(id).copied().unwrap_or(0)
    }

    /// Replays the DELs the plugin noted while the agent was unreachable
    /// ([`Node::with_del_notes`]): each is done as a DEL would be, and its
    /// note removed. A note older than the attachment's latest ADD is
    /// stale (the container was added again since) and only removed.
    /// Returns how many DELs were replayed; a failed one keeps its note
    /// for the next pass.
    pub async fn replay_del_notes(&self) -> usize {
        let Some(notes) = &self.del_notes else {
            return 0;
        };
        let listed = match notes.list() {
            Ok(listed) => listed,
            Err(error) => {
                tracing::warn!(%error, dir = %notes.dir().display(), "cannot read the DEL notes");
                return 0;
            }
        };
        let mut replayed = 0;
        for note in listed {
            let id = note.request.attachment_id();
            let stale = self
                .attachments
                .get(&id)
                .is_some_and(|record| record.since_ms > note.written_ms);
            if !stale {
                if let Err(error) = self.del(&note.request).await {
                    tracing::warn!(attachment = %id, %error, "replaying a DEL note failed; retried next pass");
                    continue;
                }
                replayed += 1;
                tracing::info!(attachment = %id, "replayed a DEL made while the agent was down");
            }
            if let Err(error) = notes.remove(&note) {
                tracing::warn!(attachment = %id, %error, "cannot remove a replayed DEL note");
            }
        }
        replayed
    }

    /// Runs the periodic GC until `shutdown` is cancelled: every `interval`
    /// the DEL notes ([`Node::replay_del_notes`]), a liveness pass
    /// ([`Node::collect_gone_sandboxes`]), a pass of
    /// [`Node::collect_dead_pods`], and every tenth pass an
    /// orphan sweep of the backend (a list call, kept rare for large
    /// clusters); every pass while the pools have intents a start could
    /// not settle without the backend
    /// ([`PoolManager::unsettled_intents`]).
    pub async fn run_collector(
        self: Arc<Self>,
        interval: std::time::Duration,
        shutdown: CancellationToken,
    ) {
        let mut passes: u64 = 0;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            passes += 1;
            self.replay_del_notes().await;
            match self.collect_gone_sandboxes().await {
                Ok(collected) if !collected.is_empty() => {
                    tracing::info!(collected = collected.len(), "liveness pass");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "liveness pass failed"),
            }
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
            // Intents a start could not settle without the backend are
            // settled by a sweep: sweep every pass until they are.
            if passes.is_multiple_of(10) || self.pools.unsettled_intents() > 0 {
                match self.pools.sweep_orphans().await {
                    Ok(sweep) if sweep == OrphanSweep::default() => {}
                    Ok(sweep) => tracing::warn!(?sweep, "the store and the backend disagreed"),
                    Err(error) => tracing::warn!(%error, "orphan sweep failed"),
                }
                self.repin_gateways().await;
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
        self.del(&PodRequest::new(owner.clone())).await?;
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
        let mut unavailable: Vec<String> = (!degraded.is_empty())
            .then(|| format!("address pools degraded: {}", degraded.join(", ")))
            .into_iter()
            .collect();
        unavailable.extend(agent_problems(&self.pools));
        let pools_degraded = (!unavailable.is_empty()).then(|| unavailable.join("; "));
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
    /// route per pod holding an address) after a reboot or restart, and
    /// re-pins running pods' gateway entries to what the pools now know
    /// ([`Node::repin_gateways`]).
    pub async fn restore(&self) -> Result<Reapplied, NodeError> {
        let live: Vec<IpAddr> = self.pools.assigned_addresses();
        let node = self.datapath.restore_node(&self.network, &live).await?;
        Ok(Reapplied {
            node,
            gateways_repinned: self.repin_gateways().await,
        })
    }

    /// An operator's re-apply (`hulkctl reapply`): first what the cloud
    /// now says of this node's addresses (the orphan sweep, which
    /// refreshes lease facts such as the gateway's MAC; a cloud that does
    /// not answer is logged and what is known is applied), then
    /// [`Node::restore`].
    pub async fn reapply(&self) -> Result<Reapplied, NodeError> {
        if let Err(error) = self.pools.sweep_orphans().await {
            tracing::warn!(%error, "cannot refresh what the backend says of this node's addresses");
        }
        self.restore().await
    }

    /// Re-pins the gateway's permanent neighbour entry in every ready
    /// attachment whose pinned MAC is not the one its lease now carries
    /// (the orphan sweep refreshes lease facts from the cloud: at start,
    /// every tenth collector pass, and on `hulkctl reapply`). Each under
    /// its attachment's turn, so it never races the attachment's DEL, and
    /// only on the recorded link in the recorded sandbox; the record is
    /// updated to what is pinned. Returns how many pods were re-pinned;
    /// failures are logged and retried on the next call.
    pub async fn repin_gateways(&self) -> usize {
        let mut repinned = 0;
        for record in self.attachments.all() {
            if self.gateway_to_pin(&record).is_none() {
                continue;
            }
            let id = record.id();
            let _turn = self.serializer.turn(&id).await;
            // Judged again under the turn: a DEL or a new ADD may have
            // changed the record meanwhile.
            let Some(mut record) = self.attachments.get(&id) else {
                continue;
            };
            let Some((gateway, mac)) = self.gateway_to_pin(&record) else {
                continue;
            };
            let Some(created) = record.created.as_mut() else {
                continue;
            };
            match self
                .datapath
                .repin_gateway(&record.netns, &record.owner.ifname, created, gateway, mac)
                .await
            {
                Ok(Some(entry)) => {
                    created.neighbours.retain(|known| known.ip != gateway);
                    created.neighbours.push(entry);
                    if let Err(error) = self.attachments.put(record) {
                        tracing::warn!(attachment = %id, %error, "cannot record the re-pinned gateway");
                    }
                    tracing::info!(attachment = %id, %gateway, "gateway entry re-pinned to the MAC the cloud reports");
                    repinned += 1;
                }
                // The sandbox or its interface is gone: the liveness pass
                // and DEL take it from here.
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(attachment = %id, %error, "cannot re-pin the pod's gateway entry");
                }
            }
        }
        repinned
    }

    /// The gateway and MAC a ready attachment should have pinned, when it
    /// has another (or none) pinned: its lease's, as the pools know it.
    fn gateway_to_pin(&self, record: &AttachmentRecord) -> Option<(IpAddr, MacAddr)> {
        if record.phase != Phase::Ready {
            return None;
        }
        let created = record.created.as_ref()?;
        let lease = self.pools.lease_of(&record.owner)?;
        let gateway = lease.gateway?;
        let mac = lease.gateway_mac?;
        let pinned = created
            .neighbours
            .iter()
            .find(|entry| entry.ip == gateway)
            .and_then(|entry| entry.mac);
        (pinned != Some(mac)).then_some((gateway, mac))
    }
}
