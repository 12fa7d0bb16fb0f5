//! The synchronous heart of a pool: which addresses are idle, assigned or
//! cooling down, how many are being allocated, and the decisions made
//! under the pool's lock. The engine wraps it in a mutex and does the I/O;
//! keeping it free of I/O lets concurrency tests (shuttle) explore every
//! interleaving of its steps.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use hulk_ipam::{Lease, Owner, PoolKey};
use serde::{Deserialize, Serialize};

use crate::config::PoolConfig;
use crate::store::{AddressRecord, AddressState};

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

/// An owner as the pool indexes it: container id and interface.
pub type OwnerKey = (String, String);

/// The lease of a record, with its owner when assigned.
pub fn leased(record: &AddressRecord) -> Lease {
    let mut lease = record.lease.clone();
    if let AddressState::Assigned(owner) = &record.state {
        lease.owner = Some(owner.clone());
    }
    lease
}

/// The index key of an owner.
pub fn owner_key(owner: &Owner) -> OwnerKey {
    (owner.container_id.clone(), owner.ifname.clone())
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

/// One pool's addresses and bookkeeping.
#[derive(Debug, Default)]
pub struct PoolCore {
    pub(crate) records: HashMap<String, AddressRecord>,
    pub(crate) idle: VecDeque<String>,
    pub(crate) owners: HashMap<OwnerKey, String>,
    pub(crate) waiters: usize,
    pub(crate) in_flight: usize,
    pub(crate) degraded: Option<Refusal>,
    /// Set by an operator's drain: no refills, idle addresses go back.
    pub(crate) draining: bool,
    /// Specific addresses being allocated from the backend for an owner.
    pub(crate) pending_addresses: HashSet<IpAddr>,
    /// Allocations that failed in a row (0 after a success).
    pub(crate) failures: u32,
    /// Refills are held back after failures until then (Unix milliseconds).
    pub(crate) backoff_until_ms: u64,
    /// The last failed allocation, kept after later successes.
    pub(crate) last_failure: Option<BackendFailure>,
    /// Set when the backend said "exhausted" (or quota): the most one
    /// allocation asks for, until one succeeds or the pause the refusal
    /// asked for ends. Backends allocate all or none, so a subnet with 2
    /// free addresses refuses a batch of 4 for good; halving finds what is
    /// left. While it holds, the subnet is tight: idle addresses are not
    /// given back (a freed one may be the last).
    pub(crate) narrowed: Option<Narrowed>,
    /// How long successful allocations take, in milliseconds (a moving
    /// average); `None` before the first.
    pub(crate) allocation_ms: Option<u64>,
    /// How often ADDs arrive (fed by [`PoolCore::note_arrival`]).
    pub(crate) arrivals: ArrivalRate,
    /// When the adaptive mode's backend calls of the last minute were
    /// decided (Unix milliseconds, oldest first): its budget
    /// (`adaptive_calls_per_minute`). Kept only with `target_add_p99`.
    pub(crate) adaptive_calls: VecDeque<u64>,
}

/// The time constant of the burst rate of ADD arrivals: ten seconds, the
/// scale of a rollout's burst (50-200 ADDs within seconds) and of a cloud
/// allocation. An arrival counts `exp(-age / ARRIVAL_BURST_TIME_CONSTANT)`.
pub const ARRIVAL_BURST_TIME_CONSTANT: Duration = Duration::from_secs(10);

/// How long the adaptive mode remembers the highest burst rate: its time
/// constant, five minutes. Long enough that a rollout's next wave (minutes
/// later) finds the pool sized for the last one, short enough that an idle
/// hour takes the pool back to `min_idle`.
pub const ARRIVAL_MEMORY: Duration = Duration::from_secs(300);

/// The budget window of `adaptive_calls_per_minute`, in milliseconds.
const BUDGET_WINDOW_MS: u64 = 60_000;

/// The fraction of ADDs the adaptive mode lets wait longer than
/// `target_add_p99`: 1 %.
const LATE_FRACTION: f64 = 0.01;

/// The ADD arrival rate the adaptive mode sizes the pool by: the peak of
/// a burst rate, forgotten slowly.
///
/// The burst rate is an exponentially decaying count: each arrival adds
/// `1 / τb` per second (τb: [`ARRIVAL_BURST_TIME_CONSTANT`]) and the sum
/// decays by `exp(-elapsed / τb)`, so a steady stream of `r` ADDs a second
/// reads about `r`. The estimate is the highest burst rate seen, decaying
/// by `exp(-elapsed / τm)` (τm: [`ARRIVAL_MEMORY`]). A plain five-minute
/// average would read a burst of 150 ADDs in ten seconds as half an ADD a
/// second, and size the pool for a trickle; the peak reads it as the
/// burst it was (measured in docs/pool.md).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArrivalRate {
    /// The burst rate (ADDs per second) at `at_ms`.
    burst: f64,
    /// The remembered peak (ADDs per second) at `at_ms`.
    peak: f64,
    /// When the rates were last brought up to date (Unix milliseconds).
    at_ms: u64,
}

