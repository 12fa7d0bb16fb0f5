//! The pool engine: assignment from idle addresses, one refiller per pool
//! that alone talks to the backend, cooldown, shrink, restart repair,
//! reconciliation against live pods and orphan sweeps.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hulk_ipam::{AllocationRequest, IpamBackend, IpamError, Lease, ListScope, Owner, PoolKey};
use tokio::sync::{Notify, RwLock, watch};

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
            .map_or(0, |elapsed| elapsed.as_millis() as u64)
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

use crate::core::{OwnerKey, PoolCore, Refusal, leased};

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
    /// Whether refills are paused after a backend refusal.
    pub degraded: bool,
    /// The backend's refusal, while degraded.
    pub degraded_reason: Option<String>,
    /// Whether an operator drained the pool.
    pub draining: bool,
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
            let wait = Duration::from_secs_f64((1.0 - tokens) / self.rate);
            tokio::time::sleep(wait).await;
            at = now + wait;
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
    /// half-done: releases in flight are finished, and the backend's
    /// addresses of this node that the store does not know are swept
    /// ([`PoolManager::sweep_orphans`]: adopted into the pool the backend
    /// names, as the marked pod's or idle, else released when no pod is
    /// marked). A failed sweep fails the open
    /// only after an interrupted allocation; otherwise the periodic sweep
    /// retries it.
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
        });
        let mut allocation_interrupted = false;
        for intent in snapshot.intents.values() {
            match &intent.kind {
                IntentKind::Release { lease_id } => {
                    match manager
                        .timed("release", manager.backend.release(lease_id))
                        .await
                    {
                        Ok(()) | Err(IpamError::NotFound(_)) => {}
                        Err(error) => return Err(error.into()),
                    }
                    manager.store.apply(&[
                        StoreOp::RemoveAddress(lease_id.clone()),
                        StoreOp::RemoveIntent(intent.id),
                    ])?;
                }
                IntentKind::Allocate { .. } => allocation_interrupted = true,
            }
        }
        let released: BTreeSet<&String> = snapshot
            .intents
            .values()
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
            if record.state == AddressState::Releasing {
                record.state = AddressState::Idle;
            }
            manager.pool(&record.key).lock().insert(record);
        }
        for key in &snapshot.drained {
            manager.pool(key).lock().draining = true;
        }
        // Every start compares with the backend: an interrupted allocation
        // leaves addresses nobody knows, a lost store forgets pods' ones.
        match manager.sweep_orphans().await {
            Ok(sweep) => {
                if sweep != OrphanSweep::default() {
                    tracing::warn!(?sweep, "the backend held addresses the store did not know");
                }
                let stale: Vec<StoreOp> = snapshot
                    .intents
                    .values()
                    .filter(|intent| matches!(intent.kind, IntentKind::Allocate { .. }))
                    .map(|intent| StoreOp::RemoveIntent(intent.id))
                    .collect();
                manager.store.apply(&stale)?;
            }
            Err(error) if allocation_interrupted => return Err(error),
            Err(error) => tracing::warn!(
                %error,
                "cannot compare the store with the backend at start; the periodic sweep will"
            ),
        }
        Ok(manager)
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

    /// A backend call counted in the metrics but not rate-limited.
    async fn metered<T>(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = Result<T, IpamError>>,
    ) -> Result<T, IpamError> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.metrics.backend_call(operation, started, &result);
        result
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
        let deadline = started + pool.config.assign_timeout;
        let mut changes = pool.changed.subscribe();
        let mut waiting = false;
        let outcome = loop {
            {
                let mut state = pool.lock();
                if let Some(lease) = state.assigned_lease(owner) {
                    break Ok(lease);
                }
                let now = self.clock.now_ms();
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
                    if state.idle.len() < pool.config.min_idle {
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
                if let Some(refusal) = state.degraded_at(now) {
                    break Err(PoolError::Degraded {
                        subnet: key.subnet.clone(),
                        reason: refusal.reason.clone(),
                        exhausted: refusal.exhausted,
                    });
                }
                if !waiting {
                    state.waiters += 1;
                    waiting = true;
                }
                pool.wake_refiller.notify_one();
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    break Err(PoolError::Empty {
                        subnet: key.subnet.clone(),
                        waited: started.elapsed(),
                    });
                }
            }
        };
        if waiting {
            pool.lock().waiters -= 1;
        }
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
            match state.take_address(owner, address, self.clock.now_ms()) {
                Ok(Some(record)) => {
                    if let Err(error) = self.store.apply(&[StoreOp::put(record.clone())]) {
                        if state.records[&record.lease.id].state == AddressState::Idle {
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
    /// an intent record as every allocation is.
    async fn allocate_for(
        &self,
        pool: &Pool,
        owner: &Owner,
        address: IpAddr,
    ) -> Result<Lease, PoolError> {
        let _gate = self.allocation_gate.read().await;
        let intent = self.intent(IntentKind::Allocate {
            key: pool.key.clone(),
            count: 1,
        });
        let intent_id = intent.id;
        self.store.apply(&[StoreOp::PutIntent(intent)])?;
        let request = AllocationRequest::for_address(pool.key.clone(), self.node.clone(), address);
        let result = self
            .timed("allocate", self.backend.allocate(&request))
            .await;
        let lease = match result.map(|mut leases| leases.pop()) {
            Ok(Some(lease)) if lease.address.addr() == address => lease,
            Ok(other) => {
                // The intent stays: the next start sweeps what came back.
                return Err(IpamError::Protocol(format!(
                    "asked for {address}, got {:?}",
                    other.map(|lease| lease.address)
                ))
                .into());
            }
            Err(error) => {
                self.store.apply(&[StoreOp::RemoveIntent(intent_id)])?;
                return Err(match error {
                    IpamError::Conflict(reason) => {
                        PoolError::AddressUnavailable { address, reason }
                    }
                    other => other.into(),
                });
            }
        };
        let record = AddressRecord {
            key: pool.key.clone(),
            lease,
            state: AddressState::Assigned(owner.clone()),
            since_ms: self.clock.now_ms(),
            fixed: true,
        };
        let stored = self.store.apply(&[
            StoreOp::put(record.clone()),
            StoreOp::RemoveIntent(intent_id),
        ]);
        // As for refills: without a durable record the intent stays and the
        // next start sweeps the address; serve it meanwhile.
        if let Err(error) = &stored {
            tracing::error!(%error, "cannot record an allocated address");
        }
        let lease = leased(&record);
        self.holder_changed(&lease.id);
        pool.lock().insert(record);
        stored?;
        Ok(lease)
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
    /// Releasing an owner that holds nothing succeeds.
    pub async fn release(&self, key: &PoolKey, owner: &Owner) -> Result<(), PoolError> {
        let pool = self.pool(key);
        let mut state = pool.lock();
        let cooldown_ms = pool.config.reuse_cooldown.as_millis() as u64;
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
                    .map(|id| state.records[id].lease.address.addr())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Counts of a pool.
    pub fn stats(&self, key: &PoolKey) -> PoolStats {
        let pool = self.pool(key);
        let state = pool.lock();
        let (idle, assigned, cooldown, releasing) = state.counts();
        let degraded_reason = state
            .degraded_at(self.clock.now_ms())
            .map(|refusal| refusal.reason.clone());
        PoolStats {
            idle,
            assigned,
            cooldown,
            releasing,
            in_flight: state.in_flight(),
            degraded: degraded_reason.is_some(),
            degraded_reason,
            draining: state.draining,
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
        self.shrink(&pool).await
    }

    /// Ends a drain of `key`'s pool and runs a refill pass.
    pub async fn resume(&self, key: &PoolKey) -> Result<RefillOutcome, PoolError> {
        self.store
            .apply(&[StoreOp::SetDrained(key.clone(), false)])?;
        self.pool(key).lock().draining = false;
        self.refill(key).await
    }

    /// One refill pass of `key`'s pool: allocates toward `min_idle` (and
    /// for waiting assignments) in batches (up to four in parallel), returns idle addresses beyond
    /// `max_idle` or unused past `idle_reclaim_after`.
    pub async fn refill(&self, key: &PoolKey) -> Result<RefillOutcome, PoolError> {
        let pool = self.pool(key);
        self.promote_cooled(&pool)?;
        let mut outcome = RefillOutcome {
            released: self.shrink(&pool).await?,
            ..RefillOutcome::default()
        };
        // More waiting assignments than one batch serves get several
        // batches in parallel: a burst then waits one backend call, not one
        // per batch.
        let mut batches = Vec::new();
        while batches.len() < MAX_PARALLEL_BATCHES {
            let want = pool.lock().plan_refill(&pool.config, self.clock.now_ms());
            if want == 0 {
                break;
            }
            batches.push(self.allocate_into(&pool, want));
        }
        for result in futures::future::join_all(batches).await {
            match result? {
                Ok(allocated) => outcome.allocated += allocated,
                Err(error) => outcome.error = Some(error),
            }
        }
        Ok(outcome)
    }

    /// Allocates `count` addresses (already counted in `in_flight`) behind
    /// an intent record. The outer error is the store's; the inner one the
    /// backend's, after which the pool may be degraded.
    async fn allocate_into(
        &self,
        pool: &Pool,
        count: usize,
    ) -> Result<Result<usize, IpamError>, PoolError> {
        let _gate = self.allocation_gate.read().await;
        let intent = self.intent(IntentKind::Allocate {
            key: pool.key.clone(),
            count,
        });
        let intent_id = intent.id;
        if let Err(error) = self.store.apply(&[StoreOp::PutIntent(intent)]) {
            pool.lock().finish_refill(count, Vec::new(), None);
            return Err(error.into());
        }
        let request = AllocationRequest::new(pool.key.clone(), self.node.clone(), count);
        let result = self
            .timed("allocate", self.backend.allocate(&request))
            .await;
        let now = self.clock.now_ms();
        match result {
            Ok(leases) => {
                let records: Vec<AddressRecord> = leases
                    .into_iter()
                    .map(|lease| AddressRecord {
                        key: pool.key.clone(),
                        lease,
                        state: AddressState::Idle,
                        since_ms: now,
                        fixed: false,
                    })
                    .collect();
                let mut ops: Vec<StoreOp> = records.iter().cloned().map(StoreOp::put).collect();
                ops.push(StoreOp::RemoveIntent(intent_id));
                let stored = self.store.apply(&ops);
                // Without a durable record the addresses would be unknown
                // after a restart; the intent stays, so the next start
                // sweeps them. Keep serving them meanwhile.
                if let Err(error) = &stored {
                    tracing::error!(%error, "cannot record allocated addresses");
                }
                let allocated = records.len();
                pool.lock().finish_refill(count, records, None);
                self.metrics
                    .refills
                    .get_or_create(&PoolLabels::from(&pool.key))
                    .inc();
                pool.announce();
                stored?;
                Ok(Ok(allocated))
            }
            Err(error) => {
                // Backends allocate all or none: nothing to undo.
                let pause = match &error {
                    IpamError::Throttled { retry_after } => {
                        Some(retry_after.unwrap_or(pool.config.backoff))
                    }
                    IpamError::Exhausted { .. } | IpamError::Quota(_) => Some(pool.config.backoff),
                    _ => None,
                };
                let degraded = pause.map(|pause| Refusal {
                    until_ms: now + pause.as_millis() as u64,
                    reason: error.to_string(),
                    exhausted: matches!(error, IpamError::Exhausted { .. } | IpamError::Quota(_)),
                });
                pool.lock().finish_refill(count, Vec::new(), degraded);
                self.store.apply(&[StoreOp::RemoveIntent(intent_id)])?;
                tracing::warn!(pool = %pool.key.subnet, %error, "refill failed");
                pool.announce();
                Ok(Err(error))
            }
        }
    }

    /// `id`'s record as it is while being returned to the backend, and the
    /// intent that covers the call.
    fn release_victim(&self, state: &PoolCore, id: &str) -> (AddressRecord, Intent) {
        let mut record = state.records[id].clone();
        record.state = AddressState::Releasing;
        let intent = self.intent(IntentKind::Release {
            lease_id: id.to_owned(),
        });
        (record, intent)
    }

    /// Returns idle addresses beyond `max_idle`, and those beyond
    /// `min_idle` idle for longer than `idle_reclaim_after`; every idle
    /// address of a draining pool.
    async fn shrink(&self, pool: &Pool) -> Result<usize, PoolError> {
        let now = self.clock.now_ms();
        let victims: Vec<(AddressRecord, Intent)> = {
            let mut state = pool.lock();
            let config = &pool.config;
            let reclaim_before = config
                .idle_reclaim_after
                .map(|after| now.saturating_sub(after.as_millis() as u64));
            let (floor, ceiling) = if state.draining {
                (0, 0)
            } else {
                (config.min_idle, config.max_idle)
            };
            let mut victims = Vec::new();
            while state.idle.len() > floor {
                let Some(oldest) = state.idle.front().cloned() else {
                    break;
                };
                let too_many = state.idle.len() > ceiling;
                let stale =
                    reclaim_before.is_some_and(|before| state.records[&oldest].since_ms < before);
                if !(too_many || stale) {
                    break;
                }
                state.idle.pop_front();
                victims.push(self.release_victim(&state, &oldest));
            }
            for id in state.cooled_fixed(now) {
                victims.push(self.release_victim(&state, &id));
            }
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
                    state.idle.push_front(record.lease.id.clone());
                }
                return Err(error.into());
            }
            for (record, _) in &victims {
                state
                    .records
                    .insert(record.lease.id.clone(), record.clone());
            }
            victims
        };
        let mut released = 0;
        for (record, intent) in victims {
            let id = record.lease.id.clone();
            match self.timed("release", self.backend.release(&id)).await {
                Ok(()) | Err(IpamError::NotFound(_)) => {
                    self.store.apply(&[
                        StoreOp::RemoveAddress(id.clone()),
                        StoreOp::RemoveIntent(intent.id),
                    ])?;
                    pool.lock().records.remove(&id);
                    released += 1;
                }
                Err(error) => {
                    // Keep it as it was (a fixed address cooled down, others
                    // idle), the intent removed; a later pass retries.
                    tracing::warn!(lease = %id, %error, "cannot return an address");
                    let mut kept = record.clone();
                    kept.state = if record.fixed {
                        AddressState::Cooldown { until_ms: now }
                    } else {
                        AddressState::Idle
                    };
                    self.store
                        .apply(&[StoreOp::put(kept.clone()), StoreOp::RemoveIntent(intent.id)])?;
                    pool.lock().insert(kept);
                }
            }
        }
        Ok(released)
    }

    /// Tops the idle addresses of `key` up to `warm_up` (in batches)
    /// before any pod asks; what a restart finds idle counts, and a
    /// drained pool gets nothing. Returns how many it allocated.
    pub async fn warm_up(&self, key: &PoolKey) -> Result<usize, PoolError> {
        let pool = self.pool(key);
        let mut allocated = 0;
        loop {
            let count = {
                let mut state = pool.lock();
                if state.draining {
                    return Ok(allocated);
                }
                let have = state.idle.len() + state.in_flight();
                let count = pool
                    .config
                    .batch
                    .min(pool.config.warm_up.saturating_sub(have));
                state.in_flight += count;
                count
            };
            if count == 0 {
                return Ok(allocated);
            }
            allocated += self.allocate_into(&pool, count).await??;
        }
    }

    /// Runs a refiller for every pool, those known now and those that
    /// appear later (a pod's annotations can name a pool first seen at its
    /// ADD), until `shutdown` turns true or its sender is dropped.
    pub async fn run_refillers(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut running = HashSet::new();
        let mut refillers = tokio::task::JoinSet::new();
        while !*shutdown.borrow_and_update() {
            for key in self.keys() {
                if running.insert(key.clone()) {
                    refillers.spawn(self.clone().run_refiller(key, shutdown.clone()));
                }
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = self.pool_added.notified() => {}
            }
        }
        while refillers.join_next().await.is_some() {}
    }

    /// Runs the refiller of `key` until `shutdown` turns true (or its
    /// sender is dropped): woken by assignments and releases, and every
    /// `refill_interval`.
    pub async fn run_refiller(self: Arc<Self>, key: PoolKey, mut shutdown: watch::Receiver<bool>) {
        let pool = self.pool(&key);
        while !*shutdown.borrow_and_update() {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = pool.wake_refiller.notified() => {}
                () = tokio::time::sleep(pool.config.refill_interval) => {}
            }
            loop {
                match self.refill(&key).await {
                    Ok(outcome) if outcome.allocated > 0 || outcome.released > 0 => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::error!(pool = %key.subnet, %error, "refill pass failed");
                        break;
                    }
                }
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
                let AddressState::Assigned(owner) = &state.records[id].state else {
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
