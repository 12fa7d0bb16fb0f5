//! hulk-controller against the Kubernetes API stand-in and an UltrON-style
//! IPAM service (the reference server over a mock) on loopback: deleted
//! nodes, gone holders, the cluster teardown, a simulated cluster of 100
//! nodes whose leader dies mid-sweep, and the release figures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hulk_controller::{
    Controller, ControllerConfig, ControllerMetrics, Force, GoneMemory, LEADER_LEASE, Outcome,
    Reason, ReleaseSettings, TeardownError, teardown,
};
use hulk_ipam::{
    AllocationRequest, FaultPlan, Faulty, IpamBackend, Lease, ListScope, MemoryBackend, PoolKey,
};
use hulk_kube::{ClientOptions, ClusterNodes, LeaseConfig};
use hulk_kube_standin::{Resource, StandIn, StandInConfig, Verb};
use hulk_openstack::ultron::UltronBackend;
use hulk_openstack::{HttpClient, HttpSettings};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "ultron-token";
const CLUSTER: &str = "prod";
const OTHER_CLUSTER: &str = "other";
const LEASE_NAMESPACE: &str = "hulk-system";

async fn standin() -> StandIn {
    match StandIn::start(StandInConfig::default()).await {
        Ok(standin) => standin,
        Err(error) => panic!("stand-in does not start: {error}"),
    }
}

async fn kube_client(standin: &StandIn) -> kube::Client {
    let options = ClientOptions {
        api_server: Some(standin.url()),
        ca_file: None,
        token_file: None,
    };
    match hulk_kube::client(&options).await {
        Ok(client) => client,
        Err(error) => panic!("no Kubernetes client: {error:?}"),
    }
}

/// A Node whose `Ready` condition is `ready` (`True`, `False`, `Unknown`).
fn node(name: &str, ready: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".to_owned(),
                status: ready.to_owned(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
    }
}

fn apply_node(standin: &StandIn, name: &str, ready: &str) {
    if let Err(error) = standin.apply_node(&node(name, ready)) {
        panic!("stand-in refuses node {name}: {error}");
    }
}

/// The UltrON-style service on loopback, serving one /16 from memory with
/// `latency` added to each of its backend calls.
struct Ultron {
    url: String,
    server: JoinHandle<()>,
}

impl Drop for Ultron {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Ultron {
    async fn start(latency: Duration) -> Self {
        let memory = MemoryBackend::new(
            "10.0.0.0/16"
                .parse()
                .unwrap_or_else(|error| panic!("{error}")),
        );
        let backend = Faulty::new(memory, FaultPlan::fixed_latency(latency));
        let app = hulk_openstack::ultron::server::router(Arc::new(backend), TOKEN);
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", 0)).await {
            Ok(listener) => listener,
            Err(error) => panic!("cannot listen: {error}"),
        };
        let address = match listener.local_addr() {
            Ok(address) => address,
            Err(error) => panic!("no address: {error}"),
        };
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{address}"),
            server,
        }
    }

    /// A client of `cluster`, listing 1000 addresses a page.
    fn client(&self, cluster: &str) -> UltronBackend {
        let http = match HttpClient::new(&HttpSettings::default()) {
            Ok(http) => http,
            Err(error) => panic!("no HTTP client: {error}"),
        };
        UltronBackend::new(http, self.url.clone(), TOKEN, cluster).with_page_size(1000)
    }
}

fn key() -> PoolKey {
    PoolKey::new("net", "subnet", ["sg"], None)
}

/// Allocates `count` addresses for `node` through `backend`, in calls of
/// at most 256 (the contract's most).
async fn allocate(backend: &dyn IpamBackend, node: &str, count: usize) -> Vec<Lease> {
    let mut leases = Vec::with_capacity(count);
    while leases.len() < count {
        let batch = (count - leases.len()).min(256);
        match backend
            .allocate(&AllocationRequest::new(key(), node, batch))
            .await
        {
            Ok(more) => leases.extend(more),
            Err(error) => panic!("allocation for {node} fails: {error}"),
        }
    }
    leases
}

async fn list(backend: &dyn IpamBackend) -> Vec<Lease> {
    match backend.list(&ListScope::Cluster).await {
        Ok(leases) => leases,
        Err(error) => panic!("list fails: {error}"),
    }
}