/// `exp(-elapsed / tau)`, the decay of an exponentially weighted count.
fn decay(elapsed_ms: u64, tau: Duration) -> f64 {
    (-(elapsed_ms as f64) / (tau.as_secs_f64() * 1_000.0)).exp()
}

impl ArrivalRate {
    /// The estimate (ADDs per second) at `now_ms` (Unix milliseconds); a
    /// clock that went back counts as no time passed.
    pub fn per_second_at(&self, now_ms: u64) -> f64 {
        // The peak is at least the burst rate, and decays slower.
        self.peak * decay(now_ms.saturating_sub(self.at_ms), ARRIVAL_MEMORY)
    }

    /// The burst rate alone (ADDs per second) at `now_ms`.
    pub fn burst_at(&self, now_ms: u64) -> f64 {
        self.burst
            * decay(
                now_ms.saturating_sub(self.at_ms),
                ARRIVAL_BURST_TIME_CONSTANT,
            )
    }

    /// Counts one arrival at `now_ms` (Unix milliseconds).
    pub fn note(&mut self, now_ms: u64) {
        let burst = self.burst_at(now_ms) + 1.0 / ARRIVAL_BURST_TIME_CONSTANT.as_secs_f64();
        self.peak = self.per_second_at(now_ms).max(burst);
        self.burst = burst;
        self.at_ms = self.at_ms.max(now_ms);
    }
}

/// The smallest `s` (at most `cap`) such that a Poisson count of mean
/// `mean` is at least `s` with probability at most `late`: how many idle
/// addresses serve all the ADDs of a window that many arrive in on
/// average, but for a fraction `late` of windows. `cap` when even `cap`
/// is not enough. Summed in log space, so a mean of thousands (whose
/// `exp(-mean)` is zero in an f64) still finds its quantile.
pub fn poisson_stock(mean: f64, late: f64, cap: usize) -> usize {
    if mean.is_nan() || mean <= 0.0 {
        // Nobody arrives: the ADD that does needs one address.
        return 1.min(cap);
    }
    let log_mean = mean.ln();
    // ln P(N = k), from k = 0 up.
    let mut log_pmf = -mean;
    let mut below = 0.0; // P(N < s)
    for s in 0..cap {
        if s > 0 {
            log_pmf += log_mean - (s as f64).ln();
        }
        // P(N >= s) = 1 - P(N < s); with s addresses, the ADD that finds
        // s others ahead of it in the window waits.
        if 1.0 - below <= late {
            return s;
        }
        below += log_pmf.exp();
    }
    cap
}

