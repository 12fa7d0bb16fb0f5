//! The decisions of an assignment, a release, a return, a drain, the
//! dead-pod collection and the orphan sweep, taken under the pool's lock.
//! The engine asks, stores what the answer says, and then commits it to
//! the core (or undoes it when the store refused): no `if` over a pool's
//! state is left to the engine.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use hulk_ipam::{AttachmentId, Lease, Owner, PoolKey};

use super::{Anomaly, Held, PoolCore, Refusal, millis};
use crate::config::PoolConfig;
use crate::store::{AddressRecord, AddressState};

/// What an assignment from the idle addresses does next
/// ([`PoolCore::admit`], then [`PoolCore::take_or_wait`]).
#[derive(Debug, Clone, PartialEq)]
pub enum AssignStep {
    /// The owner holds this lease here already: a retried ADD gets it
    /// again.
    Held(Box<Lease>),
    /// Pods hold `max_total` addresses: one must go first.
    Full,
    /// This idle address, as it should be stored for the owner: committed
    /// by [`PoolCore::insert`] once stored, put back by
    /// [`PoolCore::untake`] if the store refuses.
    Take(Box<AddressRecord>),
    /// An operator drained the pool.
    Drained,
    /// The backend refuses more addresses, and no more cooling addresses
    /// turn idle before this ADD's deadline than ADDs wait ahead of it.
    Refused(Refusal),
    /// Nothing to take now: wait for the pool to change, counted as
    /// waiting ([`PoolCore::add_waiter`]), and wake the refiller.
    Wait,
}

/// What an assignment of one specific address does next
/// ([`PoolCore::take_address_for`]).
#[derive(Debug, Clone, PartialEq)]
pub enum AddressStep {
    /// The owner holds this address already (a retried ADD).
    Held(Lease),
    /// The owner holds another address here.
    HoldsOther(Lease),
    /// Pods hold `max_total` addresses.
    Full,
    /// The pool holds it idle, or cooling down as a pod's fixed address
    /// (reserved to that pod through its cooldown): the record as it
    /// should be stored for the owner (fixed), committed by
    /// [`PoolCore::insert`], put back by [`PoolCore::untake`] if the store
    /// refuses.
    Take(Box<AddressRecord>),
    /// Another pod released it from the pool (not as a fixed address) and
    /// it cools down until `until_ms` (Unix milliseconds): Service
    /// endpoints may still point at that pod, so no pod gets it before.
    CoolingDown {
        /// When its cooldown ends (Unix milliseconds).
        until_ms: u64,
    },
    /// Another pod holds it.
    HeldBy(Owner),
    /// It is being returned to the backend.
    Releasing,
    /// Another ADD is allocating it from the backend now.
    Pending,
    /// The pool does not hold it: it is marked as being allocated (no
    /// other ADD may allocate it meanwhile) until [`PoolCore::end_pending`],
    /// and the caller allocates it from the backend.
    Allocate,
}

/// What a release does with the owner's address ([`PoolCore::plan_release`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    /// The backend no longer has it (flagged `lost`): dropped from the
    /// pool and the store, never handed out again (another node may hold
    /// it, and there is nothing to return). The record is the owner's;
    /// should the cloud give the address back within the cooldown, it
    /// comes back cooling down ([`PoolCore::arrival_state`]).
    Drop(AddressRecord),
    /// It cools down before serving again: the record as it should be
    /// stored.
    CoolDown(AddressRecord),
}

/// What becomes of an address the backend confirmed gone
/// ([`PoolCore::on_gone`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Gone {
    /// Idle or cooling down: it leaves the pool and the store.
    Drop(AddressRecord),
    /// A pod's: it stays the pod's until its DEL, flagged `lost` (the
    /// record as it should be stored).
    Lost(AddressRecord),
}

/// Assignments whose pod is missing, as one reconciliation pass sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MissingAssignments {
    /// Missing on this pass and the previous one: to be released.
    pub gone: Vec<(PoolKey, Owner)>,
    /// Missing on this pass only: gone on the next pass if still missing.
    pub suspected: Vec<Owner>,
}

/// The owners missing on the last pass of the dead-pod collection: an
/// owner is gone only when missing on two passes in a row, since the
/// Kubernetes API may lag behind a pod being created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Suspects(HashSet<AttachmentId>);

