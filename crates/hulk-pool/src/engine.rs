//! The pool engine: assignment from idle addresses, one refiller per pool
//! that alone talks to the backend, cooldown, shrink, restart repair,
//! reconciliation against live pods and orphan sweeps.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{FutureExt, StreamExt};
use hulk_ipam::{AllocationRequest, IpamBackend, IpamError, Lease, ListScope, Owner, PoolKey};
use tokio::sync::{Notify, RwLock, watch};

mod facts;
mod owner_marks;

pub use owner_marks::OrphanSweep;

use crate::config::PoolConfig;
use crate::metrics::{PoolLabels, PoolMetrics};
use crate::store::{
    AddressRecord, AddressState, Intent, IntentKind, PoolStore, StoreError, StoreOp,
};

/// Why a drained pool refuses assignments.
const DRAINED: &str = "drained by an operator; a refill resumes it";

/// The most batch calls one refill pass runs at once.
const MAX_PARALLEL_BATCHES: usize = 4;
/// Addresses returned to the backend at once in a refill pass: a queue of
/// surplus drains in a fraction of the time one at a time takes, without
/// flooding the cloud's API (the rate limiter still applies).
const RETURNS_IN_PARALLEL: usize = 4;

/// How long [`PoolManager::run_refillers`] waits before restarting a
/// refiller that panicked or ended, so that one dying at once does not
/// spin.
pub const REFILLER_RESTART_DELAY: Duration = Duration::from_secs(1);

/// How many backend calls in a row must be refused for authentication or
/// authorization (401/403, [`IpamError::Auth`]) before
/// [`BackendHealth::auth_failing`] says so: one refusal can be a token
/// expiring between two calls.
pub const AUTH_FAILING_AFTER: u32 = 3;

/// Wall-clock milliseconds; cooldowns are stored durably, so they use the
/// wall clock, not a monotonic one.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, millis)
    }
}

/// A clock that follows tokio's time from a fixed start: with tokio's
/// clock paused (`tokio::time::pause`), cooldowns, pauses and the pool's
/// estimates follow simulated time, so a simulation of hours of pod churn
/// runs in seconds. Not for an agent: its times are not Unix times.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    started: tokio::time::Instant,
    /// What [`Clock::now_ms`] says at `started`.
    base_ms: u64,
}

impl TokioClock {
    /// A clock reading `base_ms` now and moving with tokio's time.
    pub fn starting_at(base_ms: u64) -> Self {
        TokioClock {
            started: tokio::time::Instant::now(),
            base_ms,
        }
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.base_ms.saturating_add(millis(self.started.elapsed()))
    }
}

/// Pool failures.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The configuration is inconsistent.
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(String),
    /// No address became free in time; the caller should retry later.
    #[error("no idle address in pool {subnet} within {waited:?}; try again later")]
    Empty {
        /// The pool's subnet.
        subnet: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// The backend refuses to give more addresses for now, or the pool is
    /// drained.
    #[error("pool {subnet} is degraded: {reason}")]
    Degraded {
        /// The pool's subnet.
        subnet: String,
        /// The backend's last error, or why the pool is drained.
        reason: String,
        /// The subnet or quota is used up: retrying soon will not help.
        exhausted: bool,
    },
    /// The pool's pods hold `max_total` addresses, the node's pod capacity;
    /// one must go before another comes.
    #[error(
        "pool {subnet} is full: pods hold max_total ({max_total}) addresses; one must go first"
    )]
    Full {
        /// The pool's subnet.
        subnet: String,
        /// The pod capacity that is reached.
        max_total: usize,
    },
    /// A specific address cannot be assigned now: another pod holds it, it
    /// is being released or allocated, or another pool has it.
    #[error("address {address} is unavailable: {reason}")]
    AddressUnavailable {
        /// The address asked for.
        address: IpAddr,
        /// Why, for people.
        reason: String,
    },
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A backend call failed.
    #[error(transparent)]
    Backend(#[from] IpamError),
}

use crate::core::{
    Anomaly, BackendFailure, Held, OwnerKey, PoolCore, RefillEnd, Refusal, leased, millis,
};
use crate::metrics::error_kind;

/// Addresses counted in flight in a pool until their allocation ends.
/// Dropped before [`InFlight::take`] (the caller gave up, a store write
/// failed, a backend client panicked) it ends the allocation as abandoned,
/// so the count never stays up and blocks refills for good.
struct InFlight<'a> {
    pool: &'a Pool,
    count: usize,
}

impl InFlight<'_> {
    /// The count, for [`PoolCore::finish_refill`] under the caller's lock.
    fn take(&mut self) -> usize {
        std::mem::take(&mut self.count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.count > 0 {
            let now = 0; // unused by an abandoned end
            self.pool
                .lock()
                .finish_refill(self.count, RefillEnd::Abandoned, now);
        }
    }
}

/// One assignment counted in a pool's `waiters` until dropped: also when
/// the ADD waiting is cancelled (its DEL, or its caller's deadline), so
/// the count never stays up and keeps idle addresses for nobody.
struct Waiter<'a>(&'a Pool);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.waiters = state.waiters.saturating_sub(1);
    }
}

/// Counts a running refiller of a pool until dropped (also by a panic).
struct Running<'a>(&'a Pool);

impl<'a> Running<'a> {
    fn new(pool: &'a Pool) -> Self {
        pool.refillers.fetch_add(1, Ordering::SeqCst);
        Running(pool)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.refillers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A draw in [0, 1) for back-off jitter. std's hasher keys are random per
/// process and differ for every `RandomState`, which is all jitter needs.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    // The top 53 bits, as many as an f64 holds exactly.
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Marks a specific address as being allocated until dropped, also when
/// the ADD waiting for it is cancelled mid-call.
struct PendingAddress<'a> {
    pool: &'a Pool,
    address: IpAddr,
}

impl Drop for PendingAddress<'_> {
    fn drop(&mut self) {
        self.pool.lock().pending_addresses.remove(&self.address);
    }
}

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

