//! The orphan sweep: the backend's addresses of this node compared with
//! the pools, both ways, so that a lost store loses no pod's address and
//! an address the cloud took back is never handed out again.

use std::collections::HashSet;

use futures::StreamExt;
use hulk_ipam::{IpamError, Lease, ListScope, PoolKey};
use serde::{Deserialize, Serialize};

use super::owner_marks::MARKS_IN_PARALLEL;
use super::{PoolError, PoolManager};
use crate::core::{Anomaly, Gone, holder_to_mark, mark_is_stale};
use crate::store::{AddressState, Intent, IntentKind, StoreOp};

/// The most addresses one sweep asks about by id because the listing
/// lacked them ([`PoolManager::sweep_orphans`]).
const CONFIRMS_PER_SWEEP: usize = 16;

/// What [`PoolManager::sweep_orphans`] did with the backend's addresses of
/// this node that no pool knew, and with the pools' addresses the backend
/// no longer has (the cloud took them back: an operator or a cleanup job
/// deleted them, and another node may hold them now).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrphanSweep {
    /// Marked as held by no pod, and naming their pool: taken into it as
    /// idle addresses (a refill returns what exceeds `max_idle`).
    pub adopted_idle: usize,
    /// Marked as held by a pod, and naming their pool: taken back as that
    /// pod's (a lost store), for its DEL or the GC to release; also beyond
    /// `max_total` (a pod holds it), logged and counted as `over_cap`.
    pub adopted_assigned: usize,
    /// Marked as held by no pod, and without naming their pool, or refused
    /// by it (an address the node holds, outside the pool's subnet, or
    /// beyond `max_total`): returned to the backend.
    pub released: usize,
    /// Marked as held by a pod, but without naming their pool, refused by
    /// it (an address the node holds, or outside the pool's subnet), or
    /// for an interface that holds another address: left alone.
    pub left_alone: usize,
    /// Idle or cooling down in a pool, but gone from the backend: dropped
    /// from the pool and the store, never handed out again (each logged
    /// and counted in `hulk_pool_leases_lost_total`).
    #[serde(default)]
    pub dropped_idle: usize,
    /// Held by a pod, but gone from the backend, found by this sweep: the
    /// pod keeps using an address another node may hold now. Each is
    /// logged as an error, counted in `hulk_pool_leases_lost_total`, and
    /// flagged `lost` in its record (what `hulkctl leases` shows, on every
    /// later sweep too); the pod's DEL drops the record rather than
    /// cooling the address down for reuse.
    #[serde(default)]
    pub lost_assigned: usize,
    /// Addresses the pools know whose facts the backend now reports
    /// otherwise (e.g. the gateway's MAC): taken in (see
    /// `PoolManager::sweep_orphans`).
    #[serde(default)]
    pub facts_refreshed: usize,
}

/// What [`PoolManager::adopt`] did with an orphan.
pub(super) enum Adoption {
    /// Taken into its pool; `true` beyond `max_total`.
    Adopted(bool),
    /// Refused by its pool.
    Refused(Anomaly),
}

