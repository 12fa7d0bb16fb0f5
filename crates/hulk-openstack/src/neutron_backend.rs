//! [`IpamBackend`] on Neutron ports: each address is a port on the VPC
//! subnet, bound to the node (or, nested, an unbound port whose address
//! the node's own port allows: [`NodePort`]), tagged so it can always be
//! found again.

mod node_port;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use hulk_ipam::{
    AllocationRequest, InstanceMark, IpamBackend, IpamError, Lease, ListScope, MANAGED_TAG,
    MacAddr, Owner, cluster_tag, node_tag,
};
use ipnet::IpNet;
use serde_json::json;
use tokio::sync::{Mutex, OnceCell};

use crate::neutron::{FixedIp, NeutronClient, Port, PortRequest};
pub use node_port::NodePort;
use node_port::{Nested, node_port_of, node_port_tag};

/// The extension that lets a port create (single or bulk) carry tags.
const TAGS_ON_CREATE: &str = "tag-ports-during-bulk-creation";

/// Settings of the Neutron backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeutronBackendConfig {
    /// The cluster's name, tagged on every port (`hulk-cluster=NAME`).
    pub cluster: String,
    /// `device_owner` of hulk-vpc's ports.
    pub device_owner: String,
    /// Create several ports in one bulk request.
    pub bulk: bool,
    /// Page size for listing.
    pub page_size: usize,
    /// Nested mode (the node is a Nova VM): which port is the node's own.
    pub node_port: NodePort,
}

impl NeutronBackendConfig {
    /// Defaults for a cluster: device owner `compute:hulk-vpc`, bulk on,
    /// pages of 200, not nested.
    pub fn new(cluster: impl Into<String>) -> Self {
        NeutronBackendConfig {
            cluster: cluster.into(),
            device_owner: "compute:hulk-vpc".into(),
            bulk: true,
            page_size: 200,
            node_port: NodePort::Off,
        }
    }
}

/// What a lease needs from the subnet and network, fetched once.
#[derive(Debug, Clone)]
struct SubnetFacts {
    cidr: IpNet,
    prefix_len: u8,
    gateway: Option<IpAddr>,
    gateway_mac: Option<MacAddr>,
    mtu: Option<u32>,
}

/// The Neutron IPAM backend.
#[derive(Debug)]
pub struct NeutronBackend {
    client: NeutronClient,
    config: NeutronBackendConfig,
    subnets: Mutex<HashMap<String, SubnetFacts>>,
    tags_on_create: OnceCell<bool>,
    nested: Nested,
    /// What a release needs of each pod port seen (allocated or listed):
    /// its address and the node port carrying its pair, by port id.
    seen: std::sync::Mutex<HashMap<String, SeenPort>>,
}

/// A pod port as a release needs it.
#[derive(Debug, Clone)]
struct SeenPort {
    address: IpAddr,
    node: String,
    node_port: Option<String>,
}

/// The longest port `name` (and `description`) Neutron accepts.
const PORT_NAME_MAX: usize = 255;

/// How a held port's `description` begins; the instance mark and the
/// holder's pod UID and CNI network follow as `key=value` words.
const HOLDER_DESCRIPTION: &str = "hulk-vpc holder";

/// An idle port's `description`, followed by the instance mark.
const IDLE_DESCRIPTION: &str = "hulk-vpc idle";

/// A port's `name` while a pod holds it: `hulk-vpc:<ifname>:<namespace/pod>`.
/// Neither an interface name nor a Kubernetes name can hold a `:`. A pod
/// name too long for Neutron is left out rather than cut: a cut name
/// would name another pod, or none, and the agent's GC would then judge
/// the wrong pod.
fn owner_name(owner: &Owner) -> String {
    let named = format!(
        "{MANAGED_TAG}:{}:{}",
        owner.ifname,
        owner.pod.as_deref().unwrap_or("")
    );
    if named.len() <= PORT_NAME_MAX {
        return named;
    }
    format!("{MANAGED_TAG}:{}:", owner.ifname)
}

