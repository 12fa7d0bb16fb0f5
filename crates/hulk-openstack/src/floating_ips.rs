//! Neutron floating IPs (`/v2.0/floatingips`, the `router` service
//! plugin): the client calls, and [`NeutronFloatingIps`], the
//! [`FloatingIpProvider`] that associates one floating IP of an external
//! network with a pod's port.
//!
//! Neutron only associates a floating IP with a port whose subnet a router
//! connects to the floating IP's external network (the router's gateway);
//! otherwise the create is refused (`ExternalGatewayForFloatingIPNotFound`,
//! a 404 or 400, [`IpamError::NotFound`] or [`IpamError::InvalidRequest`]).
//! Neutron does not take `tags` in a floating IP's create: they are set
//! right after through the tags API, and the floating IP deleted again if
//! that fails. Deleting a port disassociates its floating IPs.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use hulk_ipam::{
    FloatingIp, FloatingIpHold, FloatingIpPolicy, FloatingIpProvider, FloatingIpRequest, IpamError,
    ListScope, MANAGED_TAG, cluster_tag, node_tag,
};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::NeutronBackend;
use crate::neutron::{Network, NeutronClient};

/// A floating IP as Neutron returns it (the fields hulk-vpc uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NeutronFloatingIp {
    /// Floating IP id.
    pub id: String,
    /// The floating address.
    pub floating_ip_address: String,
    /// The external network it comes from.
    pub floating_network_id: String,
    /// The associated port, `None` when unassociated.
    #[serde(default)]
    pub port_id: Option<String>,
    /// The port's fixed address it translates to.
    #[serde(default)]
    pub fixed_ip_address: Option<String>,
    /// The router doing the translation, while associated.
    #[serde(default)]
    pub router_id: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Revision, for compare-and-swap updates (`If-Match`).
    #[serde(default)]
    pub revision_number: u64,
}

/// The fields of a floating IP to create.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FloatingIpCreate {
    /// The external network (`router:external`).
    pub floating_network_id: String,
    /// The port to associate at once, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_id: Option<String>,
    /// Which of the port's fixed addresses, when it has several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed_ip_address: Option<String>,
    /// Description.
    pub description: String,
}

impl NeutronClient {
    /// Creates a floating IP (`POST /v2.0/floatingips`).
    pub async fn create_floating_ip(
        &self,
        request: &FloatingIpCreate,
    ) -> Result<NeutronFloatingIp, IpamError> {
        let body = json!({ "floatingip": request });
        self.single(
            Method::POST,
            "/v2.0/floatingips",
            "floatingip",
            Some(&body),
            None,
        )
        .await
    }

    /// Lists floating IPs matching `filters` (`tags`, `port_id`,
    /// `floating_network_id`, ...), `page_size` at a time.
    pub async fn list_floating_ips(
        &self,
        filters: &BTreeMap<String, String>,
        page_size: usize,
    ) -> Result<Vec<NeutronFloatingIp>, IpamError> {
        self.list_paged(
            "floatingips",
            filters,
            page_size,
            |floating: &NeutronFloatingIp| floating.id.clone(),
        )
        .await
    }

    /// Reads one floating IP.
    pub async fn get_floating_ip(&self, id: &str) -> Result<NeutronFloatingIp, IpamError> {
        let path = format!("/v2.0/floatingips/{id}");
        self.single(Method::GET, &path, "floatingip", None, None)
            .await
    }

    /// Associates a floating IP with `port` (and its `fixed_ip_address`),
    /// or disassociates it with `None`; with `if_revision`, only if its
    /// revision is still that one (a stale one is [`IpamError::Conflict`]).
    pub async fn associate_floating_ip(
        &self,
        id: &str,
        port: Option<(&str, Option<&str>)>,
        if_revision: Option<u64>,
    ) -> Result<NeutronFloatingIp, IpamError> {
        let changes = match port {
            Some((port, fixed_ip)) => match fixed_ip {
                Some(fixed_ip) => json!({"port_id": port, "fixed_ip_address": fixed_ip}),
                None => json!({"port_id": port}),
            },
            None => json!({"port_id": Value::Null}),
        };
        let body = json!({ "floatingip": changes });
        let path = format!("/v2.0/floatingips/{id}");
        self.single(Method::PUT, &path, "floatingip", Some(&body), if_revision)
            .await
    }

