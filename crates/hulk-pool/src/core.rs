//! The synchronous heart of a pool: which addresses are idle, assigned or
//! cooling down, how many are being allocated, and the decisions made
//! under the pool's lock. The engine wraps it in a mutex and does the I/O;
//! keeping it free of I/O lets concurrency tests (shuttle) explore every
//! interleaving of its steps.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use hulk_ipam::{Lease, Owner};

use crate::config::PoolConfig;
use crate::store::{AddressRecord, AddressState};

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
}

impl PoolCore {
    /// Adds or replaces a record, indexing it by its state.
    pub fn insert(&mut self, record: AddressRecord) {
        let id = record.lease.id.clone();
        match &record.state {
            AddressState::Idle => self.idle.push_back(id.clone()),
            AddressState::Assigned(owner) => {
                self.owners.insert(owner_key(owner), id.clone());
            }
            AddressState::Cooldown { .. } | AddressState::Releasing => {}
        }
        self.records.insert(id, record);
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

    /// The lease `owner` holds here, if any.
    pub fn assigned_lease(&self, owner: &Owner) -> Option<Lease> {
        let id = self.owners.get(&owner_key(owner))?;
        Some(leased(&self.records[id]))
    }

    /// Takes the oldest idle address for `owner`: the record as it should
    /// be stored. Nothing changes until [`PoolCore::insert`] commits it;
    /// [`PoolCore::untake`] puts it back if storing fails.
    pub fn take_idle(&mut self, owner: &Owner, now_ms: u64) -> Option<AddressRecord> {
        let id = self.idle.pop_front()?;
        let mut record = self.records[&id].clone();
        record.state = AddressState::Assigned(owner.clone());
        record.since_ms = now_ms;
        Some(record)
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
        let mut record = self.records[id].clone();
        record.state = AddressState::Cooldown {
            until_ms: now_ms + cooldown_ms,
        };
        record.since_ms = now_ms;
        Some(record)
    }

    /// Commits [`PoolCore::cool_down`]'s record.
    pub fn commit_cool_down(&mut self, owner: &Owner, record: AddressRecord) {
        self.owners.remove(&owner_key(owner));
        self.records.insert(record.lease.id.clone(), record);
    }

    /// How many addresses a refill should allocate now, counted as in
    /// flight until [`PoolCore::finish_refill`]: toward `min_idle` (or the
    /// number of waiting assignments), in one batch, never past `max_idle`
    /// or `max_total`, and nothing while degraded or draining.
    pub fn plan_refill(&mut self, config: &PoolConfig, now_ms: u64) -> usize {
        let idle = self.idle.len() + self.in_flight;
        let target = config.min_idle.max(self.waiters);
        let room = config
            .max_total
            .saturating_sub(self.records.len() + self.in_flight);
        let paused = self.draining || self.degraded_at(now_ms).is_some();
        let want = if paused || idle >= target {
            0
        } else {
            config
                .batch
                .min(room)
                .min(config.max_idle.max(target).saturating_sub(idle))
        };
        self.in_flight += want;
        want
    }

    /// Ends a refill of `planned` addresses that produced `records` (none
    /// on failure); a refusal pauses refills until `degraded`'s time.
    pub fn finish_refill(
        &mut self,
        planned: usize,
        records: Vec<AddressRecord>,
        degraded: Option<Refusal>,
    ) {
        self.in_flight -= planned;
        let succeeded = !records.is_empty();
        for record in records {
            self.insert(record);
        }
        if succeeded {
            self.degraded = None;
        } else if degraded.is_some() {
            self.degraded = degraded;
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
}