/// How the backend answered lately, over every call of the manager
/// (allocations, releases, holder marks, lists), for a node's STATUS and
/// health check: credentials are per backend, not per pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendHealth {
    /// The last failed call, kept after later successes.
    pub last_error: Option<BackendFailure>,
    /// Calls that failed in a row until now (0 after a call that got an
    /// answer: a success, or `NotFound`).
    pub consecutive_failures: u32,
    /// Calls refused in a row for authentication or authorization (HTTP
    /// 401 or 403: [`IpamError::Auth`]); any other answer resets it.
    pub consecutive_auth_failures: u32,
    /// At least [`AUTH_FAILING_AFTER`] calls in a row were refused for
    /// authentication or authorization: the backend refuses this node's
    /// credentials, and no refill can succeed until they are fixed.
    pub auth_failing: bool,
}

/// What one refill pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefillOutcome {
    /// Addresses allocated.
    pub allocated: usize,
    /// Addresses returned to the backend.
    pub released: usize,
    /// The backend error, if the allocation failed.
    pub error: Option<IpamError>,
}

/// Assignments whose pod is missing, as one reconciliation pass sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MissingAssignments {
    /// Missing on this pass and the previous one: to be released.
    pub gone: Vec<(PoolKey, Owner)>,
    /// Missing on this pass only: gone on the next pass if still missing.
    pub suspected: Vec<Owner>,
}