    /// Deletes a floating IP.
    pub async fn delete_floating_ip(&self, id: &str) -> Result<(), IpamError> {
        let path = format!("/v2.0/floatingips/{id}");
        self.send(Method::DELETE, &path, &[], None, None)
            .await
            .map(|_| ())
    }

    /// Lists networks matching `filters` (`name`, `router:external`, ...).
    pub async fn list_networks(
        &self,
        filters: &BTreeMap<String, String>,
        page_size: usize,
    ) -> Result<Vec<Network>, IpamError> {
        self.list_paged("networks", filters, page_size, |network: &Network| {
            network.id.clone()
        })
        .await
    }
}

/// The longest tag Neutron accepts (`MAX_TAG_LEN`).
const TAG_MAX: usize = 255;

/// The tag naming the pod a floating IP was taken for.
fn pod_tag(pod: &str) -> String {
    format!("hulk-pod={pod}")
}

/// The tag recording a floating IP's policy.
fn policy_tag(policy: FloatingIpPolicy) -> String {
    format!("hulk-fip-policy={policy}")
}

fn tagged<'a>(floating: &'a NeutronFloatingIp, prefix: &str) -> Option<&'a str> {
    floating
        .tags
        .iter()
        .find_map(|tag| tag.strip_prefix(prefix)?.strip_prefix('='))
}

/// The floating IP as [`hulk_ipam`] says it; a floating IP without a
/// policy tag (tagging failed half-way) counts as
/// [`FloatingIpPolicy::Release`].
fn to_floating_ip(floating: &NeutronFloatingIp) -> Result<FloatingIp, IpamError> {
    let address: IpAddr = floating.floating_ip_address.parse().map_err(|_| {
        IpamError::Protocol(format!(
            "floating IP {} has address {:?}",
            floating.id, floating.floating_ip_address
        ))
    })?;
    Ok(FloatingIp {
        id: floating.id.clone(),
        address,
        network: floating.floating_network_id.clone(),
        port: floating.port_id.clone(),
        pod: tagged(floating, "hulk-pod").map(str::to_owned),
        policy: tagged(floating, "hulk-fip-policy")
            .and_then(|policy| policy.parse().ok())
            .unwrap_or_default(),
    })
}

/// [`FloatingIpProvider`] on Neutron, sharing a [`NeutronBackend`]'s client
/// (and so its Keystone token) and cluster name. Every floating IP is tagged
/// `hulk-vpc`, `hulk-cluster=…`, `hulk-node=…`, `hulk-pod=NAMESPACE/NAME`
/// and `hulk-fip-policy=release|keep`.
///
/// Neutron calls: a new floating IP costs 3 (list the pod's, create,
/// tag), a kept one coming back 2 (list, associate with `If-Match`), a
/// retried ADD 1 (list); the external network's name is resolved once
/// (1 or 2 calls). Releasing costs 1 (delete), keeping 2 (read, then
/// disassociate with `If-Match` unless the floating IP already moved to
/// another port).
#[derive(Debug)]
pub struct NeutronFloatingIps {
    backend: Arc<NeutronBackend>,
    /// External networks by the name or id they were asked by.
    networks: Mutex<HashMap<String, String>>,
}

