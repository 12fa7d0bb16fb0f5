//! The IPAM backend trait of hulk-vpc: pod addresses come from the cloud
//! VPC (OpenStack Neutron ports, an UltrON-style REST service, ...) through
//! [`IpamBackend`], as [`Lease`]s.
//!
//! # Example
//!
//! ```
//! use hulk_ipam::{AllocationRequest, IpamBackend, MemoryBackend, PoolKey};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let backend = MemoryBackend::new("10.20.0.0/29".parse().unwrap());
//! let key = PoolKey::new("vpc-net", "subnet-a", ["sg-web", "sg-base"], None);
//! let request = AllocationRequest::new(key, "node-1", 2);
//! let leases = backend.allocate(&request).await.unwrap();
//! assert_eq!(leases[0].address.to_string(), "10.20.0.2/29");
//! assert_eq!(leases[0].gateway, Some("10.20.0.1".parse().unwrap()));
//! backend.release(&leases[0].id).await.unwrap();
//! # });
//! ```

mod faults;
mod floating;
mod mac;
mod memory;

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use faults::{Fault, FaultPlan, Faulty, Latency};
pub use floating::{
    FloatingIp, FloatingIpHold, FloatingIpPolicy, FloatingIpProvider, FloatingIpRequest,
    MemoryFloatingIps,
};
pub use mac::{MacAddr, ParseMacError};
pub use memory::MemoryBackend;

/// What a pool is keyed by: addresses from one subnet with one set of
/// security groups and one QoS policy are interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PoolKey {
    /// The VPC network the subnet belongs to.
    pub network: String,
    /// The subnet addresses come from.
    pub subnet: String,
    /// Security groups, sorted and without duplicates.
    pub security_groups: Vec<String>,
    /// The QoS policy, if any.
    pub qos_policy: Option<String>,
}

impl PoolKey {
    /// A key; security groups are sorted and deduplicated so that the same
    /// set always names the same pool.
    pub fn new<S: Into<String>>(
        network: impl Into<String>,
        subnet: impl Into<String>,
        security_groups: impl IntoIterator<Item = S>,
        qos_policy: Option<String>,
    ) -> Self {
        let mut security_groups: Vec<String> =
            security_groups.into_iter().map(Into::into).collect();
        security_groups.sort();
        security_groups.dedup();
        PoolKey {
            network: network.into(),
            subnet: subnet.into(),
            security_groups,
            qos_policy,
        }
    }
}

/// A request for `count` addresses of one pool, owned by one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationRequest {
    /// Which pool.
    pub key: PoolKey,
    /// The node that will hold the addresses (e.g. Neutron `binding:host_id`).
    pub node: String,
    /// Extra tags to put on the backend resources.
    pub tags: Vec<String>,
    /// How many addresses; backends with a bulk call make one request.
    pub count: usize,
    /// One specific address (a pod's fixed IP), with `count` 1. Held by
    /// someone else: [`IpamError::Conflict`]; outside the subnet:
    /// [`IpamError::InvalidRequest`].
    pub address: Option<IpAddr>,
    /// The agent instance allocating, written as the new leases' first
    /// mark ([`Lease::marked_by`]): an address another instance allocated
    /// a moment ago is never taken for a dead predecessor's.
    pub marked_by: Option<InstanceMark>,
}

impl AllocationRequest {
    /// A request for any `count` free addresses, without extra tags.
    pub fn new(key: PoolKey, node: impl Into<String>, count: usize) -> Self {
        AllocationRequest {
            key,
            node: node.into(),
            tags: Vec::new(),
            count,
            address: None,
            marked_by: None,
        }
    }

    /// A request for exactly `address`, without extra tags.
    pub fn for_address(key: PoolKey, node: impl Into<String>, address: IpAddr) -> Self {
        AllocationRequest {
            address: Some(address),
            ..Self::new(key, node, 1)
        }
    }

    /// Refuses a request no backend can serve: no address, or a specific
    /// address with a count other than 1. `most` caps the count.
    pub fn validate(&self, most: usize) -> Result<(), IpamError> {
        if self.count == 0 || self.count > most {
            return Err(IpamError::InvalidRequest(format!(
                "count must be 1 to {most}, not {}",
                self.count
            )));
        }
        if let Some(address) = self.address
            && self.count != 1
        {
            return Err(IpamError::InvalidRequest(format!(
                "a request for {address} must have count 1, not {}",
                self.count
            )));
        }
        Ok(())
    }
}

/// The tag every resource hulk-vpc creates carries, so it can be found and
/// swept even when nothing else remembers it.
pub const MANAGED_TAG: &str = "hulk-vpc";

