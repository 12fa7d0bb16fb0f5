//! The node against an in-process fake Kubernetes API: pod annotations pick
//! the pool at ADD, an unreachable or refusing API fails ADD retryably
//! without leaking an address, and the periodic GC releases the addresses
//! of pods the API no longer shows on the node, on the second pass only.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hulk_cni::ErrorCode;
use hulk_ipam::{MemoryBackend, Owner, PoolKey};
use hulk_netns::fake::FakeKernel;
use hulk_netns::{Datapath, NodeNetwork, SlaveKind};
use hulk_node::kube::{
    IP_ADDRESS_ANNOTATION, KubeClient, KubeError, NETWORK_ANNOTATION, QOS_POLICY_ANNOTATION,
    SECURITY_GROUPS_ANNOTATION, SUBNET_ANNOTATION,
};
use hulk_node::{Node, NodeError, PodRequest};
use hulk_pool::{AddressState, MemoryStore, PoolConfig, PoolManager, SystemClock};
use serde_json::{Value, json};

/// The service account token the fake API accepts.
const TOKEN: &str = "hulk-sa-token";
/// The node under test; the fake API also holds pods of another node.
const NODE: &str = "node-1";
/// Pods per list page, whatever `limit` asks: one, so that any two pods
/// take two pages and the `continue` token is always exercised.
const PAGE: usize = 1;

// ---------------------------------------------------------------------------
// The fake API server.

#[derive(Default)]
struct ApiState {
    /// Pods as the API serves them.
    pods: Vec<Value>,
    /// When set, every request is answered with this status.
    failure: Option<StatusCode>,
    /// The query of every list request, in order.
    lists: Vec<HashMap<String, String>>,
}

type Shared = Arc<Mutex<ApiState>>;

/// A Kubernetes `Status` answer.
fn status(code: StatusCode) -> Response {
    let message = code.canonical_reason().unwrap();
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message, "code": code.as_u16()});
    (code, Json(body)).into_response()
}

/// The answer to a request that is not served: wrong token, or the
/// failure switch is on.
fn refusal(state: &ApiState, headers: &HeaderMap) -> Option<Response> {
    let bearer = format!("Bearer {TOKEN}");
    if headers
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes())
        != Some(bearer.as_bytes())
    {
        return Some(status(StatusCode::UNAUTHORIZED));
    }
    state.failure.map(status)
}

