//! The synchronous heart of a pool: which addresses are idle, assigned or
//! cooling down, how many are being allocated, and every decision made
//! under the pool's lock. The engine wraps a [`PoolCore`] in a mutex and
//! does the I/O (the store, the backend) around its calls; keeping it free
//! of I/O lets property tests and concurrency tests (shuttle) drive the
//! very code production runs, through every interleaving of its steps.
//!
//! This module holds the state, the allocation plans (refill, warm-up,
//! shrink, the screening of an answer) and the adaptive mode; `decisions`
//! holds those of assignments, releases, returns, drains, the dead-pod
//! collection and the orphan sweep; `arrivals` the ADD rate estimate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use hulk_ipam::{AttachmentId, IpamError, Lease, Owner, PoolKey};
use serde::{Deserialize, Serialize};

use crate::config::PoolConfig;
use crate::store::{AddressRecord, AddressState};

mod arrivals;
mod decisions;

pub use arrivals::{ARRIVAL_BURST_TIME_CONSTANT, ARRIVAL_MEMORY, ArrivalRate, poisson_stock};
pub use decisions::{
    AddressStep, AssignStep, Gone, MissingAssignments, Release, Suspects, holder_to_mark,
    mark_is_stale, restored,
};

/// The longest pause of refills the backend can ask for (a Retry-After):
/// five minutes. A longer one (a bug, or a hostile answer of a hundred
/// years) would keep the pool degraded for good; after five minutes the
/// refiller asks again, and a backend that still refuses says so again.
pub const MAX_BACKEND_PAUSE: Duration = Duration::from_secs(300);

/// The back-off window after the first failed allocation the backend did
/// not explain (an unreadable answer, a connection reset, a 401...): one
/// second, doubling with each failure in a row up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// The widest back-off window: a minute.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// `duration` in milliseconds, saturating at `u64::MAX` (a duration from a
/// configuration or a backend can be absurdly long).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The lease of a record, with its owner when assigned.
pub fn leased(record: &AddressRecord) -> Lease {
    let mut lease = record.lease.clone();
    if let AddressState::Assigned(owner) = &record.state {
        lease.owner = Some(owner.clone());
    }
    lease
}

/// A backend's refusal to give more addresses, which pauses refills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Until when (Unix milliseconds).
    pub until_ms: u64,
    /// The backend's error, for people.
    pub reason: String,
    /// The subnet or quota is used up (rather than the backend throttling).
    pub exhausted: bool,
}

impl Refusal {
    /// The refusal an allocation's `error` (at `now_ms`) says, if it is
    /// one: throttled pauses for the backend's Retry-After (or `backoff`
    /// without one); exhausted or over quota pauses for `backoff` and
    /// marks the subnet used up. Any other error is no refusal (the
    /// refiller backs off instead).
    pub fn of(error: &IpamError, backoff: Duration, now_ms: u64) -> Option<Refusal> {
        let (pause, exhausted) = match error {
            IpamError::Throttled { retry_after } => (retry_after.unwrap_or(backoff), false),
            IpamError::Exhausted { .. } | IpamError::Quota(_) => (backoff, true),
            _ => return None,
        };
        Some(Refusal::new(now_ms, pause, error.to_string(), exhausted))
    }

    /// A refusal pausing refills for `pause` from `now_ms`, within
    /// [`BACKOFF_FIRST`] and [`MAX_BACKEND_PAUSE`] whatever the backend
    /// asked.
    pub fn new(now_ms: u64, pause: Duration, reason: String, exhausted: bool) -> Self {
        Refusal {
            // At least BACKOFF_FIRST: a "Retry-After: 0" from a backend
            // that throttles must not turn the refiller into a loop.
            until_ms: now_ms.saturating_add(millis(pause.clamp(BACKOFF_FIRST, MAX_BACKEND_PAUSE))),
            reason,
            exhausted,
        }
    }
}

/// A failed backend call, as the pool remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendFailure {
    /// The call: `allocate`, `release`, `update_owner` or `list`.
    pub operation: String,
    /// The error's kind as metrics label it (`auth` for a 401 or 403,
    /// `protocol` for an unreadable answer, `throttled`, ...: see
    /// [`crate::error_kind`]).
    pub kind: String,
    /// The error, for people.
    pub message: String,
    /// When it happened (Unix milliseconds).
    pub at_ms: u64,
}

/// A wrong answer of the backend that the pool refuses (or, for a pod's
/// address over the cap, accepts while counting it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Anomaly {
    /// An address the node already holds, or that the same answer gave
    /// twice, under a new id: the id is returned to the backend.
    DuplicateAddress,
    /// A lease id the node already holds, or that the same answer gave
    /// twice: quarantined (neither adopted nor released, since releasing
    /// it would free the address its holder has).
    DuplicateId,
    /// Fewer leases than asked: what came is adopted.
    ShortAnswer,
    /// More leases than asked: the extras go back.
    LongAnswer,
    /// A lease of another network or subnet, whose gateway lies outside
    /// its own prefix, or outside the prefix of the pool's addresses: it
    /// goes back.
    OutsideSubnet,
    /// A request for one specific address answered with another: it goes
    /// back.
    WrongAddress,
    /// An address beyond `max_total`: it goes back, unless the backend
    /// marks a pod as its holder (then it is kept, and counted).
    OverCap,
}

