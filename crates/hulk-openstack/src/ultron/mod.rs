//! The UltrON-style IPAM REST contract v1 (`docs/ultron-ipam-v1.md`): its
//! wire types, the client [`UltronBackend`], and with the
//! `ultron-server` feature, a conformant server over any backend.

use std::net::IpAddr;
use std::time::Duration;

use hulk_ipam::{
    AllocationRequest, InstanceMark, IpamBackend, IpamError, Lease, ListScope, MANAGED_TAG,
    MacAddr, Owner, cluster_tag, node_tag,
};
use ipnet::IpNet;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::http::{HttpClient, Redactor, retry_after, status_error, transport_error};

#[cfg(feature = "ultron-server")]
pub mod server;

/// The most addresses one allocation may ask for.
pub const MAX_ALLOCATION: usize = 256;

/// An address as the contract writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireAddress {
    /// The service's id of the address.
    pub id: String,
    /// The address.
    pub ip: IpAddr,
    /// The subnet's prefix length.
    pub prefix_length: u8,
    /// The VPC network (absent from services older than this field).
    #[serde(default)]
    pub network: String,
    /// The subnet (absent from services older than this field).
    #[serde(default)]
    pub subnet: String,
    /// The subnet gateway.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// The MAC bound to the address.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// The network's MTU.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The gateway's MAC.
    #[serde(default)]
    pub gateway_mac: Option<MacAddr>,
    /// Security groups applied.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// QoS policy applied.
    #[serde(default)]
    pub qos_policy: Option<String>,
    /// The node holding the address.
    pub node: String,
    /// The pod interface holding it.
    #[serde(default)]
    pub owner: Option<WireOwner>,
    /// The agent instance that last marked it (absent from services older
    /// than this field: such a service keeps no instance marks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marked_by: Option<WireMark>,
    /// Tags.
    pub tags: Vec<String>,
}

/// An instance mark as the contract writes it (see
/// [`hulk_ipam::InstanceMark`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireMark {
    /// The agent's instance id.
    pub instance: String,
    /// When it was written, seconds since the Unix epoch.
    pub at: u64,
    /// How long after `at` its writer counts as alive, in seconds
    /// (absent or 0: not said).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub alive_for: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl From<InstanceMark> for WireMark {
    fn from(mark: InstanceMark) -> Self {
        WireMark {
            instance: mark.instance,
            at: mark.at_unix,
            alive_for: mark.alive_for_secs,
        }
    }
}

impl From<WireMark> for InstanceMark {
    fn from(mark: WireMark) -> Self {
        InstanceMark::new(mark.instance, mark.at).alive_for(Duration::from_secs(mark.alive_for))
    }
}

/// An owner as the contract writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireOwner {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `namespace/name`.
    #[serde(default)]
    pub pod: Option<String>,
    /// The pod's UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The CNI network (configuration `name`) of the attachment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_network: Option<String>,
}

impl From<Owner> for WireOwner {
    fn from(owner: Owner) -> Self {
        WireOwner {
            container_id: owner.container_id,
            ifname: owner.ifname,
            pod: owner.pod,
            pod_uid: owner.pod_uid,
            cni_network: owner.cni_network,
        }
    }
}

impl From<WireOwner> for Owner {
    fn from(owner: WireOwner) -> Self {
        Owner {
            container_id: owner.container_id,
            ifname: owner.ifname,
            pod: owner.pod,
            cni_network: owner.cni_network,
            pod_uid: owner.pod_uid,
        }
    }
}

impl WireAddress {
    /// The contract's form of a lease, with its tags.
    pub fn from_lease(lease: Lease, tags: Vec<String>) -> WireAddress {
        WireAddress {
            id: lease.id,
            ip: lease.address.addr(),
            prefix_length: lease.address.prefix_len(),
            network: lease.network,
            subnet: lease.subnet,
            gateway: lease.gateway,
            mac: lease.mac,
            mtu: lease.mtu,
            gateway_mac: lease.gateway_mac,
            security_groups: lease.security_groups,
            qos_policy: lease.qos_policy,
            node: lease.node,
            owner: lease.owner.map(WireOwner::from),
            marked_by: lease.marked_by.map(WireMark::from),
            tags,
        }
    }