async fn get_pod(
    State(api): State<Shared>,
    headers: HeaderMap,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Response {
    let state = api.lock().unwrap();
    if let Some(refused) = refusal(&state, &headers) {
        return refused;
    }
    state
        .pods
        .iter()
        .find(|pod| pod["metadata"]["namespace"] == namespace && pod["metadata"]["name"] == name)
        .map_or_else(
            || status(StatusCode::NOT_FOUND),
            |pod| Json(pod.clone()).into_response(),
        )
}

/// `GET /api/v1/pods?fieldSelector=spec.nodeName=N&limit=L[&continue=T]`,
/// [`PAGE`] pods a page, the token being the offset of the next page.
async fn list_pods(
    State(api): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut state = api.lock().unwrap();
    state.lists.push(query.clone());
    if let Some(refused) = refusal(&state, &headers) {
        return refused;
    }
    let node = query
        .get("fieldSelector")
        .and_then(|selector| selector.strip_prefix("spec.nodeName="));
    let limit = query
        .get("limit")
        .and_then(|limit| limit.parse::<usize>().ok());
    let offset = query
        .get("continue")
        .map_or(Some(0), |token| token.parse::<usize>().ok());
    let (Some(node), Some(limit @ 1..), Some(offset)) = (node, limit, offset) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let on_node: Vec<&Value> = state
        .pods
        .iter()
        .filter(|pod| pod["spec"]["nodeName"] == node)
        .collect();
    let end = on_node.len().min(offset + limit.min(PAGE));
    let mut metadata = json!({"resourceVersion": "42"});
    if end < on_node.len() {
        metadata["continue"] = json!(end.to_string());
    }
    let items = on_node.get(offset..end).unwrap_or_default();
    Json(json!({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items}))
        .into_response()
}

/// A pod of the `default` namespace on `node`, running.
fn pod_on(node: &str, name: &str, annotations: &[(&str, &str)]) -> Value {
    let mut metadata = json!({"namespace": "default", "name": name, "uid": format!("uid-{name}")});
    if !annotations.is_empty() {
        metadata["annotations"] = annotations
            .iter()
            .map(|(key, value)| ((*key).to_owned(), json!(value)))
            .collect();
    }
    json!({"metadata": metadata, "spec": {"nodeName": node}, "status": {"phase": "Running"}})
}

fn pod(name: &str, annotations: &[(&str, &str)]) -> Value {
    pod_on(NODE, name, annotations)
}

/// A file holding a token, removed when dropped.
struct TokenFile(PathBuf);

impl TokenFile {
    fn new(token: &str) -> TokenFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hulk-kube-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = TokenFile(path);
        file.write(token);
        file
    }

    /// Writes `token` as a projected token file has it, with a newline.
    fn write(&self, token: &str) {
        std::fs::write(&self.0, format!("{token}\n")).unwrap();
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct FakeApi {
    state: Shared,
    url: String,
    token: TokenFile,
}

impl FakeApi {
    async fn start(pods: Vec<Value>) -> FakeApi {
        let state = Shared::default();
        state.lock().unwrap().pods = pods;
        let app = Router::new()
            .route("/api/v1/namespaces/{namespace}/pods/{name}", get(get_pod))
            .route("/api/v1/pods", get(list_pods))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeApi {
            state,
            url,
            token: TokenFile::new(TOKEN),
        }
    }

    /// A client sending the token of `token_file`.
    fn client_with(&self, token_file: Option<&Path>) -> KubeClient {
        KubeClient::new(
            reqwest::Client::new(),
            &format!("{}/", self.url),
            token_file.map(Path::to_path_buf),
        )
    }

    /// A client sending the right token.
    fn client(&self) -> KubeClient {
        self.client_with(Some(&self.token.0))
    }

    fn fail(&self, failure: Option<StatusCode>) {
        self.state.lock().unwrap().failure = failure;
    }

    fn remove(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .pods
            .retain(|pod| pod["metadata"]["name"] != name);
    }

    /// Sets the field at `pointer` (a JSON pointer) of pod `name`.
    fn set(&self, name: &str, pointer: &str, value: &str) {
        let mut state = self.state.lock().unwrap();
        let pod = state
            .pods
            .iter_mut()
            .find(|pod| pod["metadata"]["name"] == name)
            .unwrap();
        *pod.pointer_mut(pointer).unwrap() = json!(value);
    }

    /// The queries of the list requests served so far.
    fn lists(&self) -> Vec<HashMap<String, String>> {
        self.state.lock().unwrap().lists.clone()
    }
}

/// An API server address nothing listens on.
async fn unreachable_api() -> KubeClient {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    KubeClient::new(reqwest::Client::new(), &url, None)
}

// ---------------------------------------------------------------------------
// The node.

fn default_key() -> PoolKey {
    PoolKey::new("vpc", "subnet-a", ["sg-default"], Some("qos-gold".into()))
}

/// The pool the annotations of [`annotated`] ask for.
fn annotated_key() -> PoolKey {
    PoolKey::new(
        "vpc",
        "subnet-b",
        ["sg-db", "sg-web"],
        Some("qos-bronze".into()),
    )
}

const ANNOTATIONS: [(&str, &str); 3] = [
    (SUBNET_ANNOTATION, "subnet-b"),
    (SECURITY_GROUPS_ANNOTATION, "sg-web, sg-db"),
    (QOS_POLICY_ANNOTATION, "qos-bronze"),
];

fn annotated(name: &str) -> Value {
    pod(name, &ANNOTATIONS)
}

/// A node reading pods from `kube`, with warm default and annotated pools,
/// and a namespace for each of `pods`.
async fn node(kube: KubeClient, pods: &[&str]) -> Node<FakeKernel> {
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    for name in pods {
        kernel.add_namespace(format!("/var/run/netns/{name}"));
    }
    let config = PoolConfig {
        assign_timeout: Duration::from_millis(50),
        ..PoolConfig::default()
    };
    let pools = PoolManager::open(
        Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap())),
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        NODE,
        config,
    )
    .await
    .unwrap();
    for key in [default_key(), annotated_key()] {
        pools.warm_up(&key).await.unwrap();
    }
    let network = NodeNetwork {
        parent: "eth1".into(),
        kind: SlaveKind::default(),
        host_link: "hulk0".into(),
        node_address: "10.20.0.250/24".parse().unwrap(),
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
    };
    let node =
        Node::new(pools, Datapath::new(kernel), network, default_key()).with_kubernetes(kube);
    node.restore().await.unwrap();
    node
}

