//! The pool engine: the I/O and locking around [`crate::core`], whose
//! methods take every decision under a pool's lock. One file per
//! operation: assignment (`assign`), allocation (`refill`), returns
//! (`returns`), the refiller tasks (`refiller`), the backend's owner marks
//! (`owner_marks`), the comparison with the backend's listing (`sweep`),
//! start-up repair and gone pods (`reconcile`), pacing (`rate_limit`),
//! errors and backend health (`error`), time (`clock`).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hulk_ipam::{IpamBackend, Lease, Owner, PoolKey};
use tokio::sync::{Notify, RwLock, watch};

mod assign;
mod clock;
mod error;
mod facts;
mod fencing;
mod owner_marks;
mod rate_limit;
mod reconcile;
mod refill;
mod refiller;
mod returns;
mod sweep;

pub use clock::{Clock, SystemClock, TokioClock};
pub use error::{AUTH_FAILING_AFTER, BackendHealth, PoolError};
pub use fencing::{Displaced, Fencing};
pub use reconcile::ReconcileReport;
pub use refill::RefillOutcome;
pub use refiller::REFILLER_RESTART_DELAY;
pub use sweep::OrphanSweep;

use crate::config::PoolConfig;
use crate::core::{BackendFailure, PoolCore, Suspects};
use crate::metrics::{PoolLabels, PoolMetrics};
use crate::store::{AddressRecord, AddressState, Intent, IntentKind, PoolStore};
use rate_limit::RateLimiter;

struct Pool {
    key: PoolKey,
    config: PoolConfig,
    state: Mutex<PoolCore>,
    /// Bumped whenever addresses become idle or the pool's health changes.
    changed: watch::Sender<u64>,
    wake_refiller: Notify,
    /// Refiller tasks running for this pool (normally 0 or 1).
    refillers: AtomicUsize,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolCore> {
        // State updates are applied to the store first and to memory only
        // when that succeeded, never half-way, so a poisoned lock is safe.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn announce(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }
}

/// Counts of one pool, for metrics and the rescue API.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolStats {
    /// Ready to hand out.
    pub idle: usize,
    /// Held by pods.
    pub assigned: usize,
    /// Waiting out the reuse cooldown.
    pub cooldown: usize,
    /// Being returned to the backend.
    pub releasing: usize,
    /// Being allocated now.
    pub in_flight: usize,
    /// Of `assigned`, held by pods although the backend no longer has
    /// them (flagged `lost` by an orphan sweep): dropped at their DEL.
    #[serde(default)]
    pub lost: usize,
    /// Whether refills are paused after a backend refusal.
    pub degraded: bool,
    /// The backend's refusal, while degraded.
    pub degraded_reason: Option<String>,
    /// Whether an operator drained the pool.
    pub draining: bool,
    /// Whether a refiller task runs for this pool now
    /// ([`PoolManager::run_refiller`], restarted by
    /// [`PoolManager::run_refillers`] when it dies). False before the first
    /// one starts, after shutdown, and for [`REFILLER_RESTART_DELAY`] after
    /// one died: nothing refills the pool meanwhile.
    #[serde(default)]
    pub refiller_running: bool,
    /// Until when refills back off after failed allocations (Unix
    /// milliseconds), while they do; assignments keep waiting meanwhile.
    #[serde(default)]
    pub backoff_until_ms: Option<u64>,
    /// This pool's allocations that failed in a row (0 after a success).
    #[serde(default)]
    pub consecutive_failures: u32,
    /// This pool's last failed allocation, kept after later successes
    /// (compare its `at_ms`, or look at `consecutive_failures`).
    #[serde(default)]
    pub last_error: Option<BackendFailure>,
}

