//! The node against the Kubernetes API stand-in (`hulk-kube-standin`),
//! through the agent's pod directory ([`KubePods`] over hulk-kube's metadata
//! reflector): pod annotations pick the pool at ADD, which asks the API
//! nothing once the reflector has synced; an unreachable or failing API
//! fails ADD retryably, a refusing one as a configuration error, neither
//! leaking an address; and the periodic GC releases the addresses of pods
//! the watch no longer shows on the node, on the second pass only, and
//! never while the watch cannot be trusted.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use hulk_node::testing as support;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hulk_agent::kubernetes::{EVENT_CONTROLLER, KubePods};
use hulk_cni::{ErrorCode, describe};
use hulk_ipam::{Owner, PoolKey};
use hulk_kube::{ClientOptions, KubeError, NodePods, PodEvents};
use hulk_kube_standin::{Failure, Resource, StandIn, StandInConfig, Verb};
use hulk_netns::fake::FakeKernel;
use hulk_node::pods::{
    IP_ADDRESS_ANNOTATION, LivePods, NETWORK_ANNOTATION, PodDirectory, PodDirectoryError,
    QOS_POLICY_ANNOTATION, SECURITY_GROUPS_ANNOTATION, SUBNET_ANNOTATION,
};
use hulk_node::{Node, NodeError, PodRequest};
use hulk_pool::{AddressState, PoolConfig};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio_util::sync::CancellationToken;

/// The service account token the stand-in accepts.
const TOKEN: &str = "hulk-sa-token";
/// The node under test; the API also holds pods of another node.
const NODE: &str = "node-1";
/// The bound on every wait for the stand-in or the watch.
const WITHIN: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The API: the stand-in, its pods, and the agent's directory over it.

/// A pod of the `default` namespace on `node`, running.
fn pod_on(node: &str, name: &str, annotations: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("default".to_owned()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            ..PodStatus::default()
        }),
    }
}