/// The ADD or DEL of pod `default/{name}`, its container being `name`.
fn request(name: &str) -> PodRequest {
    PodRequest {
        owner: Owner {
            container_id: name.into(),
            ifname: "eth0".into(),
            pod: Some(format!("default/{name}")),
            cni_network: Some("vpc".into()),
            pod_uid: Some(format!("uid-{name}")),
        },
        netns: Some(PathBuf::from(format!("/var/run/netns/{name}"))),
        pool: None,
        timeout_ms: None,
        address: None,
        mac: None,
    }
}

fn owner(name: &str) -> Owner {
    Owner {
        container_id: name.into(),
        ifname: "eth0".into(),
        pod: Some(format!("default/{name}")),
        cni_network: Some("vpc".into()),
        pod_uid: Some(format!("uid-{name}")),
    }
}

/// ADDs `name` and returns its address.
async fn add(node: &Node<FakeKernel>, name: &str) -> IpAddr {
    node.add(&request(name)).await.unwrap().lease.address.addr()
}

/// ADDs `name`, expecting a failure that leaves no trace: no address
/// assigned in any pool, no datapath change.
async fn add_fails(node: &Node<FakeKernel>, name: &str) -> NodeError {
    let operations = node.datapath().kernel().operations();
    let error = node.add(&request(name)).await.unwrap_err();
    assert_eq!(assignments(node), [], "{error}");
    assert_eq!(node.pools().lease_of(&owner(name)), None, "{error}");
    assert_eq!(node.datapath().kernel().operations(), operations, "{error}");
    error
}

/// Every assignment of every pool: (container, address, pool), by container.
fn assignments(node: &Node<FakeKernel>) -> Vec<(String, IpAddr, PoolKey)> {
    let mut held: Vec<_> = node
        .pools()
        .records()
        .into_iter()
        .filter_map(|record| match record.state {
            AddressState::Assigned(owner) => {
                Some((owner.container_id, record.lease.address.addr(), record.key))
            }
            _ => None,
        })
        .collect();
    held.sort_by(|a, b| a.0.cmp(&b.0));
    held
}

fn state_of(node: &Node<FakeKernel>, address: IpAddr) -> AddressState {
    node.pools()
        .records()
        .into_iter()
        .find(|record| record.lease.address.addr() == address)
        .unwrap()
        .state
}

/// One GC pass: the containers released and suspected, sorted.
async fn gc_pass(node: &Node<FakeKernel>) -> Result<(Vec<String>, Vec<String>), NodeError> {
    let containers = |owners: Vec<Owner>| {
        let mut names: Vec<String> = owners.into_iter().map(|o| o.container_id).collect();
        names.sort();
        names
    };
    // A client that lost the `continue` token would list forever.
    let report = tokio::time::timeout(Duration::from_secs(10), node.collect_dead_pods())
        .await
        .unwrap()?;
    Ok((containers(report.released), containers(report.suspected)))
}

async fn expect_pass(node: &Node<FakeKernel>, released: &[&str], suspected: &[&str]) {
    let (was_released, was_suspected) = gc_pass(node).await.unwrap();
    assert_eq!(was_released, released, "released");
    assert_eq!(was_suspected, suspected, "suspected");
}

// ---------------------------------------------------------------------------
// ADD: which pool.