impl Anomaly {
    /// Its metric label (`kind` of `hulk_pool_backend_anomalies_total`).
    pub fn kind(self) -> &'static str {
        match self {
            Anomaly::DuplicateAddress => "duplicate_address",
            Anomaly::DuplicateId => "duplicate_id",
            Anomaly::ShortAnswer => "short_answer",
            Anomaly::LongAnswer => "long_answer",
            Anomaly::OutsideSubnet => "outside_subnet",
            Anomaly::WrongAddress => "wrong_address",
            Anomaly::OverCap => "over_cap",
        }
    }

    /// Whether a lease refused for this may be returned to the backend:
    /// not one whose id the node holds already.
    pub fn releasable(self) -> bool {
        self != Anomaly::DuplicateId
    }
}

/// Lease ids and addresses held (by other pools, or earlier in one
/// answer), which a new lease must not repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// Lease ids.
    pub ids: HashSet<String>,
    /// Addresses.
    pub addresses: HashSet<IpAddr>,
}

impl Held {
    /// Adds a lease.
    pub fn insert(&mut self, lease: &Lease) {
        self.ids.insert(lease.id.clone());
        self.addresses.insert(lease.address.addr());
    }
}

/// How an allocation's answer is split ([`PoolCore::screen_answer`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Screened {
    /// To adopt: valid, at most what was asked and what `max_total`
    /// leaves room for.
    pub adopt: Vec<Lease>,
    /// To return to the backend, and why.
    pub release: Vec<(Lease, Anomaly)>,
    /// Neither adopted nor released (the node holds their id), and why.
    pub quarantine: Vec<(Lease, Anomaly)>,
    /// The answer had fewer leases than asked.
    pub short: bool,
}

/// How an allocation counted in flight ended ([`PoolCore::finish_refill`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RefillEnd {
    /// The backend gave these addresses (at least one).
    Allocated(Vec<AddressRecord>),
    /// The call failed, or its answer held no usable address. With a
    /// refusal, refills pause until its time (degraded); without one they
    /// back off: the window doubles from [`BACKOFF_FIRST`] to
    /// [`BACKOFF_MAX`] with each failure in a row, and the retry falls in
    /// its second half, `jitter` (0 to 1, drawn by the caller) saying
    /// where, so that many nodes do not retry in step.
    Failed {
        /// The failure.
        failure: BackendFailure,
        /// The backend's refusal to give more, if it was one.
        refusal: Option<Refusal>,
        /// Where in the back-off window's second half to retry.
        jitter: f64,
    },
    /// Given up before an answer (the store failed, or the caller went
    /// away): only the in-flight count changes.
    Abandoned,
}

/// One pool's addresses and bookkeeping, and every decision taken under
/// the pool's lock (see the module's documentation). Cloning takes a copy
/// of the state: a model can try a decision on the copy.
#[derive(Debug, Clone, Default)]
pub struct PoolCore {
    records: HashMap<String, AddressRecord>,
    idle: VecDeque<String>,
    owners: HashMap<AttachmentId, String>,
    waiters: usize,
    in_flight: usize,
    degraded: Option<Refusal>,
    /// Set by an operator's drain: no refills, idle addresses go back.
    draining: bool,
    /// Specific addresses being allocated from the backend for an owner.
    pending_addresses: HashSet<IpAddr>,
    /// Addresses that left the pool (the cloud took them back) while a
    /// pod's release still cooled them down: should the cloud give one
    /// out again, it comes back cooling down until then
    /// ([`PoolCore::arrival_state`]). In memory only: a restart forgets
    /// them, as it forgets nothing else the store keeps.
    freed: HashMap<IpAddr, Freed>,
    /// Allocations that failed in a row (0 after a success).
    failures: u32,
    /// Refills are held back after failures until then (Unix milliseconds).
    backoff_until_ms: u64,
    /// The last failed allocation, kept after later successes.
    last_failure: Option<BackendFailure>,
    /// Set when the backend said "exhausted" (or quota): the most one
    /// allocation asks for, until one succeeds or the pause the refusal
    /// asked for ends. Backends allocate all or none, so a subnet with 2
    /// free addresses refuses a batch of 4 for good; halving finds what is
    /// left. While it holds, the subnet is tight: idle addresses are not
    /// given back (a freed one may be the last).
    narrowed: Option<Narrowed>,
    /// How long successful allocations take, in milliseconds (a moving
    /// average); `None` before the first.
    allocation_ms: Option<u64>,
    /// How often ADDs arrive (fed by [`PoolCore::note_arrival`]).
    arrivals: ArrivalRate,
    /// When the adaptive mode's backend calls of the last minute were
    /// decided (Unix milliseconds, oldest first): its budget
    /// (`adaptive_calls_per_minute`). Kept only with `target_add_p99`.
    adaptive_calls: VecDeque<u64>,
}

