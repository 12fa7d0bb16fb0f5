//! The cluster-level controller of hulk-vpc, and the cluster teardown.
//!
//! Node agents return the addresses of their own pods; nothing on a node
//! that is gone does. The controller, one active replica elected through a
//! `coordination.k8s.io/v1` Lease, watches the cluster's Node objects and
//! reconciles the cloud's allocations of this cluster against them:
//!
//! - [`plan`]: the judgement as a pure function (kube-rs' reconciler
//!   style): which leases to release and why ([`Reason`]). A node the API
//!   lists, Ready or not, keeps its addresses; one missing on two passes
//!   spanning [`ControllerConfig::grace_period_seconds`] loses them; before
//!   that, a lease whose holder mark names a pod UID that exists nowhere in
//!   the cluster goes once its node was missing on two passes.
//! - [`Controller`]: the runner (leader lease, Node reflector, passes,
//!   releases paced by [`ReleaseSettings`], stopped when the lease is
//!   lost), with [`ControllerMetrics`] and one `hulk_audit` line per
//!   address.
//! - [`teardown`]: every allocation of the cluster back to the cloud, for
//!   the base platform's cluster deletion; refuses while the cluster's API
//!   lists nodes unless forced; safe to run again.
//! - [`teardown_floating_ips`]: the same for the cluster's floating IPs
//!   (kept ones too), through a [`hulk_ipam::FloatingIpProvider`].
//! - [`ControllerFile`], [`Daemon`] and [`teardown_rounds`]: the
//!   `hulk-controller` binary's configuration file, its `run` and its
//!   `teardown` (rounds until nothing remains), so that the binary only
//!   parses arguments: `Daemon::from_config(file, holder).await?.run(shutdown)`.
//!
//! Only what the backend lists for `ListScope::Cluster` is ever released:
//! the Neutron and UltrON-style backends list by the tags `hulk-vpc` and
//! `hulk-cluster=<cluster>`, so another cluster's addresses and those
//! hulk-vpc did not create are never seen.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, Instant};
//! use hulk_controller::{GoneMemory, NodeView, Reason, plan};
//! use hulk_ipam::{AllocationRequest, IpamBackend, ListScope, MemoryBackend, PoolKey};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let backend = MemoryBackend::new("10.20.0.0/24".parse().unwrap());
//! let key = PoolKey::new("net", "subnet", ["sg"], None);
//! backend.allocate(&AllocationRequest::new(key.clone(), "node-1", 2)).await.unwrap();
//! backend.allocate(&AllocationRequest::new(key, "node-2", 1)).await.unwrap();
//! let leases = backend.list(&ListScope::Cluster).await.unwrap();
//!
//! // node-2 is gone from the API; it must be missed on two passes.
//! let view = NodeView::new(["node-1".to_owned()]);
//! let start = Instant::now();
//! let grace = Duration::from_secs(300);
//! let first = plan(&view, &leases, &GoneMemory::default(), start, grace);
//! assert!(first.releases.is_empty());
//! let second = plan(&view, &leases, &first.memory, start + grace, grace);
//! assert_eq!(second.releases.len(), 1);
//! assert_eq!(second.releases[0].lease.node, "node-2");
//! assert_eq!(second.releases[0].reason, Reason::NodeGone);
//! # });
//! ```

mod config;
mod controller;
mod daemon;
mod metrics;
mod plan;
mod release;
mod teardown;

pub use config::{
    ConfigError, ConfigFileError, ControllerConfig, ControllerFile, KubernetesSection,
    LeaderSection, ReleaseSettings,
};
pub use controller::{Controller, LEADER_LEASE, PassError, PassReport};
pub use daemon::{Daemon, DaemonError, TeardownOutcome, TeardownRound, teardown_rounds};
pub use metrics::{ControllerMetrics, Outcome, PassLabels, ReleaseLabels};
pub use plan::{GoneMemory, Missing, MissingNode, NodeView, Plan, Reason, Release, plan};
pub use release::ReleaseTally;
pub use teardown::{
    FloatingIpTeardownReport, Force, TeardownError, TeardownReport, teardown, teardown_floating_ips,
};