impl NeutronFloatingIps {
    /// Floating IPs through `backend`'s client, tagged with its cluster.
    pub fn new(backend: Arc<NeutronBackend>) -> Self {
        NeutronFloatingIps {
            backend,
            networks: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self) -> &NeutronClient {
        self.backend.client()
    }

    fn page_size(&self) -> usize {
        self.backend.config().page_size
    }

    /// The scope's tags, comma-joined as Neutron's `tags` filter wants
    /// them (all must match).
    fn scope_tags(&self, scope: &ListScope) -> String {
        let mut tags = vec![
            MANAGED_TAG.to_owned(),
            cluster_tag(&self.backend.config().cluster),
        ];
        if let ListScope::Node(node) = scope {
            tags.push(node_tag(node));
        }
        tags.join(",")
    }

    fn tags(&self, request: &FloatingIpRequest) -> Result<Vec<String>, IpamError> {
        let pod = pod_tag(&request.pod);
        if pod.len() > TAG_MAX {
            return Err(IpamError::InvalidRequest(format!(
                "pod {} has a name too long for a floating IP's tag ({TAG_MAX} characters)",
                request.pod
            )));
        }
        Ok(vec![
            MANAGED_TAG.to_owned(),
            cluster_tag(&self.backend.config().cluster),
            node_tag(&request.node),
            pod,
            policy_tag(request.policy),
        ])
    }

    /// The id of the external network named or ided `network`: a network
    /// of that name with `router:external`, else a network of that id.
    async fn network_id(&self, network: &str) -> Result<String, IpamError> {
        let mut networks = self.networks.lock().await;
        if let Some(id) = networks.get(network) {
            return Ok(id.clone());
        }
        let filters = BTreeMap::from([
            ("name".to_owned(), network.to_owned()),
            ("router:external".to_owned(), "true".to_owned()),
        ]);
        let named = self.client().list_networks(&filters, 2).await?;
        let id = match named.as_slice() {
            [one] => one.id.clone(),
            [] => self.client().get_network(network).await?.id,
            _ => {
                return Err(IpamError::InvalidRequest(format!(
                    "several external networks are named {network:?}: give its id"
                )));
            }
        };
        networks.insert(network.to_owned(), id.clone());
        Ok(id)
    }

    /// Sets `floating`'s tags to `tags` unless it has them already.
    async fn retag(&self, floating: &NeutronFloatingIp, tags: &[String]) -> Result<(), IpamError> {
        let mut have = floating.tags.clone();
        let mut want = tags.to_vec();
        have.sort();
        want.sort();
        if have == want {
            return Ok(());
        }
        self.client()
            .set_tags("floatingips", &floating.id, tags)
            .await
    }

    /// Gives up one floating IP per `policy`, unless it is no longer
    /// associated with `port` (it moved on to the pod's next sandbox).
    async fn give_up(
        &self,
        floating: &NeutronFloatingIp,
        port: &str,
        policy: FloatingIpPolicy,
    ) -> Result<(), IpamError> {
        let result = match policy {
            FloatingIpPolicy::Release => self.client().delete_floating_ip(&floating.id).await,
            FloatingIpPolicy::Keep if floating.port_id.as_deref() != Some(port) => Ok(()),
            FloatingIpPolicy::Keep => self
                .client()
                .associate_floating_ip(&floating.id, None, Some(floating.revision_number))
                .await
                .map(|_| ()),
        };
        match result {
            Err(IpamError::NotFound(_)) => Ok(()),
            other => other,
        }
    }
}

#[async_trait::async_trait]
impl FloatingIpProvider for NeutronFloatingIps {
    async fn associate(&self, request: &FloatingIpRequest) -> Result<FloatingIp, IpamError> {
        let tags = self.tags(request)?;
        let network = self.network_id(&request.network).await?;
        let fixed_ip = request.fixed_address.to_string();
        let filters = BTreeMap::from([
            (
                "tags".to_owned(),
                [
                    MANAGED_TAG.to_owned(),
                    cluster_tag(&self.backend.config().cluster),
                    pod_tag(&request.pod),
                ]
                .join(","),
            ),
            ("floating_network_id".to_owned(), network.clone()),
        ]);
        let held = self
            .client()
            .list_floating_ips(&filters, self.page_size())
            .await?;
        if let Some(done) = held
            .iter()
            .find(|floating| floating.port_id.as_deref() == Some(request.port.as_str()))
        {
            // A retried ADD: already associated.
            return to_floating_ip(done);
        }
        let keeps =
            |floating: &&NeutronFloatingIp| tagged(floating, "hulk-fip-policy") == Some("keep");
        // A pod that keeps its floating IP waits for its earlier sandbox to
        // let it go; one that releases it gets another meanwhile.
        if let Some(busy) = held
            .iter()
            .filter(keeps)
            .find(|floating| floating.port_id.is_some())
            .filter(|_| request.policy == FloatingIpPolicy::Keep)
        {
            return Err(IpamError::Conflict(format!(
                "floating IP {} of pod {} is still associated with port {} (the pod's earlier \
                 sandbox, until its DEL)",
                busy.floating_ip_address,
                request.pod,
                busy.port_id.as_deref().unwrap_or_default()
            )));
        }
        // Only a kept floating IP comes back: an unassociated one under
        // `release` lost its port and is the sweep's.
        let kept = held
            .iter()
            .filter(keeps)
            .find(|floating| floating.port_id.is_none());
        if let Some(kept) = kept {
            let associated = self
                .client()
                .associate_floating_ip(
                    &kept.id,
                    Some((&request.port, Some(&fixed_ip))),
                    Some(kept.revision_number),
                )
                .await?;
            // The node (and the asked policy) may have changed since.
            self.retag(kept, &tags).await?;
            return to_floating_ip(&NeutronFloatingIp { tags, ..associated });
        }
        let created = self
            .client()
            .create_floating_ip(&FloatingIpCreate {
                floating_network_id: network,
                port_id: Some(request.port.clone()),
                fixed_ip_address: Some(fixed_ip),
                description: format!("hulk-vpc floating IP of pod {}", request.pod),
            })
            .await?;
        if let Err(error) = self
            .client()
            .set_tags("floatingips", &created.id, &tags)
            .await
        {
            if let Err(cleanup) = self.client().delete_floating_ip(&created.id).await {
                tracing::warn!(floating_ip = %created.id, error = %cleanup, "cannot delete an untagged floating IP");
            }
            return Err(error);
        }
        to_floating_ip(&NeutronFloatingIp { tags, ..created })
    }