/// An address that left the pool during its cooldown ([`PoolCore`]'s
/// `freed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Freed {
    /// When its cooldown ends (Unix milliseconds).
    until_ms: u64,
    /// It was a pod's fixed address: reserved to that pod, which may ask
    /// for it again at once.
    fixed: bool,
}

/// The budget window of `adaptive_calls_per_minute`, in milliseconds.
const BUDGET_WINDOW_MS: u64 = 60_000;

/// The fraction of ADDs the adaptive mode lets wait longer than
/// `target_add_p99`: 1 %.
const LATE_FRACTION: f64 = 0.01;

/// The narrower allocations after an "exhausted" ([`PoolCore`]'s
/// `narrowed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Narrowed {
    /// The most one allocation asks for.
    most: usize,
    /// Until when (Unix milliseconds): the refusal's pause.
    until_ms: u64,
}

/// The weight of the newest sample in [`PoolCore::note_allocation`]'s
/// moving average: a quarter, so one slow call moves it without ruling it.
const LATENCY_WEIGHT: f64 = 0.25;

impl PoolCore {
    /// Adds or replaces a record, indexing it by its state (a replaced
    /// record's index entries go, so no index ever names a record in a
    /// state it is not in).
    pub fn insert(&mut self, record: AddressRecord) {
        let id = record.lease.id.clone();
        if let Some(old) = self.records.get(&id) {
            let state = old.state.clone();
            self.unindex(&id, &state);
        }
        match &record.state {
            AddressState::Idle => self.idle.push_back(id.clone()),
            AddressState::Assigned(owner) => {
                self.owners.insert(owner.attachment_id(), id.clone());
            }
            AddressState::Cooldown { .. } | AddressState::Releasing => {}
        }
        self.records.insert(id, record);
    }

    /// Forgets the record of `id` and its index entries (an address the
    /// backend no longer has); returns it, or `None` when there is none.
    pub fn remove(&mut self, id: &str) -> Option<AddressRecord> {
        let record = self.records.remove(id)?;
        self.unindex(id, &record.state);
        Some(record)
    }

    /// Removes the index entries of `id`'s record in `state`, so no index
    /// names a record that left that state (or the pool).
    fn unindex(&mut self, id: &str, state: &AddressState) {
        match state {
            AddressState::Idle => self.idle.retain(|idle| idle != id),
            AddressState::Assigned(owner) => {
                let key = owner.attachment_id();
                if self.owners.get(&key).is_some_and(|held| held == id) {
                    self.owners.remove(&key);
                }
            }
            AddressState::Cooldown { .. } | AddressState::Releasing => {}
        }
    }

    /// Remembers that `record`'s address leaves the pool with a cooldown
    /// running until `until_ms` (nothing when it has ended at `now_ms`),
    /// and forgets the remembered ones that have cooled down.
    fn remember_freed(&mut self, record: &AddressRecord, until_ms: u64, now_ms: u64) {
        self.freed.retain(|_, freed| freed.until_ms > now_ms);
        if until_ms > now_ms {
            let freed = Freed {
                until_ms,
                fixed: record.fixed,
            };
            self.freed.insert(record.lease.address.addr(), freed);
        }
    }

    /// Until when `address`, which left the pool, still cools down for
    /// strangers at `now_ms` (not for the pod whose fixed address it was).
    fn freed_until(&self, address: IpAddr, now_ms: u64) -> Option<u64> {
        self.freed
            .get(&address)
            .filter(|freed| freed.until_ms > now_ms && !freed.fixed)
            .map(|freed| freed.until_ms)
    }

    /// The state an address the backend brings (an allocation's answer,
    /// an orphan the sweep adopts) joins the pool in at `now_ms`: `state`,
    /// except that one meant to be idle which left the pool during its
    /// cooldown (the cloud took it back, and gives it out again) cools
    /// down until that cooldown ends: the pod that held it may still be a
    /// Service endpoint.
    pub fn arrival_state(&self, address: IpAddr, state: AddressState, now_ms: u64) -> AddressState {
        match self.freed.get(&address) {
            Some(freed) if state == AddressState::Idle && freed.until_ms > now_ms => {
                AddressState::Cooldown {
                    until_ms: freed.until_ms,
                }
            }
            _ => state,
        }
    }

    /// The record of the address `owner` holds here, if any.
    pub fn held_by(&self, owner: &Owner) -> Option<&AddressRecord> {
        let id = self.owners.get(&owner.attachment_id())?;
        self.records.get(id)
    }

    /// Cooled-down addresses become idle (fixed ones go back to the backend
    /// instead: [`PoolCore::cooled_fixed`]); returns the changed records.
    pub fn promote_cooled(&mut self, now_ms: u64) -> Vec<AddressRecord> {
        let mut changed = Vec::new();
        for record in self.records.values_mut() {
            if let AddressState::Cooldown { until_ms } = record.state
                && until_ms <= now_ms
                && !record.fixed
            {
                record.state = AddressState::Idle;
                record.since_ms = now_ms;
                self.idle.push_back(record.lease.id.clone());
                changed.push(record.clone());
            }
        }
        changed
    }