/// A port's `description`: `lead` (what the port is), then the instance
/// mark (`instance=<id> at=<unix seconds>`, see [`InstanceMark`]), then a
/// holder's pod UID and CNI network, which the name has no room for. No
/// value holds a space or an `=`; a word that would make the description
/// too long for Neutron is left out, the mark last of all.
fn port_description(lead: &str, owner: Option<&Owner>, marked_by: Option<&InstanceMark>) -> String {
    let mut description = lead.to_owned();
    let mut words: Vec<(&str, String)> = Vec::new();
    if let Some(mark) = marked_by {
        words.push(("instance", mark.instance.clone()));
        words.push(("at", mark.at_unix.to_string()));
        if mark.alive_for_secs > 0 {
            words.push(("alive", mark.alive_for_secs.to_string()));
        }
    }
    if let Some(owner) = owner {
        for (key, value) in [
            ("pod-uid", &owner.pod_uid),
            ("cni-network", &owner.cni_network),
        ] {
            if let Some(value) = value {
                words.push((key, value.clone()));
            }
        }
    }
    for (key, value) in words {
        if value.is_empty() || value.contains(char::is_whitespace) {
            continue;
        }
        let word = format!(" {key}={value}");
        if description.len() + word.len() <= PORT_NAME_MAX {
            description.push_str(&word);
        }
    }
    description
}

