//! Nested mode: the node is a Nova VM, and its pods' ipvlan slaves send
//! from the VM's NIC, with its MAC. Neutron's port security on the VM's
//! port drops every packet whose source is neither the port's own address
//! nor one of its `allowed_address_pairs`, so each pod address the node
//! holds is added to the node port's pairs (with the node port's MAC) when
//! it is allocated, and removed before it goes back to the cloud. The pod
//! addresses themselves are unbound ports (reservations) tagged with the
//! node port's id (`hulk-node-port=<id>`), so whoever releases one (the
//! agent, the cluster controller) knows which pair to remove.
//!
//! Every change of the node port is a compare-and-swap on its revision
//! (`If-Match: revision_number=N`), re-read and retried on a conflict: a
//! pair another writer added in between is never overwritten.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use hulk_ipam::{IpamError, Lease, MacAddr};
use ipnet::IpNet;
use serde_json::json;
use tokio::sync::{Mutex, OnceCell};

use super::NeutronBackend;
use crate::neutron::{AddressPair, Port};

/// Which Neutron port is the node's own: nested mode, for nodes that are
/// Nova VMs (`[backend] node_port` in the agent's configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NodePort {
    /// Not nested (the default): each pod port is bound to the node's host
    /// (`binding:host_id`), as bare-metal nodes need.
    #[default]
    Off,
    /// Nested, the node port found at the first call: the port with the
    /// parent interface's MAC, narrowed by the node's address when several
    /// have it (or found by the address alone without a MAC). None or
    /// several found: [`IpamError::InvalidRequest`] asking for the id.
    Auto {
        /// The parent interface's MAC.
        mac: Option<MacAddr>,
        /// The node's address on the VPC.
        address: Option<IpAddr>,
    },
    /// Nested, the node port given by its id.
    Id(String),
}

/// How many times a node port update is re-read and retried after losing
/// a compare-and-swap to another writer.
const CAS_ATTEMPTS: usize = 10;

/// The tag of a pod port naming the node port that carries its pair.
const NODE_PORT_TAG: &str = "hulk-node-port=";

/// The tag naming `node_port` on the pod ports it carries.
pub(super) fn node_port_tag(node_port: &str) -> String {
    format!("{NODE_PORT_TAG}{node_port}")
}

/// The node port a pod port's pair is on, from its tag.
pub(super) fn node_port_of(port: &Port) -> Option<String> {
    port.tags
        .iter()
        .find_map(|tag| tag.strip_prefix(NODE_PORT_TAG))
        .map(str::to_owned)
}

/// What nested mode needs of the node port, found once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NodePortFacts {
    /// Its id.
    pub(super) id: String,
    /// Its network: pod addresses must be on it.
    pub(super) network_id: String,
}

/// Nested mode's state in the backend.
#[derive(Debug, Default)]
pub(super) struct Nested {
    /// The configured mode.
    pub(super) setting: NodePort,
    /// The node port, once found.
    facts: OnceCell<NodePortFacts>,
    /// The last node port read or written: its revision is the first
    /// compare-and-swap's guess, saving a read while this agent is its only
    /// writer. The lock also serializes this process's updates.
    last: Mutex<Option<Port>>,
    /// Pod ports released since the last reconciliation: a snapshot of the
    /// node's addresses taken before a release must not add its pair back.
    released: std::sync::Mutex<HashSet<String>>,
}

impl Nested {
    /// Nested mode as `setting` says.
    pub(super) fn new(setting: NodePort) -> Self {
        Nested {
            setting,
            ..Nested::default()
        }
    }
}

/// The host address a pair names (`10.0.0.5` or `10.0.0.5/32`); `None` for
/// a wider CIDR, which hulk-vpc never adds.
fn host_address(pair: &AddressPair) -> Option<IpAddr> {
    if let Ok(ip) = pair.ip_address.parse::<IpAddr>() {
        return Some(ip);
    }
    let net: IpNet = pair.ip_address.parse().ok()?;
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
}

fn same_mac(pair: &AddressPair, mac: &str) -> bool {
    let parsed = |text: &str| text.parse::<MacAddr>().ok();
    pair.mac_address.as_deref().and_then(parsed) == parsed(mac)
}

fn pair(ip: IpAddr, mac: &str) -> AddressPair {
    AddressPair {
        ip_address: ip.to_string(),
        mac_address: Some(mac.to_owned()),
    }
}

