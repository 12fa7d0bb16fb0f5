//! An in-memory backend: a working IPAM of one subnet held in the process
//! (tests, demos, benchmarks, and `type = "memory"` in the agent's
//! configuration, where it forgets its leases on restart).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

use ipnet::IpNet;

use crate::{
    AllocationRequest, InstanceMark, IpamBackend, IpamError, Lease, ListScope, MacAddr, Owner,
};

/// Hands out the addresses of one subnet in order, the first host being the
/// gateway, with MACs derived from the address (`fa:16:3e` + its last three
/// bytes, as Neutron's prefix). Wrap it in [`crate::Faulty`] for latency and
/// failures.
#[derive(Debug)]
pub struct MemoryBackend {
    subnet: IpNet,
    gateway: IpAddr,
    mtu: u32,
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    by_address: BTreeMap<IpAddr, String>,
    leases: HashMap<String, Lease>,
    next_id: u64,
    gateway_mac: Option<MacAddr>,
}

/// The MTU a mock lease reports (an overlay VPC's).
pub const MOCK_MTU: u32 = 1450;

impl MemoryBackend {
    /// A backend for `subnet`; its first host address is the gateway.
    pub fn new(subnet: IpNet) -> Self {
        let subnet = subnet.trunc();
        let gateway = subnet.hosts().next().unwrap_or(subnet.addr());
        MemoryBackend::with_gateway(subnet, gateway)
    }

    /// A backend for `subnet` with an explicit gateway.
    pub fn with_gateway(subnet: IpNet, gateway: IpAddr) -> Self {
        MemoryBackend {
            subnet: subnet.trunc(),
            gateway,
            mtu: MOCK_MTU,
            state: Mutex::new(MemoryState::default()),
        }
    }

    /// Leases that also carry the gateway's MAC, so that the datapath
    /// installs its permanent neighbour entry as with a real cloud.
    pub fn with_gateway_mac(self, mac: MacAddr) -> Self {
        self.set_gateway_mac(Some(mac));
        self
    }

    /// The gateway's MAC changes, as when a cloud moves its router: every
    /// lease, handed out or to come, reports `mac` from now on.
    pub fn set_gateway_mac(&self, mac: Option<MacAddr>) {
        let mut state = self.lock();
        state.gateway_mac = mac;
        for lease in state.leases.values_mut() {
            lease.gateway_mac = mac;
        }
    }

    /// How many addresses are handed out now.
    pub fn allocated(&self) -> usize {
        self.lock().leases.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // Every update below is a pair of inserts or removes that cannot
        // panic half-way, so a poisoned lock still guards consistent maps.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lease(
        &self,
        id: String,
        address: IpAddr,
        request: &AllocationRequest,
        gateway_mac: Option<MacAddr>,
    ) -> Lease {
        let octets = match address {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let tail = &octets[octets.len() - 3..];
        Lease {
            id,
            address: IpNet::new(address, self.subnet.prefix_len())
                .unwrap_or_else(|_| IpNet::from(address)),
            network: request.key.network.clone(),
            subnet: request.key.subnet.clone(),
            gateway: Some(self.gateway),
            mac: Some(MacAddr([0xfa, 0x16, 0x3e, tail[0], tail[1], tail[2]])),
            mtu: Some(self.mtu),
            gateway_mac,
            security_groups: request.key.security_groups.clone(),
            qos_policy: request.key.qos_policy.clone(),
            node: request.node.clone(),
            owner: None,
            marked_by: request.marked_by.clone(),
        }
    }
}

#[async_trait::async_trait]
impl IpamBackend for MemoryBackend {
    fn name(&self) -> &str {
        "memory"
    }

    async fn allocate(&self, request: &AllocationRequest) -> Result<Vec<Lease>, IpamError> {
        request.validate(usize::MAX)?;
        let mut state = self.lock();
        let free: Vec<IpAddr> = match request.address {
            Some(address) if !self.subnet.contains(&address) || address == self.gateway => {
                return Err(IpamError::InvalidRequest(format!(
                    "{address} is not a host address of {}",
                    self.subnet
                )));
            }
            Some(address) if state.by_address.contains_key(&address) => {
                return Err(IpamError::Conflict(format!("{address} is in use")));
            }
            Some(address) => vec![address],
            None => self
                .subnet
                .hosts()
                .filter(|address| {
                    *address != self.gateway && !state.by_address.contains_key(address)
                })
                .take(request.count)
                .collect(),
        };
        if free.len() < request.count {
            return Err(IpamError::Exhausted {
                subnet: request.key.subnet.clone(),
            });
        }
        let mut leases = Vec::with_capacity(free.len());
        for address in free {
            state.next_id += 1;
            let id = format!("mock-{}", state.next_id);
            let lease = self.lease(id.clone(), address, request, state.gateway_mac);
            state.by_address.insert(address, id.clone());
            state.leases.insert(id, lease.clone());
            leases.push(lease);
        }
        Ok(leases)
    }

    async fn release(&self, id: &str) -> Result<(), IpamError> {
        let mut state = self.lock();
        let lease = state
            .leases
            .remove(id)
            .ok_or_else(|| IpamError::NotFound(format!("lease {id}")))?;
        state.by_address.remove(&lease.address.addr());
        Ok(())
    }

    async fn update_owner(
        &self,
        id: &str,
        owner: Option<Owner>,
        marked_by: Option<InstanceMark>,
    ) -> Result<Lease, IpamError> {
        let mut state = self.lock();
        let lease = state
            .leases
            .get_mut(id)
            .ok_or_else(|| IpamError::NotFound(format!("lease {id}")))?;
        lease.owner = owner;
        lease.marked_by = marked_by;
        Ok(lease.clone())
    }

