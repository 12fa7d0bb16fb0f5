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
//! use hulk_netns::{NetlinkWorker, link_by_name};
//!
//! # async fn example() -> Result<(), hulk_netns::NetnsError> {
//! // A fresh, anonymous namespace that lives as long as the worker.
//! let worker = NetlinkWorker::spawn_in_new_namespace()?;
//! let loopback = worker
//!     .run(|handle| async move { link_by_name(&handle, "lo").await })
//!     .await??;
//! assert!(loopback.is_some());
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

pub use attach::{Attached, Datapath, DatapathError, PodNetwork, ServicePath};
pub use kernel::{
    IpVlanFlag, IpVlanMode, Kernel, KernelError, Link, LinkUpdate, Mac, MacVlanMode, Neighbour,
    Route, SlaveKind, format_mac,
};
pub use netlink::NetlinkKernel;
pub use netns::{
    NETNS_RUN_DIR, NetlinkWorker, Netns, NetnsError, create_named_netns, delete_named_netns,
    link_by_name, run_blocking_in,
};
pub use nftables::{NftFinding, check_nftables, nftables_shadowing};
pub use node::{NodeNetwork, RestoreReport};

/// Re-exported so users build requests with the same rtnetlink version.
pub use rtnetlink;