#[tokio::test]
async fn annotations_pick_the_pool_and_plain_pods_get_the_default() {
    let api = FakeApi::start(vec![
        annotated("a"),
        pod("b", &[("app", "web")]),
        annotated("c"),
        pod("net", &[(NETWORK_ANNOTATION, "vpc-2")]),
    ])
    .await;
    let node = node(api.client(), &["a", "b", "c", "ghost", "net"]).await;

    let a = node.add(&request("a")).await.unwrap().lease;
    assert_eq!(a.security_groups, ["sg-db", "sg-web"]);
    assert_eq!(a.qos_policy.as_deref(), Some("qos-bronze"));
    let b = add(&node, "b").await;
    // The request's own pool wins over the annotations.
    let mut c_request = request("c");
    c_request.pool = Some(default_key());
    let c = node.add(&c_request).await.unwrap().lease.address.addr();
    // A pod the API does not know gets the default pool (and a warning).
    let ghost = add(&node, "ghost").await;

    assert_eq!(
        assignments(&node),
        [
            ("a".into(), a.address.addr(), annotated_key()),
            ("b".into(), b, default_key()),
            ("c".into(), c, default_key()),
            ("ghost".into(), ghost, default_key()),
        ]
    );
    assert_eq!(node.pools().stats(&annotated_key()).assigned, 1);
    assert_eq!(node.pools().stats(&default_key()).assigned, 3);

    // One annotation overrides its field only. That pool is not warm: the
    // ADD waits for a refill and fails retryably; warmed, the retry gets it.
    let vpc_2 = PoolKey::new("vpc-2", "subnet-a", ["sg-default"], Some("qos-gold".into()));
    let error = node.add(&request("net")).await.unwrap_err();
    assert_eq!(error.to_cni().code, ErrorCode::TryAgainLater, "{error}");
    node.pools().warm_up(&vpc_2).await.unwrap();
    let net = add(&node, "net").await;
    assert_eq!(node.pools().holder_of(net), Some((vpc_2, owner("net"))));
}

#[tokio::test]
async fn a_fixed_ip_annotation_gets_the_pod_that_address_and_keeps_others_off_it() {
    let api = FakeApi::start(vec![
        pod("db-0", &[(IP_ADDRESS_ANNOTATION, "10.20.0.77")]),
        pod("db-1", &[(IP_ADDRESS_ANNOTATION, "10.20.0.77")]),
        pod("odd", &[(IP_ADDRESS_ANNOTATION, "10.99.0.1")]),
    ])
    .await;
    let node = node(api.client(), &["db-0", "db-1", "odd"]).await;
    let fixed: IpAddr = "10.20.0.77".parse().unwrap();
    assert_eq!(add(&node, "db-0").await, fixed);
    let taken = node.add(&request("db-1")).await.unwrap_err();
    assert_eq!(taken.to_cni().code, ErrorCode::TryAgainLater, "{taken}");
    assert!(taken.to_string().contains("10.20.0.77"), "{taken}");
    let outside = node.add(&request("odd")).await.unwrap_err();
    assert_eq!(
        outside.to_cni().code,
        ErrorCode::InvalidNetworkConfig,
        "{outside}"
    );
    // db-0 leaves; db-1 (its successor) now gets the address.
    node.del(&request("db-0")).await.unwrap();
    assert_eq!(add(&node, "db-1").await, fixed);
    assert_eq!(
        node.pools().holder_of(fixed),
        Some((default_key(), owner("db-1")))
    );
}

#[tokio::test]
async fn a_malformed_annotation_is_an_invalid_config_naming_it() {
    for (annotation, value) in [
        (SECURITY_GROUPS_ANNOTATION, "sg-a,,sg-b"),
        (SUBNET_ANNOTATION, "  "),
        (QOS_POLICY_ANNOTATION, ""),
        (IP_ADDRESS_ANNOTATION, "10.20.0.300"),
    ] {
        let api = FakeApi::start(vec![pod("a", &[(annotation, value)])]).await;
        let node = node(api.client(), &["a"]).await;
        let cni = add_fails(&node, "a").await.to_cni();
        assert_eq!(cni.code, ErrorCode::InvalidNetworkConfig, "{}", cni.msg);
        assert_eq!(cni.code.as_u32(), 7);
        assert!(
            cni.msg.contains(annotation) && cni.msg.contains("default/a"),
            "{annotation}: {}",
            cni.msg
        );
    }
}