impl Suspects {
    /// Judges this pass's `missing` owners (with their pool): those
    /// missing on the last pass too are gone, the others suspected; the
    /// suspects become this pass's (an owner that reappeared is forgiven).
    pub fn judge(
        &mut self,
        missing: impl IntoIterator<Item = (PoolKey, Owner)>,
    ) -> MissingAssignments {
        let mut judged = MissingAssignments::default();
        let mut missing_now = HashSet::new();
        for (key, owner) in missing {
            let id = owner.attachment_id();
            if self.0.contains(&id) {
                judged.gone.push((key, owner));
            } else {
                missing_now.insert(id);
                judged.suspected.push(owner);
            }
        }
        self.0 = missing_now;
        judged
    }
}

/// The holder a mark in the backend should name for an address in
/// `state`: `Some(None)` for no pod (idle or cooling), `None` when there
/// is nothing to mark (it is being returned).
pub fn holder_to_mark(state: &AddressState) -> Option<Option<Owner>> {
    match state {
        AddressState::Assigned(owner) => Some(Some(owner.clone())),
        AddressState::Idle | AddressState::Cooldown { .. } => Some(None),
        AddressState::Releasing => None,
    }
}

/// Whether the backend's mark (`marked`: the pod it names as holder) of
/// an address in `state` must be written again: it names another holder,
/// and the address is not being returned.
pub fn mark_is_stale(state: &AddressState, marked: Option<&Owner>) -> bool {
    let holder = match state {
        AddressState::Assigned(owner) => Some(owner.attachment_id()),
        _ => None,
    };
    *state != AddressState::Releasing && holder != marked.map(Owner::attachment_id)
}

/// `record` as a start takes it from the store: `releasing` (its release
/// intent is not settled) it stays `Releasing`, never handed out; a
/// `Releasing` one without such an intent (the release was undone) is
/// idle again.
pub fn restored(record: &AddressRecord, releasing: bool) -> AddressRecord {
    let mut record = record.clone();
    if releasing {
        record.state = AddressState::Releasing;
    } else if record.state == AddressState::Releasing {
        record.state = AddressState::Idle;
    }
    record
}

/// `known` with the facts `fresh` (the backend's current answer for the
/// same lease) reports, or `None` when none changed. A fact the listing
/// leaves out (`None`, or no security groups) is kept: listings of some
/// backends say less than their allocation answers did.
fn refreshed(known: &Lease, fresh: &Lease) -> Option<Lease> {
    let mut lease = known.clone();
    if fresh.gateway.is_some() {
        lease.gateway = fresh.gateway;
    }
    if fresh.gateway_mac.is_some() {
        lease.gateway_mac = fresh.gateway_mac;
    }
    if fresh.mtu.is_some() {
        lease.mtu = fresh.mtu;
    }
    if fresh.mac.is_some() {
        lease.mac = fresh.mac;
    }
    if !fresh.security_groups.is_empty() {
        lease.security_groups = fresh.security_groups.clone();
    }
    (lease != *known).then_some(lease)
}

impl PoolCore {
    /// The first look of an assignment for `owner`: the lease it holds
    /// already, or [`AssignStep::Full`] when pods hold `max_total`
    /// addresses; `None` to go on. A `first_look` that goes on counts as
    /// an ADD arriving at `now_ms` (not a retry of one served, nor the
    /// same ADD again after a wake-up), which the adaptive mode sizes the
    /// pool by.
    pub fn admit(
        &mut self,
        config: &PoolConfig,
        owner: &Owner,
        now_ms: u64,
        first_look: bool,
    ) -> Option<AssignStep> {
        if let Some(lease) = self.assigned_lease(owner) {
            return Some(AssignStep::Held(Box::new(lease)));
        }
        if !self.pod_room(config) {
            return Some(AssignStep::Full);
        }
        if first_look {
            self.note_arrival(now_ms);
        }
        None
    }

    /// After [`PoolCore::admit`] (and cooled addresses promoted): the
    /// oldest idle address for `owner`, or why the ADD cannot wait, or
    /// [`AssignStep::Wait`]. A cloud that refuses more addresses does not
    /// keep an ADD from one of the node's own coming out of cooldown
    /// before its deadline (`assign_timeout` from `now_ms`), as long as
    /// more of them come than ADDs wait ahead of it (`waiting`: this ADD
    /// is counted among the waiters already).
    pub fn take_or_wait(
        &mut self,
        config: &PoolConfig,
        owner: &Owner,
        now_ms: u64,
        waiting: bool,
    ) -> AssignStep {
        if let Some(record) = self.take_idle(owner, now_ms) {
            return AssignStep::Take(Box::new(record));
        }
        if self.draining {
            return AssignStep::Drained;
        }
        let ahead = self.waiters.saturating_sub(usize::from(waiting));
        let deadline_ms = now_ms.saturating_add(millis(config.assign_timeout));
        match self.degraded_at(now_ms) {
            Some(refusal) if self.cooling_by(deadline_ms) <= ahead => {
                AssignStep::Refused(refusal.clone())
            }
            _ => AssignStep::Wait,
        }
    }

