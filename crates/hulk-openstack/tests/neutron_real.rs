//! Against a real Neutron and Keystone on loopback, started by
//! `scripts/openstack-tests` (tests/openstack/up.sh), which sets
//! NEUTRON_URL and KEYSTONE_URL and runs these ignored tests.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use hulk_ipam::{
    AllocationRequest, InstanceMark, IpamBackend, IpamError, Lease, ListScope, Owner, PoolKey,
};
use hulk_openstack::keystone::{Credentials, Keystone, KeystoneConfig};
use hulk_openstack::neutron::{NeutronAuth, NeutronClient, Port};
use hulk_openstack::{HttpClient, HttpSettings, NeutronBackend, NeutronBackendConfig, NodePort};
use serde_json::{Value, json};

mod support;
use support::{Vpc, env, vpc};

fn http() -> HttpClient {
    HttpClient::new(&HttpSettings::default()).expect("http client")
}

/// Cluster names differ per run, so a reused Neutron's old ports never match.
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

fn noauth_client() -> NeutronClient {
    NeutronClient::new(http(), NeutronAuth::None, Some(env("NEUTRON_URL"))).expect("client")
}

fn neutron_backend(cluster: &str) -> NeutronBackend {
    NeutronBackend::new(noauth_client(), NeutronBackendConfig::new(cluster))
}

