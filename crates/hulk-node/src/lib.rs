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
//!   Kubernetes; [`Node::collect_unproven_addresses`]: the same for the
//!   addresses the pools assign without an attachment record (adopted
//!   from the cloud's marks after a lost state file or by a replacement
//!   node), judged by whether a live interface holds them;
//!   [`Node::replay_del_notes`]: the DELs the plugin did while the agent
//!   was down ([`hulk_agent_api::del_notes`]).
//! - [`Node::restore`]: after a reboot or an agent restart, re-applies the
//!   node-level datapath for the pods that still hold addresses (a
//!   record-less address once a live interface is found holding it).
//! - [`NodeError::to_cni`]: the mapping to CNI codes (11 try again later,
//!   102 exhausted, 104 datapath, 105 namespace, ...), the cause chain in
//!   the error's `details`.
//! - [`pods::PodDirectory`]: where the node learns about pods (the agent
//!   implements it over the Kubernetes API).
//! - [`Node::with_floating_ips`]: a floating IP associated at ADD with the
//!   address of a pod that asks (annotation `hulk-vpc.io/floating-ip`, or
//!   the node's network), recorded, given up per its policy before the
//!   address goes back ([`FloatingIps`]).
//!
//! One file per operation: `add.rs`, `del.rs`, `check.rs`, `floating.rs`, `collect.rs`
//! (CNI GC, dead pods, gone sandboxes, DEL notes, the collector),
//! `restore.rs` (inspect, STATUS, restore, reapply).
//!
//! # Example
//!
//! ```no_run
//! use std::path::PathBuf;
//! use std::sync::Arc;
//! use hulk_ipam::{MemoryBackend, Owner, PoolKey};
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
//!     netns: Some(PathBuf::from("/var/run/netns/5f2c")),
//!     ..PodRequest::new(Owner {
//!         pod: Some("default/web-0".into()),
//!         cni_network: Some("vpc".into()),
//!         ..Owner::new("5f2c", "eth0")
//!     })
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
use hulk_ipam::{
    AttachmentId, FloatingIpPolicy, FloatingIpProvider, IpamError, Lease, MacAddr, Owner, PoolKey,
};
use hulk_netns::{
    Attached, Datapath, DatapathError, Kernel, NodeNetwork, NodeState, NsId, Ownership, PodNetwork,
    RestoreReport,
};
use hulk_pool::{AddressState, OrphanSweep, PoolError, PoolManager, ReconcileReport};
use tokio_util::sync::CancellationToken;

pub use hulk_agent_api::{DEFAULT_CALLER_TIMEOUT, PodAttachment, PodRequest};

use crate::attachments::{AttachmentError, AttachmentRecord, Attachments, Phase};
use crate::pods::{PodDirectory, PodDirectoryError, PodEvent, PodInfo};
use crate::serial::Serializer;

mod add;
pub mod attachments;
mod check;
mod collect;
mod del;
mod floating;
pub mod pods;
mod restore;
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
    /// The pod's floating IP could not be associated at ADD, or given up
    /// (released or disassociated, per its policy) at teardown; a
    /// teardown keeps the address until it is.
    #[error("cannot {action} the pod's floating IP")]
    FloatingIp {
        /// `associate`, `give up` or `sweep`.
        action: &'static str,
        /// The provider's error.
        #[source]
        source: IpamError,
    },
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
            // Another agent serves this node name: this one is stopping.
            PoolError::HeldElsewhere(_) => codes::AGENT_UNAVAILABLE,
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
            NodeError::FloatingIp { source, .. } => codes::of_ipam_error(source),
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
    /// Holders without an attachment record whose address no interface
    /// held on the last passes of [`Node::collect_unproven_addresses`],
    /// with how many passes in a row.
    unheld: Mutex<std::collections::HashMap<AttachmentId, u32>>,
    /// Addresses of holders without an attachment record that a live
    /// interface was last found holding, with the holder: the only
    /// record-less addresses the host routes to.
    proven: Mutex<std::collections::HashMap<IpAddr, AttachmentId>>,
    /// Attachments this agent process completed and answered: a second
    /// ADD of one is the caller's error (one an earlier process completed
    /// may never have been answered).
    answered: Mutex<HashSet<AttachmentId>>,
    del_notes: Option<DelNotes>,
    floating_ips: Option<FloatingIps>,
}

/// Where pods' floating IPs come from, and the node's settings for them
/// ([`Node::with_floating_ips`]).
#[derive(Clone)]
pub struct FloatingIps {
    /// The provider (Neutron's, in the agent).
    pub provider: Arc<dyn FloatingIpProvider>,
    /// The external network (name or id) every pod gets a floating IP of,
    /// unless its annotation says otherwise; `None`: only pods whose
    /// annotation names a network get one.
    pub network: Option<String>,
    /// The policy of pods whose annotation does not choose one.
    pub policy: FloatingIpPolicy,
}

impl std::fmt::Debug for FloatingIps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FloatingIps")
            .field("network", &self.network)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
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
    /// that cannot be read are logged and left out: their addresses are
    /// judged as those of any holder without a record
    /// ([`Node::collect_unproven_addresses`]).
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
            unheld: Mutex::default(),
            proven: Mutex::default(),
            answered: Mutex::default(),
            del_notes: None,
            floating_ips: None,
        }
    }

    /// Associates floating IPs with pods' addresses from `floating_ips`
    /// (pods asking with their annotation, or every pod when a network is
    /// configured); without this, a pod asking for one fails its ADD.
    pub fn with_floating_ips(mut self, floating_ips: FloatingIps) -> Self {
        self.floating_ips = Some(floating_ips);
        self
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
}
