//! Network namespaces and the pod datapath of hulk-vpc, over rtnetlink.
//!
//! A netlink socket belongs to the namespace it was created in, and
//! `setns(2)` changes the namespace of the calling *thread*. Entering a pod's
//! namespace from a tokio worker would leak that namespace into every other
//! task scheduled there. So a [`NetlinkWorker`] owns one dedicated OS thread
//! that enters the namespace once, creates its own rtnetlink connection
//! there, and runs the jobs sent to it on a local single-threaded runtime.
//!
//! The datapath logic is written against the [`Kernel`] trait;
//! [`NetlinkKernel`] is the real kernel.
//!
//! # Example
//!
//! ```no_run
//! use std::path::Path;
//!
//! use hulk_netns::{Datapath, MacAddr, NetlinkKernel, Ownership, PodNetwork, SlaveKind};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let datapath = Datapath::new(NetlinkKernel::new()?);
//! let pod = PodNetwork {
//!     parent: "eth1".into(),
//!     kind: SlaveKind::default(), // ipvlan l2
//!     ifname: "eth0".into(),
//!     address: "10.20.0.5/24".parse()?,
//!     gateway: "10.20.0.1".parse()?,
//!     gateway_mac: Some(MacAddr([0xfa, 0x16, 0x3e, 0x00, 0x00, 0x01])),
//!     mac: None,
//!     mtu: None,
//!     service_path: None,
//! };
//! let netns = Path::new("/var/run/netns/pod-1");
//! // Everything ADD made, to keep (it serializes) for DEL and GC.
//! let attached = datapath.attach(netns, &pod).await?;
//! println!("eth0 is interface {} in the pod", attached.index);
//! datapath.check(netns, &pod).await?;
//! // DEL removes eth0 only if it is still that link in that namespace.
//! let detached = datapath
//!     .detach_owned(
//!         Some(netns),
//!         "eth0",
//!         Ownership::Recorded(&attached),
//!         attached.host_route.as_ref(),
//!     )
//!     .await?;
//! assert!(detached.foreign_link_kept.is_none());
//! # Ok(())
//! # }
//! ```

mod attach;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod kernel;
mod netlink;
mod netns;
mod nftables;
mod node;
mod sandboxes;

pub use attach::{
    Attached, Datapath, DatapathError, Detached, Ownership, PodNetwork, ServicePath,
    default_destination,
};
pub use kernel::{
    IpVlanFlag, IpVlanMode, Kernel, KernelError, Link, LinkUpdate, MacAddr, MacVlanMode, Neighbour,
    NsId, Route, SlaveKind,
};
pub use netlink::NetlinkKernel;
pub use netns::{
    NETNS_RUN_DIR, NetlinkWorker, Netns, NetnsError, PROCESS_NETNS, create_named_netns,
    delete_named_netns, identify_netns, link_by_name, run_blocking_in,
};
pub use nftables::{NftFinding, check_nftables, nftables_shadowing};
pub use node::{NodeNetwork, NodeState, RestoreReport};

/// Re-exported so users build requests with the same rtnetlink version.
pub use rtnetlink;
