//! Allocations: the refill and warm-up passes, one batch behind its
//! intent record, and how an answer is screened and taken in.

use std::net::IpAddr;

use hulk_ipam::{AllocationRequest, IpamError, Lease, PoolKey};

use super::rate_limit::jitter;
use super::{Pool, PoolError, PoolManager};
use crate::core::{Anomaly, Held, RefillEnd, Refusal};
use crate::metrics::PoolLabels;
use crate::store::{AddressRecord, AddressState, Intent, IntentKind, StoreOp};

/// The most batch calls one refill pass runs at once.
pub(super) const MAX_PARALLEL_BATCHES: usize = 4;

/// Addresses counted in flight in a pool until their allocation ends.
/// Dropped before [`InFlight::take`] (the caller gave up, a store write
/// failed, a backend client panicked) it ends the allocation as abandoned,
/// so the count never stays up and blocks refills for good.
pub(super) struct InFlight<'a> {
    pool: &'a Pool,
    count: usize,
}

impl<'a> InFlight<'a> {
    /// `count` addresses of `pool`, already counted in flight.
    pub(super) fn new(pool: &'a Pool, count: usize) -> Self {
        InFlight { pool, count }
    }

    /// The count, for
    /// [`PoolCore::finish_refill`](crate::core::PoolCore::finish_refill)
    /// under the caller's lock.
    pub(super) fn take(&mut self) -> usize {
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

impl PoolManager {
    /// The ids and addresses every pool but `key`'s holds.
    pub(super) fn held_elsewhere(&self, key: &PoolKey) -> Held {
        let mut held = Held::default();
        for pool in self.all_pools() {
            if pool.key != *key {
                pool.lock().held(&mut held);
            }
        }
        held
    }

    /// Takes an allocation's answer into `pool` and ends `reserved`: what
    /// [`PoolCore::screen_answer`](crate::core::PoolCore::screen_answer)
    /// adopts is stored as `state` (fixed when `wanted` names the address)
    /// and added; what it refuses is logged and counted, and returned to
    /// the backend when that is safe (behind release intents, so a crash
    /// finishes the job). The outer error is
    /// the store's; the inner one says the answer held no usable address.
    pub(super) async fn take_answer(
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
                    state: core.arrival_state(lease.address.addr(), state.clone(), now),
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
    pub(super) async fn give_back(&self, lease_id: &str, intent_id: u64) -> Result<(), PoolError> {
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

    /// One refill pass of `key`'s pool, with one demand plan for both
    /// directions (see
    /// [`PoolCore::plan_refill`](crate::core::PoolCore::plan_refill) and
    /// [`PoolCore::plan_shrink`](crate::core::PoolCore::plan_shrink)):
    /// allocates toward `min_idle` (and for waiting assignments) in batches (up to four in parallel) while it
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

    /// Allocates what
    /// [`PoolCore::plan_refill`](crate::core::PoolCore::plan_refill) asks
    /// for. More waiting assignments than one batch serves get several batches in parallel:
    /// a burst then waits one backend call, not one per batch.
    pub(super) async fn allocate_pass(&self, pool: &Pool) -> Result<RefillOutcome, PoolError> {
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

    /// Allocates `count` addresses (already counted in `in_flight`) behind
    /// an intent record, and takes the answer in
    /// ([`PoolManager::take_answer`]). The outer error is the store's; the
    /// inner one the backend's (or an answer without a usable address),
    /// after which the pool is degraded or backs off. Ok: how many were
    /// adopted.
    pub(super) async fn allocate_into(
        &self,
        pool: &Pool,
        count: usize,
    ) -> Result<Result<usize, IpamError>, PoolError> {
        let mut reserved = InFlight::new(pool, count);
        let _gate = self.allocation_gate.read().await;
        let intent = self.intent(IntentKind::Allocate {
            key: pool.key.clone(),
            count,
        });
        let intent_id = intent.id;
        self.store.apply(&[StoreOp::PutIntent(intent)])?;
        let request = AllocationRequest {
            marked_by: self.instance_mark(),
            ..AllocationRequest::new(pool.key.clone(), self.node.clone(), count)
        };
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
                let refusal = Refusal::of(&error, pool.config.backoff, now);
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
}
