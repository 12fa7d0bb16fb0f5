//! One pod interface as a CNI request names it, and what ADD built.

use std::net::IpAddr;
use std::path::PathBuf;

use hulk_cni::{CniResult, Interface, IpConfig, Route};
use hulk_ipam::{AttachmentId, Lease, MacAddr, Owner, PoolKey};
use hulk_netns::{Attached, default_destination};
use serde::{Deserialize, Serialize};

/// One pod interface, as a CNI request names it: the attachment's owner
/// (container id, interface, pod, CNI network, pod UID; flattened on the
/// wire) and what this request says beyond it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRequest {
    /// Who the attachment is: `CNI_CONTAINERID`, `CNI_IFNAME`, and the
    /// pod, CNI network and pod UID when the runtime gave them.
    #[serde(flatten)]
    pub owner: Owner,
    /// `CNI_NETNS`; DEL may come without it.
    pub netns: Option<PathBuf>,
    /// The pod's own pool (per-pod subnet, security groups, QoS), if any.
    pub pool: Option<PoolKey>,
    /// How long the caller waits for the answer (milliseconds), when it
    /// said: an ADD not finished by then is undone, since the runtime has
    /// given up on it and will not use the sandbox.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The address the runtime asks for (`IP=` in `CNI_ARGS`, or the
    /// `ips` capability: podman's `--ip`, `network reload`): served through
    /// the fixed-address path, or refused (never another address instead).
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// The MAC the runtime asks for (`MAC=` in `CNI_ARGS`, or the `mac`
    /// capability): given to a macvlan interface; an ipvlan interface
    /// shares its parent's MAC, so only that one can be honoured.
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

impl PodRequest {
    /// A request about `owner`'s attachment and nothing more: no namespace
    /// (DEL may come without one; a GC's or operator's DEL has none), the
    /// pool that holds it, no timeout, address or MAC asked for.
    pub fn new(owner: Owner) -> Self {
        PodRequest {
            owner,
            netns: None,
            pool: None,
            timeout_ms: None,
            address: None,
            mac: None,
        }
    }

    /// The attachment this request is about.
    pub fn attachment_id(&self) -> AttachmentId {
        self.owner.attachment_id()
    }
}

/// What ADD built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAttachment {
    /// The address and its subnet facts.
    pub lease: Lease,
    /// The interface's index in the pod.
    pub index: u32,
    /// The interface's MAC.
    pub mac: Option<MacAddr>,
    /// The interface's MTU.
    pub mtu: u32,
    /// Every route ADD installed in the pod (default route, the node's
    /// address, the Service ranges), with the metrics it chose; empty
    /// from an agent older than this field.
    #[serde(default)]
    pub routes: Vec<hulk_netns::Route>,
}

impl PodAttachment {
    /// What `attached` (the datapath's report) built with `lease`.
    pub fn of(lease: Lease, attached: &Attached) -> Self {
        PodAttachment {
            lease,
            index: attached.index,
            mac: attached.mac,
            mtu: attached.mtu,
            routes: attached.routes.clone(),
        }
    }
}

/// A pod route as the CNI result lists it: a next hop, or scope link
/// (253, CNI 1.1; older versions drop the scope) for a destination on the
/// link itself, and the metric as `priority` when ADD chose one.
fn cni_route(route: &hulk_netns::Route) -> Route {
    let mut listed = Route::new(route.dst, route.gateway);
    listed.priority = (route.metric > 0).then_some(route.metric);
    listed.scope = route.gateway.is_none().then_some(RT_SCOPE_LINK);
    listed
}

/// The kernel's `RT_SCOPE_LINK`.
const RT_SCOPE_LINK: u8 = 253;

impl PodAttachment {
    /// The CNI result of this attachment for interface `ifname` in
    /// `sandbox`: the interface, its address and every route ADD made.
    pub fn to_cni_result(&self, ifname: &str, sandbox: &std::path::Path) -> CniResult {
        let lease = &self.lease;
        let routes = if self.routes.is_empty() {
            lease
                .gateway
                .map(|gateway| Route::new(default_destination(gateway), Some(gateway)))
                .into_iter()
                .collect()
        } else {
            self.routes.iter().map(cni_route).collect()
        };
        CniResult {
            interfaces: vec![Interface {
                name: ifname.to_owned(),
                mac: self.mac.as_ref().map(MacAddr::to_string),
                mtu: Some(self.mtu),
                sandbox: Some(sandbox.display().to_string()),
                ..Interface::default()
            }],
            ips: vec![IpConfig {
                address: lease.address,
                gateway: lease.gateway,
                interface: Some(0),
            }],
            routes,
            dns: Default::default(),
        }
    }
}