fn pod(name: &str, annotations: &[(&str, &str)]) -> Pod {
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

    /// Writes `token` as a projected token file has it, alone.
    fn write(&self, token: &str) {
        std::fs::write(&self.0, token).unwrap();
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The stand-in, requiring [`TOKEN`], and the pods put into it as stored
/// (with the UIDs it gave them).
struct Api {
    standin: StandIn,
    token: TokenFile,
    pods: Mutex<HashMap<String, Pod>>,
}

impl Api {
    async fn start(pods: Vec<Pod>) -> Api {
        let standin = StandIn::start(StandInConfig {
            token: Some(TOKEN.to_owned()),
            ..StandInConfig::default()
        })
        .await
        .unwrap();
        let api = Api {
            standin,
            token: TokenFile::new(TOKEN),
            pods: Mutex::default(),
        };
        for pod in &pods {
            api.apply(pod);
        }
        api
    }

    fn apply(&self, pod: &Pod) {
        let stored = self.standin.apply_pod(pod).unwrap();
        let name = stored.metadata.name.clone().unwrap();
        self.pods.lock().unwrap().insert(name, stored);
    }

    fn remove(&self, name: &str) {
        assert!(self.standin.delete_pod("default", name), "{name}");
        self.pods.lock().unwrap().remove(name);
    }

    fn set_phase(&self, name: &str, phase: &str) {
        let mut pod = self.pods.lock().unwrap()[name].clone();
        pod.status = Some(PodStatus {
            phase: Some(phase.to_owned()),
            ..PodStatus::default()
        });
        self.apply(&pod);
    }

    /// The UID of pod `name`, `None` for one the API never had.
    fn uid(&self, name: &str) -> Option<String> {
        self.pods.lock().unwrap().get(name)?.metadata.uid.clone()
    }

    /// The ADD or DEL of pod `default/{name}`'s sandbox (container `name`).
    fn request(&self, name: &str) -> PodRequest {
        let mut request = support::pod(name);
        request.owner.pod_uid = self.uid(name);
        request
    }

    fn owner(&self, name: &str) -> Owner {
        self.request(name).owner
    }

    fn requests(&self, verb: Verb) -> u64 {
        self.standin.requests(verb, Resource::Pods)
    }

    /// The directory with the right token, its reflector synced.
    async fn directory(&self) -> Arc<KubePods> {
        directory(self.standin.url(), Some(&self.token.0), true).await
    }

    /// The directory with the right token, not waiting for its reflector.
    async fn unsynced(&self) -> Arc<KubePods> {
        directory(self.standin.url(), Some(&self.token.0), false).await
    }
}

/// The agent's pod directory for [`NODE`] over the API at `url`, sending
/// the token of `token_file`; with `synced`, once its reflector has listed.
async fn directory(url: String, token_file: Option<&Path>, synced: bool) -> Arc<KubePods> {
    let options = ClientOptions {
        api_server: Some(url),
        ca_file: None,
        token_file: token_file.map(Path::to_path_buf),
    };
    let client = hulk_kube::client(&options).await.unwrap();
    // Dropping the directory stops its watch.
    let pods = NodePods::start(client.clone(), NODE, CancellationToken::new());
    if synced {
        pods.wait_synced(WITHIN).await.unwrap();
    }
    let events = PodEvents::new(client, EVENT_CONTROLLER, NODE);
    Arc::new(KubePods::new(pods, events))
}

/// An API server address nothing listens on.
async fn unreachable_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// Waits (boundedly) until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < WITHIN, "not within {WITHIN:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (boundedly) until the directory's live pods pass `check`: the
/// watch has delivered a change.
async fn until_live(pods: &KubePods, what: &str, check: impl Fn(&LivePods) -> bool) {
    let start = Instant::now();
    loop {
        if let Ok(live) = pods.live_pods().await
            && check(&live)
        {
            return;
        }
        assert!(start.elapsed() < WITHIN, "not within {WITHIN:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// The node.

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

fn annotated(name: &str) -> Pod {
    pod(name, &ANNOTATIONS)
}

/// A node learning about pods from `pods`, with warm default
/// ([`support::key`]) and annotated pools, and a namespace for each of
/// `sandboxes`.
async fn node(pods: Arc<KubePods>, sandboxes: &[&str]) -> Arc<Node<FakeKernel>> {
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    for name in sandboxes {
        kernel.add_namespace(format!("/var/run/netns/{name}"));
    }
    let config = PoolConfig {
        assign_timeout: Duration::from_millis(50),
        ..PoolConfig::default()
    };
    let node = support::memory_node_with_pods(kernel, config, pods).await;
    node.pools().warm_up(&annotated_key()).await.unwrap();
    node
}

/// ADDs and returns the address.
async fn add(node: &Node<FakeKernel>, request: &PodRequest) -> IpAddr {
    node.add(request).await.unwrap().lease.address.addr()
}

/// ADDs, expecting a failure that leaves no trace: no address assigned in
/// any pool, no datapath change.
async fn add_fails(node: &Node<FakeKernel>, request: &PodRequest) -> NodeError {
    let operations = node.datapath().kernel().operations();
    let error = node.add(request).await.unwrap_err();
    assert_eq!(assignments(node), [], "{error}");
    assert_eq!(node.pools().lease_of(&request.owner), None, "{error}");
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
    let report = tokio::time::timeout(WITHIN, node.collect_dead_pods())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_pick_the_pool_and_plain_pods_get_the_default() {
    let api = Api::start(vec![
        annotated("a"),
        pod("b", &[("app", "web")]),
        annotated("c"),
        pod("net", &[(NETWORK_ANNOTATION, "vpc-2")]),
    ])
    .await;
    let node = node(api.directory().await, &["a", "b", "c", "ghost", "net"]).await;

    let a = node.add(&api.request("a")).await.unwrap().lease;
    assert_eq!(a.security_groups, ["sg-db", "sg-web"]);
    assert_eq!(a.qos_policy.as_deref(), Some("qos-bronze"));
    let b = add(&node, &api.request("b")).await;
    // The request's own pool wins over the annotations.
    let mut c_request = api.request("c");
    c_request.pool = Some(support::key());
    let c = add(&node, &c_request).await;
    // A pod the API does not know gets the default pool (and a warning).
    let ghost = add(&node, &api.request("ghost")).await;

    assert_eq!(
        assignments(&node),
        [
            ("a".into(), a.address.addr(), annotated_key()),
            ("b".into(), b, support::key()),
            ("c".into(), c, support::key()),
            ("ghost".into(), ghost, support::key()),
        ]
    );
    assert_eq!(node.pools().stats(&annotated_key()).assigned, 1);
    assert_eq!(node.pools().stats(&support::key()).assigned, 3);

    // One annotation overrides its field only. That pool is not warm: the
    // ADD waits for a refill and fails retryably; warmed, the retry gets it.
    let vpc_2 = PoolKey::new("vpc-2", "subnet-a", ["sg"], None);
    let error = node.add(&api.request("net")).await.unwrap_err();
    assert_eq!(error.to_cni().code, ErrorCode::TryAgainLater, "{error}");
    node.pools().warm_up(&vpc_2).await.unwrap();
    let net = add(&node, &api.request("net")).await;
    assert_eq!(node.pools().holder_of(net), Some((vpc_2, api.owner("net"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_ip_annotation_gets_the_pod_that_address_and_keeps_others_off_it() {
    let api = Api::start(vec![
        pod("db-0", &[(IP_ADDRESS_ANNOTATION, "10.20.0.77")]),
        pod("db-1", &[(IP_ADDRESS_ANNOTATION, "10.20.0.77")]),
        pod("odd", &[(IP_ADDRESS_ANNOTATION, "10.99.0.1")]),
    ])
    .await;
    let node = node(api.directory().await, &["db-0", "db-1", "odd"]).await;
    let fixed: IpAddr = "10.20.0.77".parse().unwrap();
    assert_eq!(add(&node, &api.request("db-0")).await, fixed);
    let taken = node.add(&api.request("db-1")).await.unwrap_err();
    assert_eq!(taken.to_cni().code, ErrorCode::TryAgainLater, "{taken}");
    assert!(taken.to_string().contains("10.20.0.77"), "{taken}");
    let outside = node.add(&api.request("odd")).await.unwrap_err();
    assert_eq!(
        outside.to_cni().code,
        ErrorCode::InvalidNetworkConfig,
        "{outside}"
    );
    // db-0 leaves; db-1 (its successor) now gets the address.
    node.del(&api.request("db-0")).await.unwrap();
    assert_eq!(add(&node, &api.request("db-1")).await, fixed);
    assert_eq!(
        node.pools().holder_of(fixed),
        Some((support::key(), api.owner("db-1")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_annotation_is_an_invalid_config_naming_it() {
    for (annotation, value) in [
        (SECURITY_GROUPS_ANNOTATION, "sg-a,,sg-b"),
        (SUBNET_ANNOTATION, "  "),
        (QOS_POLICY_ANNOTATION, ""),
        (IP_ADDRESS_ANNOTATION, "10.20.0.300"),
    ] {
        let api = Api::start(vec![pod("a", &[(annotation, value)])]).await;
        let node = node(api.directory().await, &["a"]).await;
        let cni = add_fails(&node, &api.request("a")).await.to_cni();
        assert_eq!(cni.code, ErrorCode::InvalidNetworkConfig, "{}", cni.msg);
        assert_eq!(cni.code.as_u32(), 7);
        assert!(
            cni.msg.contains(annotation) && cni.msg.contains("default/a"),
            "{annotation}: {}",
            cni.msg
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_failing_or_unreachable_at_add_is_retryable_and_leaks_nothing() {
    let api = Api::start(vec![annotated("a")]).await;
    // The reflector's first list is held (until a second list, which never
    // comes), so ADD has to ask the API for the pod.
    api.standin.barrier(Verb::List, Resource::Pods, 2);
    api.standin
        .fail_next(Verb::Get, Resource::Pods, Failure::Status(500));
    let failing = api.unsynced().await;
    let unreachable = directory(unreachable_url().await, Some(&api.token.0), false).await;
    for (pods, named) in [
        (failing.clone(), "injected failure 500"),
        (unreachable, "cannot get pod default/a"),
    ] {
        let node = node(pods, &["a"]).await;
        let error = add_fails(&node, &api.request("a")).await;
        assert!(
            matches!(error, NodeError::Pods(PodDirectoryError::Unavailable(_))),
            "{named}: {error:?}"
        );
        let cni = error.to_cni();
        assert_eq!(cni.code, ErrorCode::TryAgainLater, "{}", describe(&error));
        assert_eq!(cni.code.as_u32(), 11);
        assert!(describe(&error).contains(named), "{}", describe(&error));
    }

    // The runtime's retry succeeds once the API answers, from the right pool.
    let node = node(failing, &["a"]).await;
    let a = add(&node, &api.request("a")).await;
    assert_eq!(assignments(&node), [("a".into(), a, annotated_key())]);
}

// ---------------------------------------------------------------------------
// The API's answers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_asks_the_api_nothing_once_synced_and_one_get_for_a_pod_not_yet_watched() {
    let api = Api::start(vec![
        pod("a", &[]),
        annotated("b"),
        pod_on("node-2", "elsewhere", &[]),
    ])
    .await;
    let pods = api.directory().await;
    let live = pods.live_pods().await.unwrap();
    assert_eq!(live.len(), 2);
    assert!(live.shows("default/a", api.uid("a").as_deref()));
    assert!(live.shows("default/b", api.uid("b").as_deref()));
    assert!(!live.shows("default/elsewhere", None));
    assert!(!live.shows("default/a", Some("uid-of-an-older-a")));

    let node = node(pods, &["a", "b", "c", "ghost"]).await;
    let (gets, lists) = (api.requests(Verb::Get), api.requests(Verb::List));
    let a = add(&node, &api.request("a")).await;
    let b = add(&node, &api.request("b")).await;
    expect_pass(&node, &[], &[]).await;
    assert_eq!(
        node.pools().holder_of(a),
        Some((support::key(), api.owner("a")))
    );
    assert_eq!(
        node.pools().holder_of(b),
        Some((annotated_key(), api.owner("b")))
    );
    assert_eq!(api.requests(Verb::Get), gets, "ADD and GC read the store");

    // Hold the watch (it resumes after the close, and is held there), so
    // the store does not have c when its ADD comes: one GET finds it.
    let watches = api.requests(Verb::Watch);
    api.standin.barrier(Verb::Watch, Resource::Pods, 2);
    api.standin.close_watches();
    eventually("the watch resumes", || api.requests(Verb::Watch) > watches).await;
    api.apply(&annotated("c"));
    let c = add(&node, &api.request("c")).await;
    assert_eq!(
        node.pools().holder_of(c),
        Some((annotated_key(), api.owner("c")))
    );
    assert_eq!(api.requests(Verb::Get), gets + 1);
    // A pod the API does not know either: one GET too, and the default pool.
    let ghost = add(&node, &api.request("ghost")).await;
    assert_eq!(
        node.pools().holder_of(ghost),
        Some((support::key(), api.owner("ghost")))
    );
    assert_eq!(api.requests(Verb::Get), gets + 2);
    assert_eq!(api.requests(Verb::List), lists, "nothing lists again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_as_a_configuration_error() {
    let api = Api::start(vec![pod("a", &[])]).await;
    let wrong = TokenFile::new("not-the-token");
    for (token_file, named) in [(Some(&wrong.0), "a wrong token"), (None, "no token")] {
        let pods = directory(api.standin.url(), token_file.map(PathBuf::as_path), false).await;
        let node = node(pods, &["a"]).await;
        let error = add_fails(&node, &api.request("a")).await;
        assert!(
            matches!(error, NodeError::Pods(PodDirectoryError::Refused(_))),
            "{named}: {error:?}"
        );
        let cni = error.to_cni();
        assert_eq!(cni.code, ErrorCode::InvalidNetworkConfig, "{named}");
        assert_eq!(cni.code.as_u32(), 7);
        let described = describe(&error);
        assert!(
            described.starts_with(
                "cannot read the pods from Kubernetes: the Kubernetes API refuses the agent \
                 (check its token and RBAC): cannot get pod default/a: ApiError: Unauthorized"
            ) && described.contains("code: 401"),
            "{named}: {described}"
        );
        // The GC cannot read the pods either, and says so the same way.
        gc_refused(&node).await;
    }

    // Missing RBAC: 403 on the list (so the reflector never syncs) and on
    // the GET.
    api.standin.deny(Verb::List, Resource::Pods);
    api.standin.deny(Verb::Get, Resource::Pods);
    let pods = api.unsynced().await;
    let node = node(pods, &["a"]).await;
    let error = add_fails(&node, &api.request("a")).await;
    assert!(
        matches!(error, NodeError::Pods(PodDirectoryError::Refused(_))),
        "{error:?}"
    );
    assert_eq!(error.to_cni().code, ErrorCode::InvalidNetworkConfig);
    assert!(
        describe(&error).contains(
            "cannot get pod default/a: ApiError: pods is forbidden: User \
             \"system:serviceaccount:kube-system:hulk-vpc\" cannot get resource \"pods\""
        ),
        "{}",
        describe(&error)
    );
    gc_refused(&node).await;
}

/// Waits (boundedly) for a GC pass to fail as refused (once the watch's
/// refusal has arrived; until then it has not synced), code 7.
async fn gc_refused(node: &Node<FakeKernel>) {
    let start = Instant::now();
    loop {
        match gc_pass(node).await {
            Err(NodeError::Pods(PodDirectoryError::NotSynced)) => {}
            Err(error @ NodeError::Pods(PodDirectoryError::Refused(_))) => {
                assert_eq!(error.to_cni().code, ErrorCode::InvalidNetworkConfig);
                return;
            }
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < WITHIN, "no refusal within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_read_again_as_it_rotates() {
    let api = Api::start(vec![annotated("a")]).await;
    let rotating = TokenFile::new("expired");
    let pods = directory(api.standin.url(), Some(&rotating.0), false).await;
    let node = node(pods.clone(), &["a"]).await;
    let refused = add_fails(&node, &api.request("a")).await;
    assert_eq!(refused.to_cni().code, ErrorCode::InvalidNetworkConfig);

    rotating.write(TOKEN);
    // kube-rs keeps a token file's token for 50 s (a minute, renewed ten
    // seconds early), then reads the file again.
    let rotated = Instant::now();
    loop {
        match pods.pod("default/a").await {
            Ok(Some(found)) => {
                assert_eq!(found.uid, api.uid("a"));
                break;
            }
            Err(PodDirectoryError::Refused(_)) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            rotated.elapsed() < Duration::from_secs(75),
            "the rotated token is not read"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let a = add(&node, &api.request("a")).await;
    assert_eq!(assignments(&node), [("a".into(), a, annotated_key())]);
    assert!(pods.pod("default/nobody").await.unwrap().is_none());

    // A token file with a newline (which kube-rs would send verbatim, an
    // invalid header) or missing at start is a configuration error naming
    // the file.
    let path = rotating.0.clone();
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    let newline = client_error(&api, &path).await;
    assert!(
        matches!(newline, KubeError::TokenFileWhitespace { .. }),
        "{newline:?}"
    );
    drop(rotating);
    let missing = client_error(&api, &path).await;
    for error in [newline, missing] {
        assert!(error.is_configuration(), "{error:?}");
        assert!(
            describe(&error).contains(&path.display().to_string()),
            "{}",
            describe(&error)
        );
    }
}

/// Why no client for the stand-in with this token file can be made.
async fn client_error(api: &Api, token_file: &Path) -> KubeError {
    let options = ClientOptions {
        api_server: Some(api.standin.url()),
        ca_file: None,
        token_file: Some(token_file.to_path_buf()),
    };
    match hulk_kube::client(&options).await {
        Ok(_) => panic!("a client with token file {}", token_file.display()),
        Err(error) => error,
    }
}

// ---------------------------------------------------------------------------
// The periodic GC.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gone_from_the_api_is_released_on_the_second_pass_only() {
    let api = Api::start(vec![pod("a", &[]), annotated("b"), pod("c", &[])]).await;
    let pods = api.directory().await;
    let node = node(pods.clone(), &["a", "b", "c"]).await;
    let (a, b, c) = (
        add(&node, &api.request("a")).await,
        add(&node, &api.request("b")).await,
        add(&node, &api.request("c")).await,
    );
    expect_pass(&node, &[], &[]).await;

    api.remove("b");
    until_live(&pods, "b's deletion", |live| !live.shows("default/b", None)).await;
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
            ("a".into(), a, support::key()),
            ("c".into(), c, support::key()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_recreated_under_its_name_does_not_keep_the_old_sandbox_address() {
    let api = Api::start(vec![pod("a", &[]), pod("b", &[])]).await;
    let pods = api.directory().await;
    let node = node(pods.clone(), &["a", "b"]).await;
    add(&node, &api.request("a")).await;
    let b = add(&node, &api.request("b")).await;
    // a's node crashed its sandbox away without a DEL; a StatefulSet
    // recreated a pod under the same name (a new UID), which has not
    // started here yet.
    let old_uid = api.uid("a");
    api.remove("a");
    api.apply(&pod("a", &[]));
    let new_uid = api.uid("a");
    assert_ne!(new_uid, old_uid);
    until_live(&pods, "the recreated a", |live| {
        live.shows("default/a", new_uid.as_deref())
    })
    .await;
    expect_pass(&node, &[], &["a"]).await;
    expect_pass(&node, &["a"], &[]).await;
    assert_eq!(assignments(&node), [("b".into(), b, support::key())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_pods_count_as_dead() {
    let api = Api::start(vec![pod("a", &[]), pod("b", &[]), pod("c", &[])]).await;
    let pods = api.directory().await;
    let node = node(pods.clone(), &["a", "b", "c"]).await;
    let a = add(&node, &api.request("a")).await;
    add(&node, &api.request("b")).await;
    add(&node, &api.request("c")).await;
    api.set_phase("a", "Pending");
    api.set_phase("b", "Succeeded");
    api.set_phase("c", "Failed");
    // Finished pods leave the watch (its field selector excludes them).
    until_live(&pods, "b and c finishing", |live| live.len() == 1).await;
    expect_pass(&node, &[], &["b", "c"]).await;
    expect_pass(&node, &["b", "c"], &[]).await;
    assert_eq!(assignments(&node), [("a".into(), a, support::key())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_api_releases_nothing() {
    let api = Api::start(vec![pod("a", &[]), pod("b", &[])]).await;
    // The reflector's first list fails, and its retry is held: the node
    // runs before the pods were ever listed.
    api.standin
        .fail_next(Verb::List, Resource::Pods, Failure::Status(500));
    api.standin.barrier(Verb::List, Resource::Pods, 2);
    let pods = api.unsynced().await;
    let node = node(pods.clone(), &["a", "b", "c"]).await;
    let a = add(&node, &api.request("a")).await;
    let b = add(&node, &api.request("b")).await;
    let everything = assignments(&node);
    api.remove("b");
    eventually("the list fails and is retried", || {
        api.requests(Verb::List) >= 2
    })
    .await;
    // An empty store is no evidence: twice failing releases nothing...
    for _ in 0..2 {
        let error = gc_pass(&node).await.unwrap_err();
        assert!(
            matches!(error, NodeError::Pods(PodDirectoryError::NotSynced)),
            "{error:?}"
        );
        assert_eq!(error.to_cni().code, ErrorCode::TryAgainLater);
        assert_eq!(assignments(&node), everything);
    }
    // ...nor counts as a pass: once listed (another list lets the held one
    // go), the first pass only suspects b.
    let other = api.directory().await;
    until_live(&pods, "the first list", |live| live.len() == 1).await;
    expect_pass(&node, &[], &["b"]).await;
    // Its watch would meet the barrier below: it goes once it is open.
    eventually("both watches open", || api.requests(Verb::Watch) >= 2).await;
    drop(other);

    // The watch fails (403, then its retry is held) while c is created and
    // ADDed (by a GET): a store the watch no longer updates does not show
    // c, and must not have it released.
    let watches = api.requests(Verb::Watch);
    api.standin
        .fail_next(Verb::Watch, Resource::Pods, Failure::Status(403));
    api.standin.barrier(Verb::Watch, Resource::Pods, 2);
    api.standin.close_watches();
    eventually("the watch fails and is retried", || {
        api.requests(Verb::Watch) >= watches + 2
    })
    .await;
    api.apply(&pod("c", &[]));
    let c = add(&node, &api.request("c")).await;
    let held = assignments(&node);
    assert_eq!(held.len(), 3);
    for _ in 0..2 {
        let error = gc_pass(&node).await.unwrap_err();
        assert!(
            matches!(error, NodeError::Pods(PodDirectoryError::Refused(_))),
            "{error:?}"
        );
        assert_eq!(assignments(&node), held);
    }
    // The watch resumes (another watch lets the held one go) and delivers
    // c: b goes on this second counted pass, c stays.
    let _another = api.directory().await;
    until_live(&pods, "c", |live| {
        live.shows("default/c", api.uid("c").as_deref())
    })
    .await;
    expect_pass(&node, &["b"], &[]).await;
    assert_eq!(
        assignments(&node),
        [
            ("a".into(), a, support::key()),
            ("c".into(), c, support::key()),
        ]
    );
    assert!(matches!(state_of(&node, b), AddressState::Cooldown { .. }));
}

#[tokio::test]
async fn an_add_that_waits_for_the_cloud_and_fails_is_told_on_the_pod() {
    let api = Api::start(vec![pod("a", &[]), pod("b", &[])]).await;
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    for name in ["a", "b"] {
        kernel.add_namespace(format!("/var/run/netns/{name}"));
    }
    // A /30: its first host is the gateway, so one address for pods.
    let pools = hulk_pool::PoolManager::open(
        Arc::new(hulk_ipam::MemoryBackend::new(
            "10.30.0.0/30".parse().unwrap(),
        )),
        Arc::new(hulk_pool::MemoryStore::default()),
        Arc::new(hulk_pool::SystemClock),
        NODE,
        PoolConfig {
            assign_timeout: Duration::from_millis(200),
            ..PoolConfig::default()
        },
    )
    .await
    .unwrap();
    // Narrowing batches after "exhausted", the warm-up ends with the one
    // address (and reports the exhaustion).
    let _ = pools.warm_up(&support::key()).await;
    assert_eq!(pools.stats(&support::key()).idle, 1);
    let node = Node::new(
        pools,
        hulk_netns::Datapath::new(kernel),
        support::network(),
        support::key(),
    )
    .with_pods(api.directory().await);
    node.restore().await.unwrap();

    add(&node, &api.request("a")).await;
    let error = node.add(&api.request("b")).await.unwrap_err();
    let code = error.to_cni().code;
    assert!(
        [
            hulk_agent_api::codes::ADDRESS_EXHAUSTED,
            ErrorCode::TryAgainLater
        ]
        .contains(&code),
        "{error}"
    );
    // Recorded in the background: the ADD does not wait for it.
    let reasons = || -> Vec<(String, String, String)> {
        api.standin
            .events("default")
            .unwrap()
            .into_iter()
            .map(|event| {
                let regarding = event.regarding.unwrap_or_default();
                (
                    regarding.name.unwrap_or_default(),
                    event.reason.unwrap_or_default(),
                    event.type_.unwrap_or_default(),
                )
            })
            .collect()
    };
    eventually("the waiting and the failure are told on pod b", || {
        let told = reasons();
        told.iter()
            .any(|(pod, reason, kind)| pod == "b" && reason == "AddressWaiting" && kind == "Normal")
            && told.iter().any(|(pod, reason, kind)| {
                pod == "b"
                    && ["AddressExhausted", "CloudUnavailable"].contains(&reason.as_str())
                    && kind == "Warning"
            })
    })
    .await;
    let told = reasons();
    assert!(
        told.iter().all(|(pod, _, _)| pod == "b"),
        "pod a's ADD found an idle address and is told nothing: {told:?}"
    );
}