    /// Fixed addresses released and cooled down: to return to the backend.
    pub fn cooled_fixed(&self, now_ms: u64) -> Vec<String> {
        self.records
            .values()
            .filter(|record| {
                record.fixed
                    && matches!(record.state, AddressState::Cooldown { until_ms } if until_ms <= now_ms)
            })
            .map(|record| record.lease.id.clone())
            .collect()
    }

    /// Why refills are paused, while they are.
    pub fn degraded_at(&self, now_ms: u64) -> Option<&Refusal> {
        self.degraded
            .as_ref()
            .filter(|refusal| refusal.until_ms > now_ms)
    }

    /// Until when refills back off after failures, while they do.
    pub fn backing_off_at(&self, now_ms: u64) -> Option<u64> {
        Some(self.backoff_until_ms).filter(|until| *until > now_ms)
    }

    /// Until when refills are paused (degraded or backing off), while they
    /// are: when the refiller should look again.
    pub fn paused_until(&self, now_ms: u64) -> Option<u64> {
        let refused = self.degraded_at(now_ms).map(|refusal| refusal.until_ms);
        refused.max(self.backing_off_at(now_ms))
    }

    /// The last failed allocation and how many failed in a row since the
    /// last success.
    pub fn failures(&self) -> (Option<&BackendFailure>, u32) {
        (self.last_failure.as_ref(), self.failures)
    }

    /// The lease `owner` holds here, if any.
    pub fn assigned_lease(&self, owner: &Owner) -> Option<Lease> {
        let id = self.owners.get(&owner.attachment_id())?;
        self.records.get(id).map(leased)
    }

    /// Takes the oldest idle address for `owner`: the record as it should
    /// be stored. Nothing changes until [`PoolCore::insert`] commits it;
    /// [`PoolCore::untake`] puts it back if storing fails.
    pub fn take_idle(&mut self, owner: &Owner, now_ms: u64) -> Option<AddressRecord> {
        while let Some(id) = self.idle.pop_front() {
            // An index entry without an idle record is stale: drop it
            // rather than hand out what is not idle.
            let Some(record) = self
                .records
                .get(&id)
                .filter(|record| record.state == AddressState::Idle)
            else {
                continue;
            };
            let mut record = record.clone();
            record.state = AddressState::Assigned(owner.clone());
            record.since_ms = now_ms;
            return Some(record);
        }
        None
    }

    /// Takes `address` for `owner` when this pool holds it idle, or
    /// cooling down as a fixed address (the cooldown protects strangers,
    /// not a pod asking for its own fixed address back; the annotation
    /// naming it is what makes the pod its own): the record as it should
    /// be stored, committed by [`PoolCore::insert`]; [`PoolCore::untake`]
    /// puts an idle one back. `Ok(None)`: the pool does not hold it.
    /// `Err`: it is held otherwise, or it is a pool address another pod
    /// released and its cooldown has not ended at `now_ms` (a fixed-address
    /// request must not hand a stranger's endpoints to this pod any more
    /// than an ordinary ADD may).
    pub fn take_address(
        &mut self,
        owner: &Owner,
        address: IpAddr,
        now_ms: u64,
    ) -> Result<Option<AddressRecord>, AddressState> {
        let Some(record) = self
            .records
            .values()
            .find(|record| record.lease.address.addr() == address)
        else {
            return Ok(None);
        };
        match &record.state {
            AddressState::Idle => {}
            AddressState::Cooldown { until_ms } if record.fixed || *until_ms <= now_ms => {}
            held => return Err(held.clone()),
        }
        let mut taken = record.clone();
        self.idle.retain(|id| *id != taken.lease.id);
        taken.state = AddressState::Assigned(owner.clone());
        taken.since_ms = now_ms;
        taken.fixed = true;
        Ok(Some(taken))
    }

    /// Undoes [`PoolCore::take_idle`] (or [`PoolCore::take_address`], or
    /// a return picked by [`PoolCore::plan_shrink`]) when the store refused
    /// the taken record: an address still idle in the pool goes back to
    /// the front of the idle index; one that was cooling down never left
    /// its state, and stays as it is.
    pub fn untake(&mut self, record: &AddressRecord) {
        let id = &record.lease.id;
        let idle = self
            .records
            .get(id)
            .is_some_and(|kept| kept.state == AddressState::Idle);
        if idle && !self.idle.contains(id) {
            self.idle.push_front(id.clone());
        }
    }

    /// Moves `owner`'s address to cooldown: the record as it should be
    /// stored, or `None` when the owner holds nothing here.
    pub fn cool_down(&self, owner: &Owner, now_ms: u64, cooldown_ms: u64) -> Option<AddressRecord> {
        let id = self.owners.get(&owner.attachment_id())?;
        let mut record = self.records.get(id)?.clone();
        record.state = AddressState::Cooldown {
            until_ms: now_ms.saturating_add(cooldown_ms),
        };
        record.since_ms = now_ms;
        Some(record)
    }