/// The narrower allocations after an "exhausted" ([`PoolCore`]'s
/// `narrowed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Narrowed {
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
                self.owners.insert(owner_key(owner), id.clone());
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
                let key = owner_key(owner);
                if self.owners.get(&key).is_some_and(|held| held == id) {
                    self.owners.remove(&key);
                }
            }
            AddressState::Cooldown { .. } | AddressState::Releasing => {}
        }
    }

    /// The record of the address `owner` holds here, if any.
    pub fn held_by(&self, owner: &Owner) -> Option<&AddressRecord> {
        let id = self.owners.get(&owner_key(owner))?;
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
        let id = self.owners.get(&owner_key(owner))?;
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

    /// Takes `address` for `owner` when this pool holds it idle or cooling
    /// down (the cooldown protects strangers, not a pod asking for its own
    /// fixed address back): the record as it should be stored, committed
    /// by [`PoolCore::insert`]; [`PoolCore::untake`] puts an idle one back.
    /// `Ok(None)`: the pool does not hold it. `Err`: it is held otherwise.
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
            AddressState::Idle | AddressState::Cooldown { .. } => {}
            held => return Err(held.clone()),
        }
        let mut taken = record.clone();
        self.idle.retain(|id| *id != taken.lease.id);
        taken.state = AddressState::Assigned(owner.clone());
        taken.since_ms = now_ms;
        taken.fixed = true;
        Ok(Some(taken))
    }

    /// Undoes [`PoolCore::take_idle`].
    pub fn untake(&mut self, record: &AddressRecord) {
        self.idle.push_front(record.lease.id.clone());
    }

    /// Moves `owner`'s address to cooldown: the record as it should be
    /// stored, or `None` when the owner holds nothing here.
    pub fn cool_down(
        &mut self,
        owner: &Owner,
        now_ms: u64,
        cooldown_ms: u64,
    ) -> Option<AddressRecord> {
        let id = self.owners.get(&owner_key(owner))?;
        let mut record = self.records.get(id)?.clone();
        record.state = AddressState::Cooldown {
            until_ms: now_ms.saturating_add(cooldown_ms),
        };
        record.since_ms = now_ms;
        Some(record)
    }

    /// Commits [`PoolCore::cool_down`]'s record.
    pub fn commit_cool_down(&mut self, owner: &Owner, record: AddressRecord) {
        self.owners.remove(&owner_key(owner));
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
    /// idle since before `reclaim_before_ms` (Unix milliseconds). In the
    /// adaptive mode, also those beyond the demand plus one `batch` (so
    /// that what a refill toward the demand just brought never goes back,
    /// and the pool does not oscillate), within the call budget. Nothing
    /// idle goes back while the subnet is tight (an "exhausted" or a
    /// refusal: a freed address may be the last one); everything idle goes
    /// back while draining.
    pub fn plan_shrink(
        &mut self,
        config: &PoolConfig,
        now_ms: u64,
        reclaim_before_ms: Option<u64>,
    ) -> Vec<String> {
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
mod tests {
    // Test code: a panic is how a test reports a failure.
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(id: &str, last: u8, state: AddressState) -> AddressRecord {
        AddressRecord {
            key: PoolKey::new("vpc", "s", ["sg"], None),
            lease: Lease {
                id: id.into(),
                address: format!("10.0.0.{last}/24").parse().unwrap(),
                network: "vpc".into(),
                subnet: "s".into(),
                gateway: Some("10.0.0.1".parse().unwrap()),
                mac: None,
                mtu: None,
                gateway_mac: None,
                security_groups: vec!["sg".into()],
                qos_policy: None,
                node: "n".into(),
                owner: None,
            },
            state,
            since_ms: 0,
            fixed: false,
            lost: false,
        }
    }

    fn owner(name: &str) -> Owner {
        Owner {
            container_id: name.into(),
            ifname: "eth0".into(),
            pod: None,
            cni_network: None,
            pod_uid: None,
        }
    }

    fn demand_config() -> PoolConfig {
        PoolConfig {
            // Demand is the waiting ADDs alone.
            min_idle: 0,
            max_idle: 0,
            batch: 8,
            max_total: 20,
            assign_timeout: Duration::from_secs(30),
            ..PoolConfig::default()
        }
    }

    /// An idle record with a unique address for any `n` below 65,000.
    fn numbered(n: u32) -> AddressRecord {
        let mut record = record(&format!("n-{n}"), 2, AddressState::Idle);
        let [_, _, high, low] = (n + 2).to_be_bytes();
        record.lease.address = format!("10.0.{high}.{low}/16").parse().unwrap();
        record.lease.gateway = Some("10.0.0.1".parse().unwrap());
        record
    }

    fn adaptive_config() -> PoolConfig {
        PoolConfig {
            min_idle: 2,
            max_idle: 40,
            batch: 8,
            max_total: 200,
            target_add_p99: Some(Duration::from_millis(500)),
            adaptive_calls_per_minute: 1_000,
            ..PoolConfig::default()
        }
    }

    /// P(N >= s) for a Poisson N of mean `mean`, summed the plain way.
    fn poisson_tail(mean: f64, s: usize) -> f64 {
        let mut pmf = (-mean).exp();
        let mut below = 0.0;
        for k in 0..s {
            below += pmf;
            pmf *= mean / (k + 1) as f64;
        }
        1.0 - below
    }

    #[test]
    fn the_arrival_rate_follows_a_steady_stream_and_decays_when_it_stops() {
        let mut rate = ArrivalRate::default();
        // Two ADDs a second for an hour.
        for tick in 0..7_200u64 {
            rate.note(tick * 500);
        }
        let steady = rate.per_second_at(3_600_000);
        assert!((steady - 2.0).abs() < 0.1, "{steady}");
        // One memory time constant later, a factor e lower.
        let later = 3_600_000 + millis(ARRIVAL_MEMORY);
        let decayed = rate.per_second_at(later);
        assert!(
            (decayed - steady / std::f64::consts::E).abs() < 0.01,
            "{decayed}"
        );
        // A clock that went back neither panics nor moves the estimate.
        assert_eq!(rate.per_second_at(0), rate.per_second_at(3_599_500));
        rate.note(0);
        assert!(rate.per_second_at(3_600_000) >= steady);
    }

    #[test]
    fn a_burst_counts_at_its_own_rate_and_is_remembered_for_minutes() {
        let mut rate = ArrivalRate::default();
        // 150 ADDs in ten seconds, after a quiet start.
        for n in 0..150u64 {
            rate.note(1_000_000 + n * 66);
        }
        let end = 1_000_000 + 149 * 66;
        let peak = rate.per_second_at(end);
        // About 15 a second times (1 - 1/e): far above the half an ADD a
        // second a five-minute average would say.
        assert!((8.0..15.0).contains(&peak), "{peak}");
        // A minute on, the burst rate is gone, the peak mostly remembered.
        let minute = end + 60_000;
        assert!(rate.burst_at(minute) < 0.01 * peak);
        assert!(rate.per_second_at(minute) > 0.8 * peak);
        // A single late ADD does not erase the memory.
        rate.note(minute);
        assert!(rate.per_second_at(minute) > 0.8 * peak);
    }

    #[test]
    fn the_poisson_stock_is_the_smallest_with_at_most_the_late_fraction() {
        for mean in [0.001, 0.3, 1.0, 4.5, 17.0, 60.0] {
            let stock = poisson_stock(mean, 0.01, 1_000);
            assert!(poisson_tail(mean, stock) <= 0.01, "{mean}: {stock}");
            assert!(poisson_tail(mean, stock - 1) > 0.01, "{mean}: {stock}");
        }
        // A mean whose exp(-mean) underflows: about mean + 2.33 sigma.
        let stock = poisson_stock(2_000.0, 0.01, 5_000) as f64;
        let normal = 2_000.0 + 2.326 * 2_000f64.sqrt();
        assert!((stock - normal).abs() < 5.0, "{stock}");
        assert_eq!(poisson_stock(2_000.0, 0.01, 50), 50);
        assert_eq!(poisson_stock(0.0, 0.01, 50), 1);
        assert_eq!(poisson_stock(f64::NAN, 0.01, 0), 0);
    }

    #[test]
    fn the_adaptive_target_rises_with_the_rate_and_falls_back_within_bounds() {
        let config = adaptive_config();
        let mut core = PoolCore::default();
        // Not adaptive yet: no latency measured.
        assert_eq!(core.adaptive_target(&config, 0), None);
        core.note_allocation(10_500);
        // No ADD yet: the floor.
        let quiet = core.adaptive_target(&config, 0).unwrap();
        assert_eq!(quiet, config.min_idle);
        // A burst of 100 ADDs in ten seconds.
        let mut targets = Vec::new();
        for n in 0..100u64 {
            core.note_arrival(n * 100);
            targets.push(core.adaptive_target(&config, n * 100).unwrap());
        }
        assert!(
            targets.windows(2).all(|pair| pair[0] <= pair[1]),
            "{targets:?}"
        );
        let busy = *targets.last().unwrap();
        let mean = core.arrival_rate(9_900) * 10.0;
        assert_eq!(busy, poisson_stock(mean, 0.01, config.max_idle));
        assert!(busy > quiet, "{busy}");
        // Ten times as many: capped at max_idle.
        for n in 0..1_000u64 {
            core.note_arrival(10_000 + n * 10);
        }
        assert_eq!(core.adaptive_target(&config, 20_000), Some(config.max_idle));
        // Idle: the target decays step by step back to min_idle.
        let decay: Vec<usize> = (1..=12u64)
            .map(|minutes| {
                core.adaptive_target(&config, 20_000 + minutes * 300_000)
                    .unwrap()
            })
            .collect();
        assert!(decay.windows(2).all(|pair| pair[0] >= pair[1]), "{decay:?}");
        assert!(
            decay
                .iter()
                .any(|target| (config.min_idle + 1..config.max_idle).contains(target)),
            "{decay:?}"
        );
        assert_eq!(decay.last(), Some(&config.min_idle));
        // A target at or above the allocation time needs no stock.
        let relaxed = PoolConfig {
            target_add_p99: Some(Duration::from_secs(11)),
            ..config.clone()
        };
        assert_eq!(
            core.adaptive_target(&relaxed, 20_000),
            Some(config.min_idle)
        );
        // Without the knob, no adaptive target, and the static plan.
        let fixed = PoolConfig {
            target_add_p99: None,
            ..config
        };
        assert_eq!(core.adaptive_target(&fixed, 20_000), None);
        core.insert(numbered(0));
        core.insert(numbered(1));
        assert_eq!(core.plan_refill(&fixed, 20_000), 0);
        assert!(!core.wants_refill(&fixed, 20_000));
    }

    #[test]
    fn adaptive_refills_and_returns_keep_within_the_call_budget() {
        let config = PoolConfig {
            adaptive_calls_per_minute: 2,
            ..adaptive_config()
        };
        let mut core = PoolCore::default();
        core.note_allocation(10_000);
        for n in 0..1_000u64 {
            core.note_arrival(n * 10);
        }
        let now = 10_000;
        assert_eq!(core.adaptive_target(&config, now), Some(config.max_idle));
        // Two calls of a batch, then the budget is spent.
        assert_eq!(core.plan_refill(&config, now), 8);
        assert_eq!(core.plan_refill(&config, now), 8);
        assert_eq!(core.plan_refill(&config, now), 0);
        // Waiting ADDs beyond what is coming are served anyway.
        core.waiters = 20;
        assert_eq!(core.plan_refill(&config, now), 8);
        core.waiters = 0;
        // A minute later, two more.
        assert_eq!(core.plan_refill(&config, now + 60_000), 8);
        assert_eq!(core.plan_refill(&config, now + 60_000), 8);
        assert_eq!(core.plan_refill(&config, now + 60_000), 0);
        let planned = core.in_flight();
        let records = (0..u32::try_from(planned).unwrap()).map(numbered).collect();
        core.finish_refill(planned, RefillEnd::Allocated(records), now + 60_000);
        // An hour without ADDs: the target is back at min_idle, and the
        // surplus beyond it and a batch goes back, two calls a minute.
        let quiet = now + 3_660_000;
        assert_eq!(core.adaptive_target(&config, quiet), Some(config.min_idle));
        assert_eq!(core.plan_shrink(&config, quiet, None).len(), 2);
        assert!(core.plan_shrink(&config, quiet, None).is_empty());
        let mut returned = 2;
        let mut minute = quiet;
        loop {
            minute += 60_000;
            let victims = core.plan_shrink(&config, minute, None).len();
            if victims == 0 {
                break;
            }
            assert!(victims <= 2, "{victims}");
            returned += victims;
        }
        assert_eq!(core.idle.len(), config.min_idle + config.batch);
        assert_eq!(returned, planned - config.min_idle - config.batch);
    }

    proptest::proptest! {
        /// Whatever the arrivals, latency and knobs: the adaptive target
        /// lies within the bounds, and what a refill toward it brings is
        /// never picked to go back at once (the pool does not oscillate).
        #[test]
        fn adaptive_refills_are_not_returned_at_once(
            arrivals in 0u64..400,
            spacing_ms in 1u64..2_000,
            latency_ms in 1u64..30_000,
            target_ms in 0u64..5_000,
            idle in 0u32..60,
            min_idle in 0usize..8,
            spread in 0usize..60,
            batch in 1usize..20,
        ) {
            let config = PoolConfig {
                min_idle,
                max_idle: min_idle + spread,
                batch,
                max_total: 200,
                target_add_p99: Some(Duration::from_millis(target_ms)),
                adaptive_calls_per_minute: 10_000,
                ..PoolConfig::default()
            };
            let mut core = PoolCore::default();
            core.note_allocation(latency_ms);
            for n in 0..arrivals {
                core.note_arrival(n * spacing_ms);
            }
            for n in 0..idle {
                core.insert(numbered(n));
            }
            let now = arrivals * spacing_ms;
            let target = core.adaptive_target(&config, now).unwrap();
            proptest::prop_assert!((config.min_idle..=config.max_idle).contains(&target));
            let mut next = idle;
            loop {
                let want = core.plan_refill(&config, now);
                if want == 0 {
                    break;
                }
                let count = u32::try_from(want).unwrap();
                let records = (next..next + count).map(numbered).collect();
                next += count;
                core.finish_refill(want, RefillEnd::Allocated(records), now);
            }
            if next > idle {
                proptest::prop_assert!(core.idle.len() >= target);
                proptest::prop_assert!(core.plan_shrink(&config, now, None).is_empty());
            }
        }
    }

    #[test]
    fn cooling_addresses_due_before_an_allocation_would_answer_count_as_supply() {
        let config = demand_config();
        let mut core = PoolCore::default();
        // Two addresses turn idle in 3 s, one in 20 s; two ADDs wait.
        core.insert(record("a", 2, AddressState::Cooldown { until_ms: 3_000 }));
        core.insert(record("b", 3, AddressState::Cooldown { until_ms: 3_000 }));
        core.insert(record("c", 4, AddressState::Cooldown { until_ms: 20_000 }));
        core.waiters = 2;
        // Before any allocation, the whole assign_timeout is the horizon.
        assert_eq!(core.plan_refill(&config, 0), 0);
        assert_eq!(core.next_due(0), Some(3_000));
        // Allocations take 10 s: the one due in 20 s does not count.
        core.note_allocation(10_000);
        core.waiters = 3;
        assert_eq!(core.plan_refill(&config, 0), 1);
        core.finish_refill(1, RefillEnd::Abandoned, 0);
        // Allocations take 1 s: nothing cooling counts.
        for _ in 0..40 {
            core.note_allocation(1_000);
        }
        assert_eq!(core.allocation_ms, Some(1_000));
        assert_eq!(core.plan_refill(&config, 0), 3);
    }

    #[test]
    fn an_exhausted_batch_is_halved_down_to_one_then_degrades() {
        let config = demand_config();
        let mut core = PoolCore {
            waiters: 8,
            ..PoolCore::default()
        };
        let exhausted = |now_ms| RefillEnd::Failed {
            failure: BackendFailure {
                operation: "allocate".into(),
                kind: "exhausted".into(),
                message: "no".into(),
                at_ms: now_ms,
            },
            refusal: Some(Refusal::new(
                now_ms,
                Duration::from_secs(60),
                "no".into(),
                true,
            )),
            jitter: 0.5,
        };
        let mut asked = Vec::new();
        loop {
            let want = core.plan_refill(&config, 0);
            if want == 0 {
                break;
            }
            asked.push(want);
            core.finish_refill(want, exhausted(0), 0);
        }
        assert_eq!(asked, [8, 4, 2, 1]);
        assert!(core.degraded_at(0).is_some());
        assert!(core.tight_at(59_999));
        // The pause over, whole batches again.
        assert!(!core.tight_at(60_000));
        assert_eq!(core.plan_refill(&config, 60_000), 8);
    }

    #[test]
    fn a_retry_after_of_zero_still_pauses_for_a_second() {
        let refusal = Refusal::new(5_000, Duration::ZERO, "slow down".into(), false);
        assert_eq!(refusal.until_ms, 5_000 + millis(BACKOFF_FIRST));
    }

    #[test]
    fn a_replaced_record_leaves_no_stale_index_entry() {
        let mut core = PoolCore::default();
        core.insert(record("a", 2, AddressState::Assigned(owner("p1"))));
        // The same id again, idle (what a reused id did): p1 no longer
        // appears to hold it, and it is handed out once.
        core.insert(record("a", 2, AddressState::Idle));
        assert_eq!(core.assigned_lease(&owner("p1")), None);
        let taken = core.take_idle(&owner("p2"), 1).unwrap();
        core.insert(taken);
        assert!(core.take_idle(&owner("p3"), 1).is_none());
        assert_eq!(core.counts(), (0, 1, 0, 0));
    }

    #[test]
    fn an_index_naming_a_missing_record_is_skipped_not_a_panic() {
        let mut core = PoolCore::default();
        core.idle.push_back("gone".into());
        core.owners
            .insert(owner_key(&owner("p1")), "gone-too".into());
        assert_eq!(core.assigned_lease(&owner("p1")), None);
        assert_eq!(core.cool_down(&owner("p1"), 0, 30_000), None);
        assert!(core.take_idle(&owner("p2"), 0).is_none());
        core.finish_refill(5, RefillEnd::Abandoned, 0);
        assert_eq!(core.in_flight(), 0);
    }

    #[test]
    fn answers_are_screened_against_the_pool_others_and_themselves() {
        let config = PoolConfig {
            max_total: 4,
            max_held: Some(4),
            ..PoolConfig::default()
        };
        let key = PoolKey::new("vpc", "s", ["sg"], None);
        let mut core = PoolCore::default();
        core.insert(record("held", 2, AddressState::Idle));
        core.in_flight = 3;
        let mut others = Held::default();
        others.insert(&record("other", 3, AddressState::Idle).lease);
        let mut foreign = record("foreign", 9, AddressState::Idle).lease;
        foreign.subnet = "t".into();
        let answer = vec![
            record("held", 4, AddressState::Idle).lease,
            record("new-1", 2, AddressState::Idle).lease,
            record("new-2", 3, AddressState::Idle).lease,
            foreign,
            record("new-3", 5, AddressState::Idle).lease,
            record("new-3", 6, AddressState::Idle).lease,
            record("new-4", 5, AddressState::Idle).lease,
            record("new-5", 7, AddressState::Idle).lease,
            record("new-6", 8, AddressState::Idle).lease,
            record("new-7", 10, AddressState::Idle).lease,
        ];
        let screened = core.screen_answer(&key, &config, 3, None, answer, &others);
        let ids = |leases: &[(Lease, Anomaly)]| -> Vec<(String, &'static str)> {
            leases
                .iter()
                .map(|(lease, anomaly)| (lease.id.clone(), anomaly.kind()))
                .collect()
        };
        // Room: 4 - 1 held = 3, all of this allocation's reservation.
        let adopted: Vec<&str> = screened
            .adopt
            .iter()
            .map(|lease| lease.id.as_str())
            .collect();
        assert_eq!(adopted, ["new-3", "new-5", "new-6"]);
        assert_eq!(
            ids(&screened.quarantine),
            [
                ("held".into(), "duplicate_id"),
                ("new-3".into(), "duplicate_id")
            ]
        );
        assert_eq!(
            ids(&screened.release),
            [
                ("new-1".into(), "duplicate_address"),
                ("new-2".into(), "duplicate_address"),
                ("foreign".into(), "outside_subnet"),
                ("new-4".into(), "duplicate_address"),
                ("new-7".into(), "long_answer"),
            ]
        );
        assert!(!screened.short);
        // Another allocation in flight takes its share of the room.
        core.in_flight = 4;
        let screened = core.screen_answer(
            &key,
            &config,
            3,
            None,
            vec![
                record("a", 11, AddressState::Idle).lease,
                record("b", 12, AddressState::Idle).lease,
                record("c", 13, AddressState::Idle).lease,
            ],
            &Held::default(),
        );
        assert_eq!(screened.adopt.len(), 2);
        assert_eq!(screened.release[0].1, Anomaly::OverCap);
    }

    #[test]
    fn pauses_are_capped_and_back_off_doubles_to_its_ceiling() {
        let forever = Refusal::new(u64::MAX - 5, Duration::MAX, "no".into(), false);
        assert_eq!(forever.until_ms, u64::MAX);
        let long = Refusal::new(
            1_000,
            Duration::from_secs(3_000_000_000),
            "no".into(),
            false,
        );
        assert_eq!(long.until_ms, 1_000 + millis(MAX_BACKEND_PAUSE));
        let windows: Vec<u64> = [1, 2, 3, 6, 7, 100, u32::MAX]
            .into_iter()
            .map(|failures| backoff_window(failures).as_secs())
            .collect();
        assert_eq!(windows, [1, 2, 4, 32, 60, 60, 60]);
        let mut core = PoolCore::default();
        for (failure, jitter, low, high) in [(1, 0.0, 500, 500), (2, 1.0, 2_000, 2_000)] {
            core.finish_refill(
                0,
                RefillEnd::Failed {
                    failure: BackendFailure {
                        operation: "allocate".into(),
                        kind: "protocol".into(),
                        message: "not JSON".into(),
                        at_ms: 0,
                    },
                    refusal: None,
                    jitter,
                },
                0,
            );
            assert_eq!(core.failures().1, failure);
            let until = core.backing_off_at(0).unwrap();
            assert!((low..=high).contains(&until), "{until}");
        }
        core.finish_refill(0, RefillEnd::Allocated(Vec::new()), 10);
        assert_eq!(core.paused_until(10), None);
        assert_eq!(core.failures().1, 0);
    }
}
