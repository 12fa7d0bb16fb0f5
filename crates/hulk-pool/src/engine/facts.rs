//! What the backend said about each address besides the address itself
//! (its gateway and the gateway's MAC, the MTU, the port's MAC, the
//! security groups applied), learned at allocation and refreshed from the
//! backend's listing: a cloud that moves its router changes the gateway's
//! MAC under running pods and under the warm pool's idle addresses.

use hulk_ipam::Lease;

use super::{PoolError, PoolManager};
use crate::store::{AddressState, StoreOp};

impl PoolManager {
    /// Takes the facts of `listing` (the backend's leases of this node)
    /// into every address the pools hold under the same id, durably: idle
    /// ones hand the new facts to the next pod, and [`PoolManager::lease_of`]
    /// gives assigned ones' to the node, which re-applies them in running
    /// pods. An address being returned is left alone. A changed gateway
    /// address is logged: running pods keep their route until they are
    /// recreated. Returns how many addresses changed.
    pub(super) fn refresh_facts(&self, listing: &[Lease]) -> Result<usize, PoolError> {
        let mut changed = 0;
        for fresh in listing {
            for pool in self.all_pools() {
                let mut core = pool.lock();
                let Some(updated) = core.refreshed(fresh) else {
                    continue;
                };
                let Some(known) = core.record(&fresh.id).map(|record| &record.lease) else {
                    continue;
                };
                let lease = &updated.lease;
                tracing::warn!(
                    lease = %fresh.id,
                    address = %lease.address,
                    gateway = ?known.gateway.zip(lease.gateway),
                    gateway_mac = ?known.gateway_mac.zip(lease.gateway_mac),
                    mtu = ?known.mtu.zip(lease.mtu),
                    "the backend reports new facts for an address; taking them"
                );
                if known.gateway != lease.gateway
                    && matches!(updated.state, AddressState::Assigned(_))
                {
                    tracing::error!(
                        lease = %fresh.id,
                        address = %lease.address,
                        "the gateway of a running pod's address moved; the pod keeps \
                         its default route until it is recreated"
                    );
                }
                self.store.apply(&[StoreOp::put(updated.clone())])?;
                core.insert(updated);
                changed += 1;
            }
        }
        Ok(changed)
    }
}
