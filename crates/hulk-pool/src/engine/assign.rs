//! Assignments: an idle address to a pod (waiting for the refiller when
//! none is idle), a pod's fixed address, its release into cooldown, and
//! cooled addresses turning idle again.

use std::net::IpAddr;

use hulk_ipam::{AllocationRequest, IpamError, Lease, Owner, PoolKey};

use super::refill::InFlight;
use super::{Pool, PoolError, PoolManager};
use crate::core::{AddressStep, AssignStep, PoolCore, Release, leased, millis};
use crate::metrics::PoolLabels;
use crate::store::{AddressState, IntentKind, StoreOp};

/// Why a drained pool refuses assignments.
const DRAINED: &str = "drained by an operator; a refill resumes it";

/// One assignment counted in a pool's `waiters` until dropped: also when
/// the ADD waiting is cancelled (its DEL, or its caller's deadline), so
/// the count never stays up and keeps idle addresses for nobody.
pub(super) struct Waiter<'a>(&'a Pool);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.lock().remove_waiter();
    }
}

/// Marks a specific address as being allocated until dropped, also when
/// the ADD waiting for it is cancelled mid-call.
pub(super) struct PendingAddress<'a> {
    pool: &'a Pool,
    address: IpAddr,
}

impl Drop for PendingAddress<'_> {
    fn drop(&mut self) {
        self.pool.lock().end_pending(self.address);
    }
}