    /// Commits [`PoolCore::cool_down`]'s record.
    pub fn commit_cool_down(&mut self, owner: &Owner, record: AddressRecord) {
        self.owners.remove(&owner.attachment_id());
        self.insert(record);
    }

    /// How many more addresses the pool may hold from the backend
    /// ([`PoolConfig::held_cap`]), counting those being allocated.
    pub fn room(&self, config: &PoolConfig) -> usize {
        config
            .held_cap()
            .saturating_sub(self.records.len().saturating_add(self.in_flight))
    }

    /// Whether one more pod may get an address: fewer than `max_total`
    /// addresses are assigned or being allocated for a pod (a fixed one).
    /// Cooling and idle addresses do not count: they hold no pod.
    pub fn pod_room(&self, config: &PoolConfig) -> bool {
        self.owners
            .len()
            .saturating_add(self.pending_addresses.len())
            < config.max_total
    }

    /// How far ahead a cooling address counts as supply: one that turns
    /// idle before an allocation would answer serves a waiting ADD no
    /// later than the backend would. That is the allocations' average
    /// time, within `assign_timeout`; the whole `assign_timeout` before
    /// the first allocation and while the subnet is tight (every address
    /// the cloud has not got to give counts then).
    fn supply_horizon_ms(&self, config: &PoolConfig, now_ms: u64) -> u64 {
        let deadline = millis(config.assign_timeout);
        match self.allocation_ms {
            Some(latency) if !self.tight_at(now_ms) => latency.min(deadline),
            _ => deadline,
        }
    }

    /// Whether the subnet is tight: the backend refused for want of
    /// addresses (or quota), and its pause has not ended.
    pub fn tight_at(&self, now_ms: u64) -> bool {
        self.degraded_at(now_ms).is_some() || self.narrowed_at(now_ms).is_some()
    }

    /// The narrower allocations, while they hold.
    fn narrowed_at(&self, now_ms: u64) -> Option<Narrowed> {
        self.narrowed.filter(|narrowed| narrowed.until_ms > now_ms)
    }

    /// Cooling addresses (not fixed ones, which go back to the backend)
    /// that turn idle by `until_ms` (Unix milliseconds).
    pub fn cooling_by(&self, until_ms: u64) -> usize {
        self.records
            .values()
            .filter(|record| {
                !record.fixed
                    && matches!(record.state, AddressState::Cooldown { until_ms: due } if due <= until_ms)
            })
            .count()
    }

    /// What the static watermarks want idle now: `min_idle`, or more when
    /// more ADDs wait.
    fn static_demand(&self, config: &PoolConfig) -> usize {
        config.min_idle.max(self.waiters)
    }

    /// What the pool wants idle now: the static demand, or the adaptive
    /// target when that is more ([`PoolCore::adaptive_target`]). The one
    /// demand both refills and returns are judged by.
    fn demand(&self, config: &PoolConfig, now_ms: u64) -> usize {
        let adaptive = self.adaptive_target(config, now_ms).unwrap_or(0);
        self.static_demand(config).max(adaptive)
    }

    /// Counts an ADD reaching the pool at `now_ms` (Unix milliseconds) in
    /// the arrival-rate estimate the adaptive mode sizes the pool by.
    pub fn note_arrival(&mut self, now_ms: u64) {
        self.arrivals.note(now_ms);
    }

    /// ADDs per second reaching the pool lately, as estimated at `now_ms`
    /// (see [`ArrivalRate`]).
    pub fn arrival_rate(&self, now_ms: u64) -> f64 {
        self.arrivals.per_second_at(now_ms)
    }

    /// The idle addresses the adaptive mode wants at `now_ms`, within
    /// `[min_idle, max_idle]`; `None` without `target_add_p99`, or before
    /// the first allocation says how long the backend takes.
    ///
    /// An idle address taken is replaced one allocation time `L` later
    /// (the moving average of [`PoolCore::note_allocation`]). With `s`
    /// idle, an ADD waits longer than the target `T` only when `s` others
    /// arrived in the `L - T` before it, whose addresses are not back yet.
    /// With arrivals Poisson at the estimated rate `r` ([`ArrivalRate`]:
    /// the recent peak of a ten-second rate), that count has mean
    /// `r × (L - T)`; the target is the smallest `s` for which it reaches
    /// `s` at most 1 % of the time ([`poisson_stock`]). When `T >= L` no
    /// ADD waits longer than `T` anyway, and one idle address (or
    /// `min_idle`) is all it takes.
    pub fn adaptive_target(&self, config: &PoolConfig, now_ms: u64) -> Option<usize> {
        let target = config.target_add_p99?;
        let latency_ms = self.allocation_ms?;
        let exposed_ms = latency_ms.saturating_sub(millis(target));
        let mean = self.arrival_rate(now_ms) * exposed_ms as f64 / 1_000.0;
        let stock = poisson_stock(mean, LATE_FRACTION, config.max_idle);
        Some(stock.clamp(config.min_idle, config.max_idle.max(config.min_idle)))
    }