    /// The lease this address describes.
    pub fn into_lease(self) -> Result<Lease, IpamError> {
        let address = IpNet::new(self.ip, self.prefix_length).map_err(|_| {
            IpamError::Protocol(format!(
                "address {} has prefix length {}",
                self.ip, self.prefix_length
            ))
        })?;
        Ok(Lease {
            id: self.id,
            address,
            network: self.network,
            subnet: self.subnet,
            gateway: self.gateway,
            mac: self.mac,
            mtu: self.mtu,
            gateway_mac: self.gateway_mac,
            security_groups: self.security_groups,
            qos_policy: self.qos_policy,
            node: self.node,
            owner: self.owner.map(Owner::from),
            marked_by: self.marked_by.map(InstanceMark::from),
        })
    }
}

/// `POST /v1/allocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationBody {
    /// VPC network.
    pub network: String,
    /// Subnet.
    pub subnet: String,
    /// Security groups.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// QoS policy.
    #[serde(default)]
    pub qos_policy: Option<String>,
    /// Node.
    pub node: String,
    /// Tags to put on every address.
    #[serde(default)]
    pub tags: Vec<String>,
    /// How many addresses.
    pub count: usize,
    /// One specific address (count 1); absent means any free ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// The allocating agent's instance mark, stored on every new address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marked_by: Option<WireMark>,
}

/// `PUT /v1/addresses/{id}/owner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerBody {
    /// The new owner, or `null` to free the address.
    pub owner: Option<WireOwner>,
    /// The marking agent's instance mark, stored as given (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marked_by: Option<WireMark>,
}

/// A list of addresses, and for listings, where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressPage {
    /// The addresses.
    pub addresses: Vec<WireAddress>,
    /// The cursor of the next page, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The error document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error's code and message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// One of the contract's codes.
    pub code: String,
    /// A human-readable message.
    pub message: String,
}

