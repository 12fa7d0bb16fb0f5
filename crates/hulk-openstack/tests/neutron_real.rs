//! Against a real Neutron and Keystone on loopback, started by
//! `scripts/openstack-tests` (tests/openstack/up.sh), which sets
//! NEUTRON_URL and KEYSTONE_URL and runs these ignored tests.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use hulk_ipam::{
    AllocationRequest, InstanceMark, IpamBackend, IpamError, ListScope, Owner, PoolKey,
};
use hulk_openstack::keystone::{Credentials, Keystone, KeystoneConfig};
use hulk_openstack::neutron::{NeutronAuth, NeutronClient};
use hulk_openstack::{HttpClient, HttpSettings, NeutronBackend, NeutronBackendConfig};
use serde_json::json;

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