/// The warm pools of one node.
pub struct PoolManager {
    backend: Arc<dyn IpamBackend>,
    store: Arc<dyn PoolStore>,
    clock: Arc<dyn Clock>,
    node: String,
    config: PoolConfig,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    next_intent: AtomicU64,
    /// Allocations hold it shared; an orphan sweep exclusively, so it never
    /// mistakes a just-created, not yet recorded address for an orphan.
    allocation_gate: RwLock<()>,
    /// Owners missing on the last pass of [`PoolManager::find_missing`].
    suspects: Mutex<Suspects>,
    metrics: PoolMetrics,
    rate: RateLimiter,
    /// Wakes [`PoolManager::run_refillers`] when a pool appears.
    pool_added: Notify,
    /// Addresses whose holder may differ from the backend's mark of it.
    unmarked: Mutex<BTreeSet<String>>,
    /// Wakes [`PoolManager::run_owner_marks`] when an address changed hands.
    holder_changed: Notify,
    /// Held while an answer of the backend is checked against every pool
    /// and adopted, so two pools never both adopt one address.
    adoption: Mutex<()>,
    /// How the backend answered lately.
    health: Mutex<BackendHealth>,
    /// Intents a sweep must settle ([`PoolManager::unsettled_intents`]):
    /// those loaded at open that wait for the backend, and releases of
    /// this run whose answer the store could not record.
    unsettled: Mutex<Vec<Intent>>,
    /// This agent's instance in the backend's marks, when fenced.
    fencing: Option<Fencing>,
    /// Another agent's fresh mark, once a listing showed one.
    displaced: watch::Sender<Option<Displaced>>,
}

impl std::fmt::Debug for PoolManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolManager")
            .field("node", &self.node)
            .field("backend", &self.backend.name())
            .finish_non_exhaustive()
    }
}

impl PoolManager {
    /// Opens the pools of `node` from `store`, repairing what a crash left
    /// half-done: releases in flight are finished, and the store is
    /// compared with the backend's addresses of this node
    /// ([`PoolManager::sweep_orphans`]: unknown ones adopted into the pool
    /// the backend names, as the marked pod's or idle, else released when
    /// no pod is marked; known ones the backend lacks dropped or flagged
    /// lost). The backend is not needed to open: a release it refuses now
    /// stays pending (its address `Releasing`, never handed out), and a
    /// failed sweep is logged; the next successful sweep finishes both and
    /// removes the intents of interrupted allocations
    /// ([`PoolManager::unsettled_intents`]). Errors: an invalid
    /// configuration, or the store failed.
    pub async fn open(
        backend: Arc<dyn IpamBackend>,
        store: Arc<dyn PoolStore>,
        clock: Arc<dyn Clock>,
        node: impl Into<String>,
        config: PoolConfig,
    ) -> Result<Arc<PoolManager>, PoolError> {
        Self::open_fenced(backend, store, clock, node, config, None).await
    }

    /// [`PoolManager::open`] as the agent instance `fencing` names: every
    /// mark written carries it, and the start's comparison with the
    /// backend refuses ([`PoolError::HeldElsewhere`], nothing adopted)
    /// when another instance's marks on this node are fresh: a second
    /// agent under this node name (see [`Fencing`]). A start that cannot
    /// reach the backend goes on from the store, and the periodic sweeps
    /// judge it later ([`PoolManager::displaced`]).
    pub async fn open_fenced(
        backend: Arc<dyn IpamBackend>,
        store: Arc<dyn PoolStore>,
        clock: Arc<dyn Clock>,
        node: impl Into<String>,
        config: PoolConfig,
        fencing: Option<Fencing>,
    ) -> Result<Arc<PoolManager>, PoolError> {
        config.validate().map_err(PoolError::InvalidConfig)?;
        let snapshot = store.load()?;
        let rate = RateLimiter::new(config.backend_calls_per_second, config.backend_burst);
        let manager = Arc::new(PoolManager {
            backend,
            store,
            clock,
            node: node.into(),
            config,
            pools: Mutex::new(HashMap::new()),
            next_intent: AtomicU64::new(snapshot.intents.keys().max().map_or(1, |id| id + 1)),
            allocation_gate: RwLock::new(()),
            suspects: Mutex::new(Suspects::default()),
            metrics: PoolMetrics::default(),
            rate,
            pool_added: Notify::new(),
            unmarked: Mutex::new(BTreeSet::new()),
            holder_changed: Notify::new(),
            adoption: Mutex::new(()),
            health: Mutex::new(BackendHealth::default()),
            unsettled: Mutex::new(Vec::new()),
            fencing,
            displaced: watch::Sender::new(None),
        });
        manager.recover(&snapshot).await?;
        Ok(manager)
    }
}