/// `current` with `add` added and `remove` removed, each address with
/// `mac`; the other pairs (anyone else's) untouched. `None` when nothing
/// changes.
pub(super) fn changed_pairs(
    current: &[AddressPair],
    mac: &str,
    add: &BTreeSet<IpAddr>,
    remove: &BTreeSet<IpAddr>,
) -> Option<Vec<AddressPair>> {
    let mut next: Vec<AddressPair> = current
        .iter()
        .filter(|pair| host_address(pair).is_none_or(|ip| !remove.contains(&ip)))
        .cloned()
        .collect();
    for &ip in add {
        let present = next
            .iter()
            .any(|pair| host_address(pair) == Some(ip) && same_mac(pair, mac));
        if !present {
            next.push(pair(ip, mac));
        }
    }
    (next != current).then_some(next)
}

/// The pairs the node port should carry: hulk-vpc's own (host addresses
/// for which `owned` holds: in the pools' subnets) exactly `held`, each
/// with `mac`; anyone else's untouched. `None` when nothing changes.
pub(super) fn reconciled_pairs(
    current: &[AddressPair],
    mac: &str,
    held: &BTreeSet<IpAddr>,
    owned: impl Fn(IpAddr) -> bool,
) -> Option<Vec<AddressPair>> {
    let mut next = Vec::with_capacity(held.len());
    let mut kept = BTreeSet::new();
    for pair in current {
        match host_address(pair) {
            Some(ip) if held.contains(&ip) => {
                // A held address with another MAC cannot be sent from
                // here: replaced; a duplicate is dropped.
                if same_mac(pair, mac) && kept.insert(ip) {
                    next.push(pair.clone());
                }
            }
            Some(ip) if owned(ip) => {}
            _ => next.push(pair.clone()),
        }
    }
    next.extend(held.difference(&kept).map(|&ip| pair(ip, mac)));
    (next != current).then_some(next)
}

/// The operator's remedy when Neutron refuses more pairs on a port.
fn pair_limit(error: IpamError, node_port: &str, wanted: usize) -> IpamError {
    match error {
        IpamError::InvalidRequest(message) if message.contains("AllowedAddressPairExhausted") => {
            IpamError::InvalidRequest(format!(
                "node port {node_port} cannot carry {wanted} allowed address pairs ({message}): \
                 raise max_allowed_address_pair in the [DEFAULT] section of Neutron's \
                 neutron.conf (default 10) to at least the node's max_held, or lower \
                 [pool] max_held"
            ))
        }
        other => other,
    }
}

impl NeutronBackend {
    /// The node port, found at the first call; `None` when not nested.
    pub(super) async fn node_port(&self) -> Result<Option<NodePortFacts>, IpamError> {
        if self.nested.setting == NodePort::Off {
            return Ok(None);
        }
        self.nested
            .facts
            .get_or_try_init(|| async {
                let port = match &self.nested.setting {
                    NodePort::Id(id) => self.client.get_port(id).await?,
                    NodePort::Auto { mac, address } => self.discover(*mac, *address).await?,
                    NodePort::Off => {
                        return Err(IpamError::InvalidRequest("nested mode is off".into()));
                    }
                };
                tracing::info!(
                    node_port = %port.id,
                    mac = %port.mac_address,
                    "nested mode: pod addresses ride this node port's allowed address pairs"
                );
                let facts = NodePortFacts {
                    id: port.id.clone(),
                    network_id: port.network_id.clone(),
                };
                *self.nested.last.lock().await = Some(port);
                Ok(facts)
            })
            .await
            .cloned()
            .map(Some)
    }

    /// The node's port: the one with `mac`, narrowed by `address`.
    async fn discover(
        &self,
        mac: Option<MacAddr>,
        address: Option<IpAddr>,
    ) -> Result<Port, IpamError> {
        let by_address = |port: &Port| {
            address.is_none_or(|address| {
                port.fixed_ips
                    .iter()
                    .any(|fixed| fixed.ip_address.as_deref() == Some(&address.to_string()))
            })
        };
        let mut filters = std::collections::BTreeMap::new();
        match (mac, address) {
            (Some(mac), _) => filters.insert("mac_address".to_owned(), mac.to_string()),
            (None, Some(address)) => {
                filters.insert("fixed_ips".to_owned(), format!("ip_address={address}"))
            }
            (None, None) => {
                return Err(IpamError::InvalidRequest(
                    "node_port = \"auto\" needs the parent interface's MAC or the node's \
                     address; give the node port's id instead"
                        .into(),
                ));
            }
        };
        let found = self
            .client
            .list_ports(&filters, self.config.page_size)
            .await?;
        let mut matching: Vec<Port> = found.into_iter().filter(|port| by_address(port)).collect();
        match matching.len() {
            1 => Ok(matching.remove(0)),
            count => Err(IpamError::InvalidRequest(format!(
                "{count} Neutron ports have MAC {} and address {}: set [backend] node_port to \
                 the node port's id",
                mac.map_or_else(|| "any".to_owned(), |mac| mac.to_string()),
                address.map_or_else(|| "any".to_owned(), |address| address.to_string()),
            ))),
        }
    }

