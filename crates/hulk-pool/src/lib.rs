//! The warm pool engine of hulk-vpc: VPC addresses pre-allocated per
//! (subnet, security groups, QoS policy), so that a pod never waits for a
//! cloud call that can take ten seconds.
//!
//! - [`PoolManager::assign`] hands an idle address to a pod interface
//!   (idempotently: a retried ADD gets the same address) and, when the pool
//!   is empty, waits for the refiller (bounded), never calling the backend
//!   in parallel with it;
//! - one refiller per pool ([`PoolManager::run_refiller`]) keeps the idle
//!   count between `min_idle` and `max_idle` with batch calls, pausing
//!   (degraded) after exhausted/quota/throttled answers; with
//!   [`PoolConfig::target_add_p99`] set, the idle target within those
//!   bounds follows the ADD rate and the backend's allocation time
//!   ([`core::PoolCore::adaptive_target`]);
//! - released addresses cool down before reuse;
//! - every state change is written to a [`PoolStore`] (redb on disk) first,
//!   and every backend call is covered by an intent record, so a restart
//!   repairs what a crash left half-done;
//! - [`PoolManager::run_owner_marks`] keeps the backend's mark of which
//!   pod holds each address current, off the assignment path;
//! - [`PoolManager::find_missing`] judges which pods are gone (missing on
//!   two passes in a row), for the node to tear down and release;
//!   [`PoolManager::sweep_orphans`] takes the backend's addresses of this
//!   node that nobody knows into their pool (as the marked pod's, or
//!   idle), so a lost store loses no pod's address;
//! - the engine does the I/O and locking; every decision taken under a
//!   pool's lock is a method of [`core::PoolCore`], which property and
//!   concurrency tests drive directly.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use hulk_ipam::{MemoryBackend, Owner, PoolKey};
//! use hulk_pool::{MemoryStore, PoolConfig, PoolManager, SystemClock};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
//! let pools = PoolManager::open(
//!     backend,
//!     Arc::new(MemoryStore::default()),
//!     Arc::new(SystemClock),
//!     "node-1",
//!     PoolConfig::default(),
//! )
//! .await
//! .unwrap();
//! let key = PoolKey::new("vpc", "subnet-a", ["sg-web"], None);
//! pools.warm_up(&key).await.unwrap();
//! let owner = Owner { container_id: "c1".into(), ifname: "eth0".into(), pod: None, cni_network: None, pod_uid: None };
//! let lease = pools.assign(&key, &owner).await.unwrap();
//! assert_eq!(pools.assign(&key, &owner).await.unwrap(), lease); // a retried ADD
//! pools.release(&key, &owner).await.unwrap();
//! # });
//! ```

mod config;
pub mod core;
mod engine;
mod metrics;
mod store;

pub use config::PoolConfig;
pub use core::{
    Anomaly, BACKOFF_FIRST, BACKOFF_MAX, BackendFailure, MAX_BACKEND_PAUSE, MissingAssignments,
};
pub use engine::{
    AUTH_FAILING_AFTER, BackendHealth, Clock, Displaced, Fencing, OrphanSweep, PoolError,
    PoolManager, PoolStats, REFILLER_RESTART_DELAY, ReconcileReport, RefillOutcome, SystemClock,
    TokioClock,
};
pub use metrics::{
    AnomalyLabels, CallLabels, ErrorLabels, LostLabels, PoolLabels, PoolMetrics, error_kind,
};
pub use store::{
    AddressRecord, AddressState, Intent, IntentKind, MemoryStore, PoolStore, RedbStore, Snapshot,
    StoreError, StoreOp,
};
