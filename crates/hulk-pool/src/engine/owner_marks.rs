//! The backend's record of which pod holds each address ("owner marks":
//! a Neutron port's `device_id` and name, an UltrON address's `owner`),
//! kept in step with the store off the assignment path, and the orphan
//! sweep that relies on it to take back what a lost store forgot.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hulk_ipam::{IpamError, Lease, ListScope, PoolKey};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{PoolError, PoolManager};
use crate::core::{Anomaly, owner_key};
use crate::store::{AddressRecord, AddressState, StoreOp};

/// Marks written at once: a burst of ADDs is marked in a fraction of the
/// time one at a time would take, without flooding the cloud's API.
const MARKS_IN_PARALLEL: usize = 4;
/// How long [`PoolManager::run_owner_marks`] waits after a failed pass.
const MARK_RETRY: Duration = Duration::from_secs(5);
/// How long the last pass at shutdown may take: a cloud outage must not
/// hold the agent's exit for the whole grace period.
const LAST_PASS_LIMIT: Duration = Duration::from_secs(10);

/// What [`PoolManager::sweep_orphans`] did with the backend's addresses of
/// this node that no pool knew.
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
    /// Addresses the pools know whose facts the backend now reports
    /// otherwise (e.g. the gateway's MAC): taken in (see
    /// `PoolManager::sweep_orphans`).
    pub facts_refreshed: usize,
}

/// What [`PoolManager::adopt`] did with an orphan.
enum Adoption {
    /// Taken into its pool; `true` beyond `max_total`.
    Adopted(bool),
    /// Refused by its pool.
    Refused(Anomaly),
}

impl PoolManager {
    /// Notes that `lease_id` changed hands, for the next marking pass.
    pub(super) fn holder_changed(&self, lease_id: &str) {
        self.unmarked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(lease_id.to_owned());
        self.holder_changed.notify_one();
    }

    /// The state of the record of `lease_id`, in whichever pool holds it.
    fn state_of(&self, lease_id: &str) -> Option<AddressState> {
        self.all_pools().iter().find_map(|pool| {
            let state = pool.lock();
            state
                .records
                .get(lease_id)
                .map(|record| record.state.clone())
        })
    }

    /// One marking pass: writes to the backend the current holder (or
    /// none) of every address that changed hands since the last pass, a
    /// few at a time. Returns how many marks it wrote; the addresses whose
    /// mark failed wait for the next pass, and the first error is returned.
    pub async fn mark_holders(&self) -> Result<usize, PoolError> {
        let pending = std::mem::take(
            &mut *self
                .unmarked
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let outcomes: Vec<(String, Result<bool, IpamError>)> = futures::stream::iter(pending)
            .map(|lease_id| async move {
                let outcome = self.mark(&lease_id).await;
                (lease_id, outcome)
            })
            .buffer_unordered(MARKS_IN_PARALLEL)
            .collect()
            .await;
        let mut marked = 0;
        let mut first_error = None;
        for (lease_id, outcome) in outcomes {
            match outcome {
                Ok(wrote) => marked += usize::from(wrote),
                Err(error) => {
                    self.unmarked
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(lease_id);
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error.into()),
            None => Ok(marked),
        }
    }

    /// Writes the current holder of `lease_id`; `false` when there is
    /// nothing to mark (the address is being returned, or gone).
    async fn mark(&self, lease_id: &str) -> Result<bool, IpamError> {
        // Read at the time of the call: a mark always says the latest
        // holder, so passes never need ordering among themselves.
        let holder = match self.state_of(lease_id) {
            Some(AddressState::Assigned(owner)) => Some(owner),
            Some(AddressState::Idle | AddressState::Cooldown { .. }) => None,
            Some(AddressState::Releasing) | None => return Ok(false),
        };
        // Not rate-limited: marks follow pod churn, a few at a time, and
        // taking the limiter's tokens would delay the refills that ADDs
        // wait for.
        match self
            .metered("update_owner", self.backend.update_owner(lease_id, holder))
            .await
        {
            Ok(_) | Err(IpamError::NotFound(_)) => Ok(true),
            Err(error) => Err(error),
        }
    }

    /// Runs marking passes whenever an address changes hands (and again
    /// after a failure, every few seconds) until `shutdown` turns true or
    /// its sender is dropped, then one last pass (of at most ten seconds)
    /// so that a graceful stop leaves every mark written.
    pub async fn run_owner_marks(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let retry = match self.mark_holders().await {
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!(%error, "cannot mark address holders in the backend");
                    Some(MARK_RETRY)
                }
            };
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                () = self.holder_changed.notified(), if retry.is_none() => {}
                () = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
            }
        }
        match tokio::time::timeout(LAST_PASS_LIMIT, self.mark_holders()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "last marking pass failed"),
            Err(_) => tracing::warn!("last marking pass timed out"),
        }
    }

    /// Compares the backend's addresses of this node with the pools.
    /// Unknown ones (left by an interrupted allocation, or forgotten with
    /// a lost store) are adopted into the pool the backend names, as idle
    /// or as the marked holder's; see [`OrphanSweep`] for the rest. Known
    /// ones whose mark is stale are queued for marking, and their facts
    /// (gateway, its MAC, MTU...) are refreshed from the listing.
    pub async fn sweep_orphans(&self) -> Result<OrphanSweep, PoolError> {
        let _gate = self.allocation_gate.write().await;
        let mut sweep = OrphanSweep::default();
        let scope = ListScope::Node(self.node.clone());
        let listing = self.timed("list", self.backend.list(&scope)).await?;
        sweep.facts_refreshed = self.refresh_facts(&listing)?;
        for lease in listing {
            if let Some(state) = self.state_of(&lease.id) {
                let holder = match &state {
                    AddressState::Assigned(owner) => Some(owner_key(owner)),
                    _ => None,
                };
                if state != AddressState::Releasing && holder != lease.owner.as_ref().map(owner_key)
                {
                    self.holder_changed(&lease.id);
                }
                continue;
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
        Ok(sweep)
    }

    /// Returns an orphan to the backend.
    async fn release_orphan(&self, lease_id: &str) -> Result<(), PoolError> {
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
    fn adopt(
        &self,
        key: PoolKey,
        mut lease: Lease,
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
            let over_cap = core.room(&pool.config) == 0;
            match core.check_lease(&key, &lease, &others) {
                Err(anomaly) => Adoption::Refused(anomaly),
                Ok(()) if over_cap && state == AddressState::Idle => {
                    Adoption::Refused(Anomaly::OverCap)
                }
                Ok(()) => {
                    lease.owner = None;
                    let record = AddressRecord {
                        key: key.clone(),
                        lease: lease.clone(),
                        state: state.clone(),
                        since_ms: self.clock.now_ms(),
                        fixed: false,
                    };
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