impl PoolManager {
    /// Hands an idle address of `key` to `owner`. The same owner (container
    /// and interface) always gets the same address back, so a retried ADD
    /// is harmless. With no idle address, waits for the refiller up to
    /// `assign_timeout`; never calls the backend itself.
    pub async fn assign(&self, key: &PoolKey, owner: &Owner) -> Result<Lease, PoolError> {
        let pool = self.pool(key);
        let started = tokio::time::Instant::now();
        // None: a timeout too long to add to the clock, i.e. no deadline.
        let deadline = started.checked_add(pool.config.assign_timeout);
        let mut changes = pool.changed.subscribe();
        let mut waiting: Option<Waiter<'_>> = None;
        let mut arrived = false;
        let outcome = loop {
            {
                let mut state = pool.lock();
                let now = self.clock.now_ms();
                let first_look = !arrived;
                arrived = true;
                let step = match state.admit(&pool.config, owner, now, first_look) {
                    Some(step) => step,
                    None => match self.promote_cooled_locked(&mut state, now) {
                        Ok(_) => state.take_or_wait(&pool.config, owner, now, waiting.is_some()),
                        Err(error) => break Err(error),
                    },
                };
                match step {
                    AssignStep::Held(lease) => break Ok(*lease),
                    AssignStep::Full => {
                        break Err(PoolError::Full {
                            subnet: key.subnet.clone(),
                            max_total: pool.config.max_total,
                        });
                    }
                    AssignStep::Take(record) => {
                        let record = *record;
                        if let Err(error) = self.store.apply(&[StoreOp::put(record.clone())]) {
                            state.untake(&record);
                            break Err(error.into());
                        }
                        let lease = leased(&record);
                        self.holder_changed(&lease.id);
                        state.insert(record);
                        if state.wants_refill(&pool.config, now) {
                            pool.wake_refiller.notify_one();
                        }
                        break Ok(lease);
                    }
                    AssignStep::Drained => {
                        break Err(PoolError::Degraded {
                            subnet: key.subnet.clone(),
                            reason: DRAINED.to_owned(),
                            exhausted: false,
                        });
                    }
                    AssignStep::Refused(refusal) => {
                        break Err(PoolError::Degraded {
                            subnet: key.subnet.clone(),
                            reason: refusal.reason,
                            exhausted: refusal.exhausted,
                        });
                    }
                    AssignStep::Wait => {
                        if waiting.is_none() {
                            state.add_waiter();
                            waiting = Some(Waiter(&pool));
                        }
                        pool.wake_refiller.notify_one();
                    }
                }
            }
            let changed = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, changes.changed()).await,
                None => Ok(changes.changed().await),
            };
            match changed {
                Ok(Ok(())) => continue,
                _ => {
                    break Err(PoolError::Empty {
                        subnet: key.subnet.clone(),
                        waited: started.elapsed(),
                    });
                }
            }
        };
        drop(waiting);
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
    /// gets it back on a retry. Held by another pod, cooling down after
    /// another pod released it from the pool, being released or
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
            let now = self.clock.now_ms();
            match state.take_address_for(&pool.config, owner, address, now) {
                AddressStep::Held(lease) => return Ok(lease),
                AddressStep::HoldsOther(lease) => {
                    return Err(unavailable(format!(
                        "{}/{} already holds {}",
                        owner.container_id, owner.ifname, lease.address
                    )));
                }
                AddressStep::Full => {
                    return Err(PoolError::Full {
                        subnet: key.subnet.clone(),
                        max_total: pool.config.max_total,
                    });
                }
                AddressStep::Take(record) => {
                    let record = *record;
                    if let Err(error) = self.store.apply(&[StoreOp::put(record.clone())]) {
                        state.untake(&record);
                        return Err(error.into());
                    }
                    let lease = leased(&record);
                    self.holder_changed(&lease.id);
                    state.insert(record);
                    return Ok(lease);
                }
                AddressStep::HeldBy(holder) => {
                    return Err(unavailable(format!(
                        "held by {}/{}",
                        holder.container_id, holder.ifname
                    )));
                }
                AddressStep::CoolingDown { until_ms } => {
                    return Err(unavailable(format!(
                        "another pod released it; it cools down for {} ms more",
                        until_ms.saturating_sub(now)
                    )));
                }
                AddressStep::Releasing => return Err(unavailable("it is being released".into())),
                AddressStep::Pending => return Err(unavailable("it is being allocated".into())),
                AddressStep::Allocate => {}
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
    /// an intent record as every allocation is, within the holding cap.
    pub(super) async fn allocate_for(
        &self,
        pool: &Pool,
        owner: &Owner,
        address: IpAddr,
    ) -> Result<Lease, PoolError> {
        if !pool.lock().reserve_one(&pool.config) {
            return Err(PoolError::AddressUnavailable {
                address,
                reason: format!(
                    "the pool holds its most addresses (max_held {}); one must go first",
                    pool.config.held_cap()
                ),
            });
        }
        let mut reserved = InFlight::new(pool, 1);
        let _gate = self.allocation_gate.read().await;
        let intent = self.intent(IntentKind::Allocate {
            key: pool.key.clone(),
            count: 1,
        });
        let intent_id = intent.id;
        self.store.apply(&[StoreOp::PutIntent(intent)])?;
        let request = AllocationRequest {
            marked_by: self.instance_mark(),
            ..AllocationRequest::for_address(pool.key.clone(), self.node.clone(), address)
        };
        let leases = match self
            .timed("allocate", self.backend.allocate(&request))
            .await
        {
            Ok(leases) => leases,
            Err(error) => {
                // The ADD gets the error; a refused address is no reason
                // to hold the pool's refills back.
                drop(reserved);
                self.store.apply(&[StoreOp::RemoveIntent(intent_id)])?;
                return Err(match error {
                    IpamError::Conflict(reason) => {
                        PoolError::AddressUnavailable { address, reason }
                    }
                    other => other.into(),
                });
            }
        };
        let state = AddressState::Assigned(owner.clone());
        let adopted = self
            .take_answer(pool, &mut reserved, intent_id, Some(address), state, leases)
            .await?;
        let record = adopted?
            .pop()
            .ok_or_else(|| IpamError::Protocol(format!("no lease of {address} adopted")))?;
        let lease = leased(&record);
        self.holder_changed(&lease.id);
        Ok(lease)
    }

    /// Makes cooled-down addresses idle, durably.
    /// Waiting assignments are woken when some became idle.
    pub(super) fn promote_cooled(&self, pool: &Pool) -> Result<(), PoolError> {
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
    pub(super) fn promote_cooled_locked(
        &self,
        state: &mut PoolCore,
        now_ms: u64,
    ) -> Result<bool, PoolError> {
        let cooled = state.promote_cooled(now_ms);
        if cooled.is_empty() {
            return Ok(false);
        }
        let ops: Vec<StoreOp> = cooled.iter().cloned().map(StoreOp::put).collect();
        if let Err(error) = self.store.apply(&ops) {
            state.undo_promotion(&cooled, now_ms);
            return Err(error.into());
        }
        Ok(true)
    }

    /// Takes back `owner`'s address: it cools down, then serves again.
    /// An address the backend no longer has (flagged `lost` by
    /// [`PoolManager::sweep_orphans`]) is dropped from the pool and the
    /// store instead: another node may hold it, so it must never serve
    /// here again, and there is nothing to return to the backend.
    /// Releasing an owner that holds nothing succeeds. Errors: the store
    /// refused the write (nothing changed).
    pub async fn release(&self, key: &PoolKey, owner: &Owner) -> Result<(), PoolError> {
        let pool = self.pool(key);
        let mut state = pool.lock();
        let cooldown_ms = millis(pool.config.reuse_cooldown);
        let now = self.clock.now_ms();
        let Some(release) = state.plan_release(owner, now, cooldown_ms) else {
            return Ok(());
        };
        match &release {
            Release::Drop(lost) => {
                self.store
                    .apply(&[StoreOp::RemoveAddress(lost.lease.id.clone())])?;
                tracing::warn!(
                    lease = %lost.lease.id,
                    address = %lost.lease.address,
                    container = %owner.container_id,
                    ifname = %owner.ifname,
                    "released an address the backend no longer has: dropped, not reused"
                );
            }
            Release::CoolDown(cooling) => {
                self.store.apply(&[StoreOp::put(cooling.clone())])?;
                self.holder_changed(&cooling.lease.id);
                pool.wake_refiller.notify_one();
            }
        }
        state.commit_release(owner, release, now, cooldown_ms);
        Ok(())
    }
}