/// Lease ids by node.
fn by_node(leases: &[Lease]) -> BTreeMap<String, Vec<String>> {
    let mut nodes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for lease in leases {
        nodes
            .entry(lease.node.clone())
            .or_default()
            .push(lease.id.clone());
    }
    for ids in nodes.values_mut() {
        ids.sort();
    }
    nodes
}

/// Polls `check` every 50 ms until it holds or `within` passes.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

fn config(grace_period_seconds: u64, release: ReleaseSettings) -> ControllerConfig {
    ControllerConfig {
        grace_period_seconds,
        pass_interval_seconds: 1,
        release,
    }
}

fn fast() -> ReleaseSettings {
    ReleaseSettings {
        releases_per_second: 1000.0,
        concurrency: 8,
        batch_size: 10,
    }
}

/// The leader lease of replica `holder`, expiring 2 s after its last
/// renewal.
fn leader(holder: &str) -> LeaseConfig {
    LeaseConfig::for_leader(LEADER_LEASE, holder)
        .in_namespace(LEASE_NAMESPACE)
        .with_duration_seconds(2)
}

/// A running controller replica.
struct Replica {
    metrics: ControllerMetrics,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Replica {
    fn start(controller: Controller) -> Self {
        let metrics = controller.metrics().clone();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { controller.run(token).await });
        Self {
            metrics,
            shutdown,
            task,
        }
    }

    fn released(&self, reason: Reason) -> u64 {
        self.metrics.releases_of(Outcome::Released, reason)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        if let Err(error) = tokio::time::timeout(Duration::from_secs(10), self.task).await {
            panic!("the controller does not stop: {error}");
        }
    }
}