/// The tag naming the node that holds a resource.
pub fn node_tag(node: &str) -> String {
    format!("hulk-node={node}")
}

/// The tag naming the cluster a resource belongs to.
pub fn cluster_tag(cluster: &str) -> String {
    format!("hulk-cluster={cluster}")
}

/// Which pod interface holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// `CNI_CONTAINERID` (the pod sandbox).
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `namespace/name` of the pod, when known.
    pub pod: Option<String>,
    /// The CNI network (configuration `name`) of the attachment, when
    /// known. CNI GC is per network: one network's GC must not judge
    /// another's attachments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_network: Option<String>,
    /// The pod's UID, when known: a pod recreated under the same name (a
    /// StatefulSet's) is another pod, and does not keep the old one's
    /// addresses alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl Owner {
    /// The owner of `container_id`'s interface `ifname`, nothing else
    /// known yet (pod, CNI network and UID are filled in as learned).
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Owner {
            container_id: container_id.into(),
            ifname: ifname.into(),
            pod: None,
            cni_network: None,
            pod_uid: None,
        }
    }

    /// The identity of this owner's attachment.
    pub fn attachment_id(&self) -> AttachmentId {
        AttachmentId {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// One attachment's identity: `CNI_CONTAINERID` and `CNI_IFNAME`, the key
/// the CNI specification gives plugin state (and CNI GC's
/// `cni.dev/valid-attachments` lists). Shown as `container/ifname`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttachmentId {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl std::fmt::Display for AttachmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// Which agent instance wrote a lease's holder mark, and when: how a
/// second agent started under a node name another agent still serves is
/// detected, with or without Kubernetes. A live agent writes its mark on
/// every address it allocates or hands to a pod, and refreshes one of
/// them periodically (hulk-pool's heartbeat); an agent that finds marks of
/// another instance younger than a few heartbeats refuses to adopt them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstanceMark {
    /// The agent's instance id (its host name and random bits, kept across
    /// restarts of the same machine).
    pub instance: String,
    /// When the mark was written: seconds since the Unix epoch, by the
    /// writer's clock (ages of minutes are compared, so clocks kept by NTP
    /// agree well enough).
    pub at_unix: u64,
    /// How long after `at_unix` the writer, silent, counts as gone
    /// (seconds; three of its heartbeats). A reader takes the longer of
    /// this and its own horizon, so that an agent with a short heartbeat
    /// never takes a slower live agent for a dead one. 0: not said.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub alive_for_secs: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl InstanceMark {
    /// `instance`'s mark, written at `at_unix`.
    pub fn new(instance: impl Into<String>, at_unix: u64) -> Self {
        InstanceMark {
            instance: instance.into(),
            at_unix,
            alive_for_secs: 0,
        }
    }

    /// The mark, saying its writer counts as alive for `alive_for` after
    /// writing it (whole seconds).
    pub fn alive_for(mut self, alive_for: std::time::Duration) -> Self {
        self.alive_for_secs = alive_for.as_secs();
        self
    }

    /// How old the mark is at `now_unix` (seconds since the Unix epoch);
    /// zero for a mark from the future (a writer's clock ahead of ours).
    pub fn age(&self, now_unix: u64) -> std::time::Duration {
        std::time::Duration::from_secs(now_unix.saturating_sub(self.at_unix))
    }
}

/// Which resources [`IpamBackend::list`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListScope {
    /// Those held by one node.
    Node(String),
    /// Everything this cluster created.
    Cluster,
}

/// An address handed out by a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The backend's resource id (e.g. the Neutron port id).
    pub id: String,
    /// The address with the subnet's prefix length.
    pub address: IpNet,
    /// The VPC network of the address; empty when the backend does not
    /// say.
    #[serde(default)]
    pub network: String,
    /// The subnet of the address; empty when the backend does not say.
    #[serde(default)]
    pub subnet: String,
    /// The subnet gateway.
    pub gateway: Option<IpAddr>,
    /// The MAC address the backend bound to the address, if any.
    pub mac: Option<MacAddr>,
    /// The MTU of the VPC network, if the backend knows it.
    pub mtu: Option<u32>,
    /// The MAC address of the gateway, for a static neighbour entry.
    pub gateway_mac: Option<MacAddr>,
    /// Security groups actually applied.
    pub security_groups: Vec<String>,
    /// QoS policy actually applied.
    pub qos_policy: Option<String>,
    /// The node holding the address.
    pub node: String,
    /// The pod interface holding it; `None` while it idles in a pool.
    pub owner: Option<Owner>,
    /// The agent instance that last wrote this lease's mark (allocation or
    /// [`IpamBackend::update_owner`]), when the backend keeps it; `None`
    /// for leases marked by agents older than instance marks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marked_by: Option<InstanceMark>,
}