/// The contract's status and code for an error.
pub fn error_code(error: &IpamError) -> (StatusCode, &'static str) {
    match error {
        IpamError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid"),
        IpamError::Auth(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
        IpamError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        IpamError::Exhausted { .. } => (StatusCode::CONFLICT, "exhausted"),
        IpamError::Quota(_) => (StatusCode::CONFLICT, "quota"),
        IpamError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        IpamError::Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, "throttled"),
        IpamError::Transient(_) | IpamError::Protocol(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    }
}

/// The contract's error for an answer; messages are redacted of the
/// client's secrets (`redactor`), since a service may echo the request.
fn contract_error(
    status: StatusCode,
    retry: Option<Duration>,
    body: &str,
    redactor: &Redactor,
) -> IpamError {
    let Ok(parsed) = serde_json::from_str::<ErrorBody>(body) else {
        return status_error(status, retry, &redactor.detail_of(body));
    };
    let message = redactor.clean(&parsed.error.message);
    match parsed.error.code.as_str() {
        "invalid" => IpamError::InvalidRequest(message),
        "unauthorized" => IpamError::Auth(message),
        "not_found" => IpamError::NotFound(message),
        "exhausted" => IpamError::Exhausted { subnet: message },
        "quota" => IpamError::Quota(message),
        "conflict" => IpamError::Conflict(message),
        "throttled" => IpamError::Throttled { retry_after: retry },
        _ => status_error(status, retry, &message),
    }
}

/// The client of an UltrON-style IPAM service.
#[derive(Debug)]
pub struct UltronBackend {
    http: HttpClient,
    base_url: String,
    token: String,
    cluster: String,
    page_size: usize,
}

impl UltronBackend {
    /// A client of the service at `base_url` (without `/v1`).
    pub fn new(
        http: HttpClient,
        base_url: impl Into<String>,
        token: impl Into<String>,
        cluster: impl Into<String>,
    ) -> Self {
        let token = token.into();
        http.redactor().add(&token);
        UltronBackend {
            http,
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            token,
            cluster: cluster.into(),
            page_size: 200,
        }
    }

    /// Lists `page_size` addresses per request (default 200).
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Option<T>, IpamError> {
        let mut request = self
            .http
            .client()
            .request(method, format!("{}/v1{path}", self.base_url))
            .bearer_auth(&self.token)
            .query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(transport_error)?;
        let status = response.status();
        let retry = retry_after(response.headers());
        let text = response.text().await.map_err(transport_error)?;
        if !status.is_success() {
            return Err(contract_error(status, retry, &text, self.http.redactor()));
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| IpamError::Protocol(format!("{path}: {error}")))
    }

    async fn call_expecting<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<T, IpamError> {
        self.call(method, path, query, body)
            .await?
            .ok_or_else(|| IpamError::Protocol(format!("{path}: empty answer")))
    }
}

fn to_json(value: &impl Serialize) -> Value {
    // Plain structs of strings and numbers always serialize.
    serde_json::to_value(value).expect("contract types always serialize")
}

#[async_trait::async_trait]
impl IpamBackend for UltronBackend {
    fn name(&self) -> &str {
        "ultron"
    }

    async fn allocate(&self, request: &AllocationRequest) -> Result<Vec<Lease>, IpamError> {
        request.validate(MAX_ALLOCATION)?;
        let mut tags = vec![
            MANAGED_TAG.to_owned(),
            cluster_tag(&self.cluster),
            node_tag(&request.node),
        ];
        tags.extend(request.tags.iter().cloned());
        let body = AllocationBody {
            network: request.key.network.clone(),
            subnet: request.key.subnet.clone(),
            security_groups: request.key.security_groups.clone(),
            qos_policy: request.key.qos_policy.clone(),
            node: request.node.clone(),
            tags,
            count: request.count,
            address: request.address,
            marked_by: request.marked_by.clone().map(WireMark::from),
        };
        let page: AddressPage = self
            .call_expecting(Method::POST, "/allocations", &[], Some(&to_json(&body)))
            .await?;
        if page.addresses.len() != request.count {
            // Every address the service answered is ours now: refusing the
            // whole answer would strand them. The pool adopts what fits and
            // gives back the rest.
            tracing::warn!(
                asked = request.count,
                got = page.addresses.len(),
                "the IPAM service answered another number of addresses than asked"
            );
        }
        let mut leases = Vec::with_capacity(page.addresses.len());
        for address in page.addresses {
            let id = address.id.clone();
            match address.into_lease() {
                Ok(lease) => leases.push(lease),
                // Unusable, but held for us: give it back by its id.
                Err(error) => {
                    tracing::warn!(%id, %error, "unusable address in an allocation; released");
                    if let Err(error) = self.release(&id).await {
                        tracing::warn!(%id, %error, "cannot release an unusable address; the orphan sweep will");
                    }
                }
            }
        }
        if leases.is_empty() && request.count > 0 {
            return Err(IpamError::Protocol(
                "the allocation answered no usable address".into(),
            ));
        }
        Ok(leases)
    }

    async fn release(&self, id: &str) -> Result<(), IpamError> {
        self.call::<Value>(Method::DELETE, &format!("/addresses/{id}"), &[], None)
            .await
            .map(|_| ())
    }

    async fn update_owner(
        &self,
        id: &str,
        owner: Option<Owner>,
        marked_by: Option<InstanceMark>,
    ) -> Result<Lease, IpamError> {
        let body = OwnerBody {
            owner: owner.map(WireOwner::from),
            marked_by: marked_by.map(WireMark::from),
        };
        let address: WireAddress = self
            .call_expecting(
                Method::PUT,
                &format!("/addresses/{id}/owner"),
                &[],
                Some(&to_json(&body)),
            )
            .await?;
        address.into_lease()
    }

    async fn list(&self, scope: &ListScope) -> Result<Vec<Lease>, IpamError> {
        let mut tags = vec![MANAGED_TAG.to_owned(), cluster_tag(&self.cluster)];
        if let ListScope::Node(node) = scope {
            tags.push(node_tag(node));
        }
        let mut leases = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![
                ("tags", tags.join(",")),
                ("limit", self.page_size.to_string()),
            ];
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor.clone()));
            }
            let page: AddressPage = self
                .call_expecting(Method::GET, "/addresses", &query, None)
                .await?;
            for address in page.addresses {
                leases.push(address.into_lease()?);
            }
            match page.next_cursor {
                Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
                _ => return Ok(leases),
            }
        }
    }

    async fn health(&self) -> Result<(), IpamError> {
        self.call::<Value>(Method::GET, "/health", &[], None)
            .await
            .map(|_| ())
    }
}