    /// Changes `port_id`'s pairs with `change` (given the port as it is;
    /// `None`: nothing to change) by compare-and-swap on its revision,
    /// re-read and retried on a conflict. `fresh`: read the port first
    /// rather than trust the last one seen. A port without port security
    /// needs no pairs and is left alone. Returns the pairs before and after
    /// when they changed.
    pub(super) async fn change_pairs(
        &self,
        port_id: &str,
        fresh: bool,
        change: impl Fn(&Port) -> Option<Vec<AddressPair>>,
    ) -> Result<Option<(Vec<AddressPair>, Vec<AddressPair>)>, IpamError> {
        let mut last = self.nested.last.lock().await;
        let mut port = match last.take() {
            Some(port) if !fresh && port.id == port_id => port,
            _ => self.client.get_port(port_id).await?,
        };
        let mut last_conflict = String::new();
        for _ in 0..CAS_ATTEMPTS {
            if port.port_security_enabled == Some(false) {
                *last = Some(port);
                return Ok(None);
            }
            let Some(pairs) = change(&port) else {
                *last = Some(port);
                return Ok(None);
            };
            match self
                .client
                .update_port(
                    port_id,
                    &json!({ "allowed_address_pairs": pairs }),
                    Some(port.revision_number),
                )
                .await
            {
                Ok(updated) => {
                    let before = std::mem::take(&mut port.allowed_address_pairs);
                    let after = updated.allowed_address_pairs.clone();
                    *last = Some(updated);
                    return Ok(Some((before, after)));
                }
                Err(IpamError::Conflict(message)) => {
                    last_conflict = message;
                    port = self.client.get_port(port_id).await?;
                }
                Err(error) => return Err(pair_limit(error, port_id, pairs.len())),
            }
        }
        Err(IpamError::Conflict(format!(
            "node port {port_id} changed under {CAS_ATTEMPTS} updates in a row: {last_conflict}"
        )))
    }

    /// Adds `addresses` to the node port's pairs (one update for a whole
    /// bulk allocation).
    pub(super) async fn add_pairs(
        &self,
        node_port: &str,
        addresses: BTreeSet<IpAddr>,
    ) -> Result<(), IpamError> {
        let none = BTreeSet::new();
        self.change_pairs(node_port, false, |port| {
            changed_pairs(
                &port.allowed_address_pairs,
                &port.mac_address,
                &addresses,
                &none,
            )
        })
        .await
        .map(|_| ())
    }