impl PoolManager {
    fn pool(&self, key: &PoolKey) -> Arc<Pool> {
        let mut pools = self
            .pools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                self.pool_added.notify_one();
                Arc::new(Pool {
                    key: key.clone(),
                    config: self.config.clone(),
                    state: Mutex::new(PoolCore::default()),
                    changed: watch::channel(0).0,
                    wake_refiller: Notify::new(),
                    refillers: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    fn all_pools(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The store the pools persist to, shared with an embedder that keeps
    /// its own records in it ([`crate::StoreOp::PutAttachment`]).
    pub fn store(&self) -> &Arc<dyn PoolStore> {
        &self.store
    }

    /// The node this manager serves.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    /// The metrics; register them with [`PoolMetrics::register`].
    pub fn metrics(&self) -> &PoolMetrics {
        &self.metrics
    }

    /// Sets the per-pool gauges from the pools' current counts.
    pub fn refresh_metrics(&self) {
        for key in self.keys() {
            let stats = self.stats(&key);
            let labels = PoolLabels::from(&key);
            let total = stats.idle + stats.assigned + stats.cooldown + stats.releasing;
            self.metrics
                .idle
                .get_or_create(&labels)
                .set(stats.idle as i64);
            self.metrics
                .assigned
                .get_or_create(&labels)
                .set(stats.assigned as i64);
            self.metrics.total.get_or_create(&labels).set(total as i64);
            self.metrics
                .degraded
                .get_or_create(&labels)
                .set(i64::from(stats.degraded));
        }
    }

    fn intent(&self, kind: IntentKind) -> Intent {
        Intent {
            id: self.next_intent.fetch_add(1, Ordering::Relaxed),
            kind,
        }
    }

    /// The address `owner` holds in any pool, if any.
    pub fn lease_of(&self, owner: &Owner) -> Option<Lease> {
        self.all_pools()
            .iter()
            .find_map(|pool| pool.lock().assigned_lease(owner))
    }

    /// The addresses held by pods, in every pool (what the node's host
    /// routes must cover).
    pub fn assigned_addresses(&self) -> Vec<std::net::IpAddr> {
        self.all_pools()
            .iter()
            .flat_map(|pool| pool.lock().assigned_addresses())
            .collect()
    }

    /// Counts of a pool.
    pub fn stats(&self, key: &PoolKey) -> PoolStats {
        let pool = self.pool(key);
        let state = pool.lock();
        let (idle, assigned, cooldown, releasing) = state.counts();
        let now = self.clock.now_ms();
        let degraded_reason = state.degraded_at(now).map(|refusal| refusal.reason.clone());
        let (last_error, consecutive_failures) = state.failures();
        PoolStats {
            idle,
            assigned,
            cooldown,
            releasing,
            in_flight: state.in_flight(),
            lost: state.lost(),
            degraded: degraded_reason.is_some(),
            degraded_reason,
            draining: state.draining(),
            refiller_running: pool.refillers.load(Ordering::SeqCst) > 0,
            backoff_until_ms: state.backing_off_at(now),
            consecutive_failures,
            last_error: last_error.cloned(),
        }
    }

    /// Every pool key known.
    pub fn keys(&self) -> Vec<PoolKey> {
        self.all_pools()
            .iter()
            .map(|pool| pool.key.clone())
            .collect()
    }

    /// Every address of every pool, ordered by address.
    pub fn records(&self) -> Vec<AddressRecord> {
        let mut records: Vec<AddressRecord> = self
            .all_pools()
            .iter()
            .flat_map(|pool| pool.lock().records().cloned().collect::<Vec<_>>())
            .collect();
        records.sort_by_key(|record| record.lease.address.addr());
        records
    }

    /// The pool and owner holding `address`, if a pod holds it.
    pub fn holder_of(&self, address: std::net::IpAddr) -> Option<(PoolKey, Owner)> {
        self.records()
            .into_iter()
            .find_map(|record| match record.state {
                AddressState::Assigned(owner) if record.lease.address.addr() == address => {
                    Some((record.key, owner))
                }
                _ => None,
            })
    }
}