    async fn release(&self, hold: &FloatingIpHold) -> Result<(), IpamError> {
        match &hold.id {
            Some(id) if hold.policy == FloatingIpPolicy::Release => {
                match self.client().delete_floating_ip(id).await {
                    Err(IpamError::NotFound(_)) => Ok(()),
                    other => other,
                }
            }
            Some(id) => match self.client().get_floating_ip(id).await {
                Ok(floating) => self.give_up(&floating, &hold.port, hold.policy).await,
                Err(IpamError::NotFound(_)) => Ok(()),
                Err(error) => Err(error),
            },
            None => {
                // Whatever sits on the port (an ADD stopped before it
                // recorded the id), tagged or not: the port is ours.
                let filters = BTreeMap::from([("port_id".to_owned(), hold.port.clone())]);
                for floating in self
                    .client()
                    .list_floating_ips(&filters, self.page_size())
                    .await?
                {
                    self.give_up(&floating, &hold.port, hold.policy).await?;
                }
                Ok(())
            }
        }
    }

    async fn list(&self, scope: &ListScope) -> Result<Vec<FloatingIp>, IpamError> {
        let filters = BTreeMap::from([("tags".to_owned(), self.scope_tags(scope))]);
        self.client()
            .list_floating_ips(&filters, self.page_size())
            .await?
            .iter()
            .map(to_floating_ip)
            .collect()
    }

    async fn delete(&self, id: &str) -> Result<(), IpamError> {
        self.client().delete_floating_ip(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floating_ips_read_their_pod_and_policy_from_their_tags() {
        let floating: NeutronFloatingIp = serde_json::from_value(json!({
            "id": "f", "floating_ip_address": "203.0.113.7", "floating_network_id": "ext",
            "port_id": null, "tags": ["hulk-vpc", "hulk-pod=default/web-0", "hulk-fip-policy=keep"],
            "revision_number": 3
        }))
        .unwrap();
        let read = to_floating_ip(&floating).unwrap();
        assert_eq!(read.pod.as_deref(), Some("default/web-0"));
        assert_eq!(read.policy, FloatingIpPolicy::Keep);
        assert_eq!(read.port, None);
        let untagged = NeutronFloatingIp {
            tags: Vec::new(),
            ..floating
        };
        assert_eq!(
            to_floating_ip(&untagged).unwrap().policy,
            FloatingIpPolicy::Release
        );
        let create = serde_json::to_value(FloatingIpCreate {
            floating_network_id: "ext".into(),
            port_id: Some("p".into()),
            fixed_ip_address: None,
            description: "d".into(),
        })
        .unwrap();
        assert_eq!(
            create,
            json!({"floating_network_id": "ext", "port_id": "p", "description": "d"})
        );
    }
}