    /// How many more backend calls the adaptive mode's budget allows at
    /// `now_ms` (`adaptive_calls_per_minute` less the calls of the last
    /// minute); unbounded without `target_add_p99`.
    pub fn adaptive_calls_left(&self, config: &PoolConfig, now_ms: u64) -> usize {
        if config.target_add_p99.is_none() {
            return usize::MAX;
        }
        let recent = self
            .adaptive_calls
            .iter()
            .filter(|at| now_ms.saturating_sub(**at) < BUDGET_WINDOW_MS)
            .count();
        usize::try_from(config.adaptive_calls_per_minute)
            .unwrap_or(usize::MAX)
            .saturating_sub(recent)
    }

    /// Counts `calls` backend calls decided at `now_ms` against the
    /// adaptive budget (nothing without `target_add_p99`), forgetting
    /// those older than the budget's minute.
    fn spend_calls(&mut self, config: &PoolConfig, now_ms: u64, calls: usize) {
        if config.target_add_p99.is_none() {
            return;
        }
        while self
            .adaptive_calls
            .front()
            .is_some_and(|at| now_ms.saturating_sub(*at) >= BUDGET_WINDOW_MS)
        {
            self.adaptive_calls.pop_front();
        }
        self.adaptive_calls
            .extend(std::iter::repeat_n(now_ms, calls));
    }

    /// Whether an assignment that just took an idle address should wake
    /// the refiller: fewer idle than `min_idle`, or than the adaptive
    /// target.
    pub fn wants_refill(&self, config: &PoolConfig, now_ms: u64) -> bool {
        let target = self
            .adaptive_target(config, now_ms)
            .unwrap_or(config.min_idle);
        self.idle.len() < config.min_idle.max(target)
    }

    /// How many addresses a refill should allocate now, counted as in
    /// flight until [`PoolCore::finish_refill`]: when fewer than the
    /// reserve (`min_idle`, or the adaptive target when that is more:
    /// [`PoolCore::adaptive_target`]) are idle or being allocated, or when
    /// more ADDs wait than that plus the cooling addresses turning idle
    /// within the supply horizon (`supply_horizon_ms`) can serve; then one
    /// batch (or less after an "exhausted": see `narrowed`) toward
    /// `max_idle` or what is short, within the holding cap; nothing while
    /// degraded, backing off or draining. Cooling addresses serve waiting
    /// ADDs only, never the reserve: each pod replaced under churn brings
    /// the cooling address of the pod it replaces, and a reserve counting
    /// those would never grow while ADDs keep waiting. A refill only the
    /// adaptive target asks for (the static need is met) waits while the
    /// adaptive call budget is spent.
    pub fn plan_refill(&mut self, config: &PoolConfig, now_ms: u64) -> usize {
        let ready = self.idle.len() + self.in_flight;
        let horizon = now_ms.saturating_add(self.supply_horizon_ms(config, now_ms));
        let coming = self.cooling_by(horizon);
        let waiting_short = self.waiters.saturating_sub(ready + coming);
        let static_short = config.min_idle.saturating_sub(ready).max(waiting_short);
        let reserve = self
            .adaptive_target(config, now_ms)
            .map_or(config.min_idle, |target| target.max(config.min_idle));
        let short = reserve.saturating_sub(ready).max(waiting_short);
        let paused = self.draining || self.paused_until(now_ms).is_some();
        let over_budget = static_short == 0 && self.adaptive_calls_left(config, now_ms) == 0;
        let want = if paused || short == 0 || over_budget {
            0
        } else {
            self.batch(config, now_ms)
                .min(self.room(config))
                .min(short.max(config.max_idle.saturating_sub(ready)))
        };
        if want > 0 {
            self.spend_calls(config, now_ms, 1);
        }
        self.in_flight += want;
        want
    }

    /// The most one allocation asks for: `batch`, or less after an
    /// "exhausted" (`narrowed`).
    fn batch(&self, config: &PoolConfig, now_ms: u64) -> usize {
        self.narrowed_at(now_ms)
            .map_or(config.batch, |narrowed| narrowed.most.min(config.batch))
    }

    /// When the refiller should look again at the latest: when a pause or
    /// back-off ends, or the next cooling address turns idle (waiting ADDs
    /// may be counting on it). `None`: nothing is due.
    pub fn next_due(&self, now_ms: u64) -> Option<u64> {
        let cooled = self
            .records
            .values()
            .filter_map(|record| match record.state {
                AddressState::Cooldown { until_ms } if until_ms > now_ms => Some(until_ms),
                _ => None,
            })
            .min();
        match (self.paused_until(now_ms), cooled) {
            (Some(paused), Some(cooled)) => Some(paused.min(cooled)),
            (paused, cooled) => paused.or(cooled),
        }
    }