impl PoolManager {
    /// Compares the backend's addresses of this node with the pools, both
    /// ways. Unknown ones (left by an interrupted allocation, or forgotten
    /// with a lost store) are adopted into the pool the backend names, as
    /// idle or as the marked holder's; see [`OrphanSweep`] for the rest.
    /// Known ones whose mark is stale are queued for marking. The pools'
    /// addresses the listing lacks are no longer this node's: idle and
    /// cooling ones are dropped, pods' ones flagged `lost`
    /// ([`OrphanSweep::dropped_idle`], [`OrphanSweep::lost_assigned`]);
    /// only addresses the pools held before the list call are judged, so
    /// one that arrives while the backend answers is never taken for lost.
    /// Known ones also get their facts (gateway, its MAC, MTU...)
    /// refreshed from the listing. Last, the backend lines its node-level
    /// state up with what the node holds
    /// ([`hulk_ipam::IpamBackend::reconcile_node`]: the node port's allowed
    /// address pairs in Neutron's nested mode).
    /// Errors: the backend's list, release or reconcile call failed, or
    /// the store refused a write; what was done until then stays done.
    pub async fn sweep_orphans(&self) -> Result<OrphanSweep, PoolError> {
        // Releases of addresses no allocation can touch: outside the gate,
        // so a slow cloud does not hold allocations up meanwhile.
        let pending_releases = self.settle_releases().await?;
        let _gate = self.allocation_gate.write().await;
        let mut sweep = OrphanSweep::default();
        let scope = ListScope::Node(self.node.clone());
        let held_before: Vec<String> = self
            .all_pools()
            .iter()
            .flat_map(|pool| pool.lock().lease_ids())
            .collect();
        let listed = self.timed("list", self.backend.list(&scope)).await?;
        // Before anything is adopted or judged: another agent's fresh
        // marks mean this node name is served twice.
        self.check_sole_holder(&listed)?;
        sweep.facts_refreshed = self.refresh_facts(&listed)?;
        let listed_ids: HashSet<&str> = listed.iter().map(|lease| lease.id.as_str()).collect();
        // A few per sweep, a few at a time: a listing that lacks most of
        // the node's addresses (a backend's paging bug, a failover) must
        // not hold allocations behind hundreds of calls; the rest are
        // judged by the next sweeps.
        let unlisted: Vec<String> = held_before
            .into_iter()
            .filter(|lease_id| !listed_ids.contains(lease_id.as_str()))
            .take(CONFIRMS_PER_SWEEP)
            .collect();
        let confirmed: Vec<(String, bool)> = futures::stream::iter(unlisted)
            .map(|lease_id: String| async move {
                let gone = self.confirmed_gone(&lease_id).await;
                (lease_id, gone)
            })
            .buffer_unordered(MARKS_IN_PARALLEL)
            .collect()
            .await;
        for (lease_id, gone) in confirmed {
            if gone {
                self.lose(&lease_id, &mut sweep)?;
            }
        }
        for lease in listed {
            if pending_releases.contains(&lease.id) {
                // Going back: neither an orphan nor this node's to keep.
                continue;
            }
            if let Some(state) = self.state_of(&lease.id) {
                self.relisted(&lease.id)?;
                if mark_is_stale(&state, lease.owner.as_ref())
                    || self.instance_mark_is_stale(&lease)
                {
                    self.holder_changed(&lease.id);
                }
                continue;
            }
            // What is adopted (a dead predecessor's, or an older agent's)
            // is marked as this instance's.
            if self.instance_mark_is_stale(&lease) {
                self.holder_changed(&lease.id);
            }
            match (lease.owner.clone(), lease.pool_key()) {
                (None, Some(key)) => match self.adopt(key, lease.clone(), AddressState::Idle)? {
                    Adoption::Adopted(_) => sweep.adopted_idle += 1,
                    Adoption::Refused(anomaly) if anomaly.releasable() => {
                        self.release_orphan(&lease.id).await?;
                        sweep.released += 1;
                    }
                    Adoption::Refused(_) => sweep.left_alone += 1,
                },
                (None, None) => {
                    self.release_orphan(&lease.id).await?;
                    sweep.released += 1;
                }
                (Some(owner), Some(key)) if self.lease_of(&owner).is_none() => {
                    match self.adopt(key, lease, AddressState::Assigned(owner))? {
                        Adoption::Adopted(_) => sweep.adopted_assigned += 1,
                        Adoption::Refused(_) => sweep.left_alone += 1,
                    }
                }
                (Some(owner), _) => {
                    tracing::warn!(
                        lease = %lease.id,
                        address = %lease.address,
                        container = %owner.container_id,
                        ifname = %owner.ifname,
                        "the backend says a pod holds an address this node does not know, \
                         and it cannot be taken back: left alone"
                    );
                    sweep.left_alone += 1;
                }
            }
        }
        // Whatever an allocation interrupted by the last stop left in the
        // backend is adopted now: its intent has served.
        self.settle_allocations()?;
        // Still under the allocation gate: no allocation adds an address
        // the snapshot lacks while the backend lines its node-level state
        // up with it.
        let held = self.held_leases(&pending_releases);
        self.timed(
            "reconcile_node",
            self.backend.reconcile_node(&self.node, &held),
        )
        .await?;
        Ok(sweep)
    }