    /// Counts one more ADD waiting for an address (refills serve them).
    pub fn add_waiter(&mut self) {
        self.waiters = self.waiters.saturating_add(1);
    }

    /// Counts one ADD fewer waiting (served, failed or cancelled).
    pub fn remove_waiter(&mut self) {
        self.waiters = self.waiters.saturating_sub(1);
    }

    /// How many ADDs wait for an address.
    pub fn waiters(&self) -> usize {
        self.waiters
    }

    /// The assignment of exactly `address` to `owner` (a pod's fixed IP):
    /// see [`AddressStep`]. The cooldown protects strangers, not a pod
    /// asking for its own fixed address back, so a cooling fixed one is
    /// taken; a pool address another pod released waits out its cooldown
    /// ([`AddressStep::CoolingDown`]), as it would for any ADD.
    pub fn take_address_for(
        &mut self,
        config: &PoolConfig,
        owner: &Owner,
        address: IpAddr,
        now_ms: u64,
    ) -> AddressStep {
        if let Some(lease) = self.assigned_lease(owner) {
            return if lease.address.addr() == address {
                AddressStep::Held(lease)
            } else {
                AddressStep::HoldsOther(lease)
            };
        }
        if !self.pod_room(config) {
            return AddressStep::Full;
        }
        match self.take_address(owner, address, now_ms) {
            Ok(Some(record)) => AddressStep::Take(Box::new(record)),
            Ok(None) => match self.freed_until(address, now_ms) {
                // The cloud took it back during its cooldown: a refill
                // would bring it back cooling, and so does this request.
                Some(until_ms) => AddressStep::CoolingDown { until_ms },
                None if self.pending_addresses.insert(address) => AddressStep::Allocate,
                None => AddressStep::Pending,
            },
            Err(AddressState::Assigned(holder)) => AddressStep::HeldBy(holder),
            Err(AddressState::Cooldown { until_ms }) => AddressStep::CoolingDown { until_ms },
            Err(_) => AddressStep::Releasing,
        }
    }

    /// Ends the allocation of `address` that [`AddressStep::Allocate`]
    /// began (answered, failed or cancelled).
    pub fn end_pending(&mut self, address: IpAddr) {
        self.pending_addresses.remove(&address);
    }

    /// Whether `address` is being allocated for an ADD.
    pub fn is_pending(&self, address: IpAddr) -> bool {
        self.pending_addresses.contains(&address)
    }

    /// Undoes [`PoolCore::promote_cooled`] for the `promoted` records the
    /// store did not take: they cool down again (due at once, `now_ms`),
    /// and leave the idle index, so memory never serves what the store
    /// would not know after a restart.
    pub fn undo_promotion(&mut self, promoted: &[AddressRecord], now_ms: u64) {
        for record in promoted {
            let id = &record.lease.id;
            self.idle.retain(|idle| idle != id);
            if let Some(kept) = self.records.get_mut(id) {
                kept.state = AddressState::Cooldown { until_ms: now_ms };
            }
        }
    }

    /// What a release of `owner`'s address does (see [`Release`]); `None`
    /// when the owner holds nothing here. Nothing changes until
    /// [`PoolCore::commit_release`].
    pub fn plan_release(&self, owner: &Owner, now_ms: u64, cooldown_ms: u64) -> Option<Release> {
        let held = self.held_by(owner)?;
        if held.lost {
            return Some(Release::Drop(held.clone()));
        }
        self.cool_down(owner, now_ms, cooldown_ms)
            .map(Release::CoolDown)
    }