fn key(vpc: &Vpc) -> PoolKey {
    PoolKey::new(
        &vpc.network,
        &vpc.subnet,
        [vpc.security_group.clone()],
        Some(vpc.qos_policy.clone()),
    )
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn single_and_bulk_ports_carry_every_field_and_can_be_found_again() {
    let vpc = vpc("fields", "10.61.0.0/24").await;
    let backend = neutron_backend(&unique("fields"));
    let one = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-a", 1))
        .await
        .unwrap();
    let bulk = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-b", 4))
        .await
        .unwrap();
    assert_eq!((one.len(), bulk.len()), (1, 4));

    let lease = &one[0];
    assert_eq!(lease.address.prefix_len(), 24);
    assert!(lease.address.addr().to_string().starts_with("10.61.0."));
    assert_eq!(
        lease.gateway.map(|ip| ip.to_string()),
        Some("10.61.0.1".into())
    );
    assert_eq!(lease.mtu, Some(1500));
    assert_eq!(
        lease.security_groups,
        std::slice::from_ref(&vpc.security_group)
    );
    assert_eq!(lease.qos_policy.as_ref(), Some(&vpc.qos_policy));
    assert_eq!(lease.node, "node-a");
    assert!(lease.mac.is_some());

    let port = backend.client().get_port(&lease.id).await.unwrap();
    assert_eq!(port.binding_host_id.as_deref(), Some("node-a"));
    assert_eq!(port.device_owner, "compute:hulk-vpc");
    let mut tags = port.tags.clone();
    tags.sort();
    assert_eq!(tags.len(), 3);
    assert!(tags[0].starts_with("hulk-cluster=fields-"), "{tags:?}");
    assert_eq!(tags[1..], ["hulk-node=node-a", "hulk-vpc"]);

    let node_b = backend
        .list(&ListScope::Node("node-b".into()))
        .await
        .unwrap();
    assert_eq!(node_b.len(), 4);
    assert!(node_b.iter().all(|lease| lease.node == "node-b"));
    assert!(
        node_b
            .iter()
            .all(|lease| lease.pool_key().as_ref() == Some(&key(&vpc))),
        "a listed port names its pool: network, subnet, groups, QoS"
    );
    assert_eq!(backend.list(&ListScope::Cluster).await.unwrap().len(), 5);
    // Raw filters and pagination: device_owner and the address, two per page.
    let filters = BTreeMap::from([
        ("device_owner".to_owned(), "compute:hulk-vpc".to_owned()),
        ("network_id".to_owned(), vpc.network.clone()),
    ]);
    assert_eq!(
        backend
            .client()
            .list_ports(&filters, 2)
            .await
            .unwrap()
            .len(),
        5
    );
    let by_ip = BTreeMap::from([(
        "fixed_ips".to_owned(),
        format!("ip_address={}", lease.address.addr()),
    )]);
    let found = backend.client().list_ports(&by_ip, 10).await.unwrap();
    assert_eq!(
        found
            .iter()
            .map(|port| port.id.as_str())
            .collect::<Vec<_>>(),
        [lease.id.as_str()]
    );

    // Another cluster's ports on the same network are not ours, nor ours theirs.
    let other = neutron_backend(&unique("someone-else"));
    other
        .allocate(&AllocationRequest::new(key(&vpc), "node-a", 1))
        .await
        .unwrap();
    assert_eq!(other.list(&ListScope::Cluster).await.unwrap().len(), 1);
    assert_eq!(backend.list(&ListScope::Cluster).await.unwrap().len(), 5);
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn ownership_updates_are_compare_and_swap() {
    let vpc = vpc("owners", "10.62.0.0/24").await;
    let backend = neutron_backend(&unique("owners"));
    let mark = InstanceMark::new("node-a-3f9c0a7d12e4b865", 1_764_590_000);
    let mut request = AllocationRequest::new(key(&vpc), "node-a", 1);
    request.marked_by = Some(InstanceMark::new("node-a-3f9c0a7d12e4b865", 1_764_589_000));
    let lease = backend.allocate(&request).await.unwrap().remove(0);
    assert_eq!(
        lease.marked_by, request.marked_by,
        "a new port carries the allocator's mark"
    );
    let owner = Owner {
        container_id: "sandbox-1".into(),
        ifname: "eth0".into(),
        pod: Some("default/web-0".into()),
        cni_network: Some("hulk-vpc".into()),
        pod_uid: Some("0b3e2f8a-6f1c-4d1e-9a57-3c1f0d9e2b11".into()),
    };
    let updated = backend
        .update_owner(&lease.id, Some(owner.clone()), Some(mark.clone()))
        .await
        .unwrap();
    assert_eq!(updated.owner.as_ref(), Some(&owner));
    let listed = backend
        .list(&ListScope::Node("node-a".into()))
        .await
        .unwrap();
    assert_eq!(listed[0].owner.as_ref(), Some(&owner));
    assert_eq!(
        listed[0].marked_by.as_ref(),
        Some(&mark),
        "listed with its mark"
    );

    let port = backend.client().get_port(&lease.id).await.unwrap();
    let stale = port.revision_number - 1;
    let error = backend
        .client()
        .update_port(&lease.id, &json!({"device_id": "thief"}), Some(stale))
        .await
        .unwrap_err();
    assert!(matches!(error, IpamError::Conflict(_)), "{error}");
    assert_eq!(
        backend
            .client()
            .get_port(&lease.id)
            .await
            .unwrap()
            .device_id,
        "sandbox-1"
    );

    let cleared = backend
        .update_owner(&lease.id, None, Some(mark.clone()))
        .await
        .unwrap();
    assert_eq!(cleared.owner, None);
    assert_eq!(
        cleared.marked_by,
        Some(mark),
        "an idle port keeps its instance mark"
    );
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn release_deletes_and_a_second_release_is_not_found() {
    let vpc = vpc("release", "10.63.0.0/24").await;
    let backend = neutron_backend(&unique("release"));
    let leases = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-a", 2))
        .await
        .unwrap();
    backend.release(&leases[0].id).await.unwrap();
    assert!(matches!(
        backend.release(&leases[0].id).await,
        Err(IpamError::NotFound(_))
    ));
    let left = backend.list(&ListScope::Cluster).await.unwrap();
    assert_eq!(
        left.iter().map(|lease| &lease.id).collect::<Vec<_>>(),
        [&leases[1].id]
    );
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn a_fixed_address_is_allocated_once_and_only_inside_the_subnet() {
    let vpc = vpc("fixed", "10.65.0.0/24").await;
    let backend = neutron_backend(&unique("fixed"));
    let wanted = "10.65.0.42".parse().unwrap();
    let fixed = AllocationRequest::for_address(key(&vpc), "node-a", wanted);
    let lease = backend.allocate(&fixed).await.unwrap().remove(0);
    assert_eq!(lease.address.addr(), wanted);
    let again = backend.allocate(&fixed).await;
    assert!(matches!(again, Err(IpamError::Conflict(_))), "{again:?}");
    let outside = AllocationRequest::for_address(key(&vpc), "node-a", "10.66.0.9".parse().unwrap());
    let refused = backend.allocate(&outside).await;
    assert!(
        matches!(refused, Err(IpamError::InvalidRequest(_))),
        "{refused:?}"
    );
    assert_eq!(
        backend.list(&ListScope::Cluster).await.unwrap().len(),
        1,
        "refusals leave no port behind"
    );
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn a_full_subnet_is_exhausted_and_a_failed_bulk_leaves_nothing() {
    // A /29 holds 8 addresses: network, gateway and broadcast leave 5.
    let vpc = vpc("exhaust", "10.64.0.0/29").await;
    let backend = neutron_backend(&unique("exhaust"));
    let too_many = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-a", 6))
        .await;
    assert!(
        matches!(too_many, Err(IpamError::Exhausted { .. })),
        "{too_many:?}"
    );
    assert!(
        backend.list(&ListScope::Cluster).await.unwrap().is_empty(),
        "bulk is all or none"
    );
    let five = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-a", 5))
        .await
        .unwrap();
    assert_eq!(five.len(), 5);
    let one_more = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-a", 1))
        .await;
    assert!(
        matches!(one_more, Err(IpamError::Exhausted { .. })),
        "{one_more:?}"
    );
}

fn password(password: &str) -> Credentials {
    Credentials::Password {
        username: env("OS_USERNAME"),
        user_domain: "Default".into(),
        password: password.into(),
        project: env("OS_PROJECT_NAME"),
        project_domain: "Default".into(),
    }
}

#[tokio::test]
#[ignore = "needs a real Keystone: scripts/openstack-tests"]
async fn keystone_tokens_are_cached_refreshed_and_give_the_neutron_endpoint() {
    let keystone = Keystone::new(
        KeystoneConfig::new(env("KEYSTONE_URL"), password(&env("OS_PASSWORD"))),
        http(),
    );
    let first = keystone.token().await.unwrap();
    assert_eq!(first.endpoint("network"), Some(env("NEUTRON_URL").as_str()));
    assert_eq!(
        keystone.token().await.unwrap(),
        first,
        "a fresh token is reused"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    keystone.invalidate(&first.value).await;
    let second = keystone.token().await.unwrap();
    assert_ne!(
        second.value, first.value,
        "an invalidated token is replaced"
    );

    // Tokens here live 600 s: with a margin longer than that, every call
    // counts as "about to expire" and re-authenticates.
    let mut eager = KeystoneConfig::new(env("KEYSTONE_URL"), password(&env("OS_PASSWORD")));
    eager.refresh_margin = Duration::from_secs(3600);
    let eager = Keystone::new(eager, http());
    let before = eager.token().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = eager.token().await.unwrap();
    assert_ne!(
        before.value, after.value,
        "a token near expiry is refreshed"
    );

    // The whole backend through Keystone and the catalog.
    let vpc = vpc("keystone", "10.65.0.0/24").await;
    let client =
        NeutronClient::new(http(), NeutronAuth::Keystone(Box::new(keystone)), None).unwrap();
    let backend = NeutronBackend::new(client, NeutronBackendConfig::new(unique("keystone")));
    backend.health().await.unwrap();
    let lease = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-a", 1))
        .await
        .unwrap();
    backend.release(&lease[0].id).await.unwrap();
}

/// Creates an application credential for the admin user, as an operator
/// would for a node agent.
async fn application_credential() -> Credentials {
    let keystone = env("KEYSTONE_URL");
    let http = reqwest::Client::new();
    let auth = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": env("OS_USERNAME"), "domain": {"id": "default"}, "password": env("OS_PASSWORD")}}},
        "scope": {"project": {"name": env("OS_PROJECT_NAME"), "domain": {"id": "default"}}}}});
    let response = http
        .post(format!("{keystone}/auth/tokens"))
        .json(&auth)
        .send()
        .await
        .unwrap();
    let token = response.headers()["x-subject-token"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    let user = body["token"]["user"]["id"].as_str().unwrap().to_owned();
    let created: serde_json::Value = http
        .post(format!("{keystone}/users/{user}/application_credentials"))
        .header("X-Auth-Token", token)
        .json(&json!({"application_credential": {"name": unique("hulk-agent")}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let credential = &created["application_credential"];
    Credentials::ApplicationCredential {
        id: credential["id"].as_str().unwrap().to_owned(),
        secret: credential["secret"].as_str().unwrap().to_owned(),
    }
}

#[tokio::test]
#[ignore = "needs a real Keystone: scripts/openstack-tests"]
async fn application_credentials_authenticate_a_node_agent() {
    let credentials = application_credential().await;
    let keystone = Keystone::new(
        KeystoneConfig::new(env("KEYSTONE_URL"), credentials.clone()),
        http(),
    );
    let token = keystone.token().await.unwrap();
    assert_eq!(token.endpoint("network"), Some(env("NEUTRON_URL").as_str()));
    let Credentials::ApplicationCredential { id, .. } = credentials else {
        unreachable!()
    };
    let forged = Credentials::ApplicationCredential {
        id,
        secret: "not-the-secret".into(),
    };
    let refused = Keystone::new(KeystoneConfig::new(env("KEYSTONE_URL"), forged), http());
    assert!(matches!(refused.token().await, Err(IpamError::Auth(_))));
}

#[tokio::test]
#[ignore = "needs a real Keystone: scripts/openstack-tests"]
async fn a_wrong_password_is_an_auth_error() {
    let keystone = Keystone::new(
        KeystoneConfig::new(env("KEYSTONE_URL"), password("wrong")),
        http(),
    );
    assert!(matches!(keystone.token().await, Err(IpamError::Auth(_))));
}

// ---------------------------------------------------------------------
// Nested mode: the node is a VM, its pods' addresses ride its port's
// allowed address pairs.

/// Every request a backend sent through a [`CountingProxy`]: method, path
/// (without the query) and the status Neutron answered.
type Calls = Arc<Mutex<Vec<(String, String, u16)>>>;

/// A proxy in front of the real Neutron that records every call, so the
/// tests count exactly what Neutron receives.
struct CountingProxy {
    url: String,
    calls: Calls,
}

impl CountingProxy {
    async fn start() -> CountingProxy {
        async fn forward(
            State((target, calls)): State<(String, Calls)>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> Response {
            let path = uri.path().to_owned();
            let query = uri
                .query()
                .map(|query| format!("?{query}"))
                .unwrap_or_default();
            let mut request = reqwest::Client::new()
                .request(method.clone(), format!("{target}{path}{query}"))
                .body(body);
            for name in ["content-type", "if-match", "x-auth-token"] {
                if let Some(value) = headers.get(name) {
                    request = request.header(name, value);
                }
            }
            let answer = request.send().await.unwrap();
            let status = answer.status();
            calls
                .lock()
                .unwrap()
                .push((method.to_string(), path, status.as_u16()));
            let body = answer.bytes().await.unwrap();
            (status, [("content-type", "application/json")], body).into_response()
        }
        let calls: Calls = Arc::default();
        let app = Router::new()
            .fallback(any(forward))
            .with_state((env("NEUTRON_URL"), calls.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        CountingProxy { url, calls }
    }

    fn client(&self) -> NeutronClient {
        NeutronClient::new(http(), NeutronAuth::None, Some(self.url.clone())).expect("client")
    }

    /// The calls since the last `take`, as `METHOD /path/kind` with ids
    /// replaced by `{id}` and a non-2xx status appended.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
            .into_iter()
            .map(|(method, path, status)| {
                let path: Vec<&str> = path
                    .split('/')
                    .map(|part| if part.len() == 36 { "{id}" } else { part })
                    .collect();
                let status = if status < 300 {
                    String::new()
                } else {
                    format!(" -> {status}")
                };
                format!("{method} {}{status}", path.join("/"))
            })
            .collect()
    }
}

/// A Nova VM's port on the VPC network, port security on (the default
/// with the extension driver). Not bound to a hypervisor: on this test
/// Neutron (SQLite, a no-op binding driver) an update of a bound port's
/// pairs takes seconds, 25 s for 32 pairs, which says nothing about a real
/// cloud and would only slow the tests.
async fn vm_port(vpc: &Vpc, name: &str) -> Port {
    let created = support::create(
        "ports",
        json!({"port": {"network_id": vpc.network, "name": name,
            "fixed_ips": [{"subnet_id": vpc.subnet}], "security_groups": [vpc.security_group],
            "device_owner": "compute:nova", "device_id": unique("vm")}}),
    )
    .await;
    serde_json::from_value(created["port"].clone()).unwrap()
}

/// `backend.allocate(request)`, again after a transient failure (up to
/// five tries): the test Neutron runs on SQLite, which answers some
/// concurrent writes with a 500, as an agent's refiller would retry. A
/// failed try must leave no port and no pair behind (the backend's
/// rollback), which the callers' pair checks see.
async fn allocate_through_500s(
    backend: &NeutronBackend,
    request: &AllocationRequest,
) -> Vec<Lease> {
    let mut tries = 0;
    loop {
        tries += 1;
        match backend.allocate(request).await {
            Ok(leases) => return leases,
            Err(IpamError::Transient(message)) if tries < 5 => {
                eprintln!("try {tries}: {message}; again");
            }
            Err(error) => panic!("allocation failed after {tries} tries: {error}"),
        }
    }
}

fn nested_backend(client: NeutronClient, cluster: &str, node_port: NodePort) -> NeutronBackend {
    let mut config = NeutronBackendConfig::new(cluster);
    config.node_port = node_port;
    NeutronBackend::new(client, config)
}

/// The node port's pairs as `(address, MAC)`, sorted.
async fn pairs_of(client: &NeutronClient, node_port: &str) -> Vec<(String, String)> {
    let port = client.get_port(node_port).await.unwrap();
    let mut pairs: Vec<(String, String)> = port
        .allowed_address_pairs
        .into_iter()
        .map(|pair| (pair.ip_address, pair.mac_address.unwrap_or_default()))
        .collect();
    pairs.sort();
    pairs
}

fn with_mac(leases: &[Lease], mac: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = leases
        .iter()
        .map(|lease| (lease.address.addr().to_string(), mac.to_owned()))
        .collect();
    pairs.sort();
    pairs
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn nested_pairs_follow_allocation_and_release() {
    let vpc = vpc("nested", "10.67.0.0/24").await;
    let node = vm_port(&vpc, "node-a").await;
    let node_address: IpAddr = node.fixed_ips[0]
        .ip_address
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    // Found by the parent's MAC and the node's address, as an agent does.
    let auto = NodePort::Auto {
        mac: Some(node.mac_address.parse().unwrap()),
        address: Some(node_address),
    };
    let backend = nested_backend(noauth_client(), &unique("nested"), auto);
    let leases = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-a", 3))
        .await
        .unwrap();
    let client = noauth_client();
    assert_eq!(
        pairs_of(&client, &node.id).await,
        with_mac(&leases, &node.mac_address),
        "every allocated address is allowed on the node port, with its MAC"
    );
    for lease in &leases {
        assert_eq!(lease.node, "node-a");
        let port = client.get_port(&lease.id).await.unwrap();
        assert_eq!(
            port.binding_host_id.as_deref().unwrap_or(""),
            "",
            "a reservation is bound to nothing"
        );
        assert!(
            port.tags.contains(&format!("hulk-node-port={}", node.id)),
            "{:?}",
            port.tags
        );
    }
    assert_eq!(
        backend
            .list(&ListScope::Node("node-a".into()))
            .await
            .unwrap()
            .len(),
        3
    );

    backend.release(&leases[0].id).await.unwrap();
    assert_eq!(
        pairs_of(&client, &node.id).await,
        with_mac(&leases[1..], &node.mac_address),
        "a released address loses its pair"
    );
    assert!(matches!(
        client.get_port(&leases[0].id).await,
        Err(IpamError::NotFound(_))
    ));

    // Another backend (the cluster controller, or this agent restarted)
    // releasing a port it never saw finds the pair through the port's tag.
    let other = nested_backend(noauth_client(), "unused", NodePort::Id(node.id.clone()));
    other.release(&leases[1].id).await.unwrap();
    assert_eq!(
        pairs_of(&client, &node.id).await,
        with_mac(&leases[2..], &node.mac_address)
    );

    // A pool on another network cannot ride this node port.
    let elsewhere = support::vpc("nested-other", "10.68.0.0/24").await;
    let refused = backend
        .allocate(&AllocationRequest::new(key(&elsewhere), "node-a", 1))
        .await;
    assert!(
        matches!(&refused, Err(IpamError::InvalidRequest(message)) if message.contains("network")),
        "{refused:?}"
    );
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn reconciliation_removes_stale_pairs_and_adds_missing_ones() {
    let vpc = vpc("reconcile", "10.69.0.0/24").await;
    let node = vm_port(&vpc, "node-r").await;
    let backend = nested_backend(
        noauth_client(),
        &unique("reconcile"),
        NodePort::Id(node.id.clone()),
    );
    let leases = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-r", 3))
        .await
        .unwrap();
    // Drift: one pair lost, one stale pair of an address the node no longer
    // holds, and an operator's pair outside the pods' subnet.
    let client = noauth_client();
    let mut drifted: Vec<Value> = leases[1..]
        .iter()
        .map(|lease| json!({"ip_address": lease.address.addr().to_string()}))
        .collect();
    // Neutron picks addresses at random: the stale one must be none of
    // the node's.
    let stale = (240..=254)
        .map(|last| format!("10.69.0.{last}"))
        .find(|candidate| {
            leases
                .iter()
                .all(|lease| lease.address.addr().to_string() != *candidate)
                && node
                    .fixed_ips
                    .iter()
                    .all(|fixed| fixed.ip_address.as_deref() != Some(candidate.as_str()))
        })
        .unwrap();
    drifted.push(json!({"ip_address": stale}));
    drifted.push(json!({"ip_address": "192.168.77.7", "mac_address": "fa:16:3e:77:77:77"}));
    client
        .update_port(&node.id, &json!({"allowed_address_pairs": drifted}), None)
        .await
        .unwrap();

    backend.reconcile_node("node-r", &leases).await.unwrap();
    let mut expected = with_mac(&leases, &node.mac_address);
    expected.push(("192.168.77.7".into(), "fa:16:3e:77:77:77".into()));
    expected.sort();
    assert_eq!(pairs_of(&client, &node.id).await, expected);

    // In line already: no update, the revision stays.
    let revision = client.get_port(&node.id).await.unwrap().revision_number;
    backend.reconcile_node("node-r", &leases).await.unwrap();
    assert_eq!(
        client.get_port(&node.id).await.unwrap().revision_number,
        revision
    );

    // The node holds nothing: only the operator's pair stays.
    backend.reconcile_node("node-r", &[]).await.unwrap();
    assert_eq!(
        pairs_of(&client, &node.id).await,
        [("192.168.77.7".to_owned(), "fa:16:3e:77:77:77".to_owned())]
    );
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn two_backends_racing_on_one_node_port_both_land_their_pairs() {
    let vpc = vpc("race", "10.70.0.0/24").await;
    let node = vm_port(&vpc, "node-x").await;
    let proxy = CountingProxy::start().await;
    let cluster = unique("race");
    let first = nested_backend(proxy.client(), &cluster, NodePort::Id(node.id.clone()));
    let second = nested_backend(proxy.client(), &cluster, NodePort::Id(node.id.clone()));
    // Both read the node port at the same revision...
    first.reconcile_node("node-x", &[]).await.unwrap();
    second.reconcile_node("node-x", &[]).await.unwrap();
    // ...then each adds its batch: the second one's revision is stale.
    let a = first
        .allocate(&AllocationRequest::new(key(&vpc), "node-x", 2))
        .await
        .unwrap();
    let b = second
        .allocate(&AllocationRequest::new(key(&vpc), "node-x", 2))
        .await
        .unwrap();
    // And at once, several rounds.
    let mut all = [a, b].concat();
    let two = AllocationRequest::new(key(&vpc), "node-x", 2);
    for _ in 0..3 {
        let (c, d) = tokio::join!(
            allocate_through_500s(&first, &two),
            allocate_through_500s(&second, &two)
        );
        all.extend(c);
        all.extend(d);
    }
    let calls = proxy.take();
    let conflicts = calls.iter().filter(|call| call.ends_with("-> 412")).count();
    assert!(conflicts >= 1, "the stale revision was refused: {calls:#?}");
    let client = noauth_client();
    assert_eq!(
        pairs_of(&client, &node.id).await,
        with_mac(&all, &node.mac_address),
        "no pair lost to the race ({conflicts} conflicts)"
    );
    // Releases race too, and take exactly their own pairs away.
    let (kept, gone) = all.split_at(8);
    let releases = |backend: &'static str, leases: &[Lease]| {
        let backend = if backend == "first" { &first } else { &second };
        let ids: Vec<String> = leases.iter().map(|lease| lease.id.clone()).collect();
        async move {
            for id in ids {
                backend.release(&id).await.unwrap();
            }
        }
    };
    tokio::join!(
        releases("first", &gone[..2]),
        releases("second", &gone[2..])
    );
    assert_eq!(
        pairs_of(&client, &node.id).await,
        with_mac(kept, &node.mac_address)
    );
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn too_many_pairs_is_a_clear_error_and_leaves_no_port() {
    let vpc = vpc("pair-limit", "10.71.0.0/24").await;
    let node = vm_port(&vpc, "node-l").await;
    // up.sh sets max_allowed_address_pair = 128: fill 127 of them.
    let filler: Vec<Value> = (0..127)
        .map(|n| json!({"ip_address": format!("172.20.{}.{}", n / 200, n % 200 + 1)}))
        .collect();
    let client = noauth_client();
    client
        .update_port(&node.id, &json!({"allowed_address_pairs": filler}), None)
        .await
        .unwrap();
    let backend = nested_backend(
        noauth_client(),
        &unique("pair-limit"),
        NodePort::Id(node.id.clone()),
    );
    let refused = backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-l", 2))
        .await;
    let Err(error) = refused else {
        panic!("accepted: {refused:?}")
    };
    assert!(!error.is_retryable(), "{error}");
    assert!(
        error.to_string().contains("max_allowed_address_pair"),
        "{error}"
    );
    assert!(
        backend.list(&ListScope::Cluster).await.unwrap().is_empty(),
        "the ports of a refused batch are deleted"
    );
    // One more still fits.
    backend
        .allocate(&AllocationRequest::new(key(&vpc), "node-l", 1))
        .await
        .unwrap();
}

/// The Neutron calls each step of an address's life costs, today and
/// nested; printed for docs/ipam.md and asserted. An ADD served from the
/// warm pool calls nothing itself: the owner mark follows in the
/// background, the refill is per batch.
#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn neutron_calls_per_address_today_and_nested() {
    let vpc = vpc("calls", "10.72.0.0/24").await;
    let node = vm_port(&vpc, "node-c").await;
    let proxy = CountingProxy::start().await;
    let owner = Owner::new("sandbox-1", "eth0");
    let mut table = Vec::new();
    for (mode, node_port) in [
        ("today", NodePort::Off),
        ("nested", NodePort::Id(node.id.clone())),
    ] {
        let backend = nested_backend(proxy.client(), &unique("calls"), node_port);
        // Warm the caches (extensions, subnet facts, the node port).
        let warm = backend
            .allocate(&AllocationRequest::new(key(&vpc), "node-c", 1))
            .await
            .unwrap();
        backend.release(&warm[0].id).await.unwrap();
        proxy.take();

        let started = Instant::now();
        let batch = backend
            .allocate(&AllocationRequest::new(key(&vpc), "node-c", 8))
            .await
            .unwrap();
        let refill = (proxy.take(), started.elapsed());
        backend
            .update_owner(&batch[0].id, Some(owner.clone()), None)
            .await
            .unwrap();
        let mark = proxy.take();
        backend
            .update_owner(&batch[0].id, None, None)
            .await
            .unwrap();
        let unmark = proxy.take();
        let started = Instant::now();
        backend.release(&batch[0].id).await.unwrap();
        let release = (proxy.take(), started.elapsed());
        table.push((mode, refill, mark, unmark, release));
    }
    for (mode, refill, mark, unmark, release) in &table {
        println!(
            "{mode}: refill of 8 {:?} in {:?}; owner mark {:?}; unmark {:?}; release {:?} in {:?}",
            refill.0, refill.1, mark, unmark, release.0, release.1
        );
    }
    let today = &table[0];
    let nested = &table[1];
    assert_eq!(today.1.0, ["POST /v2.0/ports"]);
    assert_eq!(
        nested.1.0,
        ["POST /v2.0/ports", "PUT /v2.0/ports/{id}"],
        "one pair update per batch, the node port's revision known"
    );
    for (_, _, mark, unmark, _) in &table {
        assert_eq!(*mark, ["GET /v2.0/ports/{id}", "PUT /v2.0/ports/{id}"]);
        assert_eq!(*unmark, ["GET /v2.0/ports/{id}", "PUT /v2.0/ports/{id}"]);
    }
    assert_eq!(today.4.0, ["DELETE /v2.0/ports/{id}"]);
    assert_eq!(
        nested.4.0,
        ["PUT /v2.0/ports/{id}", "DELETE /v2.0/ports/{id}"],
        "the pair goes, then the port"
    );
}
