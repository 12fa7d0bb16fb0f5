//! Reconciliation with the world: the start-up repair of what a crash
//! left half-done, assignments whose pod is gone, and the cluster-level
//! sweeps.

use std::collections::{BTreeSet, HashSet};

use hulk_ipam::{AttachmentId, IpamError, Owner, PoolKey};

use super::{OrphanSweep, PoolError, PoolManager};
use crate::core::{MissingAssignments, restored};
use crate::store::{Intent, IntentKind, Snapshot, StoreOp};

/// What a pass of the node's dead-pod collection did (hulk-node's
/// `collect_dead_pods`: [`PoolManager::find_missing`], then a teardown
/// and release of each gone owner).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Assignments released because their pod was missing twice.
    pub released: Vec<Owner>,
    /// Assignments missing once: released on the next pass if still missing.
    pub suspected: Vec<Owner>,
}

impl PoolManager {
    /// The start-up repair of what the last run left half-done: releases
    /// in flight are finished (the backend is not needed: one it refuses
    /// stays unsettled, its address `Releasing`, for the sweeps), the
    /// pools are filled from `snapshot`, and the store is compared with
    /// the backend ([`PoolManager::sweep_orphans`]; a failure is logged).
    /// Errors: the store failed.
    pub(super) async fn recover(&self, snapshot: &Snapshot) -> Result<(), PoolError> {
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
                IntentKind::Release { lease_id } => match self.settle_release(intent).await {
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
            let record = restored(record, releasing.contains(&record.lease.id));
            self.pool(&record.key).lock().insert(record);
        }
        for key in &snapshot.drained {
            self.pool(key).lock().set_draining(true);
        }
        *self
            .unsettled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = unsettled;
        // Every start compares with the backend: an interrupted allocation
        // leaves addresses nobody knows, a lost store forgets pods' ones,
        // and the cloud may have taken addresses back.
        match self.sweep_orphans().await {
            Ok(sweep) => {
                if sweep != OrphanSweep::default() {
                    tracing::warn!(?sweep, "the store and the backend disagreed");
                }
            }
            // Another agent serves this node name: nothing may start.
            Err(error @ PoolError::HeldElsewhere(_)) => return Err(error),
            Err(error) => {
                let unsettled = self.unsettled_intents();
                tracing::warn!(
                    %error,
                    unsettled,
                    "cannot compare the store with the backend at start; serving from the \
                     store meanwhile, and the periodic orphan sweep retries (finishing the \
                     unsettled intents of interrupted allocations and releases)"
                );
            }
        }
        Ok(())
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
    pub(super) async fn settle_release(&self, intent: &Intent) -> Result<(), PoolError> {
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

    /// Judges which assignments are gone without releasing them, for a
    /// caller that must tear down more than the address (a pod's host
    /// route) before handing it back: hulk-node's dead-pod collection
    /// tears each gone owner down and then calls [`PoolManager::release`]. An assignment missing from `live` is
    /// gone only when it was also missing on the previous pass, so a pod
    /// still being created is never robbed.
    pub fn find_missing(&self, live: &HashSet<AttachmentId>) -> MissingAssignments {
        let missing: Vec<(PoolKey, Owner)> = self
            .all_pools()
            .iter()
            .flat_map(|pool| {
                let owners = pool.lock().missing_from(live);
                owners.into_iter().map(|owner| (pool.key.clone(), owner))
            })
            .collect();
        self.suspects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .judge(missing)
    }
}