    /// Commits [`PoolCore::plan_release`]'s answer (planned at `now_ms`
    /// with `cooldown_ms`), once stored: a dropped address is remembered
    /// as cooling down until the cooldown it would have had ends.
    pub fn commit_release(
        &mut self,
        owner: &Owner,
        release: Release,
        now_ms: u64,
        cooldown_ms: u64,
    ) {
        match release {
            Release::Drop(record) => {
                self.remove(&record.lease.id);
                self.remember_freed(&record, now_ms.saturating_add(cooldown_ms), now_ms);
            }
            Release::CoolDown(record) => self.commit_cool_down(owner, record),
        }
    }

    /// The addresses to give back now ([`PoolCore::plan_shrink`]) as they
    /// should be stored while being returned (`Releasing`). They leave the
    /// idle index at once; [`PoolCore::commit_returns`] records them once
    /// stored, [`PoolCore::undo_returns`] puts them back if the store
    /// refuses.
    pub fn plan_returns(&mut self, config: &PoolConfig, now_ms: u64) -> Vec<AddressRecord> {
        self.plan_shrink(config, now_ms)
            .iter()
            .filter_map(|id| {
                let mut record = self.records.get(id)?.clone();
                record.state = AddressState::Releasing;
                Some(record)
            })
            .collect()
    }

    /// Records [`PoolCore::plan_returns`]'s records as being returned.
    pub fn commit_returns(&mut self, returning: &[AddressRecord]) {
        for record in returning {
            self.insert(record.clone());
        }
    }

    /// Undoes [`PoolCore::plan_returns`]: idle ones go back to the front
    /// of the idle index, in their order (fixed ones never left cooldown).
    pub fn undo_returns(&mut self, returning: &[AddressRecord]) {
        for record in returning.iter().rev() {
            self.untake(record);
        }
    }

    /// `record` (being returned) as it is kept when the backend refused
    /// to take it back: a fixed one cooled down (due at once, `now_ms`, so
    /// the next pass returns it again), others idle, serving again.
    pub fn unreturned(record: &AddressRecord, now_ms: u64) -> AddressRecord {
        let mut kept = record.clone();
        kept.state = if record.fixed {
            AddressState::Cooldown { until_ms: now_ms }
        } else {
            AddressState::Idle
        };
        kept
    }

    /// Whether an operator drained the pool: no refills, idle addresses
    /// go back, assignments without an idle address fail.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Drains the pool (`true`) or ends a drain.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// The owners of this pool's assignments missing from `live`
    /// (container id and interface of every live pod interface).
    pub fn missing_from(&self, live: &HashSet<AttachmentId>) -> Vec<Owner> {
        self.owners
            .iter()
            .filter(|(id, _)| !live.contains(*id))
            .filter_map(|(_, id)| match &self.records.get(id)?.state {
                AddressState::Assigned(owner) => Some(owner.clone()),
                _ => None,
            })
            .collect()
    }

    /// What becomes of `id`, which the backend confirmed gone, as its
    /// record is now (an assignment may have taken it since the listing):
    /// see [`Gone`]. `None`: nothing to do (not here, flagged `lost`
    /// already, or being returned: for its release the backend's
    /// `NotFound` is success).
    pub fn on_gone(&self, id: &str) -> Option<Gone> {
        let record = self.records.get(id)?;
        match &record.state {
            AddressState::Releasing => None,
            AddressState::Assigned(_) if record.lost => None,
            AddressState::Idle | AddressState::Cooldown { .. } => Some(Gone::Drop(record.clone())),
            AddressState::Assigned(_) => {
                let mut lost = record.clone();
                lost.lost = true;
                Some(Gone::Lost(lost))
            }
        }
    }

    /// Forgets `id`'s record once [`Gone::Drop`] is stored; a cooling
    /// address is remembered until its cooldown ends at `now_ms` or later
    /// (see [`PoolCore::arrival_state`]). Returns the record.
    pub fn drop_gone(&mut self, id: &str, now_ms: u64) -> Option<AddressRecord> {
        let record = self.remove(id)?;
        if let AddressState::Cooldown { until_ms } = record.state {
            self.remember_freed(&record, until_ms, now_ms);
        }
        Some(record)
    }

    /// `id`'s record with its `lost` flag cleared, when it has one: the
    /// backend lists it again, so its "not found" was wrong (a backend's
    /// hiccup) and the address may cool down and serve again.
    pub fn relisted(&self, id: &str) -> Option<AddressRecord> {
        let record = self.records.get(id).filter(|record| record.lost)?;
        let mut found = record.clone();
        found.lost = false;
        Some(found)
    }

