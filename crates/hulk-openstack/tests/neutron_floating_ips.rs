//! Floating IPs against a real Neutron (`scripts/openstack-tests`):
//! association with a pod's port, re-use on a retried ADD, the `release`
//! and `keep` policies, and the sweep of floating IPs whose port is gone.
//! Ignored unless run with `--include-ignored` and `NEUTRON_URL` set.

// Test code: a panic is how a test helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hulk_ipam::{
    AllocationRequest, FloatingIpHold, FloatingIpPolicy, FloatingIpProvider, FloatingIpRequest,
    IpamBackend, IpamError, Lease, ListScope, PoolKey,
};
use hulk_openstack::neutron::{NeutronAuth, NeutronClient};
use hulk_openstack::{
    HttpClient, HttpSettings, NeutronBackend, NeutronBackendConfig, NeutronFloatingIps,
};
use serde_json::json;

mod support;
use support::{Vpc, create, env, vpc};

/// Cluster and network names differ per run, so a reused Neutron's old
/// resources never match.
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

fn id_of(value: &serde_json::Value, kind: &str) -> String {
    value[kind]["id"].as_str().unwrap().to_owned()
}

/// A VPC whose subnet a router connects to a new external network named
/// `public` (returned): Neutron refuses a floating IP for a port no router
/// connects to the floating IP's network.
async fn routed_vpc(name: &str, cidr: &str, public_cidr: &str) -> (Vpc, String) {
    let vpc = vpc(name, cidr).await;
    let public = unique(&format!("{name}-public"));
    let external = id_of(
        &create(
            "networks",
            json!({"network": {"name": public, "router:external": true}}),
        )
        .await,
        "network",
    );
    create(
        "subnets",
        json!({"subnet": {"network_id": external, "ip_version": 4, "cidr": public_cidr, "enable_dhcp": false}}),
    )
    .await;
    let router = id_of(
        &create(
            "routers",
            json!({"router": {"name": name, "external_gateway_info": {"network_id": external}}}),
        )
        .await,
        "router",
    );
    let url = format!(
        "{}/v2.0/routers/{router}/add_router_interface",
        env("NEUTRON_URL")
    );
    let response = reqwest::Client::new()
        .put(url)
        .json(&json!({"subnet_id": vpc.subnet}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    (vpc, public)
}

/// A proxy in front of Neutron that counts the requests through it, so
/// that a test can say how many calls an operation costs.
#[derive(Clone)]
struct Counter {
    target: String,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Counter {
    async fn start() -> (String, Counter) {
        let counter = Counter {
            target: env("NEUTRON_URL"),
            calls: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(counter.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{address}"), counter)
    }

    /// The calls since the last take, as `METHOD /path`.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

async fn forward(
    State(counter): State<Counter>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    counter
        .calls
        .lock()
        .unwrap()
        .push(format!("{method} {}", uri.path()));
    let path = uri.path_and_query().map_or("/", |path| path.as_str());
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", counter.target))
        .body(body);
    for name in ["content-type", "if-match", "x-auth-token"] {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    let response = request.send().await.unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let body = response.bytes().await.unwrap();
    (status, [("content-type", "application/json")], body).into_response()
}

fn neutron_backend(endpoint: String, cluster: &str) -> Arc<NeutronBackend> {
    let http = HttpClient::new(&HttpSettings::default()).unwrap();
    let client = NeutronClient::new(http, NeutronAuth::None, Some(endpoint)).unwrap();
    Arc::new(NeutronBackend::new(
        client,
        NeutronBackendConfig::new(cluster),
    ))
}

fn key(vpc: &Vpc) -> PoolKey {
    PoolKey::new(
        &vpc.network,
        &vpc.subnet,
        [vpc.security_group.clone()],
        Some(vpc.qos_policy.clone()),
    )
}

async fn ports(backend: &NeutronBackend, vpc: &Vpc, count: usize) -> Vec<Lease> {
    backend
        .allocate(&AllocationRequest::new(key(vpc), "node-a", count))
        .await
        .unwrap()
}

fn request(network: &str, lease: &Lease, pod: &str, policy: FloatingIpPolicy) -> FloatingIpRequest {
    FloatingIpRequest {
        network: network.into(),
        port: lease.id.clone(),
        fixed_address: lease.address.addr(),
        pod: pod.into(),
        node: lease.node.clone(),
        policy,
    }
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn a_pods_floating_ip_is_associated_reused_on_retry_and_released() {
    let (vpc, public) = routed_vpc("fip-assoc", "10.71.0.0/24", "198.51.100.0/24").await;
    let (proxy, counter) = Counter::start().await;
    let cluster = unique("fip-assoc");
    let backend = neutron_backend(proxy, &cluster);
    let floating_ips = NeutronFloatingIps::new(backend.clone());
    let leases = ports(&backend, &vpc, 2).await;
    let wanted = request(
        &public,
        &leases[0],
        "default/web-0",
        FloatingIpPolicy::Release,
    );

    // The first association resolves the network's name once.
    counter.take();
    let floating = floating_ips.associate(&wanted).await.unwrap();
    let first_calls = counter.take();
    assert_eq!(floating.port.as_deref(), Some(leases[0].id.as_str()));
    assert_eq!(floating.pod.as_deref(), Some("default/web-0"));
    assert!(
        floating.address.to_string().starts_with("198.51.100."),
        "{floating:?}"
    );
    let raw = backend
        .client()
        .get_floating_ip(&floating.id)
        .await
        .unwrap();
    assert_eq!(
        raw.fixed_ip_address.as_deref(),
        Some(leases[0].address.addr().to_string().as_str())
    );
    let mut tags = raw.tags.clone();
    tags.sort();
    assert_eq!(
        tags,
        [
            format!("hulk-cluster={cluster}"),
            "hulk-fip-policy=release".into(),
            "hulk-node=node-a".into(),
            "hulk-pod=default/web-0".into(),
            "hulk-vpc".into(),
        ]
    );

    // A retried ADD gets the same floating IP, for one list call.
    counter.take();
    let again = floating_ips.associate(&wanted).await.unwrap();
    assert_eq!(again, floating);
    let retry_calls = counter.take();
    assert_eq!(retry_calls, ["GET /v2.0/floatingips"]);

    // Another pod on the other port gets another one: 3 calls once the
    // network is known.
    let started = std::time::Instant::now();
    let other = floating_ips
        .associate(&request(
            &public,
            &leases[1],
            "default/web-1",
            FloatingIpPolicy::Release,
        ))
        .await
        .unwrap();
    let new_took = started.elapsed();
    assert_ne!(other.address, floating.address);
    let new_calls = counter.take();
    assert_eq!(
        new_calls.len(),
        3,
        "list, create, tag: {new_calls:?} (first: {first_calls:?})"
    );
    assert_eq!(
        floating_ips.list(&ListScope::Cluster).await.unwrap().len(),
        2
    );

    // Release deletes: one call.
    counter.take();
    let started = std::time::Instant::now();
    floating_ips
        .release(&FloatingIpHold {
            port: leases[0].id.clone(),
            id: Some(floating.id.clone()),
            address: Some(floating.address),
            policy: FloatingIpPolicy::Release,
        })
        .await
        .unwrap();
    let release_took = started.elapsed();
    assert_eq!(counter.take().len(), 1);
    assert!(matches!(
        backend.client().get_floating_ip(&floating.id).await,
        Err(IpamError::NotFound(_))
    ));
    // Without its id (an ADD that stopped before recording it), the port
    // finds it; twice is fine.
    let by_port = FloatingIpHold {
        port: leases[1].id.clone(),
        id: None,
        address: None,
        policy: FloatingIpPolicy::Release,
    };
    floating_ips.release(&by_port).await.unwrap();
    floating_ips.release(&by_port).await.unwrap();
    assert!(
        floating_ips
            .list(&ListScope::Cluster)
            .await
            .unwrap()
            .is_empty()
    );
    eprintln!(
        "Neutron calls: first ADD with a floating IP {} ({first_calls:?}), a new one {} \
         ({new_took:?}), a retry {}; release {release_took:?}",
        first_calls.len(),
        new_calls.len(),
        retry_calls.len()
    );
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn a_kept_floating_ip_comes_back_to_the_same_pod_name() {
    let (vpc, public) = routed_vpc("fip-keep", "10.72.0.0/24", "198.51.101.0/24").await;
    let (proxy, counter) = Counter::start().await;
    let backend = neutron_backend(proxy, &unique("fip-keep"));
    let floating_ips = NeutronFloatingIps::new(backend.clone());
    let leases = ports(&backend, &vpc, 5).await;
    let first = floating_ips
        .associate(&request(
            &public,
            &leases[0],
            "default/db-0",
            FloatingIpPolicy::Keep,
        ))
        .await
        .unwrap();
    assert_eq!(first.policy, FloatingIpPolicy::Keep);

    // The pod's next sandbox asks while the old one still holds it.
    let early = floating_ips
        .associate(&request(
            &public,
            &leases[1],
            "default/db-0",
            FloatingIpPolicy::Keep,
        ))
        .await;
    assert!(matches!(early, Err(IpamError::Conflict(_))), "{early:?}");

    counter.take();
    floating_ips
        .release(&FloatingIpHold {
            port: leases[0].id.clone(),
            id: Some(first.id.clone()),
            address: Some(first.address),
            policy: FloatingIpPolicy::Keep,
        })
        .await
        .unwrap();
    let keep_calls = counter.take();
    assert_eq!(keep_calls.len(), 2, "read, disassociate: {keep_calls:?}");
    let kept = backend.client().get_floating_ip(&first.id).await.unwrap();
    assert_eq!(kept.port_id, None, "disassociated, not deleted");
    counter.take();

    let back = floating_ips
        .associate(&request(
            &public,
            &leases[1],
            "default/db-0",
            FloatingIpPolicy::Keep,
        ))
        .await
        .unwrap();
    let back_calls = counter.take();
    assert_eq!(
        (back.id.as_str(), back.address),
        (first.id.as_str(), first.address),
        "the same pod name gets the same floating IP back"
    );
    assert_eq!(back.port.as_deref(), Some(leases[1].id.as_str()));
    assert_eq!(back_calls.len(), 2, "list, associate: {back_calls:?}");

    // A late DEL of the old sandbox does not take it from the new one.
    floating_ips
        .release(&FloatingIpHold {
            port: leases[0].id.clone(),
            id: Some(first.id.clone()),
            address: Some(first.address),
            policy: FloatingIpPolicy::Keep,
        })
        .await
        .unwrap();
    let still = backend.client().get_floating_ip(&first.id).await.unwrap();
    assert_eq!(still.port_id.as_deref(), Some(leases[1].id.as_str()));
    // Another pod is not given it.
    let other = floating_ips
        .associate(&request(
            &public,
            &leases[2],
            "default/db-1",
            FloatingIpPolicy::Keep,
        ))
        .await
        .unwrap();
    assert_ne!(other.id, first.id);
    // A pod under `release` does not wait for its earlier sandbox's.
    let earlier = floating_ips
        .associate(&request(
            &public,
            &leases[3],
            "default/api",
            FloatingIpPolicy::Release,
        ))
        .await
        .unwrap();
    let next = floating_ips
        .associate(&request(
            &public,
            &leases[4],
            "default/api",
            FloatingIpPolicy::Release,
        ))
        .await
        .unwrap();
    assert_ne!(next.id, earlier.id);
    assert_eq!(next.port.as_deref(), Some(leases[4].id.as_str()));
    eprintln!(
        "Neutron calls: keep on DEL {}, a kept floating IP back {}",
        keep_calls.len(),
        back_calls.len()
    );
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn the_sweep_deletes_released_floating_ips_whose_port_is_gone_and_only_ours() {
    let (vpc, public) = routed_vpc("fip-sweep", "10.73.0.0/24", "198.51.102.0/24").await;
    let backend = neutron_backend(env("NEUTRON_URL"), &unique("fip-sweep"));
    let floating_ips = NeutronFloatingIps::new(backend.clone());
    let leases = ports(&backend, &vpc, 3).await;
    let orphan = floating_ips
        .associate(&request(
            &public,
            &leases[0],
            "default/a",
            FloatingIpPolicy::Release,
        ))
        .await
        .unwrap();
    let kept = floating_ips
        .associate(&request(
            &public,
            &leases[1],
            "default/b",
            FloatingIpPolicy::Keep,
        ))
        .await
        .unwrap();
    let live = floating_ips
        .associate(&request(
            &public,
            &leases[2],
            "default/c",
            FloatingIpPolicy::Release,
        ))
        .await
        .unwrap();
    // Another cluster's orphan on the same network is not ours to sweep.
    let someone_else = neutron_backend(env("NEUTRON_URL"), &unique("someone-else"));
    let theirs = NeutronFloatingIps::new(someone_else.clone());
    let their_lease = ports(&someone_else, &vpc, 1).await.remove(0);
    let their_orphan = theirs
        .associate(&request(
            &public,
            &their_lease,
            "default/a",
            FloatingIpPolicy::Release,
        ))
        .await
        .unwrap();
    someone_else.release(&their_lease.id).await.unwrap();

    // Deleting a port disassociates its floating IP.
    backend.release(&leases[0].id).await.unwrap();
    backend.release(&leases[1].id).await.unwrap();
    let swept = floating_ips.sweep(&ListScope::Cluster).await.unwrap();
    assert_eq!(
        swept.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
        [orphan.id.as_str()]
    );
    let mut left: Vec<String> = floating_ips
        .list(&ListScope::Node("node-a".into()))
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.id)
        .collect();
    left.sort();
    let mut expected = vec![kept.id.clone(), live.id.clone()];
    expected.sort();
    assert_eq!(left, expected, "kept and live ones stay");
    assert!(
        backend
            .client()
            .get_floating_ip(&their_orphan.id)
            .await
            .is_ok(),
        "another cluster's floating IP is untouched"
    );
    assert!(
        floating_ips
            .list(&ListScope::Node("node-b".into()))
            .await
            .unwrap()
            .is_empty()
    );

    // The cluster's teardown deletes what is left, kept ones too.
    for floating in floating_ips.list(&ListScope::Cluster).await.unwrap() {
        floating_ips.delete(&floating.id).await.unwrap();
    }
    assert!(matches!(
        floating_ips.delete(&kept.id).await,
        Err(IpamError::NotFound(_))
    ));
    assert_eq!(theirs.list(&ListScope::Cluster).await.unwrap().len(), 1);
}

#[tokio::test]
#[ignore = "needs a real Neutron: scripts/openstack-tests"]
async fn an_unknown_network_or_an_unrouted_subnet_is_refused() {
    let (_, public) = routed_vpc("fip-refused", "10.74.0.0/24", "198.51.103.0/24").await;
    let unrouted = vpc("fip-unrouted", "10.75.0.0/24").await;
    let backend = neutron_backend(env("NEUTRON_URL"), &unique("fip-refused"));
    let floating_ips = NeutronFloatingIps::new(backend.clone());
    let lease = ports(&backend, &unrouted, 1).await.remove(0);
    let unknown = floating_ips
        .associate(&request(
            "no-such-network",
            &lease,
            "default/a",
            FloatingIpPolicy::Release,
        ))
        .await;
    assert!(
        matches!(unknown, Err(IpamError::NotFound(_))),
        "{unknown:?}"
    );
    let refused = floating_ips
        .associate(&request(
            &public,
            &lease,
            "default/a",
            FloatingIpPolicy::Release,
        ))
        .await;
    assert!(
        matches!(
            refused,
            Err(IpamError::NotFound(_) | IpamError::InvalidRequest(_))
        ),
        "{refused:?}"
    );
    assert!(
        floating_ips
            .list(&ListScope::Cluster)
            .await
            .unwrap()
            .is_empty(),
        "nothing left behind"
    );
}
