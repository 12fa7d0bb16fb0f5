//! The Neutron client and backend against a scripted fake server: every
//! failure becomes a typed error, never a panic, and nothing is leaked.

// Test code: a panic is how a fake server or helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use hulk_ipam::{AllocationRequest, IpamBackend, IpamError, PoolKey};
use hulk_openstack::keystone::{Credentials, Keystone, KeystoneConfig};
use hulk_openstack::neutron::{NeutronAuth, NeutronClient};
use hulk_openstack::{HttpClient, HttpSettings, NeutronBackend, NeutronBackendConfig, NodePort};
use serde_json::{Value, json};

/// How the fake answers port creation.
#[derive(Clone, Copy, PartialEq)]
enum CreateReply {
    Ok,
    ServerError,
    Throttled,
    Malformed,
    Slow,
    /// A 500 whose body echoes the request and its token.
    Echo,
}

struct Fake {
    create: CreateReply,
    tags_fail: bool,
    tags_on_create: bool,
    accepted_token: Option<String>,
    tokens_issued: usize,
    created: Vec<String>,
    deleted: Vec<String>,
    base: String,
}

type Shared = Arc<Mutex<Fake>>;

fn port(id: &str) -> Value {
    json!({"id": id, "network_id": "net", "mac_address": "fa:16:3e:00:00:09",
           "fixed_ips": [{"subnet_id": "sub", "ip_address": "10.9.0.9"}],
           "binding:host_id": "node-a", "name": "hulk-vpc", "revision_number": 1})
}

fn authorized(fake: &Fake, headers: &HeaderMap) -> bool {
    match &fake.accepted_token {
        None => true,
        Some(token) => headers.get("x-auth-token").and_then(|v| v.to_str().ok()) == Some(token),
    }
}

async fn create_ports(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let reply = {
        let fake = fake.lock().unwrap();
        if !authorized(&fake, &headers) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": {"code": 401}})),
            )
                .into_response();
        }
        fake.create
    };
    match reply {
        CreateReply::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        CreateReply::Throttled => (
            StatusCode::TOO_MANY_REQUESTS,
            [("Retry-After", "7")],
            "slow down",
        )
            .into_response(),
        CreateReply::Malformed => (StatusCode::CREATED, "{\"port\": {\"id\": ").into_response(),
        CreateReply::Echo => {
            let token = headers
                .get("x-auth-token")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default();
            let echo = format!("secret app-secret-4711, token {token}, request {body}");
            let document = json!({"NeutronError": {"type": "Internal", "message": echo}});
            (StatusCode::INTERNAL_SERVER_ERROR, Json(document)).into_response()
        }
        CreateReply::Slow => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (StatusCode::CREATED, Json(json!({"port": port("late")}))).into_response()
        }
        CreateReply::Ok => {
            let mut fake = fake.lock().unwrap();
            let count = body
                .get("ports")
                .and_then(Value::as_array)
                .map_or(1, Vec::len);
            let ids: Vec<String> = (0..count)
                .map(|n| format!("p{}", fake.created.len() + n))
                .collect();
            fake.created.extend(ids.iter().cloned());
            let ports: Vec<Value> = ids.iter().map(|id| port(id)).collect();
            if body.get("ports").is_some() {
                (StatusCode::CREATED, Json(json!({"ports": ports}))).into_response()
            } else {
                (StatusCode::CREATED, Json(json!({"port": ports[0]}))).into_response()
            }
        }
    }
}

async fn set_tags(State(fake): State<Shared>, Path(_id): Path<String>) -> Response {
    if fake.lock().unwrap().tags_fail {
        (StatusCode::INTERNAL_SERVER_ERROR, "tags broke").into_response()
    } else {
        Json(json!({"tags": []})).into_response()
    }
}

async fn delete_port(State(fake): State<Shared>, Path(id): Path<String>) -> StatusCode {
    fake.lock().unwrap().deleted.push(id);
    StatusCode::NO_CONTENT
}

