//! A thin Neutron v2.0 client for ports, subnets and networks.

use std::collections::BTreeMap;

use hulk_ipam::IpamError;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::http::{HttpClient, Redactor, retry_after, status_error, transport_error};
use crate::keystone::Keystone;

/// How requests are authenticated.
#[derive(Debug)]
pub enum NeutronAuth {
    /// No token: a Neutron with `auth_strategy = noauth` (tests, labs).
    None,
    /// Keystone tokens; a 401 drops the cached token and retries once.
    Keystone(Box<Keystone>),
}

/// A fixed IP of a port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedIp {
    /// The subnet.
    pub subnet_id: String,
    /// The address; absent in a request means "any free one".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
}

/// A port as Neutron returns it (the fields hulk-vpc uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Port {
    /// Port id.
    pub id: String,
    /// Network id.
    pub network_id: String,
    /// MAC address.
    pub mac_address: String,
    /// Fixed IPs.
    #[serde(default)]
    pub fixed_ips: Vec<FixedIp>,
    /// Security group ids.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// QoS policy id.
    #[serde(default)]
    pub qos_policy_id: Option<String>,
    /// Device owner.
    #[serde(default)]
    pub device_owner: String,
    /// Device id.
    #[serde(default)]
    pub device_id: String,
    /// Bound host.
    #[serde(default, rename = "binding:host_id")]
    pub binding_host_id: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Revision, for compare-and-swap updates.
    #[serde(default)]
    pub revision_number: u64,
    /// Addresses besides the fixed IPs that port security lets through
    /// (nested mode adds the node's pod addresses to the node's port).
    #[serde(default)]
    pub allowed_address_pairs: Vec<AddressPair>,
    /// Whether port security filters the port (`None`: the extension is
    /// not loaded, so nothing filters it).
    #[serde(default)]
    pub port_security_enabled: Option<bool>,
}

/// One entry of a port's `allowed_address_pairs`: an address (or CIDR)
/// and the MAC it may be sent from (Neutron fills in the port's own MAC
/// when a request leaves it out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressPair {
    /// An address, or a CIDR.
    pub ip_address: String,
    /// The MAC the address may come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
}

/// The fields of a port to create.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PortRequest {
    /// Network id.
    pub network_id: String,
    /// Fixed IPs (a subnet, optionally an address).
    pub fixed_ips: Vec<FixedIp>,
    /// Security group ids.
    pub security_groups: Vec<String>,
    /// QoS policy id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos_policy_id: Option<String>,
    /// Device owner.
    pub device_owner: String,
    /// Device id.
    pub device_id: String,
    /// Bound host.
    #[serde(rename = "binding:host_id", skip_serializing_if = "Option::is_none")]
    pub binding_host_id: Option<String>,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Tags (sent only when the server takes tags on create).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A subnet (the fields hulk-vpc uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Subnet {
    /// Subnet id.
    pub id: String,
    /// Network id.
    pub network_id: String,
    /// CIDR.
    pub cidr: String,
    /// Gateway address.
    #[serde(default)]
    pub gateway_ip: Option<String>,
}

/// A network (the fields hulk-vpc uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Network {
    /// Network id.
    pub id: String,
    /// MTU.
    #[serde(default)]
    pub mtu: Option<u32>,
}

#[derive(Deserialize)]
struct NeutronErrorBody {
    #[serde(rename = "NeutronError")]
    error: NeutronErrorDetail,
}

