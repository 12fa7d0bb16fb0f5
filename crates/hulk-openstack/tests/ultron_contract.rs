//! The UltrON-style client against the reference server and the contract
//! document (docs/ultron-ipam-v1.md).

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hulk_ipam::{
    AllocationRequest, Fault, FaultPlan, Faulty, InstanceMark, IpamBackend, IpamError, ListScope,
    MemoryBackend, Owner, PoolKey,
};
use hulk_openstack::ultron::{ErrorBody, UltronBackend, WireAddress, server};
use hulk_openstack::{HttpClient, HttpSettings};
use serde_json::Value;

async fn serve(backend: Arc<dyn IpamBackend>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = server::router(backend, "s3cret");
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

fn client(base: &str, token: &str, cluster: &str) -> UltronBackend {
    UltronBackend::new(
        HttpClient::new(&HttpSettings::default()).unwrap(),
        base,
        token,
        cluster,
    )
}

fn request(node: &str, count: usize) -> AllocationRequest {
    AllocationRequest::new(
        PoolKey::new("vpc", "subnet-a", ["sg-2", "sg-1"], Some("qos-1".into())),
        node,
        count,
    )
}

fn mock(cidr: &str) -> Arc<dyn IpamBackend> {
    Arc::new(MemoryBackend::new(cidr.parse().unwrap()))
}

#[tokio::test]
async fn allocate_list_own_and_release_round_trip() {
    let base = serve(mock("10.30.0.0/24")).await;
    let ultron = client(&base, "s3cret", "prod");
    ultron.health().await.unwrap();
    let leases = ultron.allocate(&request("node-1", 3)).await.unwrap();
    assert_eq!(leases.len(), 3);
    assert_eq!(leases[0].address.to_string(), "10.30.0.2/24");
    assert_eq!(leases[0].security_groups, ["sg-1", "sg-2"]);
    assert_eq!(leases[0].qos_policy.as_deref(), Some("qos-1"));
    assert_eq!(leases[0].pool_key(), Some(request("node-1", 1).key));
    ultron.allocate(&request("node-2", 2)).await.unwrap();

    assert_eq!(
        ultron
            .list(&ListScope::Node("node-1".into()))
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(ultron.list(&ListScope::Cluster).await.unwrap().len(), 5);
    let stranger = client(&base, "s3cret", "other-cluster");
    assert!(stranger.list(&ListScope::Cluster).await.unwrap().is_empty());

    let owner = Owner {
        container_id: "c-1".into(),
        ifname: "eth0".into(),
        pod: Some("default/web-0".into()),
        cni_network: Some("hulk-vpc".into()),
        pod_uid: Some("0b3e2f8a-6f1c-4d1e-9a57-3c1f0d9e2b11".into()),
    };
    let mark = InstanceMark::new("node-1-3f9c0a7d12e4b865", 1_764_590_000)
        .alive_for(std::time::Duration::from_secs(180));
    let owned = ultron
        .update_owner(&leases[1].id, Some(owner.clone()), Some(mark.clone()))
        .await
        .unwrap();
    assert_eq!(owned.owner.as_ref(), Some(&owner));
    assert_eq!(
        owned.marked_by.as_ref(),
        Some(&mark),
        "the mark goes both ways"
    );
    let listed = ultron
        .list(&ListScope::Node("node-1".into()))
        .await
        .unwrap();
    assert_eq!(
        listed
            .iter()
            .find(|lease| lease.id == leases[1].id)
            .unwrap()
            .owner,
        Some(owner)
    );
    assert_eq!(
        listed
            .iter()
            .find(|lease| lease.id == leases[1].id)
            .unwrap()
            .marked_by,
        Some(mark.clone()),
        "and is listed"
    );
    let mut marked = request("node-1", 1);
    marked.marked_by = Some(mark.clone());
    let allocated = ultron.allocate(&marked).await.unwrap();
    assert_eq!(allocated[0].marked_by, Some(mark), "allocations carry it");
    ultron.release(&allocated[0].id).await.unwrap();

    ultron.release(&leases[0].id).await.unwrap();
    assert!(matches!(
        ultron.release(&leases[0].id).await,
        Err(IpamError::NotFound(_))
    ));
    assert!(matches!(
        ultron.update_owner(&leases[0].id, None, None).await,
        Err(IpamError::NotFound(_))
    ));
    assert_eq!(
        ultron
            .list(&ListScope::Node("node-1".into()))
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn listing_follows_the_cursor_across_pages() {
    let base = serve(mock("10.31.0.0/24")).await;
    let ultron = client(&base, "s3cret", "prod").with_page_size(2);
    ultron.allocate(&request("node-1", 7)).await.unwrap();
    let mut ids: Vec<String> = ultron
        .list(&ListScope::Cluster)
        .await
        .unwrap()
        .into_iter()
        .map(|lease| lease.id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 7);
}

#[tokio::test]
async fn a_specific_address_is_allocated_once() {
    let base = serve(mock("10.34.0.0/24")).await;
    let ultron = client(&base, "s3cret", "prod");
    let key = request("node-1", 1).key;
    let fixed =
        AllocationRequest::for_address(key.clone(), "node-1", "10.34.0.42".parse().unwrap());
    let lease = ultron.allocate(&fixed).await.unwrap().remove(0);
    assert_eq!(lease.address.to_string(), "10.34.0.42/24");
    assert!(matches!(
        ultron.allocate(&fixed).await,
        Err(IpamError::Conflict(_))
    ));
    let outside = AllocationRequest::for_address(key, "node-1", "10.35.0.1".parse().unwrap());
    assert!(matches!(
        ultron.allocate(&outside).await,
        Err(IpamError::InvalidRequest(_))
    ));
}

#[tokio::test]
async fn errors_carry_their_contract_codes() {
    let base = serve(mock("10.32.0.0/29")).await;
    let wrong = client(&base, "guess", "prod");
    assert!(matches!(wrong.health().await, Err(IpamError::Auth(_))));
    let ultron = client(&base, "s3cret", "prod");
    assert!(matches!(
        ultron.allocate(&request("node-1", 6)).await,
        Err(IpamError::Exhausted { .. })
    ));
    assert!(matches!(
        ultron.allocate(&request("node-1", 0)).await,
        Err(IpamError::InvalidRequest(_))
    ));

    let throttled = FaultPlan {
        on_call: BTreeMap::from([(
            1,
            Fault::Error(IpamError::Throttled {
                retry_after: Some(Duration::from_secs(3)),
            }),
        )]),
        ..FaultPlan::default()
    };
    let base = serve(Arc::new(Faulty::new(
        MemoryBackend::new("10.33.0.0/24".parse().unwrap()),
        throttled,
    )))
    .await;
    let ultron = client(&base, "s3cret", "prod");
    let error = ultron.allocate(&request("node-1", 1)).await.unwrap_err();
    assert_eq!(
        error,
        IpamError::Throttled {
            retry_after: Some(Duration::from_secs(3))
        }
    );
    assert!(
        ultron.allocate(&request("node-1", 1)).await.is_ok(),
        "only the first call was throttled"
    );
}

#[tokio::test]
async fn a_garbled_answer_is_a_protocol_error() {
    use axum::routing::post;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/v1/allocations",
        post(|| async {
            (
                axum::http::StatusCode::CREATED,
                "{\"addresses\": [{\"id\": 3",
            )
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let error = client(&base, "t", "prod")
        .allocate(&request("node-1", 1))
        .await
        .unwrap_err();
    assert!(matches!(error, IpamError::Protocol(_)), "{error}");
}

/// The JSON blocks of the contract document, in order.
fn contract_examples() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ultron-ipam-v1.md");
    let text = std::fs::read_to_string(path).unwrap();
    text.split("```json\n")
        .skip(1)
        .map(|block| serde_json::from_str(block.split("```").next().unwrap()).unwrap())
        .collect()
}

#[test]
fn the_documented_examples_are_what_the_code_reads_and_writes() {
    let examples = contract_examples();
    assert_eq!(
        examples.len(),
        2,
        "the contract shows an Address and an Error"
    );
    let address: WireAddress = serde_json::from_value(examples[0].clone()).unwrap();
    assert_eq!(serde_json::to_value(&address).unwrap(), examples[0]);
    let lease = address.into_lease().unwrap();
    assert_eq!(lease.address.to_string(), "10.20.0.5/24");
    assert_eq!(
        lease.pool_key(),
        Some(PoolKey::new("net-1", "subnet-a", ["sg-web"], None))
    );
    let owner = lease.owner.unwrap();
    assert_eq!(owner.pod.as_deref(), Some("default/web-0"));
    assert_eq!(owner.cni_network.as_deref(), Some("hulk-vpc"));
    assert!(owner.pod_uid.is_some());
    let error: ErrorBody = serde_json::from_value(examples[1].clone()).unwrap();
    assert_eq!(error.error.code, "exhausted");
}

#[tokio::test]
async fn a_refused_token_says_so_once_and_never_shows_the_token() {
    let base = serve(mock("10.33.0.0/24")).await;
    let error = client(&base, "wrong-token-4711", "prod")
        .allocate(&request("node-1", 1))
        .await
        .unwrap_err();
    assert!(matches!(error, IpamError::Auth(_)), "{error}");
    let text = error.to_string();
    assert_eq!(text.matches("authentication failed").count(), 1, "{text}");
    assert!(!text.contains("wrong-token-4711"), "{text}");
}

#[tokio::test]
async fn a_short_answer_is_passed_on_not_thrown_away() {
    // A buggy service answers one address short: the client hands on the
    // ones it got (the pool adopts them) instead of stranding them all.
    let short = FaultPlan {
        on_call: BTreeMap::from([(1, Fault::ShortAnswer(1))]),
        ..FaultPlan::default()
    };
    let backend = Arc::new(Faulty::new(
        MemoryBackend::new("10.34.0.0/24".parse().unwrap()),
        short,
    ));
    let base = serve(backend.clone()).await;
    let ultron = client(&base, "s3cret", "prod");
    let leases = ultron.allocate(&request("node-1", 4)).await.unwrap();
    assert_eq!(leases.len(), 3);
    let held = ultron
        .list(&ListScope::Node("node-1".into()))
        .await
        .unwrap();
    assert_eq!(
        held.len(),
        3,
        "nothing held that the client did not hand on"
    );
}