    /// Folds how long a successful allocation took into the average the
    /// supply horizon uses.
    pub fn note_allocation(&mut self, took_ms: u64) {
        self.allocation_ms = Some(match self.allocation_ms {
            None => took_ms,
            // `as` saturates; both values fit an f64 closely enough.
            Some(average) => {
                (average as f64 * (1.0 - LATENCY_WEIGHT) + took_ms as f64 * LATENCY_WEIGHT) as u64
            }
        });
    }

    /// Which idle addresses to give back now, taken out of the idle index
    /// (the caller stores them as being released, or puts them back with
    /// [`PoolCore::untake`] if that fails), and the cooled fixed ones
    /// ([`PoolCore::cooled_fixed`]). Judged by the same demand as refills:
    /// beyond `max_idle` or beyond the demand (the waiting ADDs, or the
    /// adaptive target), whichever is more, and those beyond that floor
    /// idle for longer than `idle_reclaim_after` at `now_ms`. In the
    /// adaptive mode, also those beyond the demand plus one `batch` (so
    /// that what a refill toward the demand just brought never goes back,
    /// and the pool does not oscillate), within the call budget. Nothing
    /// idle goes back while the subnet is tight (an "exhausted" or a
    /// refusal: a freed address may be the last one); everything idle goes
    /// back while draining.
    pub fn plan_shrink(&mut self, config: &PoolConfig, now_ms: u64) -> Vec<String> {
        let reclaim_before_ms = config
            .idle_reclaim_after
            .map(|after| now_ms.saturating_sub(millis(after)));
        let mut victims = Vec::new();
        let (floor, ceiling) = if self.draining {
            (0, 0)
        } else if self.tight_at(now_ms) {
            (usize::MAX, usize::MAX)
        } else {
            let demand = self.demand(config, now_ms);
            (demand, config.max_idle.max(demand))
        };
        // Without the adaptive mode this is the ceiling, and the budget is
        // unbounded: nothing changes.
        let adaptive_ceiling = match self.adaptive_target(config, now_ms) {
            Some(_) if floor != usize::MAX => floor.saturating_add(config.batch).min(ceiling),
            _ => ceiling,
        };
        let mut budget = self.adaptive_calls_left(config, now_ms);
        while self.idle.len() > floor {
            let Some(oldest) = self.idle.front().cloned() else {
                break;
            };
            let Some(since_ms) = self.records.get(&oldest).map(|record| record.since_ms) else {
                // An index entry without a record: drop it.
                self.idle.pop_front();
                continue;
            };
            let too_many = self.idle.len() > ceiling;
            let stale = reclaim_before_ms.is_some_and(|before| since_ms < before);
            let surplus = self.idle.len() > adaptive_ceiling && budget > 0;
            if !(too_many || stale || surplus) {
                break;
            }
            budget = budget.saturating_sub(1);
            self.idle.pop_front();
            victims.push(oldest);
        }
        victims.extend(self.cooled_fixed(now_ms));
        // One release call each (no backend has a bulk release).
        self.spend_calls(config, now_ms, victims.len());
        victims
    }

    /// How many addresses a warm-up batch should allocate now, counted as
    /// in flight until [`PoolCore::finish_refill`]: toward `warm_up` idle
    /// ones, in one batch, never past `max_total`; nothing while draining.
    /// Back-off does not hold a warm-up back: it is asked for once, and
    /// reports its failure to its caller.
    pub fn plan_warm_up(&mut self, config: &PoolConfig, now_ms: u64) -> usize {
        if self.draining {
            return 0;
        }
        let have = self.idle.len() + self.in_flight;
        let want = self
            .batch(config, now_ms)
            .min(config.warm_up.saturating_sub(have))
            .min(self.room(config));
        self.in_flight += want;
        want
    }

    /// Counts one address (a pod's fixed one) as in flight if the holding
    /// cap leaves room for it; `false` when the pool holds its most.
    pub fn reserve_one(&mut self, config: &PoolConfig) -> bool {
        let room = self.room(config) > 0;
        if room {
            self.in_flight += 1;
        }
        room
    }

    /// Whether `lease` may join the pool of `key`: its id and address are
    /// new to this pool and to `others`, its network and subnet (when the
    /// backend names them) are the pool's, its gateway lies in its own
    /// prefix, and that prefix is the one of the pool's addresses.
    pub fn check_lease(&self, key: &PoolKey, lease: &Lease, others: &Held) -> Result<(), Anomaly> {
        if self.records.contains_key(&lease.id) || others.ids.contains(&lease.id) {
            return Err(Anomaly::DuplicateId);
        }
        let address = lease.address.addr();
        if others.addresses.contains(&address)
            || self
                .records
                .values()
                .any(|record| record.lease.address.addr() == address)
        {
            return Err(Anomaly::DuplicateAddress);
        }
        let prefix = lease.address.trunc();
        let named_elsewhere = (!lease.network.is_empty() && lease.network != key.network)
            || (!lease.subnet.is_empty() && lease.subnet != key.subnet);
        let gateway_outside = lease
            .gateway
            .is_some_and(|gateway| !prefix.contains(&gateway));
        let off_the_pool = !self.records.is_empty()
            && !self
                .records
                .values()
                .any(|record| record.lease.address.trunc() == prefix);
        if named_elsewhere || gateway_outside || off_the_pool {
            return Err(Anomaly::OutsideSubnet);
        }
        Ok(())
    }