    /// Every lease the node holds, as [`hulk_ipam::IpamBackend::reconcile_node`]
    /// takes them: idle, cooling down or a pod's; not those being returned
    /// (`Releasing`, or a release still pending from the last stop), nor
    /// those the cloud took back (`lost`).
    fn held_leases(&self, pending_releases: &HashSet<String>) -> Vec<Lease> {
        self.all_pools()
            .iter()
            .flat_map(|pool| {
                pool.lock()
                    .records()
                    .filter(|record| {
                        record.state != AddressState::Releasing
                            && !record.lost
                            && !pending_releases.contains(&record.lease.id)
                    })
                    .map(|record| record.lease.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Retries the releases left unsettled at open; returns the lease ids
    /// of those the backend still refuses (kept for the next sweep).
    /// Errors: the store refused a write.
    pub(super) async fn settle_releases(&self) -> Result<HashSet<String>, PoolError> {
        let releases: Vec<Intent> = self
            .unsettled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|intent| matches!(intent.kind, IntentKind::Release { .. }))
            .cloned()
            .collect();
        let mut pending = HashSet::new();
        let mut failing = false;
        for intent in releases {
            let IntentKind::Release { lease_id } = &intent.kind else {
                continue;
            };
            if failing {
                pending.insert(lease_id.clone());
                continue;
            }
            match self.settle_release(&intent).await {
                Ok(()) => {
                    tracing::info!(lease = %lease_id, "finished a release interrupted by the last stop");
                    self.unsettled
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .retain(|kept| kept.id != intent.id);
                }
                Err(PoolError::Backend(error)) => {
                    tracing::warn!(lease = %lease_id, %error, "cannot finish an interrupted release yet");
                    pending.insert(lease_id.clone());
                    // The backend is failing: the rest wait for the next
                    // sweep instead of a timeout each.
                    failing = true;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(pending)
    }

    /// Removes the intents of allocations interrupted by the last stop,
    /// after a sweep adopted what they left. Errors: the store refused it
    /// (the intents stay for the next sweep).
    pub(super) fn settle_allocations(&self) -> Result<(), PoolError> {
        let mut unsettled = self
            .unsettled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let stale: Vec<StoreOp> = unsettled
            .iter()
            .filter(|intent| matches!(intent.kind, IntentKind::Allocate { .. }))
            .map(|intent| StoreOp::RemoveIntent(intent.id))
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        self.store.apply(&stale)?;
        unsettled.retain(|intent| !matches!(intent.kind, IntentKind::Allocate { .. }));
        tracing::info!(
            intents = stale.len(),
            "removed the intents of allocations interrupted by the last stop"
        );
        Ok(())
    }

    /// Whether the backend confirms that `lease_id`, which its listing
    /// of this node lacks, is gone. A listing can miss what a backend
    /// still has (a Neutron port whose binding or tags are not visible
    /// yet), and dropping an address on that word alone would strand it
    /// or flag a healthy pod; so the lease is asked about by id, with a
    /// harmless write of its current holder. Not found: gone. Found: kept,
    /// its mark rewritten. Any other answer: judged again next sweep.
    pub(super) async fn confirmed_gone(&self, lease_id: &str) -> bool {
        let Some(holder) = self.state_of(lease_id).as_ref().and_then(holder_to_mark) else {
            return false;
        };
        match self
            .timed(
                "update_owner",
                self.backend
                    .update_owner(lease_id, holder, self.instance_mark()),
            )
            .await
        {
            Err(IpamError::NotFound(_)) => true,
            Ok(_) => {
                // The holder may have changed while the call was out:
                // the next marking pass writes the current one.
                self.holder_changed(lease_id);
                tracing::warn!(
                    lease = %lease_id,
                    "the backend's listing of this node lacks an address it still has; kept"
                );
                false
            }
            Err(error) => {
                tracing::warn!(
                    lease = %lease_id,
                    %error,
                    "cannot ask the backend about an address its listing lacks; judged again \
                     on the next sweep"
                );
                false
            }
        }
    }

    /// Clears the `lost` flag of `lease_id` when the backend lists it
    /// again: a "not found" that was wrong (a backend's hiccup) must not
    /// keep the address from cooling down and serving again.
    pub(super) fn relisted(&self, lease_id: &str) -> Result<(), PoolError> {
        for pool in self.all_pools() {
            let mut core = pool.lock();
            let Some(found) = core.relisted(lease_id) else {
                continue;
            };
            self.store.apply(&[StoreOp::put(found.clone())])?;
            core.insert(found);
            tracing::warn!(lease = %lease_id, "the backend lists an address it said was gone; no longer lost");
            return Ok(());
        }
        Ok(())
    }

    /// Acts on `lease_id` being gone from the backend, as its record is
    /// now (an assignment may have taken it since the listing): an idle or
    /// cooling address leaves the pool and the store; a pod's is flagged
    /// `lost` (once); one being released is left to its release, for which
    /// the backend's `NotFound` is success.
    pub(super) fn lose(&self, lease_id: &str, sweep: &mut OrphanSweep) -> Result<(), PoolError> {
        for pool in self.all_pools() {
            let mut core = pool.lock();
            if core.state_of(lease_id).is_none() {
                continue;
            }
            match core.on_gone(lease_id) {
                None => {}
                Some(Gone::Drop(record)) => {
                    self.store
                        .apply(&[StoreOp::RemoveAddress(lease_id.to_owned())])?;
                    core.drop_gone(lease_id, self.clock.now_ms());
                    let state = if record.state == AddressState::Idle {
                        "idle"
                    } else {
                        "cooldown"
                    };
                    self.metrics.lease_lost(&pool.key, state);
                    sweep.dropped_idle += 1;
                    tracing::warn!(
                        lease = %lease_id,
                        address = %record.lease.address,
                        pool = %pool.key.subnet,
                        state,
                        "the backend no longer has this address (the cloud took it back): \
                         dropped from the pool, never handed out again"
                    );
                }
                Some(Gone::Lost(lost)) => {
                    self.store.apply(&[StoreOp::put(lost.clone())])?;
                    if let AddressState::Assigned(owner) = &lost.state {
                        tracing::error!(
                            lease = %lease_id,
                            address = %lost.lease.address,
                            pool = %pool.key.subnet,
                            pod = owner.pod.as_deref().unwrap_or("-"),
                            container = %owner.container_id,
                            ifname = %owner.ifname,
                            "the backend no longer has the address this pod uses (the cloud \
                             took it back; another node may hold it now): the pod keeps it \
                             until its DEL, after which it is dropped, never handed out again; \
                             recreate the pod"
                        );
                    }
                    core.insert(lost);
                    self.metrics.lease_lost(&pool.key, "assigned");
                    sweep.lost_assigned += 1;
                }
            }
            return Ok(());
        }
        Ok(())
    }

    /// Returns an orphan to the backend.
    pub(super) async fn release_orphan(&self, lease_id: &str) -> Result<(), PoolError> {
        match self.timed("release", self.backend.release(lease_id)).await {
            Ok(()) | Err(IpamError::NotFound(_)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Takes an orphan into `key`'s pool as `state`, unless the pool
    /// refuses it ([`crate::core::PoolCore::check_lease`]) or, idle, it
    /// would pass `max_total`; a pod's address beyond `max_total` is taken
    /// (the pod holds it) but logged and counted. Refusals are logged and
    /// counted too.
    pub(super) fn adopt(
        &self,
        key: PoolKey,
        lease: Lease,
        state: AddressState,
    ) -> Result<Adoption, PoolError> {
        let pool = self.pool(&key);
        let adoption = {
            let _adopting = self
                .adoption
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let others = self.held_elsewhere(&key);
            let mut core = pool.lock();
            let now = self.clock.now_ms();
            match core.adopt_orphan(&key, &pool.config, &lease, state.clone(), &others, now) {
                Err(anomaly) => Adoption::Refused(anomaly),
                Ok((record, over_cap)) => {
                    self.store.apply(&[StoreOp::put(record.clone())])?;
                    core.insert(record);
                    Adoption::Adopted(over_cap)
                }
            }
        };
        match &adoption {
            Adoption::Adopted(over_cap) => {
                tracing::warn!(
                    address = %lease.address,
                    pool = %key.subnet,
                    state = ?state,
                    "adopted an address of this node the store did not know"
                );
                if *over_cap {
                    self.metrics.anomaly(Anomaly::OverCap);
                    tracing::warn!(
                        lease = %lease.id,
                        address = %lease.address,
                        pool = %key.subnet,
                        max_total = pool.config.max_total,
                        "the backend marks a pod as holding it, so it is kept beyond max_total"
                    );
                }
                pool.announce();
            }
            Adoption::Refused(anomaly) => {
                self.metrics.anomaly(*anomaly);
                tracing::warn!(
                    lease = %lease.id,
                    address = %lease.address,
                    pool = %key.subnet,
                    anomaly = anomaly.kind(),
                    marked = lease.owner.is_some(),
                    "refused an address of this node the store did not know; \
                     returned unless a pod is marked as its holder"
                );
            }
        }
        Ok(adoption)
    }
}