#[tokio::test]
async fn an_api_failing_or_unreachable_at_add_is_retryable_and_leaks_nothing() {
    let api = FakeApi::start(vec![annotated("a")]).await;
    for (client, named) in [
        (api.client(), "500"),
        (unreachable_api().await, "Kubernetes API: "),
    ] {
        api.fail(Some(StatusCode::INTERNAL_SERVER_ERROR));
        let node = node(client, &["a"]).await;
        let error = add_fails(&node, "a").await;
        assert!(
            matches!(error, NodeError::Kubernetes(_)),
            "{named}: {error:?}"
        );
        let cni = error.to_cni();
        assert_eq!(cni.code, ErrorCode::TryAgainLater, "{}", cni.msg);
        assert_eq!(cni.code.as_u32(), 11);
        assert!(cni.msg.contains(named), "{}", cni.msg);
    }

    // The runtime's retry succeeds once the API answers, from the right pool.
    api.fail(None);
    let node = node(api.client(), &["a"]).await;
    let a = add(&node, "a").await;
    assert_eq!(assignments(&node), [("a".into(), a, annotated_key())]);
}

// ---------------------------------------------------------------------------
// The API's answers.

#[tokio::test]
async fn pod_lists_are_read_page_by_page() {
    let api = FakeApi::start(vec![
        pod("a", &[]),
        pod("b", &[]),
        pod_on("node-2", "elsewhere", &[]),
        pod("c", &[]),
    ])
    .await;
    let live = api.client().live_pods_on(NODE).await.unwrap();
    assert_eq!(live.len(), 3);
    for name in ["a", "b", "c"] {
        assert!(live.shows(&format!("default/{name}"), Some(&format!("uid-{name}"))));
    }
    assert!(!live.shows("default/elsewhere", None));
    assert!(!live.shows("default/a", Some("uid-of-an-older-a")));
    let lists = api.lists();
    let continues: Vec<Option<&str>> = lists
        .iter()
        .map(|query| query.get("continue").map(String::as_str))
        .collect();
    assert_eq!(continues, [None, Some("1"), Some("2")]);
    for query in &lists {
        assert_eq!(query["fieldSelector"], "spec.nodeName=node-1");
        assert!(query["limit"].parse::<usize>().unwrap() > PAGE, "{query:?}");
    }
}

#[tokio::test]
async fn a_wrong_token_is_refused_with_a_clear_error() {
    let api = FakeApi::start(vec![pod("a", &[])]).await;
    let wrong = TokenFile::new("not-the-token");
    let client = api.client_with(Some(&wrong.0));
    assert_eq!(
        client.pod("default/a").await.unwrap_err().to_string(),
        "Kubernetes API answered 401 for /api/v1/namespaces/default/pods/a: Unauthorized"
    );
    assert_eq!(
        api.client_with(None)
            .live_pods_on(NODE)
            .await
            .unwrap_err()
            .to_string(),
        "Kubernetes API answered 401 for /api/v1/pods: Unauthorized"
    );
    api.fail(Some(StatusCode::FORBIDDEN));
    let error = api.client().live_pods_on(NODE).await.unwrap_err();
    assert!(
        matches!(&error, KubeError::Status { status: 403, path, .. } if path == "/api/v1/pods"),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "Kubernetes API answered 403 for /api/v1/pods: Forbidden"
    );

    // Through the node: the CNI error carries the API's answer.
    api.fail(None);
    let node = node(client, &["a"]).await;
    let cni = add_fails(&node, "a").await.to_cni();
    assert_eq!(cni.code, ErrorCode::TryAgainLater);
    assert_eq!(
        cni.msg,
        "Kubernetes API answered 401 for /api/v1/namespaces/default/pods/a: Unauthorized"
    );
}