    /// Splits the answer to an allocation of `asked` addresses (counted in
    /// flight; `wanted`: the one specific address asked for) into what to
    /// adopt, release and quarantine. A lease is refused as
    /// [`PoolCore::check_lease`] says, also when an earlier lease of the
    /// same answer has its id or address; of the valid ones, the first
    /// `asked` that `max_total` leaves room for are adopted and the rest
    /// go back.
    pub fn screen_answer(
        &self,
        key: &PoolKey,
        config: &PoolConfig,
        asked: usize,
        wanted: Option<IpAddr>,
        leases: Vec<Lease>,
        others: &Held,
    ) -> Screened {
        // This allocation's own reservation is the room it may fill.
        let others_in_flight = self.in_flight.saturating_sub(asked);
        let room = config
            .held_cap()
            .saturating_sub(self.records.len().saturating_add(others_in_flight))
            .min(asked);
        let mut screened = Screened {
            short: leases.len() < asked,
            ..Screened::default()
        };
        let mut seen = others.clone();
        for lease in leases {
            let verdict = match self.check_lease(key, &lease, &seen) {
                Ok(()) if wanted.is_some_and(|wanted| wanted != lease.address.addr()) => {
                    Err(Anomaly::WrongAddress)
                }
                Ok(()) if screened.adopt.len() >= asked => Err(Anomaly::LongAnswer),
                Ok(()) if screened.adopt.len() >= room => Err(Anomaly::OverCap),
                verdict => verdict,
            };
            seen.insert(&lease);
            match verdict {
                Ok(()) => screened.adopt.push(lease),
                Err(anomaly) if anomaly.releasable() => screened.release.push((lease, anomaly)),
                Err(anomaly) => screened.quarantine.push((lease, anomaly)),
            }
        }
        screened
    }

    /// Ends an allocation of `planned` addresses counted in flight (see
    /// [`RefillEnd`]): a success adds its records and ends any pause and
    /// back-off; a failure is remembered and pauses or backs off refills.
    pub fn finish_refill(&mut self, planned: usize, end: RefillEnd, now_ms: u64) {
        self.in_flight = self.in_flight.saturating_sub(planned);
        match end {
            RefillEnd::Allocated(records) => {
                for record in records {
                    self.insert(record);
                }
                self.degraded = None;
                self.failures = 0;
                self.backoff_until_ms = 0;
                self.narrowed = None;
            }
            RefillEnd::Failed {
                failure,
                refusal,
                jitter,
            } => {
                self.failures = self.failures.saturating_add(1);
                self.last_failure = Some(failure);
                match refusal {
                    // All or none: fewer may still be there. Ask again at
                    // once for half, down to one; only "exhausted" for a
                    // single address degrades the pool.
                    Some(refusal) if refusal.exhausted && planned > 1 => {
                        let half = (planned / 2).max(1);
                        let most = self
                            .narrowed_at(now_ms)
                            .map_or(half, |narrowed| narrowed.most.min(half));
                        self.narrowed = Some(Narrowed {
                            most,
                            until_ms: refusal.until_ms,
                        });
                    }
                    Some(refusal) => {
                        if refusal.exhausted {
                            self.narrowed = Some(Narrowed {
                                most: 1,
                                until_ms: refusal.until_ms,
                            });
                        }
                        self.degraded = Some(refusal);
                    }
                    None => {
                        let window = millis(backoff_window(self.failures));
                        let half = window / 2;
                        // `as` saturates, and a NaN jitter counts as 0.
                        let spread = (half as f64 * jitter.clamp(0.0, 1.0)) as u64;
                        self.backoff_until_ms = now_ms.saturating_add(half.saturating_add(spread));
                    }
                }
            }
            RefillEnd::Abandoned => {}
        }
    }

    /// Counts of the pool: idle, assigned, cooling, releasing.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let mut counts = (0, 0, 0, 0);
        for record in self.records.values() {
            match record.state {
                AddressState::Idle => counts.0 += 1,
                AddressState::Assigned(_) => counts.1 += 1,
                AddressState::Cooldown { .. } => counts.2 += 1,
                AddressState::Releasing => counts.3 += 1,
            }
        }
        counts
    }

    /// How many addresses are being allocated.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// How many addresses the pool holds in any state.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the pool holds no address.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The ids and addresses this pool holds.
    pub fn held(&self, into: &mut Held) {
        for record in self.records.values() {
            into.insert(&record.lease);
        }
    }
}

/// The back-off window after `failures` failed allocations in a row:
/// [`BACKOFF_FIRST`] doubled per failure after the first, at most
/// [`BACKOFF_MAX`].
pub fn backoff_window(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    BACKOFF_FIRST
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests;