async fn extensions(State(fake): State<Shared>, headers: HeaderMap) -> Response {
    let fake = fake.lock().unwrap();
    if !authorized(&fake, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let aliases: Vec<Value> = if fake.tags_on_create {
        vec![json!({"alias": "tag-ports-during-bulk-creation"})]
    } else {
        vec![json!({"alias": "standard-attr-tag"})]
    };
    Json(json!({"extensions": aliases})).into_response()
}

async fn subnet() -> Json<Value> {
    Json(
        json!({"subnet": {"id": "sub", "network_id": "net", "cidr": "10.9.0.0/24", "gateway_ip": "10.9.0.1"}}),
    )
}

async fn network() -> Json<Value> {
    Json(json!({"network": {"id": "net", "mtu": 1450}}))
}

async fn list_ports() -> Json<Value> {
    Json(json!({"ports": []}))
}

/// Issues "token-1", "token-2", ... with a catalog pointing at the fake.
async fn issue_token(State(fake): State<Shared>) -> Response {
    let mut fake = fake.lock().unwrap();
    fake.tokens_issued += 1;
    let token = format!("token-{}", fake.tokens_issued);
    let body = json!({"token": {"expires_at": "2099-01-01T00:00:00.000000Z", "catalog": [
        {"type": "network", "endpoints": [{"interface": "public", "region_id": "RegionOne", "url": fake.base}]}]}});
    (
        StatusCode::CREATED,
        [("X-Subject-Token", token)],
        Json(body),
    )
        .into_response()
}

async fn start(fake: Fake) -> (Shared, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shared = Arc::new(Mutex::new(Fake {
        base: base.clone(),
        ..fake
    }));
    let app = Router::new()
        .route("/v2.0/ports", post(create_ports).get(list_ports))
        .route("/v2.0/ports/{id}", delete(delete_port))
        .route("/v2.0/ports/{id}/tags", put(set_tags))
        .route("/v2.0/extensions", get(extensions))
        .route("/v2.0/subnets/{id}", get(subnet))
        .route("/v2.0/networks/{id}", get(network))
        .route("/v3/auth/tokens", post(issue_token))
        .with_state(shared.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (shared, base)
}

fn fake(create: CreateReply) -> Fake {
    Fake {
        create,
        tags_fail: false,
        tags_on_create: true,
        accepted_token: None,
        tokens_issued: 0,
        created: Vec::new(),
        deleted: Vec::new(),
        base: String::new(),
    }
}

fn backend(base: &str, timeout: Duration) -> NeutronBackend {
    let http = HttpClient::new(&HttpSettings {
        timeout,
        ..HttpSettings::default()
    })
    .unwrap();
    let client = NeutronClient::new(http, NeutronAuth::None, Some(base.to_owned())).unwrap();
    NeutronBackend::new(client, NeutronBackendConfig::new("faults"))
}

fn request(count: usize) -> AllocationRequest {
    AllocationRequest::new(PoolKey::new("net", "sub", ["sg"], None), "node-a", count)
}

#[tokio::test]
async fn server_errors_throttling_and_timeouts_are_typed() {
    for (reply, check) in [
        (
            CreateReply::ServerError,
            (|e: &IpamError| matches!(e, IpamError::Transient(_))) as fn(&IpamError) -> bool,
        ),
        (
            CreateReply::Throttled,
            |e| matches!(e, IpamError::Throttled { retry_after: Some(d) } if *d == Duration::from_secs(7)),
        ),
        (CreateReply::Malformed, |e| {
            matches!(e, IpamError::Protocol(_))
        }),
        (CreateReply::Slow, |e| matches!(e, IpamError::Transient(_))),
    ] {
        let (_, base) = start(fake(reply)).await;
        let error = backend(&base, Duration::from_millis(500))
            .allocate(&request(1))
            .await
            .unwrap_err();
        assert!(check(&error), "unexpected {error}");
    }
}

#[tokio::test]
async fn an_unreachable_server_is_transient() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let error = backend(&base, Duration::from_secs(2))
        .health()
        .await
        .unwrap_err();
    assert!(matches!(error, IpamError::Transient(_)), "{error}");
}

#[tokio::test]
async fn failed_tagging_deletes_the_ports_it_created() {
    let (state, base) = start(Fake {
        tags_on_create: false,
        tags_fail: true,
        ..fake(CreateReply::Ok)
    })
    .await;
    let error = backend(&base, Duration::from_secs(2))
        .allocate(&request(3))
        .await
        .unwrap_err();
    assert!(matches!(error, IpamError::Transient(_)), "{error}");
    let state = state.lock().unwrap();
    assert_eq!(state.created.len(), 3);
    let mut deleted = state.deleted.clone();
    deleted.sort();
    assert_eq!(
        deleted, state.created,
        "every created port is deleted again"
    );
}

#[tokio::test]
async fn without_the_tag_extension_tags_are_set_afterwards() {
    let (state, base) = start(Fake {
        tags_on_create: false,
        ..fake(CreateReply::Ok)
    })
    .await;
    let leases = backend(&base, Duration::from_secs(2))
        .allocate(&request(2))
        .await
        .unwrap();
    assert_eq!(leases.len(), 2);
    assert_eq!(leases[0].mtu, Some(1450));
    assert_eq!(leases[0].address.to_string(), "10.9.0.9/24");
    assert!(state.lock().unwrap().deleted.is_empty());
}

#[tokio::test]
async fn a_rejected_token_is_replaced_once() {
    let (state, base) = start(Fake {
        accepted_token: Some("token-2".into()),
        ..fake(CreateReply::Ok)
    })
    .await;
    let keystone = Keystone::new(
        KeystoneConfig::new(
            format!("{base}/v3"),
            Credentials::ApplicationCredential {
                id: "id".into(),
                secret: "s".into(),
            },
        ),
        HttpClient::new(&HttpSettings::default()).unwrap(),
    );
    let client = NeutronClient::new(
        HttpClient::new(&HttpSettings::default()).unwrap(),
        NeutronAuth::Keystone(Box::new(keystone)),
        None,
    )
    .unwrap();
    client.extensions().await.unwrap();
    assert_eq!(
        state.lock().unwrap().tokens_issued,
        2,
        "token-1 was refused, token-2 fetched"
    );

    // A server that refuses every token gives up after one retry.
    state.lock().unwrap().accepted_token = Some("never".into());
    let error = client.extensions().await.unwrap_err();
    assert!(matches!(error, IpamError::Auth(_)), "{error}");
    assert_eq!(state.lock().unwrap().tokens_issued, 3);
}

#[tokio::test]
async fn upstream_errors_never_carry_credentials_or_tokens() {
    let (_, base) = start(fake(CreateReply::Echo)).await;
    let keystone = Keystone::new(
        KeystoneConfig::new(
            format!("{base}/v3"),
            Credentials::ApplicationCredential {
                id: "id".into(),
                secret: "app-secret-4711".into(),
            },
        ),
        HttpClient::new(&HttpSettings::default()).unwrap(),
    );
    let client = NeutronClient::new(
        HttpClient::new(&HttpSettings::default()).unwrap(),
        NeutronAuth::Keystone(Box::new(keystone)),
        None,
    )
    .unwrap();
    let backend = NeutronBackend::new(client, NeutronBackendConfig::new("faults"));
    let error = backend.allocate(&request(1)).await.unwrap_err().to_string();
    assert!(!error.contains("app-secret-4711"), "{error}");
    assert!(!error.contains("token-1"), "{error}");
    assert!(error.contains("[redacted]"), "{error}");

    // A timeout says so and names the cause, not only "error sending request".
    let (_, base) = start(fake(CreateReply::Slow)).await;
    let error = backend_timeout_of(&base).await.to_string();
    assert!(error.contains("timed out"), "{error}");
}

async fn backend_timeout_of(base: &str) -> IpamError {
    backend(base, Duration::from_millis(300))
        .allocate(&request(1))
        .await
        .unwrap_err()
}

/// A node port (`node`) carrying pod port `p0`'s pair, where another
/// writer changes the node port before each of the first `conflicts`
/// updates, which Neutron then refuses (412, stale revision).
struct NodePortFake {
    revision: u64,
    pairs: Vec<Value>,
    conflicts: usize,
    updates: usize,
    deleted: Vec<String>,
}

type SharedNode = Arc<Mutex<NodePortFake>>;

async fn node_get(State(fake): State<SharedNode>, Path(id): Path<String>) -> Response {
    let fake = fake.lock().unwrap();
    let port = match id.as_str() {
        "node" => json!({"id": "node", "network_id": "net", "mac_address": "fa:16:3e:aa:aa:aa",
            "fixed_ips": [{"subnet_id": "sub", "ip_address": "10.9.0.2"}],
            "allowed_address_pairs": fake.pairs, "port_security_enabled": true,
            "revision_number": fake.revision}),
        "p0" if !fake.deleted.contains(&id) => {
            json!({"id": "p0", "network_id": "net", "mac_address": "fa:16:3e:00:00:09",
            "fixed_ips": [{"subnet_id": "sub", "ip_address": "10.9.0.9"}],
            "tags": ["hulk-vpc", "hulk-node=node-a", "hulk-node-port=node"], "revision_number": 1})
        }
        _ => {
            let gone = json!({"NeutronError": {"type": "PortNotFound", "message": "gone"}});
            return (StatusCode::NOT_FOUND, Json(gone)).into_response();
        }
    };
    Json(json!({ "port": port })).into_response()
}

async fn node_put(
    State(fake): State<SharedNode>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut fake = fake.lock().unwrap();
    fake.updates += 1;
    let asked = headers
        .get("if-match")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("revision_number="))
        .and_then(|value| value.parse::<u64>().ok());
    if fake.conflicts > 0 {
        // Another writer got there first.
        fake.conflicts -= 1;
        fake.revision += 1;
        let other = format!("10.9.0.{}", 100 + fake.conflicts % 100);
        fake.pairs
            .push(json!({"ip_address": other, "mac_address": "fa:16:3e:aa:aa:aa"}));
    }
    if asked != Some(fake.revision) {
        let stale =
            json!({"NeutronError": {"type": "RevisionNumberConstraintFailed", "message": "stale"}});
        return (StatusCode::PRECONDITION_FAILED, Json(stale)).into_response();
    }
    fake.revision += 1;
    fake.pairs = body["port"]["allowed_address_pairs"]
        .as_array()
        .unwrap()
        .clone();
    Json(
        json!({"port": {"id": "node", "network_id": "net", "mac_address": "fa:16:3e:aa:aa:aa",
        "allowed_address_pairs": fake.pairs, "revision_number": fake.revision}}),
    )
    .into_response()
}