    /// Whether an orphan (an address of this node the store did not know)
    /// may join the pool of `key` as `state`, and its record as it should
    /// be stored: refused as [`PoolCore::check_lease`] says, and, idle,
    /// beyond the holding cap; a pod's address beyond the cap is taken
    /// (the pod holds it), with `true` to count it as over the cap.
    pub fn adopt_orphan(
        &self,
        key: &PoolKey,
        config: &PoolConfig,
        lease: &Lease,
        state: AddressState,
        others: &Held,
        now_ms: u64,
    ) -> Result<(AddressRecord, bool), Anomaly> {
        self.check_lease(key, lease, others)?;
        let over_cap = self.room(config) == 0;
        if over_cap && state == AddressState::Idle {
            return Err(Anomaly::OverCap);
        }
        let mut lease = lease.clone();
        lease.owner = None;
        let state = self.arrival_state(lease.address.addr(), state, now_ms);
        let record = AddressRecord {
            key: key.clone(),
            lease,
            state,
            since_ms: now_ms,
            fixed: false,
            lost: false,
        };
        Ok((record, over_cap))
    }

    /// `fresh`'s id's record with the facts the backend's listing reports
    /// now (gateway, its MAC, MTU...), or `None` when the pool does not
    /// hold it, it is being returned, or nothing changed.
    pub fn refreshed(&self, fresh: &Lease) -> Option<AddressRecord> {
        let record = self
            .records
            .get(&fresh.id)
            .filter(|record| record.state != AddressState::Releasing)?;
        let lease = refreshed(&record.lease, fresh)?;
        let mut updated = record.clone();
        updated.lease = lease;
        Some(updated)
    }

    /// The record of `id`, if the pool holds it.
    pub fn record(&self, id: &str) -> Option<&AddressRecord> {
        self.records.get(id)
    }

    /// The state of `id`'s record, if the pool holds it.
    pub fn state_of(&self, id: &str) -> Option<&AddressState> {
        self.records.get(id).map(|record| &record.state)
    }

    /// The lease ids of every address the pool holds.
    pub fn lease_ids(&self) -> Vec<String> {
        self.records.keys().cloned().collect()
    }

    /// Every record of the pool, in no order.
    pub fn records(&self) -> impl Iterator<Item = &AddressRecord> {
        self.records.values()
    }

    /// The addresses pods hold here (what the node's host routes cover).
    pub fn assigned_addresses(&self) -> Vec<IpAddr> {
        self.owners
            .values()
            .filter_map(|id| self.records.get(id))
            .map(|record| record.lease.address.addr())
            .collect()
    }

    /// How many addresses pods hold although the backend no longer has
    /// them (flagged `lost`).
    pub fn lost(&self) -> usize {
        self.records.values().filter(|record| record.lost).count()
    }

    /// How long a refiller loop may sleep at `now_ms`: until the next
    /// pause, back-off or cooldown ends ([`PoolCore::next_due`]), at most
    /// `refill_interval`.
    pub fn refiller_sleep(&self, config: &PoolConfig, now_ms: u64) -> Duration {
        self.next_due(now_ms)
            .map_or(config.refill_interval, |until| {
                Duration::from_millis(until.saturating_sub(now_ms))
            })
            .min(config.refill_interval)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            id: "p1".into(),
            address: "10.0.0.5/24".parse().unwrap_or_else(|_| unreachable!()),
            network: "vpc".into(),
            subnet: "s".into(),
            gateway: Some([10, 0, 0, 1].into()),
            mac: None,
            mtu: Some(1450),
            gateway_mac: Some(hulk_ipam::MacAddr([2, 0, 0, 0, 0, 1])),
            security_groups: vec!["sg".into()],
            qos_policy: None,
            node: "n".into(),
            owner: None,
            marked_by: None,
        }
    }

    #[test]
    fn new_facts_are_taken_and_missing_ones_kept() {
        let known = lease();
        assert_eq!(refreshed(&known, &known), None, "nothing changed");
        let mut fresh = known.clone();
        fresh.gateway_mac = Some(hulk_ipam::MacAddr([2, 0, 0, 0, 0, 2]));
        fresh.mtu = None;
        fresh.security_groups.clear();
        let taken = refreshed(&known, &fresh).expect("the gateway MAC changed");
        assert_eq!(taken.gateway_mac, fresh.gateway_mac);
        assert_eq!(
            taken.mtu,
            Some(1450),
            "a fact the listing leaves out is kept"
        );
        assert_eq!(taken.security_groups, ["sg"]);
    }
}