impl Lease {
    /// The pool the address belongs to, when the backend named its
    /// network and subnet.
    pub fn pool_key(&self) -> Option<PoolKey> {
        if self.network.is_empty() || self.subnet.is_empty() {
            return None;
        }
        Some(PoolKey::new(
            self.network.clone(),
            self.subnet.clone(),
            self.security_groups.clone(),
            self.qos_policy.clone(),
        ))
    }
}

/// Why a backend call failed, in terms a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The subnet has no free address.
    #[error("subnet {subnet} has no free address")]
    Exhausted {
        /// The subnet.
        subnet: String,
    },
    /// The project's quota is used up.
    #[error("quota exceeded: {0}")]
    Quota(String),
    /// The backend asks to slow down.
    #[error("throttled by the backend (retry after {retry_after:?})")]
    Throttled {
        /// How long the backend asked to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A concurrent change won (e.g. a stale revision).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Credentials were refused.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A network or server failure that may pass.
    #[error("transient backend failure: {0}")]
    Transient(String),
    /// The request itself is wrong; retrying will not help.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The backend answered something unreadable.
    #[error("unexpected answer from the backend: {0}")]
    Protocol(String),
}

impl IpamError {
    /// Whether the same call may succeed later without any change.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            IpamError::Throttled { .. }
                | IpamError::Transient(_)
                | IpamError::Conflict(_)
                | IpamError::Protocol(_)
        )
    }
}

/// A source of VPC addresses. Object-safe: use it as `Arc<dyn IpamBackend>`.
///
/// With the `mock` feature, mockall generates `MockIpamBackend`.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait::async_trait]
pub trait IpamBackend: Send + Sync {
    /// A short name for logs and metrics (`neutron`, `ultron`, `memory`).
    fn name(&self) -> &str;

    /// Allocates `request.count` addresses; all or none. A client should
    /// hand over whatever the service answered, even when it is not that
    /// (fewer, more, repeated or foreign leases): dropping an answer leaks
    /// the addresses in it, while a caller such as hulk-pool checks every
    /// lease, keeps what it can use and returns the rest.
    async fn allocate(&self, request: &AllocationRequest) -> Result<Vec<Lease>, IpamError>;

    /// Releases a lease by its id; releasing an unknown id is `NotFound`.
    async fn release(&self, id: &str) -> Result<(), IpamError>;

    /// Records which pod interface holds a lease (`None`: back in the
    /// pool), and which agent instance says so (`marked_by`, kept as given,
    /// `None` included; see [`InstanceMark`]).
    async fn update_owner(
        &self,
        id: &str,
        owner: Option<Owner>,
        marked_by: Option<InstanceMark>,
    ) -> Result<Lease, IpamError>;

    /// Every lease this node or cluster holds, for reconciliation.
    async fn list(&self, scope: &ListScope) -> Result<Vec<Lease>, IpamError>;

    /// Checks that the backend answers.
    async fn health(&self) -> Result<(), IpamError>;

    /// Brings node-level state the backend keeps for `node` in line with
    /// `held`, every address the node holds (idle, cooling down or a
    /// pod's; neither those being released nor those the cloud took
    /// back). Called after each orphan sweep, so at start and
    /// periodically. The Neutron backend in nested mode makes the node
    /// port's allowed address pairs equal `held`'s addresses (see
    /// `hulk_openstack::NodePort`); backends without node-level state do
    /// nothing (the default).
    ///
    /// # Errors
    ///
    /// The backend's calls failed; what was changed until then stays.
    async fn reconcile_node(&self, node: &str, held: &[Lease]) -> Result<(), IpamError> {
        let _ = (node, held);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_keys_ignore_security_group_order_and_duplicates() {
        let a = PoolKey::new("n", "s", ["b", "a", "b"], None);
        let b = PoolKey::new("n", "s", ["a", "b"], None);
        assert_eq!(a, b);
        assert_ne!(a, PoolKey::new("n", "s", ["a"], None));
    }

    #[test]
    fn only_passing_failures_are_retryable() {
        assert!(IpamError::Throttled { retry_after: None }.is_retryable());
        assert!(IpamError::Transient("reset".into()).is_retryable());
        assert!(!IpamError::Exhausted { subnet: "s".into() }.is_retryable());
        assert!(!IpamError::InvalidRequest("bad".into()).is_retryable());
    }

    #[test]
    fn the_trait_is_object_safe() {
        let backend: std::sync::Arc<dyn IpamBackend> =
            std::sync::Arc::new(MemoryBackend::new("10.0.0.0/30".parse().unwrap()));
        assert_eq!(backend.name(), "memory");
    }
}