async fn node_delete(State(fake): State<SharedNode>, Path(id): Path<String>) -> StatusCode {
    fake.lock().unwrap().deleted.push(id);
    StatusCode::NO_CONTENT
}

async fn node_port_backend(conflicts: usize) -> (SharedNode, NeutronBackend) {
    let shared = Arc::new(Mutex::new(NodePortFake {
        revision: 7,
        pairs: vec![json!({"ip_address": "10.9.0.9", "mac_address": "fa:16:3e:aa:aa:aa"})],
        conflicts,
        updates: 0,
        deleted: Vec::new(),
    }));
    let app = Router::new()
        .route(
            "/v2.0/ports/{id}",
            get(node_get).put(node_put).delete(node_delete),
        )
        .route("/v2.0/subnets/{id}", get(subnet))
        .route("/v2.0/networks/{id}", get(network))
        .route("/v2.0/ports", get(list_ports))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = HttpClient::new(&HttpSettings::default()).unwrap();
    let client = NeutronClient::new(http, NeutronAuth::None, Some(base)).unwrap();
    let mut config = NeutronBackendConfig::new("c");
    config.node_port = NodePort::Id("node".into());
    (shared, NeutronBackend::new(client, config))
}

#[tokio::test]
async fn a_lost_compare_and_swap_is_read_again_and_keeps_the_other_writers_pairs() {
    let (fake, backend) = node_port_backend(2).await;
    backend.release("p0").await.unwrap();
    let fake = fake.lock().unwrap();
    assert_eq!(fake.updates, 3, "two refused, the third landed");
    let pairs: Vec<&str> = fake
        .pairs
        .iter()
        .map(|pair| pair["ip_address"].as_str().unwrap())
        .collect();
    assert_eq!(
        pairs,
        ["10.9.0.101", "10.9.0.100"],
        "p0's pair gone, the other writer's kept"
    );
    assert_eq!(fake.deleted, ["p0"], "the port goes after its pair");
}

#[tokio::test]
async fn endless_conflicts_give_up_and_keep_the_port() {
    let (fake, backend) = node_port_backend(usize::MAX).await;
    let error = backend.release("p0").await.unwrap_err();
    assert!(
        matches!(error, IpamError::Conflict(_)) && error.is_retryable(),
        "{error}"
    );
    let fake = fake.lock().unwrap();
    assert_eq!(fake.updates, 10);
    assert!(
        fake.deleted.is_empty(),
        "a port whose pair is still on the node port is not deleted"
    );
}