/// The value of `key=value` among a description's words.
fn described(description: &str, key: &str) -> Option<String> {
    description
        .split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

/// The instance mark a port's description carries, if whole.
fn marked_by(port: &Port) -> Option<InstanceMark> {
    let instance = described(&port.description, "instance")?;
    let at_unix = described(&port.description, "at")?.parse().ok()?;
    let alive_for = described(&port.description, "alive")
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or(0);
    Some(InstanceMark::new(instance, at_unix).alive_for(std::time::Duration::from_secs(alive_for)))
}

fn owner_of(port: &Port) -> Option<Owner> {
    if port.device_id.is_empty() {
        return None;
    }
    let mut parts = port.name.splitn(3, ':');
    let (_, ifname, pod) = (parts.next(), parts.next(), parts.next());
    let described = |key: &str| described(port.description.strip_prefix(HOLDER_DESCRIPTION)?, key);
    Some(Owner {
        container_id: port.device_id.clone(),
        ifname: ifname.unwrap_or_default().to_owned(),
        pod: pod.filter(|pod| !pod.is_empty()).map(str::to_owned),
        cni_network: described("cni-network"),
        pod_uid: described("pod-uid"),
    })
}

impl NeutronBackend {
    /// A backend over `client`.
    pub fn new(client: NeutronClient, config: NeutronBackendConfig) -> Self {
        NeutronBackend {
            client,
            nested: Nested::new(config.node_port.clone()),
            config,
            subnets: Mutex::new(HashMap::new()),
            tags_on_create: OnceCell::new(),
            seen: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The raw client, for operations the trait does not cover.
    pub fn client(&self) -> &NeutronClient {
        &self.client
    }

    /// The settings it was built with.
    pub fn config(&self) -> &NeutronBackendConfig {
        &self.config
    }

    fn tags(&self, node: &str, extra: &[String]) -> Vec<String> {
        let mut tags = vec![
            MANAGED_TAG.to_owned(),
            cluster_tag(&self.config.cluster),
            node_tag(node),
        ];
        tags.extend(extra.iter().cloned());
        tags
    }

    async fn takes_tags_on_create(&self) -> Result<bool, IpamError> {
        self.tags_on_create
            .get_or_try_init(|| async {
                Ok(self
                    .client
                    .extensions()
                    .await?
                    .iter()
                    .any(|alias| alias == TAGS_ON_CREATE))
            })
            .await
            .copied()
    }

    async fn subnet_facts(&self, subnet_id: &str) -> Result<SubnetFacts, IpamError> {
        let mut subnets = self.subnets.lock().await;
        if let Some(facts) = subnets.get(subnet_id) {
            return Ok(facts.clone());
        }
        let subnet = self.client.get_subnet(subnet_id).await?;
        let cidr: IpNet = subnet.cidr.parse().map_err(|_| {
            IpamError::Protocol(format!("subnet {subnet_id} has CIDR {:?}", subnet.cidr))
        })?;
        let gateway: Option<IpAddr> = subnet.gateway_ip.as_deref().and_then(|ip| ip.parse().ok());
        let network = self.client.get_network(&subnet.network_id).await?;
        // The router port holding the gateway address knows the gateway's MAC.
        let gateway_mac = match gateway {
            Some(gateway) => {
                let filters = BTreeMap::from([
                    ("network_id".to_owned(), subnet.network_id.clone()),
                    ("fixed_ips".to_owned(), format!("ip_address={gateway}")),
                ]);
                let ports = self.client.list_ports(&filters, 1).await?;
                ports.first().and_then(|port| port.mac_address.parse().ok())
            }
            None => None,
        };
        let facts = SubnetFacts {
            cidr: cidr.trunc(),
            prefix_len: cidr.prefix_len(),
            gateway,
            gateway_mac,
            mtu: network.mtu,
        };
        subnets.insert(subnet_id.to_owned(), facts.clone());
        Ok(facts)
    }

    async fn lease(&self, port: &Port) -> Result<Lease, IpamError> {
        let fixed = port
            .fixed_ips
            .first()
            .ok_or_else(|| IpamError::Protocol(format!("port {} has no fixed IP", port.id)))?;
        let facts = self.subnet_facts(&fixed.subnet_id).await?;
        let ip: IpAddr = fixed
            .ip_address
            .as_deref()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| IpamError::Protocol(format!("port {} has no valid address", port.id)))?;
        let node = port
            .binding_host_id
            .clone()
            .filter(|host| !host.is_empty())
            .or_else(|| {
                port.tags
                    .iter()
                    .find_map(|tag| tag.strip_prefix("hulk-node=").map(str::to_owned))
            })
            .unwrap_or_default();
        self.seen_ports().insert(
            port.id.clone(),
            SeenPort {
                address: ip,
                node: node.clone(),
                node_port: node_port_of(port),
            },
        );
        Ok(Lease {
            id: port.id.clone(),
            address: IpNet::new(ip, facts.prefix_len)
                .map_err(|_| IpamError::Protocol(format!("port {} address {ip}", port.id)))?,
            network: port.network_id.clone(),
            subnet: fixed.subnet_id.clone(),
            gateway: facts.gateway,
            mac: port.mac_address.parse().ok(),
            mtu: facts.mtu,
            gateway_mac: facts.gateway_mac,
            security_groups: port.security_groups.clone(),
            qos_policy: port.qos_policy_id.clone(),
            node,
            owner: owner_of(port),
            marked_by: marked_by(port),
        })
    }

    async fn leases(&self, ports: &[Port]) -> Result<Vec<Lease>, IpamError> {
        let mut leases = Vec::with_capacity(ports.len());
        for port in ports {
            leases.push(self.lease(port).await?);
        }
        Ok(leases)
    }

    fn seen_ports(&self) -> std::sync::MutexGuard<'_, HashMap<String, SeenPort>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets the ports a listing of `scope` lacks: they are gone.
    fn forget_unlisted(&self, scope: &ListScope, listed: &[Port]) {
        let listed: std::collections::HashSet<&str> =
            listed.iter().map(|port| port.id.as_str()).collect();
        self.seen_ports().retain(|id, seen| {
            let in_scope = match scope {
                ListScope::Cluster => true,
                ListScope::Node(node) => &seen.node == node,
            };
            !in_scope || listed.contains(id.as_str())
        });
    }

    /// The address and node port of pod port `id`, for its release: as
    /// seen, else (nested only: today's mode needs nothing) read.
    async fn release_facts(&self, id: &str) -> Result<Option<SeenPort>, IpamError> {
        if let Some(seen) = self.seen_ports().get(id).cloned() {
            return Ok(Some(seen));
        }
        if self.nested.setting == NodePort::Off {
            return Ok(None);
        }
        let port = self.client.get_port(id).await?;
        self.lease(&port).await?;
        Ok(self.seen_ports().get(id).cloned())
    }

    /// Deletes ports after a failed all-or-nothing allocation; failures are
    /// logged (the orphan sweep finds these ports by their tags).
    async fn discard(&self, ports: &[Port]) {
        for port in ports {
            self.seen_ports().remove(&port.id);
            if let Err(error) = self.client.delete_port(&port.id).await {
                tracing::warn!(port = %port.id, %error, "cannot delete a port of a failed allocation");
            }
        }
    }
}

#[async_trait::async_trait]
impl IpamBackend for NeutronBackend {
    fn name(&self) -> &str {
        "neutron"
    }

    async fn allocate(&self, request: &AllocationRequest) -> Result<Vec<Lease>, IpamError> {
        request.validate(usize::MAX)?;
        let tags_on_create = self.takes_tags_on_create().await?;
        let node_port = self.node_port().await?;
        let mut tags = self.tags(&request.node, &request.tags);
        if let Some(node_port) = &node_port {
            // Port security passes the pairs of the node port's own network.
            if node_port.network_id != request.key.network {
                return Err(IpamError::InvalidRequest(format!(
                    "nested mode: network {} is not the node port's ({}); pods of a VM node \
                     get addresses on its port's network only",
                    request.key.network, node_port.network_id
                )));
            }
            tags.push(node_port_tag(&node_port.id));
        }
        let port = PortRequest {
            network_id: request.key.network.clone(),
            fixed_ips: vec![FixedIp {
                subnet_id: request.key.subnet.clone(),
                ip_address: request.address.map(|address| address.to_string()),
            }],
            security_groups: request.key.security_groups.clone(),
            qos_policy_id: request.key.qos_policy.clone(),
            device_owner: self.config.device_owner.clone(),
            device_id: String::new(),
            // Nested: a reservation, bound to nothing; the VM's port
            // carries the traffic.
            binding_host_id: node_port.is_none().then(|| request.node.clone()),
            name: MANAGED_TAG.to_owned(),
            description: port_description(
                &format!("{MANAGED_TAG} address of node {}", request.node),
                None,
                request.marked_by.as_ref(),
            ),
            tags: if tags_on_create {
                tags.clone()
            } else {
                Vec::new()
            },
        };
        let ports = if self.config.bulk && request.count > 1 {
            self.client.create_ports(&vec![port; request.count]).await?
        } else {
            let mut created = Vec::with_capacity(request.count);
            for _ in 0..request.count {
                match self.client.create_port(&port).await {
                    Ok(one) => created.push(one),
                    Err(error) => {
                        self.discard(&created).await;
                        return Err(error);
                    }
                }
            }
            created
        };
        if !tags_on_create {
            for created in &ports {
                if let Err(error) = self.client.set_port_tags(&created.id, &tags).await {
                    self.discard(&ports).await;
                    return Err(error);
                }
            }
        }
        let leases = match self.leases(&ports).await {
            Ok(leases) => leases,
            Err(error) => {
                self.discard(&ports).await;
                return Err(error);
            }
        };
        if let Some(node_port) = &node_port {
            // One update for the whole batch, so an ADD later costs no call.
            let addresses = leases.iter().map(|lease| lease.address.addr()).collect();
            if let Err(error) = self.add_pairs(&node_port.id, addresses).await {
                self.discard(&ports).await;
                return Err(error);
            }
        }
        Ok(leases)
    }

    async fn release(&self, id: &str) -> Result<(), IpamError> {
        // The pair goes first: a pair whose port is gone would let this
        // node send from an address the cloud may give to someone else.
        if let Some(SeenPort {
            address,
            node_port: Some(node_port),
            ..
        }) = self.release_facts(id).await?
        {
            self.remove_pair(id, &node_port, address).await?;
        }
        self.client.delete_port(id).await?;
        self.seen_ports().remove(id);
        Ok(())
    }

    async fn update_owner(
        &self,
        id: &str,
        owner: Option<Owner>,
        marked_by: Option<InstanceMark>,
    ) -> Result<Lease, IpamError> {
        let changes = match &owner {
            Some(owner) => json!({
                "device_id": owner.container_id,
                "name": owner_name(owner),
                "description": port_description(HOLDER_DESCRIPTION, Some(owner), marked_by.as_ref()),
            }),
            None => json!({
                "device_id": "",
                "name": MANAGED_TAG,
                "description": port_description(IDLE_DESCRIPTION, None, marked_by.as_ref()),
            }),
        };
        // Compare-and-swap on the revision: a concurrent change makes the
        // update fail instead of silently overwriting it; re-read and retry.
        let mut last_conflict = None;
        for _ in 0..3 {
            let current = self.client.get_port(id).await?;
            match self
                .client
                .update_port(id, &changes, Some(current.revision_number))
                .await
            {
                Ok(port) => return self.lease(&port).await,
                Err(IpamError::Conflict(message)) => last_conflict = Some(message),
                Err(error) => return Err(error),
            }
        }
        Err(IpamError::Conflict(last_conflict.unwrap_or_default()))
    }

    async fn list(&self, scope: &ListScope) -> Result<Vec<Lease>, IpamError> {
        let mut tags = vec![MANAGED_TAG.to_owned(), cluster_tag(&self.config.cluster)];
        if let ListScope::Node(node) = scope {
            tags.push(node_tag(node));
        }
        let filters = BTreeMap::from([("tags".to_owned(), tags.join(","))]);
        let ports = self
            .client
            .list_ports(&filters, self.config.page_size)
            .await?;
        self.forget_unlisted(scope, &ports);
        self.leases(&ports).await
    }

    async fn health(&self) -> Result<(), IpamError> {
        self.client.extensions().await.map(|_| ())
    }

    /// Nested mode: the node port's pairs in the pools' subnets become
    /// exactly `held`'s addresses (one compare-and-swap update, none when
    /// they already are); other pairs are left alone. Not nested: nothing.
    async fn reconcile_node(&self, _node: &str, held: &[Lease]) -> Result<(), IpamError> {
        self.reconcile_pairs(held).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_survive_the_port_name_and_description_round_trip() {
        let owner = Owner {
            container_id: "abc".into(),
            ifname: "eth0".into(),
            pod: Some("default/web-0".into()),
            cni_network: Some("hulk-vpc".into()),
            pod_uid: Some("0b3e2f8a-6f1c-4d1e-9a57-3c1f0d9e2b11".into()),
        };
        let port: Port = serde_json::from_value(json!({
            "id": "p", "network_id": "n", "mac_address": "fa:16:3e:00:00:01",
            "device_id": "abc", "name": owner_name(&owner),
            "description": port_description(HOLDER_DESCRIPTION, Some(&owner), None)
        }))
        .unwrap();
        assert_eq!(owner_of(&port).as_ref(), Some(&owner));
        assert_eq!(marked_by(&port), None, "no instance mark written");
        let unknown = Owner {
            cni_network: None,
            pod_uid: None,
            ..owner.clone()
        };
        let created: Port = serde_json::from_value(json!({
            "id": "p", "network_id": "n", "mac_address": "fa:16:3e:00:00:01",
            "device_id": "abc", "name": owner_name(&owner),
            "description": "hulk-vpc address of node n"
        }))
        .unwrap();
        assert_eq!(owner_of(&created), Some(unknown), "not described: unknown");
        let idle: Port = serde_json::from_value(json!({
            "id": "p", "network_id": "n", "mac_address": "fa:16:3e:00:00:01", "name": "hulk-vpc"
        }))
        .unwrap();
        assert_eq!(owner_of(&idle), None);

        let long = Owner {
            pod: Some(format!("default/{}", "p".repeat(253))),
            ..owner
        };
        let name = owner_name(&long);
        assert!(name.len() <= PORT_NAME_MAX, "{name}");
        let port: Port = serde_json::from_value(json!({
            "id": "p", "network_id": "n", "mac_address": "fa:16:3e:00:00:01",
            "device_id": "abc", "name": name
        }))
        .unwrap();
        assert_eq!(owner_of(&port).unwrap().pod, None, "left out, not cut");
    }

    #[test]
    fn instance_marks_survive_the_description_round_trip() {
        let mark = InstanceMark::new("node-7.example-9f3a", 1_764_000_000)
            .alive_for(std::time::Duration::from_secs(180));
        let owner = Owner {
            pod_uid: Some("0b3e2f8a-6f1c-4d1e-9a57-3c1f0d9e2b11".into()),
            cni_network: Some("hulk-vpc".into()),
            ..Owner::new("abc", "eth0")
        };
        let port = |description: String, device_id: &str| -> Port {
            serde_json::from_value(json!({
                "id": "p", "network_id": "n", "mac_address": "fa:16:3e:00:00:01",
                "device_id": device_id, "name": owner_name(&owner), "description": description
            }))
            .unwrap()
        };
        let held = port(
            port_description(HOLDER_DESCRIPTION, Some(&owner), Some(&mark)),
            "abc",
        );
        assert_eq!(marked_by(&held), Some(mark.clone()));
        assert_eq!(
            owner_of(&held),
            Some(owner.clone()),
            "the mark does not hide the holder"
        );
        let idle = port(port_description(IDLE_DESCRIPTION, None, Some(&mark)), "");
        assert_eq!(marked_by(&idle), Some(mark.clone()));
        let created = port(
            port_description("hulk-vpc address of node n", None, Some(&mark)),
            "",
        );
        assert_eq!(marked_by(&created), Some(mark));
        // A mark cut short is no mark: a missing time must not read as 0
        // (a dead instance) nor an instance without its time as fresh.
        let cut = port("hulk-vpc idle instance=x".into(), "");
        assert_eq!(marked_by(&cut), None);
        let long = InstanceMark::new("h".repeat(300), 1);
        let description = port_description(HOLDER_DESCRIPTION, Some(&owner), Some(&long));
        assert!(description.len() <= PORT_NAME_MAX, "{description}");
        assert_eq!(marked_by(&port(description, "abc")), None);
    }
}