#[tokio::test]
async fn the_token_file_is_read_on_each_call() {
    let api = FakeApi::start(vec![pod("a", &[])]).await;
    let rotating = TokenFile::new("expired");
    let client = api.client_with(Some(&rotating.0));
    assert!(matches!(
        client.pod("default/a").await,
        Err(KubeError::Status { status: 401, .. })
    ));
    rotating.write(TOKEN);
    let pod = client.pod("default/a").await.unwrap().unwrap();
    assert_eq!(pod.name, "default/a");
    assert_eq!(pod.phase.as_deref(), Some("Running"));
    assert!(client.pod("default/nobody").await.unwrap().is_none());

    let path = rotating.0.clone();
    drop(rotating);
    let error = client.pod("default/a").await.unwrap_err();
    assert!(matches!(error, KubeError::Token { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
}

// ---------------------------------------------------------------------------
// The periodic GC.

#[tokio::test]
async fn a_pod_gone_from_the_api_is_released_on_the_second_pass_only() {
    let api = FakeApi::start(vec![pod("a", &[]), annotated("b"), pod("c", &[])]).await;
    let node = node(api.client(), &["a", "b", "c"]).await;
    let (a, b, c) = (
        add(&node, "a").await,
        add(&node, "b").await,
        add(&node, "c").await,
    );
    expect_pass(&node, &[], &[]).await;

    api.remove("b");
    expect_pass(&node, &[], &["b"]).await;
    assert!(matches!(state_of(&node, b), AddressState::Assigned(_)));
    expect_pass(&node, &["b"], &[]).await;
    assert!(matches!(state_of(&node, b), AddressState::Cooldown { .. }));
    let mut host_routes = node.datapath().kernel().host_namespace().route_lines();
    host_routes.sort();
    assert_eq!(
        host_routes,
        [format!("{a}/32 dev hulk0"), format!("{c}/32 dev hulk0")],
        "b's host route leaves with its address"
    );
    assert_eq!(
        assignments(&node),
        [
            ("a".into(), a, default_key()),
            ("c".into(), c, default_key()),
        ]
    );
}

#[tokio::test]
async fn a_pod_recreated_under_its_name_does_not_keep_the_old_sandbox_address() {
    let api = FakeApi::start(vec![pod("a", &[]), pod("b", &[])]).await;
    let node = node(api.client(), &["a", "b"]).await;
    add(&node, "a").await;
    let b = add(&node, "b").await;
    // a's node crashed its sandbox away without a DEL; a StatefulSet
    // recreated a pod under the same name, which has not started here yet.
    api.set("a", "/metadata/uid", "uid-a-recreated");
    expect_pass(&node, &[], &["a"]).await;
    expect_pass(&node, &["a"], &[]).await;
    assert_eq!(assignments(&node), [("b".into(), b, default_key())]);
}

#[tokio::test]
async fn finished_pods_count_as_dead() {
    let api = FakeApi::start(vec![pod("a", &[]), pod("b", &[]), pod("c", &[])]).await;
    let node = node(api.client(), &["a", "b", "c"]).await;
    let a = add(&node, "a").await;
    add(&node, "b").await;
    add(&node, "c").await;
    api.set("a", "/status/phase", "Pending");
    api.set("b", "/status/phase", "Succeeded");
    api.set("c", "/status/phase", "Failed");
    expect_pass(&node, &[], &["b", "c"]).await;
    expect_pass(&node, &["b", "c"], &[]).await;
    assert_eq!(assignments(&node), [("a".into(), a, default_key())]);
}

#[tokio::test]
async fn a_failing_api_releases_nothing() {
    let api = FakeApi::start(vec![pod("a", &[]), pod("b", &[])]).await;
    let node = node(api.client(), &["a", "b"]).await;
    let a = add(&node, "a").await;
    let b = add(&node, "b").await;
    let everything = assignments(&node);
    api.remove("b");
    // A failed read is no evidence: twice failing releases nothing...
    for failure in [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::FORBIDDEN] {
        api.fail(Some(failure));
        let error = gc_pass(&node).await.unwrap_err();
        assert!(
            matches!(&error, NodeError::Kubernetes(KubeError::Status { status, .. })
                if *status == failure.as_u16()),
            "{error:?}"
        );
        assert_eq!(assignments(&node), everything);
    }
    // ...nor counts as a pass: the first answer only suspects b.
    api.fail(None);
    expect_pass(&node, &[], &["b"]).await;
    api.fail(Some(StatusCode::INTERNAL_SERVER_ERROR));
    gc_pass(&node).await.unwrap_err();
    assert_eq!(assignments(&node), everything);
    api.fail(None);
    expect_pass(&node, &["b"], &[]).await;
    assert_eq!(assignments(&node), [("a".into(), a, default_key())]);
    assert!(matches!(state_of(&node, b), AddressState::Cooldown { .. }));
}