/// What a reconciliation pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Assignments released because their pod was missing twice.
    pub released: Vec<Owner>,
    /// Assignments missing once: released on the next pass if still missing.
    pub suspected: Vec<Owner>,
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
    suspects: Mutex<HashSet<OwnerKey>>,
    metrics: PoolMetrics,
    rate: RateLimiter,
    overrides: Mutex<HashMap<PoolKey, PoolConfig>>,
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
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct RateLimiter {
    rate: f64,
    burst: f64,
    /// Tokens and when they were counted; the async lock queues callers.
    bucket: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimiter {
    fn new(rate: f64, burst: u32) -> Self {
        RateLimiter {
            rate,
            burst: f64::from(burst),
            bucket: tokio::sync::Mutex::new((f64::from(burst), tokio::time::Instant::now())),
        }
    }

    async fn acquire(&self) {
        let mut bucket = self.bucket.lock().await;
        let now = tokio::time::Instant::now();
        let (tokens, counted) = *bucket;
        let mut tokens =
            (tokens + now.duration_since(counted).as_secs_f64() * self.rate).min(self.burst);
        let mut at = now;
        if tokens < 1.0 {
            // A rate near zero asks for a wait no Duration holds: wait
            // "forever" rather than panic.
            let wait =
                Duration::try_from_secs_f64((1.0 - tokens) / self.rate).unwrap_or(Duration::MAX);
            tokio::time::sleep(wait).await;
            at = tokio::time::Instant::now();
            tokens = 1.0;
        }
        *bucket = (tokens - 1.0, at);
    }
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
            suspects: Mutex::new(HashSet::new()),
            metrics: PoolMetrics::default(),
            rate,
            overrides: Mutex::new(HashMap::new()),
            pool_added: Notify::new(),
            unmarked: Mutex::new(BTreeSet::new()),
            holder_changed: Notify::new(),
            adoption: Mutex::new(()),
            health: Mutex::new(BackendHealth::default()),
            unsettled: Mutex::new(Vec::new()),
        });
        // No start needs the backend: a release it does not take now is
        // retried by every orphan sweep, and an interrupted allocation's
        // intent stays until a sweep has adopted what it left.
        let mut released = BTreeSet::new();
        let mut unsettled = Vec::new();
        for intent in snapshot.intents.values() {
            match &intent.kind {
                // After one failure the backend is taken as down: the
                // rest wait for the sweeps instead of a timeout each.
                IntentKind::Release { .. }
                    if unsettled
                        .iter()
                        .any(|kept: &Intent| matches!(kept.kind, IntentKind::Release { .. })) =>
                {
                    unsettled.push(intent.clone());
                }
                IntentKind::Release { lease_id } => match manager.settle_release(intent).await {
                    Ok(()) => {
                        released.insert(lease_id.clone());
                    }
                    Err(PoolError::Backend(error)) => {
                        tracing::warn!(
                            lease = %lease_id,
                            %error,
                            "cannot finish a release interrupted by the last stop; \
                             the orphan sweeps retry it"
                        );
                        unsettled.push(intent.clone());
                    }
                    Err(error) => return Err(error),
                },
                IntentKind::Allocate { .. } => unsettled.push(intent.clone()),
            }
        }
        let releasing: BTreeSet<&String> = unsettled
            .iter()
            .filter_map(|intent| match &intent.kind {
                IntentKind::Release { lease_id } => Some(lease_id),
                IntentKind::Allocate { .. } => None,
            })
            .collect();
        for record in snapshot.addresses.values() {
            if released.contains(&record.lease.id) {
                continue;
            }
            let mut record = record.clone();
            if releasing.contains(&record.lease.id) {
                // Never handed out: it goes back as soon as the backend
                // answers.
                record.state = AddressState::Releasing;
            } else if record.state == AddressState::Releasing {
                record.state = AddressState::Idle;
            }
            manager.pool(&record.key).lock().insert(record);
        }
        for key in &snapshot.drained {
            manager.pool(key).lock().draining = true;
        }
        *manager
            .unsettled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = unsettled;
        // Every start compares with the backend: an interrupted allocation
        // leaves addresses nobody knows, a lost store forgets pods' ones,
        // and the cloud may have taken addresses back.
        match manager.sweep_orphans().await {
            Ok(sweep) => {
                if sweep != OrphanSweep::default() {
                    tracing::warn!(?sweep, "the store and the backend disagreed");
                }
            }
            Err(error) => {
                let unsettled = manager.unsettled_intents();
                tracing::warn!(
                    %error,
                    unsettled,
                    "cannot compare the store with the backend at start; serving from the \
                     store meanwhile, and the periodic orphan sweep retries (finishing the \
                     unsettled intents of interrupted allocations and releases)"
                );
            }
        }
        Ok(manager)
    }

    /// How many intents loaded at open still wait for the backend: releases
    /// it did not take yet, and allocations interrupted by the last stop
    /// whose leftovers no orphan sweep has adopted yet. Each successful
    /// [`PoolManager::sweep_orphans`] settles them; while any is left, an
    /// embedder may sweep sooner than usual.
    pub fn unsettled_intents(&self) -> usize {
        self.unsettled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// Finishes the release `intent` covers: the backend's release (its
    /// `NotFound` counts as done), then the record and the intent leave
    /// the store and the pool. Errors: the backend's ([`PoolError::Backend`],
    /// nothing changed) or the store's.
    async fn settle_release(&self, intent: &Intent) -> Result<(), PoolError> {
        let IntentKind::Release { lease_id } = &intent.kind else {
            return Ok(());
        };
        match self.timed("release", self.backend.release(lease_id)).await {
            Ok(()) | Err(IpamError::NotFound(_)) => {}
            Err(error) => return Err(error.into()),
        }
        self.store.apply(&[
            StoreOp::RemoveAddress(lease_id.clone()),
            StoreOp::RemoveIntent(intent.id),
        ])?;
        for pool in self.all_pools() {
            if pool.lock().remove(lease_id).is_some() {
                pool.announce();
            }
        }
        Ok(())
    }

    /// Gives `key`'s pool its own knobs. Set it before the pool is first
    /// used (a pool keeps the configuration it was created with).
    pub fn configure_pool(&self, key: &PoolKey, config: PoolConfig) -> Result<(), PoolError> {
        config.validate().map_err(PoolError::InvalidConfig)?;
        let pools = self
            .pools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if pools.contains_key(key) {
            return Err(PoolError::InvalidConfig(format!(
                "pool {} is already in use; configure it before its first use",
                key.subnet
            )));
        }
        self.overrides
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key.clone(), config);
        Ok(())
    }

    fn pool(&self, key: &PoolKey) -> Arc<Pool> {
        let mut pools = self
            .pools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                self.pool_added.notify_one();
                let config = self
                    .overrides
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| self.config.clone());
                Arc::new(Pool {
                    key: key.clone(),
                    config,
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

    /// Runs a backend call once the rate limit allows, recording its
    /// latency and failure kind.
    async fn timed<T>(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = Result<T, IpamError>>,
    ) -> Result<T, IpamError> {
        self.rate.acquire().await;
        self.metered(operation, call).await
    }

    /// A backend call counted in the metrics and the backend's health but
    /// not rate-limited.
    async fn metered<T>(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = Result<T, IpamError>>,
    ) -> Result<T, IpamError> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.metrics.backend_call(operation, started, &result);
        let mut health = self
            .health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &result {
            Ok(_) | Err(IpamError::NotFound(_)) => {
                health.consecutive_failures = 0;
                health.consecutive_auth_failures = 0;
            }
            Err(error) => {
                health.consecutive_failures = health.consecutive_failures.saturating_add(1);
                health.consecutive_auth_failures = if matches!(error, IpamError::Auth(_)) {
                    health.consecutive_auth_failures.saturating_add(1)
                } else {
                    0
                };
                health.last_error = Some(self.failure(operation, error));
            }
        }
        health.auth_failing = health.consecutive_auth_failures >= AUTH_FAILING_AFTER;
        result
    }

    /// `error` of an `operation` now, as the pool remembers it.
    fn failure(&self, operation: &str, error: &IpamError) -> BackendFailure {
        BackendFailure {
            operation: operation.to_owned(),
            kind: error_kind(error).to_owned(),
            message: error.to_string(),
            at_ms: self.clock.now_ms(),
        }
    }

    /// How the backend answered lately, over every call of this manager.
    pub fn backend_health(&self) -> BackendHealth {
        self.health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn intent(&self, kind: IntentKind) -> Intent {
        Intent {
            id: self.next_intent.fetch_add(1, Ordering::Relaxed),
            kind,
        }
    }

    /// Hands an idle address of `key` to `owner`. The same owner (container
    /// and interface) always gets the same address back, so a retried ADD
    /// is harmless. With no idle address, waits for the refiller up to
    /// `assign_timeout`; never calls the backend itself.
    pub async fn assign(&self, key: &PoolKey, owner: &Owner) -> Result<Lease, PoolError> {
        let pool = self.pool(key);
        let started = tokio::time::Instant::now();
        // None: a timeout too long to add to the clock, i.e. no deadline.
        let deadline = started.checked_add(pool.config.assign_timeout);
        let mut changes = pool.changed.subscribe();
        let mut waiting: Option<Waiter<'_>> = None;
        let mut arrived = false;
        let outcome = loop {
            {
                let mut state = pool.lock();
                if let Some(lease) = state.assigned_lease(owner) {
                    break Ok(lease);
                }
                if !state.pod_room(&pool.config) {
                    break Err(PoolError::Full {
                        subnet: key.subnet.clone(),
                        max_total: pool.config.max_total,
                    });
                }
                let now = self.clock.now_ms();
                // A new ADD (not a retry of one served, nor this one
                // again after a wake-up) is what the adaptive mode sizes
                // the pool by.
                if !arrived {
                    state.note_arrival(now);
                    arrived = true;
                }
                if let Err(error) = self.promote_cooled_locked(&mut state, now) {
                    break Err(error);
                }
                if let Some(record) = state.take_idle(owner, now) {
                    if let Err(error) = self.store.apply(&[StoreOp::put(record.clone())]) {
                        state.untake(&record);
                        break Err(error.into());
                    }
                    let lease = leased(&record);
                    self.holder_changed(&lease.id);
                    state.insert(record);
                    if state.wants_refill(&pool.config, now) {
                        pool.wake_refiller.notify_one();
                    }
                    break Ok(lease);
                }
                if state.draining {
                    break Err(PoolError::Degraded {
                        subnet: key.subnet.clone(),
                        reason: DRAINED.to_owned(),
                        exhausted: false,
                    });
                }
                // A cloud that refuses more addresses does not keep this
                // ADD from one of the node's own coming out of cooldown
                // before its deadline (more of them than ADDs waiting).
                let ahead = state.waiters.saturating_sub(usize::from(waiting.is_some()));
                let deadline_ms = now.saturating_add(millis(pool.config.assign_timeout));
                if let Some(refusal) = state.degraded_at(now)
                    && state.cooling_by(deadline_ms) <= ahead
                {
                    break Err(PoolError::Degraded {
                        subnet: key.subnet.clone(),
                        reason: refusal.reason.clone(),
                        exhausted: refusal.exhausted,
                    });
                }
                if waiting.is_none() {
                    state.waiters += 1;
                    waiting = Some(Waiter(&pool));
                }
                pool.wake_refiller.notify_one();
            }
            let changed = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, changes.changed()).await,
                None => Ok(changes.changed().await),
            };
            match changed {
                Ok(Ok(())) => continue,
                _ => {
                    break Err(PoolError::Empty {
                        subnet: key.subnet.clone(),
                        waited: started.elapsed(),
                    });
                }
            }
        };
        drop(waiting);
        if outcome.is_ok() {
            self.metrics
                .assign_seconds
                .get_or_create(&PoolLabels::from(key))
                .observe(started.elapsed().as_secs_f64());
        }
        outcome
    }

    /// Hands exactly `address` of `key` to `owner` (a pod's fixed IP): the
    /// pool's own record of it when idle or cooling down, else one backend
    /// allocation of that address, which the ADD waits for. The same owner
    /// gets it back on a retry. Held by another pod, being released or
    /// allocated, or in another pool: [`PoolError::AddressUnavailable`]
    /// (the other pod may be on its way out: retry later).
    pub async fn assign_address(
        &self,
        key: &PoolKey,
        owner: &Owner,
        address: IpAddr,
    ) -> Result<Lease, PoolError> {
        let unavailable = |reason: String| PoolError::AddressUnavailable { address, reason };
        let pool = self.pool(key);
        {
            let mut state = pool.lock();
            if let Some(lease) = state.assigned_lease(owner) {
                return if lease.address.addr() == address {
                    Ok(lease)
                } else {
                    Err(unavailable(format!(
                        "{}/{} already holds {}",
                        owner.container_id, owner.ifname, lease.address
                    )))
                };
            }
            if !state.pod_room(&pool.config) {
                return Err(PoolError::Full {
                    subnet: key.subnet.clone(),
                    max_total: pool.config.max_total,
                });
            }
            match state.take_address(owner, address, self.clock.now_ms()) {
                Ok(Some(record)) => {
                    if let Err(error) = self.store.apply(&[StoreOp::put(record.clone())]) {
                        if state
                            .records
                            .get(&record.lease.id)
                            .is_some_and(|kept| kept.state == AddressState::Idle)
                        {
                            state.untake(&record);
                        }
                        return Err(error.into());
                    }
                    let lease = leased(&record);
                    self.holder_changed(&lease.id);
                    state.insert(record);
                    return Ok(lease);
                }
                Ok(None) => {}
                Err(AddressState::Assigned(holder)) => {
                    return Err(unavailable(format!(
                        "held by {}/{}",
                        holder.container_id, holder.ifname
                    )));
                }
                Err(_) => return Err(unavailable("it is being released".into())),
            }
            if !state.pending_addresses.insert(address) {
                return Err(unavailable("it is being allocated".into()));
            }
        }
        let _pending = PendingAddress {
            pool: &pool,
            address,
        };
        if let Some(elsewhere) = self
            .records()
            .into_iter()
            .find(|record| record.lease.address.addr() == address)
        {
            return Err(unavailable(if elsewhere.key == *key {
                "a refill just brought it into this pool; retry".to_owned()
            } else {
                format!(
                    "the pool of subnet {} with security groups {:?} and QoS {:?} holds it",
                    elsewhere.key.subnet, elsewhere.key.security_groups, elsewhere.key.qos_policy
                )
            }));
        }
        self.allocate_for(&pool, owner, address).await
    }

    /// One backend allocation of `address`, recorded as `owner`'s, behind
    /// an intent record as every allocation is, within the holding cap.
    async fn allocate_for(
        &self,
        pool: &Pool,
        owner: &Owner,
        address: IpAddr,
    ) -> Result<Lease, PoolError> {
        if !pool.lock().reserve_one(&pool.config) {
            return Err(PoolError::AddressUnavailable {
                address,
                reason: format!(
                    "the pool holds its most addresses (max_held {}); one must go first",
                    pool.config.held_cap()
                ),
            });
        }
        let mut reserved = InFlight { pool, count: 1 };
        let _gate = self.allocation_gate.read().await;
        let intent = self.intent(IntentKind::Allocate {
            key: pool.key.clone(),
            count: 1,
        });
        let intent_id = intent.id;
        self.store.apply(&[StoreOp::PutIntent(intent)])?;
        let request = AllocationRequest::for_address(pool.key.clone(), self.node.clone(), address);
        let leases = match self
            .timed("allocate", self.backend.allocate(&request))
            .await
        {
            Ok(leases) => leases,
            Err(error) => {
                // The ADD gets the error; a refused address is no reason
                // to hold the pool's refills back.
                drop(reserved);
                self.store.apply(&[StoreOp::RemoveIntent(intent_id)])?;
                return Err(match error {
                    IpamError::Conflict(reason) => {
                        PoolError::AddressUnavailable { address, reason }
                    }
                    other => other.into(),
                });
            }
        };
        let state = AddressState::Assigned(owner.clone());
        let adopted = self
            .take_answer(pool, &mut reserved, intent_id, Some(address), state, leases)
            .await?;
        let record = adopted?
            .pop()
            .ok_or_else(|| IpamError::Protocol(format!("no lease of {address} adopted")))?;
        let lease = leased(&record);
        self.holder_changed(&lease.id);
        Ok(lease)
    }

    /// The ids and addresses every pool but `key`'s holds.
    fn held_elsewhere(&self, key: &PoolKey) -> Held {
        let mut held = Held::default();
        for pool in self.all_pools() {
            if pool.key != *key {
                pool.lock().held(&mut held);
            }
        }
        held
    }

    /// Takes an allocation's answer into `pool` and ends `reserved`: what
    /// [`PoolCore::screen_answer`] adopts is stored as `state` (fixed when
    /// `wanted` names the address) and added; what it refuses is logged
    /// and counted, and returned to the backend when that is safe (behind
    /// release intents, so a crash finishes the job). The outer error is
    /// the store's; the inner one says the answer held no usable address.
    async fn take_answer(
        &self,
        pool: &Pool,
        reserved: &mut InFlight<'_>,
        intent_id: u64,
        wanted: Option<IpAddr>,
        state: AddressState,
        leases: Vec<Lease>,
    ) -> Result<Result<Vec<AddressRecord>, IpamError>, PoolError> {
        let now = self.clock.now_ms();
        let answered = leases.len();
        let (screened, records, releases, stored, unusable) = {
            let _adopting = self
                .adoption
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let others = self.held_elsewhere(&pool.key);
            let mut core = pool.lock();
            let screened = core.screen_answer(
                &pool.key,
                &pool.config,
                reserved.count,
                wanted,
                leases,
                &others,
            );
            let records: Vec<AddressRecord> = screened
                .adopt
                .iter()
                .map(|lease| AddressRecord {
                    key: pool.key.clone(),
                    lease: lease.clone(),
                    state: state.clone(),
                    since_ms: now,
                    fixed: wanted.is_some(),
                    lost: false,
                })
                .collect();
            let releases: Vec<Intent> = screened
                .release
                .iter()
                .map(|(lease, _)| {
                    self.intent(IntentKind::Release {
                        lease_id: lease.id.clone(),
                    })
                })
                .collect();
            let mut ops: Vec<StoreOp> = records.iter().cloned().map(StoreOp::put).collect();
            ops.extend(releases.iter().cloned().map(StoreOp::PutIntent));
            ops.push(StoreOp::RemoveIntent(intent_id));
            let stored = self.store.apply(&ops);
            // Without a durable record the addresses would be unknown
            // after a restart; the allocation's intent stays, so the next
            // start sweeps them. Keep serving them meanwhile.
            if let Err(error) = &stored {
                tracing::error!(%error, "cannot record allocated addresses");
            }
            let unusable = records.is_empty().then(|| {
                IpamError::Protocol(format!(
                    "no usable address in an answer of {answered} leases to a request for {}",
                    reserved.count
                ))
            });
            let end = match &unusable {
                Some(error) => RefillEnd::Failed {
                    failure: self.failure("allocate", error),
                    refusal: None,
                    jitter: jitter(),
                },
                None => RefillEnd::Allocated(records.clone()),
            };
            core.finish_refill(reserved.take(), end, now);
            (screened, records, releases, stored, unusable)
        };
        pool.announce();
        if screened.short {
            self.metrics.anomaly(Anomaly::ShortAnswer);
            tracing::warn!(
                pool = %pool.key.subnet,
                answered,
                "the backend answered fewer addresses than asked; keeping what came"
            );
        }
        for (lease, anomaly) in &screened.quarantine {
            self.metrics.anomaly(*anomaly);
            tracing::warn!(
                pool = %pool.key.subnet,
                lease = %lease.id,
                address = %lease.address,
                anomaly = anomaly.kind(),
                "refused a lease whose id this node already holds; not released, \
                 since that would free the address its holder has"
            );
        }
        for ((lease, anomaly), intent) in screened.release.iter().zip(releases) {
            self.metrics.anomaly(*anomaly);
            tracing::warn!(
                pool = %pool.key.subnet,
                lease = %lease.id,
                address = %lease.address,
                anomaly = anomaly.kind(),
                "refused a lease of the backend's answer; returning it"
            );
            self.give_back(&lease.id, intent.id).await?;
        }
        stored?;
        Ok(match unusable {
            Some(error) => Err(error),
            None => Ok(records),
        })
    }

    /// Returns a lease the pool never adopted, covered by `intent_id`. A
    /// failure leaves the intent: the next start finishes the release, and
    /// the periodic orphan sweep meets the lease before that.
    async fn give_back(&self, lease_id: &str, intent_id: u64) -> Result<(), PoolError> {
        match self.timed("release", self.backend.release(lease_id)).await {
            Ok(()) | Err(IpamError::NotFound(_)) => {
                self.store.apply(&[StoreOp::RemoveIntent(intent_id)])?;
            }
            Err(error) => {
                tracing::warn!(lease = %lease_id, %error, "cannot return a refused lease");
            }
        }
        Ok(())
    }

    /// Makes cooled-down addresses idle, durably.
    /// Waiting assignments are woken when some became idle.
    fn promote_cooled(&self, pool: &Pool) -> Result<(), PoolError> {
        let promoted = {
            let mut state = pool.lock();
            self.promote_cooled_locked(&mut state, self.clock.now_ms())?
        };
        if promoted {
            pool.announce();
        }
        Ok(())
    }

    /// Returns whether any address was promoted.
    fn promote_cooled_locked(&self, state: &mut PoolCore, now_ms: u64) -> Result<bool, PoolError> {
        let cooled = state.promote_cooled(now_ms);
        if cooled.is_empty() {
            return Ok(false);
        }
        let ops: Vec<StoreOp> = cooled.iter().cloned().map(StoreOp::put).collect();
        if let Err(error) = self.store.apply(&ops) {
            // Undo in memory what the store did not take.
            for record in cooled {
                state.idle.retain(|id| *id != record.lease.id);
                if let Some(kept) = state.records.get_mut(&record.lease.id) {
                    kept.state = AddressState::Cooldown { until_ms: now_ms };
                }
            }
            return Err(error.into());
        }
        Ok(true)
    }

    /// Takes back `owner`'s address: it cools down, then serves again.
    /// An address the backend no longer has (flagged `lost` by
    /// [`PoolManager::sweep_orphans`]) is dropped from the pool and the
    /// store instead: another node may hold it, so it must never serve
    /// here again, and there is nothing to return to the backend.
    /// Releasing an owner that holds nothing succeeds. Errors: the store
    /// refused the write (nothing changed).
    pub async fn release(&self, key: &PoolKey, owner: &Owner) -> Result<(), PoolError> {
        let pool = self.pool(key);
        let mut state = pool.lock();
        if let Some(lost) = state.held_by(owner).filter(|record| record.lost) {
            let lease_id = lost.lease.id.clone();
            let address = lost.lease.address;
            self.store
                .apply(&[StoreOp::RemoveAddress(lease_id.clone())])?;
            state.remove(&lease_id);
            tracing::warn!(
                lease = %lease_id,
                %address,
                container = %owner.container_id,
                ifname = %owner.ifname,
                "released an address the backend no longer has: dropped, not reused"
            );
            return Ok(());
        }
        let cooldown_ms = millis(pool.config.reuse_cooldown);
        let Some(record) = state.cool_down(owner, self.clock.now_ms(), cooldown_ms) else {
            return Ok(());
        };
        self.store.apply(&[StoreOp::put(record.clone())])?;
        self.holder_changed(&record.lease.id);
        state.commit_cool_down(owner, record);
        pool.wake_refiller.notify_one();
        Ok(())
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
            .flat_map(|pool| {
                let state = pool.lock();
                state
                    .owners
                    .values()
                    .filter_map(|id| state.records.get(id))
                    .map(|record| record.lease.address.addr())
                    .collect::<Vec<_>>()
            })
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
            lost: state.records.values().filter(|record| record.lost).count(),
            degraded: degraded_reason.is_some(),
            degraded_reason,
            draining: state.draining,
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
            .flat_map(|pool| pool.lock().records.values().cloned().collect::<Vec<_>>())
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

    /// Drains `key`'s pool for an operator: refills stop, assignments
    /// without an idle address fail, and every idle address goes back to
    /// the backend now (cooling ones once cooled). Addresses held by pods
    /// stay. Returns how many went back. The drain is stored: a restarted
    /// manager keeps the pool drained until `resume`.
    pub async fn drain(&self, key: &PoolKey) -> Result<usize, PoolError> {
        self.store
            .apply(&[StoreOp::SetDrained(key.clone(), true)])?;
        let pool = self.pool(key);
        pool.lock().draining = true;
        pool.announce();
        self.return_surplus(&pool).await
    }

    /// Ends a drain of `key`'s pool and runs a refill pass.
    pub async fn resume(&self, key: &PoolKey) -> Result<RefillOutcome, PoolError> {
        self.store
            .apply(&[StoreOp::SetDrained(key.clone(), false)])?;
        self.pool(key).lock().draining = false;
        self.refill(key).await
    }

    /// One refill pass of `key`'s pool, with one demand plan for both
    /// directions (see [`PoolCore::plan_refill`] and
    /// [`PoolCore::plan_shrink`]): allocates toward `min_idle` (and for
    /// waiting assignments) in batches (up to four in parallel) while it
    /// returns idle addresses beyond `max_idle` or unused past
    /// `idle_reclaim_after`, a few at a time. The refiller
    /// ([`PoolManager::run_refiller`]) runs the two directions as separate
    /// loops, so that returns never hold up the allocations waiting ADDs
    /// need.
    pub async fn refill(&self, key: &PoolKey) -> Result<RefillOutcome, PoolError> {
        let pool = self.pool(key);
        self.promote_cooled(&pool)?;
        let (released, allocated) =
            futures::future::join(self.return_surplus(&pool), self.allocate_pass(&pool)).await;
        let mut outcome = allocated?;
        outcome.released = released?;
        Ok(outcome)
    }

    /// Allocates what [`PoolCore::plan_refill`] asks for. More waiting
    /// assignments than one batch serves get several batches in parallel:
    /// a burst then waits one backend call, not one per batch.
    async fn allocate_pass(&self, pool: &Pool) -> Result<RefillOutcome, PoolError> {
        let mut batches = Vec::new();
        while batches.len() < MAX_PARALLEL_BATCHES {
            let want = pool.lock().plan_refill(&pool.config, self.clock.now_ms());
            if want == 0 {
                break;
            }
            batches.push(self.allocate_into(pool, want));
        }
        let mut outcome = RefillOutcome::default();
        for result in futures::future::join_all(batches).await {
            match result? {
                Ok(allocated) => outcome.allocated += allocated,
                Err(error) => outcome.error = Some(error),
            }
        }
        Ok(outcome)
    }

    /// Returns to the backend what [`PoolCore::plan_shrink`] picks;
    /// how many went back.
    async fn return_surplus(&self, pool: &Pool) -> Result<usize, PoolError> {
        let returns = self.pick_returns(pool)?;
        self.return_addresses(pool, returns).await
    }

    /// Allocates `count` addresses (already counted in `in_flight`) behind
    /// an intent record, and takes the answer in
    /// ([`PoolManager::take_answer`]). The outer error is the store's; the
    /// inner one the backend's (or an answer without a usable address),
    /// after which the pool is degraded or backs off. Ok: how many were
    /// adopted.
    async fn allocate_into(
        &self,
        pool: &Pool,
        count: usize,
    ) -> Result<Result<usize, IpamError>, PoolError> {
        let mut reserved = InFlight { pool, count };
        let _gate = self.allocation_gate.read().await;
        let intent = self.intent(IntentKind::Allocate {
            key: pool.key.clone(),
            count,
        });
        let intent_id = intent.id;
        self.store.apply(&[StoreOp::PutIntent(intent)])?;
        let request = AllocationRequest::new(pool.key.clone(), self.node.clone(), count);
        let started_ms = self.clock.now_ms();
        let result = self
            .timed("allocate", self.backend.allocate(&request))
            .await;
        match result {
            Ok(leases) => {
                pool.lock()
                    .note_allocation(self.clock.now_ms().saturating_sub(started_ms));
                let adopted = self
                    .take_answer(
                        pool,
                        &mut reserved,
                        intent_id,
                        None,
                        AddressState::Idle,
                        leases,
                    )
                    .await?;
                if let Ok(records) = &adopted {
                    self.metrics
                        .refills
                        .get_or_create(&PoolLabels::from(&pool.key))
                        .inc();
                    tracing::debug!(pool = %pool.key.subnet, allocated = records.len(), "refilled");
                }
                Ok(adopted.map(|records| records.len()))
            }
            Err(error) => {
                // Backends allocate all or none: nothing to undo.
                let now = self.clock.now_ms();
                let refusal = match &error {
                    IpamError::Throttled { retry_after } => {
                        Some(retry_after.unwrap_or(pool.config.backoff))
                    }
                    IpamError::Exhausted { .. } | IpamError::Quota(_) => Some(pool.config.backoff),
                    _ => None,
                }
                .map(|pause| {
                    Refusal::new(
                        now,
                        pause,
                        error.to_string(),
                        matches!(error, IpamError::Exhausted { .. } | IpamError::Quota(_)),
                    )
                });
                let end = RefillEnd::Failed {
                    failure: self.failure("allocate", &error),
                    refusal,
                    jitter: jitter(),
                };
                pool.lock().finish_refill(reserved.take(), end, now);
                self.store.apply(&[StoreOp::RemoveIntent(intent_id)])?;
                tracing::warn!(pool = %pool.key.subnet, %error, "refill failed");
                pool.announce();
                Ok(Err(error))
            }
        }
    }

    /// `id`'s record as it is while being returned to the backend, and the
    /// intent that covers the call; `None` when the pool has no such record.
    fn release_victim(&self, state: &PoolCore, id: &str) -> Option<(AddressRecord, Intent)> {
        let mut record = state.records.get(id)?.clone();
        record.state = AddressState::Releasing;
        let intent = self.intent(IntentKind::Release {
            lease_id: id.to_owned(),
        });
        Some((record, intent))
    }

    /// Takes the addresses [`PoolCore::plan_shrink`] picks out of service,
    /// durably: each is stored as being released, behind a release intent
    /// (a crash finishes the job). Nothing changes if the store fails.
    fn pick_returns(&self, pool: &Pool) -> Result<Vec<(AddressRecord, Intent)>, PoolError> {
        let now = self.clock.now_ms();
        let reclaim_before = pool
            .config
            .idle_reclaim_after
            .map(|after| now.saturating_sub(millis(after)));
        let mut state = pool.lock();
        let picked = state.plan_shrink(&pool.config, now, reclaim_before);
        let victims: Vec<(AddressRecord, Intent)> = picked
            .iter()
            .filter_map(|id| self.release_victim(&state, id))
            .collect();
        let ops: Vec<StoreOp> = victims
            .iter()
            .flat_map(|(record, intent)| {
                [
                    StoreOp::put(record.clone()),
                    StoreOp::PutIntent(intent.clone()),
                ]
            })
            .collect();
        if let Err(error) = self.store.apply(&ops) {
            // Fixed addresses were never idle.
            for (record, _) in victims.iter().rev().filter(|(record, _)| !record.fixed) {
                state.untake(record);
            }
            return Err(error.into());
        }
        for (record, _) in &victims {
            state
                .records
                .insert(record.lease.id.clone(), record.clone());
        }
        Ok(victims)
    }

    /// Returns `victims` ([`PoolManager::pick_returns`]) to the backend, a
    /// few calls at a time: one call each (no backend has a bulk release).
    /// A failed return keeps the address as it was (a fixed one cooled
    /// down, others idle) for a later pass. Returns how many went back.
    async fn return_addresses(
        &self,
        pool: &Pool,
        victims: Vec<(AddressRecord, Intent)>,
    ) -> Result<usize, PoolError> {
        let now = self.clock.now_ms();
        // Each return is settled as soon as its call answers: a record
        // kept as "releasing" while other calls run would still count
        // against the holding cap after another node got the address.
        let mut returns = futures::stream::iter(victims)
            .map(|(record, intent)| async move {
                let result = self
                    .timed("release", self.backend.release(&record.lease.id))
                    .await;
                (record, intent, result)
            })
            .buffer_unordered(RETURNS_IN_PARALLEL);
        let mut released = 0;
        let mut store_error = None;
        while let Some((record, intent, result)) = returns.next().await {
            let id = record.lease.id.clone();
            let stored = match result {
                Ok(()) | Err(IpamError::NotFound(_)) => self
                    .store
                    .apply(&[
                        StoreOp::RemoveAddress(id.clone()),
                        StoreOp::RemoveIntent(intent.id),
                    ])
                    .map(|()| {
                        pool.lock().remove(&id);
                        released += 1;
                    }),
                Err(error) => {
                    tracing::warn!(lease = %id, %error, "cannot return an address");
                    let mut kept = record.clone();
                    kept.state = if record.fixed {
                        AddressState::Cooldown { until_ms: now }
                    } else {
                        AddressState::Idle
                    };
                    self.store
                        .apply(&[StoreOp::put(kept.clone()), StoreOp::RemoveIntent(intent.id)])
                        .map(|()| pool.lock().insert(kept))
                }
            };
            // The other returns still finish; this one stays "releasing"
            // behind its intent, and the sweeps settle it once the store
            // takes writes again.
            if let Err(error) = stored {
                tracing::error!(lease = %id, %error, "cannot record a return");
                self.unsettled
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(intent);
                store_error.get_or_insert(error);
            }
        }
        match store_error {
            Some(error) => Err(error.into()),
            None => Ok(released),
        }
    }

    /// Tops the idle addresses of `key` up to `warm_up` (in batches)
    /// before any pod asks, never past `max_total`; what a restart finds
    /// idle counts, and a drained pool gets nothing. Returns how many it
    /// allocated. A backend error (or an answer without a usable address)
    /// ends it with that error.
    pub async fn warm_up(&self, key: &PoolKey) -> Result<usize, PoolError> {
        let pool = self.pool(key);
        let mut allocated = 0;
        loop {
            let count = pool.lock().plan_warm_up(&pool.config, self.clock.now_ms());
            if count == 0 {
                return Ok(allocated);
            }
            match self.allocate_into(&pool, count).await? {
                Ok(adopted) => allocated += adopted,
                // "Exhausted" for several: the next batch asks for fewer.
                Err(IpamError::Exhausted { .. } | IpamError::Quota(_)) if count > 1 => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Runs a refiller for every pool, those known now and those that
    /// appear later (a pod's annotations can name a pool first seen at its
    /// ADD), until `shutdown` turns true or its sender is dropped. A
    /// refiller that panics or ends before shutdown is restarted after
    /// [`REFILLER_RESTART_DELAY`], with an error logged and
    /// `hulk_pool_refiller_restarts_total` counted; [`PoolStats`] says
    /// whether each pool's refiller runs.
    pub async fn run_refillers(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut running = HashSet::new();
        let mut refillers = tokio::task::JoinSet::new();
        while !*shutdown.borrow_and_update() {
            for key in self.keys() {
                if running.insert(key.clone()) {
                    refillers.spawn(self.clone().supervised_refiller(
                        key,
                        Duration::ZERO,
                        shutdown.clone(),
                    ));
                }
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = self.pool_added.notified() => {}
                Some(Ok((key, death))) = refillers.join_next() => {
                    if *shutdown.borrow() {
                        continue;
                    }
                    tracing::error!(
                        pool = %key.subnet,
                        death,
                        "the pool's refiller died; restarting it"
                    );
                    self.metrics
                        .refiller_restarts
                        .get_or_create(&PoolLabels::from(&key))
                        .inc();
                    refillers.spawn(self.clone().supervised_refiller(
                        key,
                        REFILLER_RESTART_DELAY,
                        shutdown.clone(),
                    ));
                }
            }
        }
        while refillers.join_next().await.is_some() {}
    }

    /// Runs `key`'s refiller after `delay`, catching a panic: returns the
    /// key and how the refiller ended, for [`PoolManager::run_refillers`].
    async fn supervised_refiller(
        self: Arc<Self>,
        key: PoolKey,
        delay: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> (PoolKey, String) {
        tokio::time::sleep(delay).await;
        // Unwind safety: pool state sits behind mutexes whose updates are
        // applied whole (a poisoned lock is taken over), and an allocation
        // in flight is ended by its `InFlight` guard while unwinding.
        let refiller = std::panic::AssertUnwindSafe(self.run_refiller(key.clone(), shutdown));
        let death = match refiller.catch_unwind().await {
            Ok(()) => "it ended".to_owned(),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                format!("panicked: {message}")
            }
        };
        (key, death)
    }

    /// Runs the refiller of `key` until `shutdown` turns true (or its
    /// sender is dropped): two loops on one task, one allocating (woken by
    /// assignments, every `refill_interval`, and when a pause, back-off or
    /// cooldown ends) and one returning surplus (woken by every change of
    /// the pool, and on the same clock), so that neither waits for the
    /// other's backend calls.
    pub async fn run_refiller(self: Arc<Self>, key: PoolKey, shutdown: watch::Receiver<bool>) {
        let pool = self.pool(&key);
        let _running = Running::new(&pool);
        futures::future::join(
            self.allocation_loop(&pool, shutdown.clone()),
            self.return_loop(&pool, shutdown),
        )
        .await;
    }

    /// How long a refiller loop of `pool` may sleep: until the next pause,
    /// back-off or cooldown ends, at most `refill_interval`.
    fn refiller_sleep(&self, pool: &Pool) -> Duration {
        let now = self.clock.now_ms();
        pool.lock()
            .next_due(now)
            .map_or(pool.config.refill_interval, |until| {
                Duration::from_millis(until.saturating_sub(now))
            })
            .min(pool.config.refill_interval)
    }

    /// The allocating half of [`PoolManager::run_refiller`].
    ///
    /// Batches run side by side (up to four), and the plan is made again
    /// whenever one answers or an ADD wakes the refiller: an ADD arriving
    /// while batches are out gets its own at once, instead of waiting for
    /// the slowest of them and then a whole allocation more. Shutdown lets
    /// the batches out finish, so their answers are recorded.
    async fn allocation_loop(&self, pool: &Pool, mut shutdown: watch::Receiver<bool>) {
        let mut batches = futures::stream::FuturesUnordered::new();
        // False after the store failed: no new batch until the next wake
        // or tick, so a broken disk is not hammered in a loop.
        let mut plan = false;
        while !*shutdown.borrow_and_update() {
            if plan {
                if let Err(error) = self.promote_cooled(pool) {
                    tracing::error!(pool = %pool.key.subnet, %error, "refill pass failed");
                }
                while batches.len() < MAX_PARALLEL_BATCHES {
                    let want = pool.lock().plan_refill(&pool.config, self.clock.now_ms());
                    if want == 0 {
                        break;
                    }
                    batches.push(self.allocate_into(pool, want));
                }
            }
            plan = true;
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(answered) = batches.next(), if !batches.is_empty() => {
                    // A backend failure is in the pool's state already (a
                    // pause, a back-off, or a narrower next batch).
                    if let Err(error) = answered {
                        tracing::error!(pool = %pool.key.subnet, %error, "refill pass failed");
                        plan = false;
                    }
                }
                () = pool.wake_refiller.notified() => {}
                () = tokio::time::sleep(self.refiller_sleep(pool)), if batches.is_empty() => {}
            }
        }
        while batches.next().await.is_some() {}
    }

    /// The returning half of [`PoolManager::run_refiller`].
    async fn return_loop(&self, pool: &Pool, mut shutdown: watch::Receiver<bool>) {
        let mut changes = pool.changed.subscribe();
        while !*shutdown.borrow_and_update() {
            let pass = match self.promote_cooled(pool) {
                Ok(()) => self.return_surplus(pool).await,
                Err(error) => Err(error),
            };
            if let Err(error) = pass {
                tracing::error!(pool = %pool.key.subnet, %error, "return pass failed");
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(self.refiller_sleep(pool)) => {}
            }
        }
    }

    /// Judges which assignments are gone without releasing them, for a
    /// caller that must tear down more than the address (a pod's host
    /// route) before handing it back. An assignment missing from `live` is
    /// gone only when it was also missing on the previous pass, so a pod
    /// still being created is never robbed.
    pub fn find_missing(&self, live: &HashSet<(String, String)>) -> MissingAssignments {
        let mut missing = MissingAssignments::default();
        let mut suspects = self
            .suspects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut missing_now = HashSet::new();
        for pool in self.all_pools() {
            let state = pool.lock();
            for (owner_key, id) in &state.owners {
                if live.contains(owner_key) {
                    continue;
                }
                let Some(AddressState::Assigned(owner)) =
                    state.records.get(id).map(|record| &record.state)
                else {
                    continue;
                };
                if suspects.contains(owner_key) {
                    missing.gone.push((pool.key.clone(), owner.clone()));
                } else {
                    missing.suspected.push(owner.clone());
                    missing_now.insert(owner_key.clone());
                }
            }
        }
        *suspects = missing_now;
        missing
    }

    /// Releases addresses whose pod is gone, as [`PoolManager::find_missing`]
    /// judges it.
    pub async fn reconcile(
        &self,
        live: &HashSet<(String, String)>,
    ) -> Result<ReconcileReport, PoolError> {
        let missing = self.find_missing(live);
        let mut report = ReconcileReport {
            released: Vec::with_capacity(missing.gone.len()),
            suspected: missing.suspected,
        };
        for (key, owner) in missing.gone {
            self.release(&key, &owner).await?;
            self.metrics.gc_releases.inc();
            report.released.push(owner);
        }
        Ok(report)
    }
}

/// Releases every address the backend holds for `node`: for a node that
/// was deleted without draining. Returns how many.
pub async fn sweep_node(backend: &dyn IpamBackend, node: &str) -> Result<usize, IpamError> {
    sweep(backend, &ListScope::Node(node.to_owned())).await
}

/// Releases every address the backend holds for this cluster: for a
/// cluster that is being deleted. Returns how many.
pub async fn sweep_cluster(backend: &dyn IpamBackend) -> Result<usize, IpamError> {
    sweep(backend, &ListScope::Cluster).await
}

async fn sweep(backend: &dyn IpamBackend, scope: &ListScope) -> Result<usize, IpamError> {
    let mut released = 0;
    for lease in backend.list(scope).await? {
        match backend.release(&lease.id).await {
            Ok(()) | Err(IpamError::NotFound(_)) => released += 1,
            Err(error) => return Err(error),
        }
    }
    Ok(released)
}
