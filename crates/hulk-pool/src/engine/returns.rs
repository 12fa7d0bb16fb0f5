//! Returns: idle addresses beyond what the pool needs (and cooled fixed
//! ones) go back to the backend, and an operator's drain and resume.

use futures::StreamExt;
use hulk_ipam::{IpamError, PoolKey};

use super::{Pool, PoolError, PoolManager, RefillOutcome};
use crate::core::PoolCore;
use crate::store::{AddressRecord, Intent, IntentKind, StoreOp};

/// Addresses returned to the backend at once in a refill pass: a queue of
/// surplus drains in a fraction of the time one at a time takes, without
/// flooding the cloud's API (the rate limiter still applies).
const RETURNS_IN_PARALLEL: usize = 4;

impl PoolManager {
    /// Drains `key`'s pool for an operator: refills stop, assignments
    /// without an idle address fail, and every idle address goes back to
    /// the backend now (cooling ones once cooled). Addresses held by pods
    /// stay. Returns how many went back. The drain is stored: a restarted
    /// manager keeps the pool drained until `resume`.
    pub async fn drain(&self, key: &PoolKey) -> Result<usize, PoolError> {
        self.store
            .apply(&[StoreOp::SetDrained(key.clone(), true)])?;
        let pool = self.pool(key);
        pool.lock().set_draining(true);
        pool.announce();
        self.return_surplus(&pool).await
    }

    /// Ends a drain of `key`'s pool and runs a refill pass.
    pub async fn resume(&self, key: &PoolKey) -> Result<RefillOutcome, PoolError> {
        self.store
            .apply(&[StoreOp::SetDrained(key.clone(), false)])?;
        self.pool(key).lock().set_draining(false);
        self.refill(key).await
    }

    /// Returns to the backend what [`PoolCore::plan_returns`] picks;
    /// how many went back.
    pub(super) async fn return_surplus(&self, pool: &Pool) -> Result<usize, PoolError> {
        let returns = self.pick_returns(pool)?;
        self.return_addresses(pool, returns).await
    }

    /// Takes the addresses [`PoolCore::plan_returns`] picks out of service,
    /// durably: each is stored as being released, behind a release intent
    /// (a crash finishes the job). Nothing changes if the store fails.
    pub(super) fn pick_returns(
        &self,
        pool: &Pool,
    ) -> Result<Vec<(AddressRecord, Intent)>, PoolError> {
        let now = self.clock.now_ms();
        let mut state = pool.lock();
        let returning = state.plan_returns(&pool.config, now);
        let mut ops = Vec::with_capacity(returning.len() * 2);
        let mut victims = Vec::with_capacity(returning.len());
        for record in &returning {
            let intent = self.intent(IntentKind::Release {
                lease_id: record.lease.id.clone(),
            });
            ops.push(StoreOp::put(record.clone()));
            ops.push(StoreOp::PutIntent(intent.clone()));
            victims.push((record.clone(), intent));
        }
        if let Err(error) = self.store.apply(&ops) {
            state.undo_returns(&returning);
            return Err(error.into());
        }
        state.commit_returns(&returning);
        Ok(victims)
    }

    /// Returns `victims` ([`PoolManager::pick_returns`]) to the backend, a
    /// few calls at a time: one call each (no backend has a bulk release).
    /// A failed return keeps the address as it was (a fixed one cooled
    /// down, others idle) for a later pass. Returns how many went back.
    pub(super) async fn return_addresses(
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
                    let kept = PoolCore::unreturned(&record, now);
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
}