#[derive(Deserialize)]
struct NeutronErrorDetail {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Maps a Neutron failure by its `NeutronError.type` first, its status second.
/// Messages are redacted of the client's secrets (`redactor`): Neutron
/// may echo a request in them.
pub(crate) fn neutron_error(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
    redactor: &Redactor,
) -> IpamError {
    let detail = serde_json::from_str::<NeutronErrorBody>(body)
        .ok()
        .map(|parsed| parsed.error)
        .map(|mut detail| {
            detail.message = redactor.clean(&detail.message);
            detail
        });
    match detail {
        Some(detail) if detail.kind == "IpAddressGenerationFailure" => IpamError::Exhausted {
            subnet: detail.message,
        },
        Some(detail) if detail.kind == "OverQuota" => IpamError::Quota(detail.message),
        Some(detail) if status.as_u16() == 409 || status.as_u16() == 412 => {
            IpamError::Conflict(format!("{}: {}", detail.kind, detail.message))
        }
        Some(detail) if status.as_u16() == 404 => IpamError::NotFound(detail.message),
        Some(detail) if status.as_u16() == 400 => {
            IpamError::InvalidRequest(format!("{}: {}", detail.kind, detail.message))
        }
        _ => status_error(status, retry_after(headers), &redactor.detail_of(body)),
    }
}

/// The Neutron client.
#[derive(Debug)]
pub struct NeutronClient {
    http: HttpClient,
    auth: NeutronAuth,
    endpoint_override: Option<String>,
}

impl NeutronClient {
    /// A client. With Keystone, the endpoint comes from the catalog unless
    /// `endpoint_override` is given; without, the override is required.
    pub fn new(
        http: HttpClient,
        auth: NeutronAuth,
        endpoint_override: Option<String>,
    ) -> Result<NeutronClient, IpamError> {
        if matches!(auth, NeutronAuth::None) && endpoint_override.is_none() {
            return Err(IpamError::InvalidRequest(
                "without Keystone, the Neutron endpoint must be given".into(),
            ));
        }
        // Keystone's credentials and tokens must stay out of Neutron's
        // errors too, even when the two were given separate clients.
        let http = match &auth {
            NeutronAuth::Keystone(keystone) => http.sharing_secrets_with(keystone.http()),
            NeutronAuth::None => http,
        };
        Ok(NeutronClient {
            http,
            auth,
            endpoint_override,
        })
    }