    /// Removes `address`'s pair of pod port `lease_id` from `node_port`
    /// before the pod port goes back; a node port that is gone (its VM
    /// deleted) carries nothing.
    pub(super) async fn remove_pair(
        &self,
        lease_id: &str,
        node_port: &str,
        address: IpAddr,
    ) -> Result<(), IpamError> {
        // Only a node agent reconciles, and drains this set.
        if self.nested.setting != NodePort::Off {
            self.nested
                .released
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(lease_id.to_owned());
        }
        let none = BTreeSet::new();
        let remove = BTreeSet::from([address]);
        match self
            .change_pairs(node_port, false, |port| {
                changed_pairs(
                    &port.allowed_address_pairs,
                    &port.mac_address,
                    &none,
                    &remove,
                )
            })
            .await
        {
            Ok(_) | Err(IpamError::NotFound(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Makes the node port's pairs in the pools' subnets exactly `held`'s
    /// addresses (see [`hulk_ipam::IpamBackend::reconcile_node`]).
    pub(super) async fn reconcile_pairs(&self, held: &[Lease]) -> Result<(), IpamError> {
        let Some(node_port) = self.node_port().await? else {
            return Ok(());
        };
        let mut subnets: Vec<IpNet> = Vec::new();
        for subnet in held.iter().map(|lease| lease.subnet.as_str()) {
            if !subnet.is_empty() {
                self.subnet_facts(subnet).await?;
            }
        }
        subnets.extend(self.subnets.lock().await.values().map(|facts| facts.cidr));
        let released = std::mem::take(
            &mut *self
                .nested
                .released
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let wanted: BTreeSet<IpAddr> = held
            .iter()
            .filter(|lease| !released.contains(&lease.id))
            .map(|lease| lease.address.addr())
            .collect();
        let changed = self
            .change_pairs(&node_port.id, true, |port| {
                let own: Vec<&str> = port
                    .fixed_ips
                    .iter()
                    .filter_map(|fixed| fixed.ip_address.as_deref())
                    .collect();
                reconciled_pairs(
                    &port.allowed_address_pairs,
                    &port.mac_address,
                    &wanted,
                    |ip| {
                        subnets.iter().any(|subnet| subnet.contains(&ip))
                            && !own.contains(&ip.to_string().as_str())
                    },
                )
            })
            .await
            .map_err(|error| pair_limit(error, &node_port.id, wanted.len()))?;
        if let Some((before, after)) = changed {
            let addresses = |pairs: &[AddressPair]| -> BTreeSet<String> {
                pairs.iter().map(|pair| pair.ip_address.clone()).collect()
            };
            let (before, after) = (addresses(&before), addresses(&after));
            tracing::warn!(
                node_port = %node_port.id,
                added = ?after.difference(&before).collect::<Vec<_>>(),
                removed = ?before.difference(&after).collect::<Vec<_>>(),
                "the node port's allowed address pairs differed from the addresses the node \
                 holds; repaired"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: &str = "fa:16:3e:00:00:01";

    fn pairs(list: &[(&str, &str)]) -> Vec<AddressPair> {
        list.iter()
            .map(|(ip, mac)| AddressPair {
                ip_address: (*ip).to_owned(),
                mac_address: Some((*mac).to_owned()),
            })
            .collect()
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn changes_add_and_remove_only_the_given_addresses() {
        let current = pairs(&[("10.0.0.5", MAC), ("192.168.9.9/32", "fa:16:3e:99:99:99")]);
        let added = changed_pairs(&current, MAC, &ips(&["10.0.0.6", "10.0.0.5"]), &ips(&[]));
        assert_eq!(
            added,
            Some(pairs(&[
                ("10.0.0.5", MAC),
                ("192.168.9.9/32", "fa:16:3e:99:99:99"),
                ("10.0.0.6", MAC)
            ]))
        );
        let removed = changed_pairs(&current, MAC, &ips(&[]), &ips(&["192.168.9.9"]));
        assert_eq!(removed, Some(pairs(&[("10.0.0.5", MAC)])));
        assert_eq!(
            changed_pairs(&current, MAC, &ips(&["10.0.0.5"]), &ips(&["10.9.9.9"])),
            None,
            "nothing to change: no update"
        );
        // The MAC is compared as a MAC, not as text.
        assert_eq!(
            changed_pairs(
                &current,
                "FA:16:3E:00:00:01",
                &ips(&["10.0.0.5"]),
                &ips(&[])
            ),
            None
        );
    }

    #[test]
    fn reconciliation_makes_the_owned_pairs_exactly_the_held_addresses() {
        let subnet: IpNet = "10.0.0.0/24".parse().unwrap();
        let owned = |ip: IpAddr| subnet.contains(&ip);
        let current = pairs(&[
            ("10.0.0.5", MAC),                    // held: kept
            ("10.0.0.7", MAC),                    // stale: removed
            ("10.0.0.8", "fa:16:3e:00:00:02"),    // held, wrong MAC: replaced
            ("10.0.0.8", MAC),                    // held, right MAC: kept
            ("10.0.0.5/32", MAC),                 // a duplicate: dropped
            ("10.0.0.0/28", MAC),                 // a range: an operator's, kept
            ("172.16.0.10", "fa:16:3e:77:77:77"), // outside the subnets: kept
        ]);
        let held = ips(&["10.0.0.5", "10.0.0.8", "10.0.0.9"]);
        let next = reconciled_pairs(&current, MAC, &held, owned).unwrap();
        assert_eq!(
            next,
            pairs(&[
                ("10.0.0.5", MAC),
                ("10.0.0.8", MAC),
                ("10.0.0.0/28", MAC),
                ("172.16.0.10", "fa:16:3e:77:77:77"),
                ("10.0.0.9", MAC),
            ])
        );
        assert_eq!(
            reconciled_pairs(&next, MAC, &held, owned),
            None,
            "reconciled once, nothing more to change"
        );
        // Nothing held: every owned pair goes, the others stay.
        assert_eq!(
            reconciled_pairs(&next, MAC, &BTreeSet::new(), owned),
            Some(pairs(&[
                ("10.0.0.0/28", MAC),
                ("172.16.0.10", "fa:16:3e:77:77:77")
            ]))
        );
    }

    #[test]
    fn the_pair_limit_names_the_setting_to_raise() {
        let refused = IpamError::InvalidRequest(
            "AllowedAddressPairExhausted: Maximum number of allowed address pairs 10 exceeded"
                .into(),
        );
        let error = pair_limit(refused, "np-1", 11);
        assert!(!error.is_retryable());
        let text = error.to_string();
        for named in ["np-1", "max_allowed_address_pair", "neutron.conf", "11"] {
            assert!(text.contains(named), "{named:?} not in {text}");
        }
        let other = IpamError::InvalidRequest("HTTPBadRequest: bad".into());
        assert_eq!(pair_limit(other.clone(), "np-1", 11), other);
    }
}
