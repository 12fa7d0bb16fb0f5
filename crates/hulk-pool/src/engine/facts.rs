//! What the backend said about each address besides the address itself
//! (its gateway and the gateway's MAC, the MTU, the port's MAC, the
//! security groups applied), learned at allocation and refreshed from the
//! backend's listing: a cloud that moves its router changes the gateway's
//! MAC under running pods and under the warm pool's idle addresses.

use hulk_ipam::Lease;

use super::{PoolError, PoolManager};
use crate::store::{AddressState, StoreOp};

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
                let Some(record) = core.records.get(&fresh.id) else {
                    continue;
                };
                if record.state == AddressState::Releasing {
                    continue;
                }
                let Some(lease) = refreshed(&record.lease, fresh) else {
                    continue;
                };
                tracing::warn!(
                    lease = %fresh.id,
                    address = %record.lease.address,
                    gateway = ?record.lease.gateway.zip(lease.gateway),
                    gateway_mac = ?record.lease.gateway_mac.zip(lease.gateway_mac),
                    mtu = ?record.lease.mtu.zip(lease.mtu),
                    "the backend reports new facts for an address; taking them"
                );
                if record.lease.gateway != lease.gateway
                    && matches!(record.state, AddressState::Assigned(_))
                {
                    tracing::error!(
                        lease = %fresh.id,
                        address = %record.lease.address,
                        "the gateway of a running pod's address moved; the pod keeps \
                         its default route until it is recreated"
                    );
                }
                let mut updated = record.clone();
                updated.lease = lease;
                self.store.apply(&[StoreOp::put(updated.clone())])?;
                core.insert(updated);
                changed += 1;
            }
        }
        Ok(changed)
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