    async fn list(&self, scope: &ListScope) -> Result<Vec<Lease>, IpamError> {
        let state = self.lock();
        let mut leases: Vec<Lease> = state
            .leases
            .values()
            .filter(|lease| match scope {
                ListScope::Node(node) => &lease.node == node,
                ListScope::Cluster => true,
            })
            .cloned()
            .collect();
        leases.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(leases)
    }

    async fn health(&self) -> Result<(), IpamError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PoolKey;
    use std::collections::HashSet;

    fn request(count: usize) -> AllocationRequest {
        AllocationRequest::new(
            PoolKey::new("net", "sub", ["sg"], Some("qos".into())),
            "node",
            count,
        )
    }

    #[tokio::test]
    async fn hands_out_distinct_addresses_until_exhausted() {
        // A /29 has 6 hosts; one is the gateway.
        let backend = MemoryBackend::new("10.0.0.0/29".parse().unwrap());
        let leases = backend.allocate(&request(5)).await.unwrap();
        let addresses: HashSet<_> = leases.iter().map(|lease| lease.address).collect();
        assert_eq!(addresses.len(), 5);
        assert!(
            leases
                .iter()
                .all(|lease| lease.gateway == Some("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(leases[0].qos_policy.as_deref(), Some("qos"));
        assert_eq!(
            backend.allocate(&request(1)).await,
            Err(IpamError::Exhausted {
                subnet: "sub".into()
            })
        );
        assert_eq!(backend.allocated(), 5);
    }

    #[tokio::test]
    async fn a_specific_address_is_given_once_and_only_inside_the_subnet() {
        let backend = MemoryBackend::new("10.0.0.0/29".parse().unwrap());
        let key = PoolKey::new("net", "sub", ["sg"], None);
        let wanted: IpAddr = "10.0.0.5".parse().unwrap();
        let fixed = AllocationRequest::for_address(key.clone(), "node", wanted);
        let lease = backend.allocate(&fixed).await.unwrap().remove(0);
        assert_eq!(lease.address.addr(), wanted);
        assert!(matches!(
            backend.allocate(&fixed).await,
            Err(IpamError::Conflict(_))
        ));
        // The next free address skips the one taken.
        let leases = backend.allocate(&request(4)).await.unwrap();
        assert!(leases.iter().all(|other| other.address.addr() != wanted));
        for outside in ["10.0.0.1", "10.0.1.2"] {
            let request =
                AllocationRequest::for_address(key.clone(), "node", outside.parse().unwrap());
            assert!(matches!(
                backend.allocate(&request).await,
                Err(IpamError::InvalidRequest(_))
            ));
        }
        let mut two = fixed.clone();
        two.count = 2;
        assert!(matches!(
            backend.allocate(&two).await,
            Err(IpamError::InvalidRequest(_))
        ));
    }

    #[tokio::test]
    async fn a_partial_batch_allocates_nothing() {
        let backend = MemoryBackend::new("10.0.0.0/29".parse().unwrap());
        assert!(backend.allocate(&request(6)).await.is_err());
        assert_eq!(backend.allocated(), 0);
    }

    #[tokio::test]
    async fn released_addresses_come_back_and_double_release_is_not_found() {
        let backend = MemoryBackend::new("10.0.0.0/30".parse().unwrap());
        let lease = backend.allocate(&request(1)).await.unwrap().remove(0);
        assert_eq!(lease.address.to_string(), "10.0.0.2/30");
        assert_eq!(lease.mac.unwrap().to_string(), "fa:16:3e:00:00:02");
        backend.release(&lease.id).await.unwrap();
        assert!(matches!(
            backend.release(&lease.id).await,
            Err(IpamError::NotFound(_))
        ));
        let again = backend.allocate(&request(1)).await.unwrap().remove(0);
        assert_eq!(again.address, lease.address);
        assert_ne!(again.id, lease.id);
    }

    #[tokio::test]
    async fn owners_are_recorded_and_listed_per_node() {
        let backend = MemoryBackend::new("10.0.0.0/28".parse().unwrap());
        let mine = backend.allocate(&request(2)).await.unwrap();
        let mut other = request(1);
        other.node = "node-2".into();
        backend.allocate(&other).await.unwrap();
        let owner = Owner {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            pod: Some("default/web-0".into()),
            cni_network: None,
            pod_uid: None,
        };
        let mark = InstanceMark::new("host-a-1f2e", 1_700_000_000);
        let updated = backend
            .update_owner(&mine[0].id, Some(owner.clone()), Some(mark.clone()))
            .await
            .unwrap();
        assert_eq!(updated.owner.as_ref(), Some(&owner));
        assert_eq!(updated.marked_by.as_ref(), Some(&mark));
        let listed = backend.list(&ListScope::Node("node".into())).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(
            listed
                .iter()
                .find(|lease| lease.id == mine[0].id)
                .unwrap()
                .owner,
            Some(owner)
        );
        assert_eq!(backend.list(&ListScope::Cluster).await.unwrap().len(), 3);
        let mut marked = request(1);
        marked.marked_by = Some(mark.clone());
        let allocated = backend.allocate(&marked).await.unwrap();
        assert_eq!(
            allocated[0].marked_by,
            Some(mark),
            "new leases carry the allocator's mark"
        );
        assert!(matches!(
            backend.update_owner("mock-99", None, None).await,
            Err(IpamError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn zero_addresses_is_an_invalid_request() {
        let backend = MemoryBackend::new("10.0.0.0/30".parse().unwrap());
        assert!(matches!(
            backend.allocate(&request(0)).await,
            Err(IpamError::InvalidRequest(_))
        ));
    }
}