fn lease_holder(standin: &StandIn) -> Option<String> {
    match standin.lease(LEASE_NAMESPACE, LEADER_LEASE) {
        Ok(lease) => lease.and_then(|lease| lease.spec?.holder_identity),
        Err(error) => panic!("cannot read the leader lease: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_nodes_lose_their_addresses_and_nobody_else_does() {
    let standin = standin().await;
    let ultron = Ultron::start(Duration::ZERO).await;
    let prod: Arc<dyn IpamBackend> = Arc::new(ultron.client(CLUSTER));
    let other = ultron.client(OTHER_CLUSTER);
    for (name, ready) in [
        ("ready-1", "True"),
        ("notready-1", "False"),
        ("unknown-1", "Unknown"),
        ("deleted-1", "True"),
    ] {
        apply_node(&standin, name, ready);
    }
    for name in [
        "ready-1",
        "notready-1",
        "unknown-1",
        "deleted-1",
        "never-listed",
    ] {
        allocate(prod.as_ref(), name, 5).await;
    }
    // Another cluster's addresses on a node of the same name.
    allocate(&other, "deleted-1", 5).await;
    let others = list(&other).await;
    assert_eq!(others.len(), 5);
    let before = by_node(&list(prod.as_ref()).await);
    assert!(standin.delete_node("deleted-1"));

    let replica = Replica::start(Controller::new(
        prod.clone(),
        kube_client(&standin).await,
        config(0, fast()),
        leader("replica-a"),
    ));
    let mut remaining = BTreeMap::new();
    for _ in 0..200 {
        remaining = by_node(&list(prod.as_ref()).await);
        if remaining.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept: BTreeMap<String, Vec<String>> = before
        .into_iter()
        .filter(|(node, _)| ["ready-1", "notready-1", "unknown-1"].contains(&node.as_str()))
        .collect();
    assert_eq!(
        remaining, kept,
        "only the listed nodes keep their addresses"
    );
    assert_eq!(
        list(&other).await,
        others,
        "another cluster's addresses are untouched"
    );
    assert_eq!(replica.released(Reason::NodeGone), 10);
    assert_eq!(replica.metrics.leader.get(), 1);
    assert_eq!(lease_holder(&standin).as_deref(), Some("replica-a"));

    // Passes go on and find nothing more to do.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(by_node(&list(prod.as_ref()).await), kept);
    assert_eq!(replica.released(Reason::NodeGone), 10);
    assert_eq!(replica.metrics.missing_nodes.get(), 0);

    replica.stop().await;
    assert_eq!(
        lease_holder(&standin),
        None,
        "the lease is given up at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_gone_everywhere_go_before_the_grace_period() {
    let standin = standin().await;
    let ultron = Ultron::start(Duration::ZERO).await;
    let prod: Arc<dyn IpamBackend> = Arc::new(ultron.client(CLUSTER));
    apply_node(&standin, "ready-1", "True");
    let alive = match standin.apply_pod(&k8s_openapi::api::core::v1::Pod {
        metadata: ObjectMeta {
            name: Some("alive".to_owned()),
            namespace: Some("default".to_owned()),
            ..ObjectMeta::default()
        },
        ..k8s_openapi::api::core::v1::Pod::default()
    }) {
        Ok(pod) => pod.metadata.uid.unwrap_or_default(),
        Err(error) => panic!("stand-in refuses the pod: {error}"),
    };
    assert!(!alive.is_empty());
    let on_ready = allocate(prod.as_ref(), "ready-1", 1).await;
    let leases = allocate(prod.as_ref(), "gone-1", 3).await;
    let mark = |id: &str, uid: &str| {
        let prod = prod.clone();
        let (id, uid) = (id.to_owned(), uid.to_owned());
        async move {
            let owner = hulk_ipam::Owner {
                pod: Some(format!("default/{uid}")),
                pod_uid: Some(uid),
                ..hulk_ipam::Owner::new(format!("sandbox-{id}"), "eth0")
            };
            if let Err(error) = prod.update_owner(&id, Some(owner), None).await {
                panic!("cannot mark {id}: {error}");
            }
        }
    };
    // Held by a pod that exists, by one that exists nowhere, by nobody; and
    // on a listed node, by a pod that exists nowhere.
    mark(&leases[0].id, &alive).await;
    mark(&leases[1].id, "deleted-pod-uid").await;
    mark(&on_ready[0].id, "deleted-pod-uid").await;

    let replica = Replica::start(Controller::new(
        prod.clone(),
        kube_client(&standin).await,
        config(3600, fast()),
        leader("replica-a"),
    ));
    let ids = || async {
        list(prod.as_ref())
            .await
            .into_iter()
            .map(|lease| lease.id)
            .collect::<Vec<_>>()
    };
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = ids().await;
        if !listed.contains(&leases[1].id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !listed.contains(&leases[1].id),
        "the gone holder's address stays"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let listed = ids().await;
    assert!(listed.contains(&leases[0].id), "a live pod's address went");
    assert!(
        listed.contains(&leases[2].id),
        "an unmarked address went before the grace"
    );
    assert!(
        listed.contains(&on_ready[0].id),
        "a listed node's address went"
    );
    assert_eq!(replica.released(Reason::HolderGone), 1);
    assert_eq!(replica.released(Reason::NodeGone), 0);

    // The pod goes: its address follows.
    assert!(standin.delete_pod("default", "alive"));
    let gone = eventually(Duration::from_secs(10), || {
        replica.released(Reason::HolderGone) == 2
    })
    .await;
    assert!(gone, "the address of a deleted pod stays");
    let listed = ids().await;
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&leases[2].id) && listed.contains(&on_ready[0].id));
    replica.stop().await;
}

/// While the Node watch fails, the controller judges nobody: a node added
/// meanwhile (which the stale cache would miss) keeps its addresses, and so
/// does a node the API really lacks, until the watch works again; then only
/// the latter loses its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_node_watch_judges_nobody_until_it_recovers() {
    let standin = standin().await;
    let ultron = Ultron::start(Duration::ZERO).await;
    let prod: Arc<dyn IpamBackend> = Arc::new(ultron.client(CLUSTER));
    apply_node(&standin, "old-1", "True");
    allocate(prod.as_ref(), "old-1", 2).await;
    let replica = Replica::start(Controller::new(
        prod.clone(),
        kube_client(&standin).await,
        config(0, fast()),
        leader("replica-a"),
    ));
    let ok_passes = || {
        replica
            .metrics
            .passes
            .get_or_create(&hulk_controller::PassLabels {
                result: "ok".to_owned(),
            })
            .get()
    };
    assert!(eventually(Duration::from_secs(20), || ok_passes() >= 1).await);
    standin.deny(Verb::Watch, Resource::Nodes);
    standin.deny(Verb::List, Resource::Nodes);
    standin.close_watches();
    apply_node(&standin, "new-1", "True");
    let added = allocate(prod.as_ref(), "new-1", 3).await;
    allocate(prod.as_ref(), "never-listed", 2).await;
    let mut ids: Vec<String> = added.into_iter().map(|lease| lease.id).collect();
    ids.sort();
    // Four passes' worth of a failing watch (1 s passes, no grace).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let remaining = by_node(&list(prod.as_ref()).await);
    assert_eq!(
        remaining.get("new-1"),
        Some(&ids),
        "judged from a stale cache"
    );
    assert_eq!(
        remaining.get("never-listed").map(Vec::len),
        Some(2),
        "judged while the watch fails"
    );
    assert_eq!(replica.released(Reason::NodeGone), 0);

    standin.allow(Verb::Watch, Resource::Nodes);
    standin.allow(Verb::List, Resource::Nodes);
    assert!(
        eventually(Duration::from_secs(20), || {
            replica.released(Reason::NodeGone) == 2
        })
        .await,
        "the node the API lacks kept its addresses after the watch recovered"
    );
    let remaining = by_node(&list(prod.as_ref()).await);
    assert_eq!(
        remaining.get("new-1"),
        Some(&ids),
        "the new node lost addresses"
    );
    assert_eq!(remaining.get("old-1").map(Vec::len), Some(2));
    assert_eq!(remaining.get("never-listed"), None);
    replica.stop().await;
}

/// Captures what tracing writes, for the audit lines.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

// One thread: the subscriber set for this test sees every task.
#[tokio::test]
async fn teardown_refuses_while_nodes_are_listed_and_runs_again_until_none_remain() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("hulk_audit=info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let ultron = Ultron::start(Duration::ZERO).await;
    let other = ultron.client(OTHER_CLUSTER);
    allocate(&other, "n1", 4).await;
    let others = list(&other).await;
    // Calls through this client: 1 list, then releases one at a time; the
    // 3rd and 5th calls (two releases) fail.
    let plan = FaultPlan {
        on_call: [3, 5]
            .into_iter()
            .map(|call| {
                (
                    call,
                    hulk_ipam::Fault::Error(hulk_ipam::IpamError::Transient("injected".into())),
                )
            })
            .collect(),
        ..FaultPlan::default()
    };
    let prod = Faulty::new(ultron.client(CLUSTER), plan);
    for node in ["n1", "n2", "n3"] {
        allocate(prod.inner(), node, 4).await;
    }
    let before = list(prod.inner()).await;
    assert_eq!(before.len(), 12);
    let one_at_a_time = ReleaseSettings {
        releases_per_second: 1000.0,
        concurrency: 1,
        batch_size: 5,
    };
    let stop = CancellationToken::new();

    let refused = teardown(&prod, 3, Force::No, &one_at_a_time, &stop).await;
    assert!(
        matches!(refused, Err(TeardownError::NodesListed { nodes: 3 })),
        "{refused:?}"
    );
    assert_eq!(prod.calls(), 0, "a refused teardown touches nothing");

    let first = match teardown(&prod, 3, Force::Yes, &one_at_a_time, &stop).await {
        Ok(report) => report,
        Err(error) => panic!("teardown fails: {error}"),
    };
    assert_eq!(first.listed, 12);
    assert_eq!(first.tally.released, 10);
    assert_eq!(first.tally.failed, 2);
    assert_eq!(first.remaining, 2);

    let second = match teardown(&prod, 0, Force::No, &one_at_a_time, &stop).await {
        Ok(report) => report,
        Err(error) => panic!("teardown fails: {error}"),
    };
    assert_eq!(
        (second.listed, second.tally.released, second.remaining),
        (2, 2, 0)
    );
    let third = match teardown(&prod, 0, Force::No, &one_at_a_time, &stop).await {
        Ok(report) => report,
        Err(error) => panic!("teardown fails: {error}"),
    };
    assert_eq!(
        (third.listed, third.tally.released, third.remaining),
        (0, 0, 0)
    );
    assert_eq!(
        list(&other).await,
        others,
        "another cluster's addresses are untouched"
    );

    // One audit line per returned address, naming it.
    let lines = captured.lines();
    let audited: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("address returned to the cloud"))
        .collect();
    assert_eq!(audited.len(), 12);
    for lease in &before {
        let line = audited
            .iter()
            .find(|line| line.contains(&format!("lease={} ", lease.id)));
        assert!(
            line.is_some_and(
                |line| line.contains(&format!("address={}", lease.address.addr()))
                    && line.contains(&format!("node={}", lease.node))
                    && line.contains("reason=teardown")
            ),
            "no audit line for {}: {lines:#?}",
            lease.id
        );
    }
}

#[tokio::test]
async fn not_found_counts_as_already_gone_and_remaining_comes_from_a_new_list() {
    let memory = MemoryBackend::new(
        "10.0.0.0/24"
            .parse()
            .unwrap_or_else(|error| panic!("{error}")),
    );
    allocate(&memory, "n1", 3).await;
    // Call 1 is the list; the first release answers NotFound (released
    // meanwhile by someone else, as the backend says) while the mock keeps
    // the address: the report's remaining comes from the second list.
    let plan = FaultPlan {
        on_call: [(
            2,
            hulk_ipam::Fault::Error(hulk_ipam::IpamError::NotFound("gone".into())),
        )]
        .into(),
        ..FaultPlan::default()
    };
    let backend = Faulty::new(memory, plan);
    let one_at_a_time = ReleaseSettings {
        concurrency: 1,
        ..fast()
    };
    let stop = CancellationToken::new();
    let report = teardown(&backend, 0, Force::No, &one_at_a_time, &stop).await;
    let report = report.unwrap_or_else(|error| panic!("teardown fails: {error}"));
    assert_eq!(report.listed, 3);
    assert_eq!(
        (
            report.tally.released,
            report.tally.already_gone,
            report.tally.failed
        ),
        (2, 1, 0)
    );
    assert_eq!(report.remaining, 1);

    // A stopped teardown attempts nothing.
    allocate(backend.inner(), "n1", 1).await;
    stop.cancel();
    let report = teardown(&backend, 0, Force::No, &fast(), &stop).await;
    let report = report.unwrap_or_else(|error| panic!("teardown fails: {error}"));
    assert_eq!(
        (report.listed, report.tally.skipped, report.remaining),
        (2, 2, 2)
    );
}

/// 100 nodes with 100 addresses each (10,000 in the UltrON-style service,
/// plus 300 of another cluster), 10 nodes deleted, the leader killed
/// mid-sweep: the second replica takes the lease once it expires and
/// finishes. Every address of the 10 deleted nodes goes back, nobody
/// else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_finishes_the_sweep_of_a_killed_one() {
    let started = Instant::now();
    let standin = standin().await;
    let ultron = Ultron::start(Duration::from_millis(1)).await;
    let prod: Arc<dyn IpamBackend> = Arc::new(ultron.client(CLUSTER));
    let other = ultron.client(OTHER_CLUSTER);
    let names: Vec<String> = (0..100).map(|index| format!("node-{index:03}")).collect();
    for name in &names {
        apply_node(&standin, name, "True");
        allocate(prod.as_ref(), name, 100).await;
    }
    for name in &names[..3] {
        allocate(&other, name, 100).await;
    }
    let before = by_node(&list(prod.as_ref()).await);
    let others = list(&other).await;
    assert_eq!(before.values().map(Vec::len).sum::<usize>(), 10_000);
    let deleted: Vec<&String> = names.iter().step_by(10).collect();
    assert_eq!(deleted.len(), 10);
    // Paced so that the sweep of 1,000 addresses takes a few seconds.
    let paced = ReleaseSettings {
        releases_per_second: 250.0,
        concurrency: 8,
        batch_size: 50,
    };

    let first = Replica::start(Controller::new(
        prod.clone(),
        kube_client(&standin).await,
        config(0, paced.clone()),
        leader("replica-a"),
    ));
    let second = Replica::start(Controller::new(
        prod.clone(),
        kube_client(&standin).await,
        config(0, paced.clone()),
        leader("replica-b"),
    ));
    let passes = |replica: &Replica| {
        replica
            .metrics
            .passes
            .get_or_create(&hulk_controller::PassLabels {
                result: "ok".to_owned(),
            })
            .get()
    };
    assert!(
        eventually(Duration::from_secs(20), || passes(&first) >= 1).await,
        "the first replica does not lead"
    );
    assert_eq!(second.metrics.leader.get(), 0, "two leaders");
    for name in &deleted {
        assert!(standin.delete_node(name));
    }
    // Killed mid-sweep: no shutdown, no lease given up.
    assert!(
        eventually(Duration::from_secs(30), || first.released(Reason::NodeGone)
            >= 200)
        .await,
        "the first replica does not sweep"
    );
    first.task.abort();
    let by_first = first.released(Reason::NodeGone);
    assert!(
        by_first < 1000,
        "the sweep finished before the kill ({by_first})"
    );
    assert_eq!(lease_holder(&standin).as_deref(), Some("replica-a"));

    let mut remaining = BTreeMap::new();
    for _ in 0..300 {
        remaining = by_node(&list(prod.as_ref()).await);
        if remaining.len() == 90 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept: BTreeMap<String, Vec<String>> = before
        .into_iter()
        .filter(|(node, _)| !deleted.contains(&node))
        .collect();
    assert_eq!(remaining.len(), 90, "the deleted nodes' addresses stay");
    assert_eq!(remaining, kept, "addresses of listed nodes went");
    assert_eq!(
        list(&other).await,
        others,
        "another cluster's addresses went"
    );
    assert_eq!(lease_holder(&standin).as_deref(), Some("replica-b"));
    let by_second = second.released(Reason::NodeGone);
    assert!(by_second > 0, "the second replica did nothing");
    // A call cut off by the kill may have been done by the service without
    // the first replica counting it.
    let counted = by_first + by_second;
    assert!(
        (1000 - 8..=1000).contains(&counted),
        "{by_first} + {by_second} released"
    );
    assert_eq!(
        second
            .metrics
            .releases_of(Outcome::Failed, Reason::NodeGone),
        0
    );
    second.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// The figures of docs/operations.md: with the default release settings
/// and every backend call taking 1.5 s, the pass that returns a deleted
/// node's 100 addresses, and a teardown of 200 addresses, timed and their
/// backend calls counted; a 10,000-address teardown is extrapolated from
/// the measured time per release. Run with
/// `cargo nextest run -p hulk-controller --run-ignored only --no-capture figures`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about 40 s: the release figures of docs/operations.md"]
async fn figures_at_one_and_a_half_seconds_a_call() {
    const CALL: Duration = Duration::from_millis(1500);
    let settings = ReleaseSettings::default();
    let standin = standin().await;
    let memory = MemoryBackend::new(
        "10.0.0.0/16"
            .parse()
            .unwrap_or_else(|error| panic!("{error}")),
    );
    for node in ["node-a", "node-b"] {
        allocate(&memory, node, 100).await;
        apply_node(&standin, node, "True");
    }
    let backend = Arc::new(Faulty::new(memory, FaultPlan::fixed_latency(CALL)));
    let client = kube_client(&standin).await;
    let controller = Controller::new(
        backend.clone(),
        client.clone(),
        config(0, settings.clone()),
        leader("figures"),
    );
    let stop = CancellationToken::new();
    let nodes = ClusterNodes::start(client, stop.child_token());
    assert!(standin.delete_node("node-b"));
    let mut memory = GoneMemory::default();
    // The first pass that misses the node only remembers it.
    let first = controller.pass(&nodes, &mut memory, &stop).await;
    let first = first.unwrap_or_else(|error| panic!("pass fails: {error}"));
    assert_eq!((first.missing_nodes, first.tally.released), (1, 0));

    let calls = backend.calls();
    let clock = Instant::now();
    let second = controller.pass(&nodes, &mut memory, &stop).await;
    let node_time = clock.elapsed();
    let node_calls = backend.calls() - calls;
    let second = second.unwrap_or_else(|error| panic!("pass fails: {error}"));
    assert_eq!(second.tally.released, 100);
    assert_eq!(node_calls, 101);

    allocate(backend.inner(), "node-c", 100).await;
    let calls = backend.calls();
    let clock = Instant::now();
    let report = teardown(backend.as_ref(), 0, Force::Yes, &settings, &stop).await;
    let teardown_time = clock.elapsed();
    let teardown_calls = backend.calls() - calls;
    let report = report.unwrap_or_else(|error| panic!("teardown fails: {error}"));
    assert_eq!((report.tally.released, report.remaining), (200, 0));
    assert_eq!(teardown_calls, 202);
    // Two lists, the releases started one spacing apart, and the last
    // release's own call: the spacing measured scales to 10,000.
    let spacing = teardown_time.saturating_sub(3 * CALL) / 199;
    let ten_thousand = 3 * CALL + spacing * 9_999;
    println!(
        "settings: {} releases/s, {} in flight, batches of {}; 1.5 s a backend call",
        settings.releases_per_second, settings.concurrency, settings.batch_size
    );
    println!(
        "deleted node, 100 addresses: the pass that returns them took {node_time:.1?} with {node_calls} backend calls (1 list + 100 releases)"
    );
    println!(
        "teardown of 200 addresses: {teardown_time:.1?}, {teardown_calls} backend calls (2 lists + 200 releases), releases started {spacing:.1?} apart"
    );
    println!(
        "teardown of 10,000 addresses (extrapolated): {ten_thousand:.0?}, 10,002 backend calls"
    );
}