    async fn credentials(&self) -> Result<(String, Option<String>), IpamError> {
        match &self.auth {
            NeutronAuth::None => Ok((self.endpoint_override.clone().unwrap_or_default(), None)),
            NeutronAuth::Keystone(keystone) => {
                let token = keystone.token().await?;
                let endpoint = match &self.endpoint_override {
                    Some(endpoint) => endpoint.clone(),
                    None => token
                        .endpoint("network")
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            IpamError::InvalidRequest(
                                "the Keystone catalog has no network endpoint".into(),
                            )
                        })?,
                };
                Ok((endpoint, Some(token.value)))
            }
        }
    }

    /// Sends one request (path relative to the endpoint, e.g.
    /// `/v2.0/ports`), retrying once with a fresh token after a 401.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
        if_match: Option<u64>,
    ) -> Result<(StatusCode, String), IpamError> {
        for attempt in 0..2 {
            let (endpoint, token) = self.credentials().await?;
            let url = format!("{}{path}", endpoint.trim_end_matches('/'));
            let mut request = self
                .http
                .client()
                .request(method.clone(), &url)
                .query(query);
            if let Some(token) = &token {
                request = request.header("X-Auth-Token", token);
            }
            if let Some(revision) = if_match {
                request = request.header("If-Match", format!("revision_number={revision}"));
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(transport_error)?;
            let status = response.status();
            let headers = response.headers().clone();
            let text = response.text().await.map_err(transport_error)?;
            if status == StatusCode::UNAUTHORIZED
                && attempt == 0
                && let (NeutronAuth::Keystone(keystone), Some(token)) = (&self.auth, &token)
            {
                keystone.invalidate(token).await;
                continue;
            }
            if !status.is_success() {
                return Err(neutron_error(status, &headers, &text, self.http.redactor()));
            }
            return Ok((status, text));
        }
        Err(IpamError::Auth(
            "Neutron refused a freshly issued token".into(),
        ))
    }

    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
        if_match: Option<u64>,
    ) -> Result<T, IpamError> {
        let (_, text) = self.send(method, path, query, body, if_match).await?;
        serde_json::from_str(&text).map_err(|error| IpamError::Protocol(format!("{path}: {error}")))
    }

    /// A call whose answer wraps one resource as `{"<singular>": {...}}`,
    /// as Neutron's are.
    pub(crate) async fn single<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        singular: &str,
        body: Option<&Value>,
        if_match: Option<u64>,
    ) -> Result<T, IpamError> {
        let mut answer: Value = self.call(method, path, &[], body, if_match).await?;
        let resource = answer
            .get_mut(singular)
            .map(Value::take)
            .ok_or_else(|| IpamError::Protocol(format!("{path}: no {singular:?} in the answer")))?;
        serde_json::from_value(resource)
            .map_err(|error| IpamError::Protocol(format!("{path}: {error}")))
    }

    /// Creates one port.
    pub async fn create_port(&self, port: &PortRequest) -> Result<Port, IpamError> {
        let body = json!({ "port": port });
        self.single(Method::POST, "/v2.0/ports", "port", Some(&body), None)
            .await
    }

    /// Creates ports in one bulk request; Neutron creates all or none.
    pub async fn create_ports(&self, ports: &[PortRequest]) -> Result<Vec<Port>, IpamError> {
        #[derive(Deserialize)]
        struct Created {
            ports: Vec<Port>,
        }
        let body = json!({ "ports": ports });
        let created: Created = self
            .call(Method::POST, "/v2.0/ports", &[], Some(&body), None)
            .await?;
        if created.ports.len() != ports.len() {
            return Err(IpamError::Protocol(format!(
                "asked for {} ports, Neutron returned {}",
                ports.len(),
                created.ports.len()
            )));
        }
        Ok(created.ports)
    }

    /// Lists ports matching `filters` (e.g. `device_owner`, `tags`,
    /// `fixed_ips`), following pagination `page_size` at a time.
    pub async fn list_ports(
        &self,
        filters: &BTreeMap<String, String>,
        page_size: usize,
    ) -> Result<Vec<Port>, IpamError> {
        self.list_paged("ports", filters, page_size, |port: &Port| port.id.clone())
            .await
    }

    /// Lists the collection `plural` (`/v2.0/<plural>`, answered as
    /// `{"<plural>": [...], "<plural>_links": [...]}`) matching `filters`,
    /// following Neutron's marker pagination `page_size` at a time;
    /// `id_of` gives the marker of a resource.
    pub(crate) async fn list_paged<T: DeserializeOwned>(
        &self,
        plural: &str,
        filters: &BTreeMap<String, String>,
        page_size: usize,
        id_of: impl Fn(&T) -> String,
    ) -> Result<Vec<T>, IpamError> {
        #[derive(Deserialize)]
        struct PageLink {
            rel: String,
        }
        let path = format!("/v2.0/{plural}");
        let mut listed = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut query: Vec<(String, String)> = filters
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            query.push(("limit".into(), page_size.to_string()));
            if let Some(marker) = &marker {
                query.push(("marker".into(), marker.clone()));
            }
            let mut page: Value = self.call(Method::GET, &path, &query, None, None).await?;
            let items: Vec<T> = page
                .get_mut(plural)
                .map(Value::take)
                .map(serde_json::from_value)
                .transpose()
                .map_err(|error| IpamError::Protocol(format!("{path}: {error}")))?
                .ok_or_else(|| {
                    IpamError::Protocol(format!("{path}: no {plural:?} in the answer"))
                })?;
            let links: Vec<PageLink> = page
                .get_mut(format!("{plural}_links").as_str())
                .map(Value::take)
                .map(serde_json::from_value)
                .transpose()
                .map_err(|error| IpamError::Protocol(format!("{path}: {error}")))?
                .unwrap_or_default();
            let has_next = links.iter().any(|link| link.rel == "next");
            let full_page = items.len() >= page_size;
            marker = items.last().map(&id_of);
            listed.extend(items);
            if !(has_next && full_page) || marker.is_none() {
                return Ok(listed);
            }
        }
    }

    /// Reads one port.
    pub async fn get_port(&self, id: &str) -> Result<Port, IpamError> {
        self.single(
            Method::GET,
            &format!("/v2.0/ports/{id}"),
            "port",
            None,
            None,
        )
        .await
    }

    /// Updates a port; with `if_revision`, only if its revision is still
    /// that one (a stale revision is [`IpamError::Conflict`]).
    pub async fn update_port(
        &self,
        id: &str,
        changes: &Value,
        if_revision: Option<u64>,
    ) -> Result<Port, IpamError> {
        let body = json!({ "port": changes });
        let path = format!("/v2.0/ports/{id}");
        self.single(Method::PUT, &path, "port", Some(&body), if_revision)
            .await
    }

    /// Replaces a port's tags through the tags API.
    pub async fn set_port_tags(&self, id: &str, tags: &[String]) -> Result<(), IpamError> {
        self.set_tags("ports", id, tags).await
    }

    /// Replaces the tags of resource `id` of collection `plural` (`ports`,
    /// `floatingips`, ...) through the tags API
    /// (`PUT /v2.0/<plural>/<id>/tags`).
    pub async fn set_tags(&self, plural: &str, id: &str, tags: &[String]) -> Result<(), IpamError> {
        let body = json!({ "tags": tags });
        self.send(
            Method::PUT,
            &format!("/v2.0/{plural}/{id}/tags"),
            &[],
            Some(&body),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Deletes a port.
    pub async fn delete_port(&self, id: &str) -> Result<(), IpamError> {
        self.send(
            Method::DELETE,
            &format!("/v2.0/ports/{id}"),
            &[],
            None,
            None,
        )
        .await
        .map(|_| ())
    }

    /// Reads a subnet.
    pub async fn get_subnet(&self, id: &str) -> Result<Subnet, IpamError> {
        self.single(
            Method::GET,
            &format!("/v2.0/subnets/{id}"),
            "subnet",
            None,
            None,
        )
        .await
    }

    /// Reads a network.
    pub async fn get_network(&self, id: &str) -> Result<Network, IpamError> {
        self.single(
            Method::GET,
            &format!("/v2.0/networks/{id}"),
            "network",
            None,
            None,
        )
        .await
    }

    /// The aliases of the API extensions the server has loaded.
    pub async fn extensions(&self) -> Result<Vec<String>, IpamError> {
        #[derive(Deserialize)]
        struct Extensions {
            extensions: Vec<Extension>,
        }
        #[derive(Deserialize)]
        struct Extension {
            alias: String,
        }
        let list: Extensions = self
            .call(Method::GET, "/v2.0/extensions", &[], None, None)
            .await?;
        Ok(list
            .extensions
            .into_iter()
            .map(|extension| extension.alias)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(status: u16, body: &str) -> IpamError {
        neutron_error(
            StatusCode::from_u16(status).unwrap(),
            &reqwest::header::HeaderMap::new(),
            body,
            &Redactor::default(),
        )
    }

    #[test]
    fn neutron_error_types_become_actionable_errors() {
        let exhausted = map(
            409,
            r#"{"NeutronError": {"type": "IpAddressGenerationFailure", "message": "No more IP addresses available on network n1.", "detail": ""}}"#,
        );
        assert!(matches!(exhausted, IpamError::Exhausted { .. }));
        assert!(matches!(
            map(
                409,
                r#"{"NeutronError":{"type":"OverQuota","message":"Quota exceeded for resources: ['port']."}}"#
            ),
            IpamError::Quota(_)
        ));
        assert!(matches!(
            map(
                412,
                r#"{"NeutronError":{"type":"RevisionNumberConstraintFailed","message":"stale"}}"#
            ),
            IpamError::Conflict(_)
        ));
        assert!(matches!(
            map(
                404,
                r#"{"NeutronError":{"type":"PortNotFound","message":"Port x could not be found."}}"#
            ),
            IpamError::NotFound(_)
        ));
        assert!(matches!(
            map(
                400,
                r#"{"NeutronError":{"type":"HTTPBadRequest","message":"bad"}}"#
            ),
            IpamError::InvalidRequest(_)
        ));
        assert!(matches!(
            map(503, "<html>busy</html>"),
            IpamError::Throttled { .. }
        ));
        assert!(matches!(map(500, "not json"), IpamError::Transient(_)));
    }

    #[test]
    fn port_requests_serialize_as_neutron_expects() {
        let request = PortRequest {
            network_id: "net".into(),
            fixed_ips: vec![FixedIp {
                subnet_id: "sub".into(),
                ip_address: None,
            }],
            security_groups: vec!["sg".into()],
            qos_policy_id: Some("qos".into()),
            device_owner: "compute:hulk-vpc".into(),
            device_id: String::new(),
            binding_host_id: Some("node-1".into()),
            name: "hulk-vpc".into(),
            description: "pool".into(),
            tags: vec!["hulk-vpc".into()],
        };
        let value = serde_json::to_value(&request).unwrap();
        assert_eq!(value["binding:host_id"], "node-1");
        assert_eq!(value["fixed_ips"], json!([{"subnet_id": "sub"}]));
        assert_eq!(value["qos_policy_id"], "qos");
    }
}
