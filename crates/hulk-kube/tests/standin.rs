//! hulk-kube against the Kubernetes API stand-in.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hulk_kube::{
    ClientOptions, ClusterNodes, IdentityLease, KubeError, LeaseConfig, LeaseLoss, NodePods,
    PodEvent, PodEvents, PodMeta,
};
use hulk_kube_standin::{Failure, Resource, StandIn, StandInConfig, Verb, pod_on};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use tokio_util::sync::CancellationToken;

const NODE: &str = "node-1";
const SYNC: Duration = Duration::from_secs(5);

async fn standin(config: StandInConfig) -> StandIn {
    match StandIn::start(config).await {
        Ok(standin) => standin,
        Err(error) => panic!("stand-in does not start: {error}"),
    }
}

/// A token file unique to this test process and call.
fn token_file(token: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "hulk-kube-test-token-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if let Err(error) = std::fs::write(&path, token) {
        panic!("cannot write {}: {error}", path.display());
    }
    path
}

async fn client_with(standin: &StandIn, token: Option<&str>) -> kube::Client {
    let options = ClientOptions {
        api_server: Some(standin.url()),
        ca_file: None,
        token_file: token.map(token_file),
    };
    match hulk_kube::client(&options).await {
        Ok(client) => client,
        Err(error) => panic!("no client: {error:?}"),
    }
}

async fn client(standin: &StandIn) -> kube::Client {
    client_with(standin, None).await
}

/// A pod of `hulk_kube_standin::pod_on` with an annotation to find again.
fn pod(name: &str, node: &str, phase: &str) -> Pod {
    let mut pod = pod_on(name, node, phase);
    pod.metadata.annotations = Some([("hulk-vpc/subnet".to_owned(), "blue".to_owned())].into());
    pod
}

fn apply_pod(standin: &StandIn, pod: &Pod) -> Pod {
    match standin.apply_pod(pod) {
        Ok(pod) => pod,
        Err(error) => panic!("stand-in refuses the pod: {error}"),
    }
}

fn names(pods: &NodePods) -> BTreeSet<String> {
    match pods.live() {
        Ok(live) => live.into_iter().map(|pod| pod.name).collect(),
        Err(error) => panic!("live() fails: {error:?}"),
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

/// Polls `check` every 20 ms until it holds or `within` passes.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

async fn synced_pods(standin: &StandIn, cancel: &CancellationToken) -> NodePods {
    let pods = NodePods::start(client(standin).await, NODE, cancel.clone());
    if let Err(error) = pods.wait_synced(SYNC).await {
        panic!("pods do not sync: {error:?}");
    }
    pods
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_sees_adds_and_deletes_of_its_node_within_a_second() {
    let standin = standin(StandInConfig::default()).await;
    apply_pod(&standin, &pod("a", NODE, "Running"));
    apply_pod(&standin, &pod("elsewhere", "node-2", "Running"));
    let cancel = CancellationToken::new();
    let pods = synced_pods(&standin, &cancel).await;
    assert_eq!(names(&pods), set(&["a"]));

    apply_pod(&standin, &pod("b", NODE, "Pending"));
    apply_pod(&standin, &pod("other", "node-2", "Pending"));
    assert!(eventually(Duration::from_secs(1), || names(&pods) == set(&["a", "b"])).await);

    assert!(standin.delete_pod("default", "a"));
    assert!(eventually(Duration::from_secs(1), || names(&pods) == set(&["b"])).await);

    let live = pods.live().unwrap_or_default();
    let b = live.first().map(|pod| {
        (
            pod.namespace.clone(),
            pod.annotations.clone(),
            pod.uid.is_empty(),
        )
    });
    assert_eq!(
        b,
        Some((
            "default".to_owned(),
            [("hulk-vpc/subnet".to_owned(), "blue".to_owned())].into(),
            false
        ))
    );
    // One list, then the watch did the rest.
    assert_eq!(standin.requests(Verb::List, Resource::Pods), 1);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_finishes_leaves_live() {
    let standin = standin(StandInConfig::default()).await;
    apply_pod(&standin, &pod("job", NODE, "Running"));
    apply_pod(&standin, &pod("failing", NODE, "Running"));
    apply_pod(&standin, &pod("done-before", NODE, "Succeeded"));
    let cancel = CancellationToken::new();
    let pods = synced_pods(&standin, &cancel).await;
    assert_eq!(names(&pods), set(&["job", "failing"]));

    apply_pod(&standin, &pod("job", NODE, "Succeeded"));
    apply_pod(&standin, &pod("failing", NODE, "Failed"));
    assert!(eventually(Duration::from_secs(1), || names(&pods).is_empty()).await);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_forces_a_relist_and_the_store_ends_correct() {
    let standin = standin(StandInConfig::default()).await;
    apply_pod(&standin, &pod("a", NODE, "Running"));
    apply_pod(&standin, &pod("b", NODE, "Running"));
    let cancel = CancellationToken::new();
    let pods = synced_pods(&standin, &cancel).await;
    assert_eq!(names(&pods), set(&["a", "b"]));
    // The watch that follows the list is open.
    assert!(eventually(SYNC, || standin.requests(Verb::Watch, Resource::Pods) == 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The watch breaks and its first resumption fails, so the changes below
    // happen while it is away; then the history they are in is compacted.
    standin.fail_next(Verb::Watch, Resource::Pods, Failure::Status(500));
    standin.close_watches();
    standin.delete_pod("default", "b");
    apply_pod(&standin, &pod("c", NODE, "Running"));
    standin.expire_history();

    // Until the relist, live() refuses: its watch is failing.
    assert!(
        eventually(Duration::from_secs(5), || pods.live().is_ok_and(
            |live| live
                .into_iter()
                .map(|pod| pod.name)
                .collect::<BTreeSet<_>>()
                == set(&["a", "c"])
        ))
        .await
    );
    assert_eq!(standin.requests(Verb::List, Resource::Pods), 2);
    // The initial watch, the failed one, the one answered 410, the one after the relist.
    assert!(
        eventually(Duration::from_secs(3), || {
            standin.requests(Verb::Watch, Resource::Pods) == 4
        })
        .await
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_before_the_first_list_is_not_synced() {
    let standin = standin(StandInConfig::default()).await;
    apply_pod(&standin, &pod("a", NODE, "Running"));
    // 500, which kube does not retry by itself (it does 429, 503, 504).
    standin.fail_next(Verb::List, Resource::Pods, Failure::Status(500));
    let cancel = CancellationToken::new();
    let pods = NodePods::start(client(&standin).await, NODE, cancel.clone());
    assert!(eventually(SYNC, || standin.requests(Verb::List, Resource::Pods) >= 1).await);

    let error = pods.live().err();
    assert!(
        matches!(error, Some(KubeError::NotSynced { .. })),
        "live() before sync: {error:?}"
    );
    assert!(!pods.is_synced());

    assert!(pods.wait_synced(SYNC).await.is_ok());
    assert_eq!(names(&pods), set(&["a"]));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_falls_back_to_a_get_for_a_pod_not_yet_in_the_store() {
    let standin = standin(StandInConfig::default()).await;
    let stored = apply_pod(&standin, &pod("known", NODE, "Running"));
    let cancel = CancellationToken::new();
    let pods = synced_pods(&standin, &cancel).await;

    let known = pods.pod("default", "known").await.ok().flatten();
    assert_eq!(known.map(|pod| pod.uid), stored.metadata.uid);
    assert_eq!(standin.requests(Verb::Get, Resource::Pods), 0);

    // Keep the watch away for a few seconds of backoff.
    for _ in 0..3 {
        standin.fail_next(Verb::Watch, Resource::Pods, Failure::Drop);
    }
    standin.close_watches();
    let fresh = apply_pod(&standin, &pod("fresh", NODE, "Pending"));
    let found = pods.pod("default", "fresh").await;
    let expected = PodMeta {
        namespace: "default".to_owned(),
        name: "fresh".to_owned(),
        uid: fresh.metadata.uid.unwrap_or_default(),
        annotations: [("hulk-vpc/subnet".to_owned(), "blue".to_owned())].into(),
    };
    assert_eq!(found.ok(), Some(Some(expected)));
    assert_eq!(standin.requests(Verb::Get, Resource::Pods), 1);

    let missing = pods.pod("default", "never").await;
    assert_eq!(missing.ok(), Some(None));
    assert_eq!(standin.requests(Verb::Get, Resource::Pods), 2);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_uids_pages_through_every_namespace() {
    let standin = standin(StandInConfig::default()).await;
    let mut expected = BTreeSet::new();
    // More than one page (500), in two namespaces, on several nodes and in
    // every phase: a pod exists while its object does.
    for index in 0..620 {
        let mut pod = pod(&format!("p-{index}"), &format!("n{}", index % 7), "Running");
        if index % 2 == 1 {
            pod.metadata.namespace = Some("other".to_owned());
        }
        if index % 5 == 0 {
            pod.status = Some(PodStatus {
                phase: Some("Succeeded".to_owned()),
                ..PodStatus::default()
            });
        }
        let stored = apply_pod(&standin, &pod);
        expected.insert(stored.metadata.uid.unwrap_or_default());
    }
    let gone = apply_pod(&standin, &pod("gone", "n1", "Running"));
    assert!(standin.delete_pod("default", "gone"));

    let uids = hulk_kube::pod_uids(client(&standin).await).await;
    let uids: BTreeSet<String> = match uids {
        Ok(uids) => uids.into_iter().collect(),
        Err(error) => panic!("pod_uids fails: {error:?}"),
    };
    assert_eq!(uids.len(), 620);
    assert_eq!(uids, expected);
    assert!(!uids.contains(&gone.metadata.uid.unwrap_or_default()));
    assert_eq!(standin.requests(Verb::List, Resource::Pods), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_uids_reports_a_refused_list_as_configuration() {
    let standin = standin(StandInConfig::default()).await;
    apply_pod(&standin, &pod("p", "n1", "Running"));
    standin.fail_next(Verb::List, Resource::Pods, Failure::Status(403));
    let error = hulk_kube::pod_uids(client(&standin).await).await.err();
    assert!(
        error.as_ref().is_some_and(KubeError::is_configuration),
        "{error:?}"
    );
}

fn node(name: &str, ready: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(NodeStatus {
            conditions: Some(vec![
                NodeCondition {
                    type_: "MemoryPressure".to_owned(),
                    status: "False".to_owned(),
                    ..NodeCondition::default()
                },
                NodeCondition {
                    type_: "Ready".to_owned(),
                    status: ready.to_owned(),
                    ..NodeCondition::default()
                },
            ]),
            ..NodeStatus::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_nodes_follow_nodes_and_readiness() {
    let standin = standin(StandInConfig::default()).await;
    assert!(standin.apply_node(&node("n1", "True")).is_ok());
    standin.fail_next(Verb::List, Resource::Nodes, Failure::Status(500));
    let cancel = CancellationToken::new();
    let nodes = ClusterNodes::start(client(&standin).await, cancel.clone());
    assert!(eventually(SYNC, || standin.requests(Verb::List, Resource::Nodes) >= 1).await);
    assert!(matches!(
        nodes.is_known("n1"),
        Err(KubeError::NotSynced { .. })
    ));

    assert!(nodes.wait_synced(SYNC).await.is_ok());
    assert_eq!(nodes.names().ok(), Some(vec!["n1".to_owned()]));
    assert_eq!(nodes.is_ready("n1").ok(), Some(Some(true)));

    assert!(standin.apply_node(&node("n2", "False")).is_ok());
    assert!(
        eventually(Duration::from_secs(1), || nodes
            .is_known("n2")
            .unwrap_or(false))
        .await
    );
    assert_eq!(nodes.is_ready("n2").ok(), Some(Some(false)));
    assert!(standin.delete_node("n1"));
    assert!(
        eventually(Duration::from_secs(1), || nodes.is_known("n1").ok()
            == Some(false))
        .await
    );
    assert_eq!(nodes.is_ready("n1").ok(), Some(None));
    cancel.cancel();
}

const LEASE_NAMESPACE: &str = "hulk-system";

fn lease_config(holder: &str, seconds: u32) -> LeaseConfig {
    LeaseConfig::for_node(NODE, holder)
        .in_namespace(LEASE_NAMESPACE)
        .with_duration_seconds(seconds)
}

fn stored_lease(standin: &StandIn) -> Option<LeaseSpec> {
    standin
        .lease(LEASE_NAMESPACE, &format!("hulk-vpc-node-{NODE}"))
        .ok()
        .flatten()
        .and_then(|lease| lease.spec)
}

fn holder(standin: &StandIn) -> Option<String> {
    stored_lease(standin).and_then(|spec| spec.holder_identity)
}

fn held_by(result: Result<(), KubeError>) -> Option<String> {
    match result {
        Err(KubeError::LeaseHeld { holder, .. }) => Some(holder),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_acquired_then_refused_to_a_second_holder_by_name() {
    let standin = standin(StandInConfig::default()).await;
    let first = IdentityLease::new(client(&standin).await, lease_config("agent-a", 30));
    assert!(first.acquire().await.is_ok());
    assert_eq!(holder(&standin), Some("agent-a".to_owned()));
    assert_eq!(
        stored_lease(&standin).and_then(|spec| spec.lease_duration_seconds),
        Some(30)
    );

    let second = IdentityLease::new(client(&standin).await, lease_config("agent-b", 30));
    let refused = second.acquire().await;
    let message = refused
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert_eq!(held_by(refused), Some("agent-a".to_owned()));
    assert!(message.contains("agent-a"), "{message}");
    assert_eq!(holder(&standin), Some("agent-a".to_owned()));

    // The same holder again (a restart keeping its id) takes it back.
    assert!(first.acquire().await.is_ok());

    // Released, it is free for the next holder at once.
    assert!(first.release().await.is_ok());
    assert_eq!(holder(&standin), None);
    assert!(second.acquire().await.is_ok());
    assert_eq!(holder(&standin), Some("agent-b".to_owned()));
    assert_eq!(
        stored_lease(&standin).and_then(|spec| spec.lease_transitions),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_taken_over_after_expiry_and_the_old_holder_learns_it() {
    let standin = standin(StandInConfig::default()).await;
    let first = IdentityLease::new(client(&standin).await, lease_config("agent-a", 1));
    let second = IdentityLease::new(client(&standin).await, lease_config("agent-b", 1));
    assert!(first.acquire().await.is_ok());
    assert_eq!(held_by(second.acquire().await), Some("agent-a".to_owned()));

    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(second.acquire().await.is_ok());
    let spec = stored_lease(&standin);
    assert_eq!(
        spec.as_ref().and_then(|s| s.holder_identity.clone()),
        Some("agent-b".to_owned())
    );
    assert_eq!(spec.and_then(|s| s.lease_transitions), Some(1));

    let renewed = first.renew().await;
    assert!(
        matches!(
            &renewed,
            Err(KubeError::LeaseLost { loss: LeaseLoss::TakenOver { holder: Some(h) }, .. }) if h == "agent-b"
        ),
        "{renewed:?}"
    );
}

/// A lease of a holder that stopped renewing an hour ago.
fn expired_lease() -> Lease {
    let an_hour_ago = Timestamp::now()
        .checked_sub(SignedDuration::from_secs(3600))
        .unwrap_or(Timestamp::UNIX_EPOCH);
    Lease {
        metadata: ObjectMeta {
            name: Some(format!("hulk-vpc-node-{NODE}")),
            namespace: Some(LEASE_NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("agent-gone".to_owned()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(an_hour_ago)),
            acquire_time: Some(MicroTime(an_hour_ago)),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }),
    }
}

async fn race(standin: &StandIn) -> (Result<(), KubeError>, Result<(), KubeError>) {
    let a = IdentityLease::new(client(standin).await, lease_config("agent-a", 30));
    let b = IdentityLease::new(client(standin).await, lease_config("agent-b", 30));
    tokio::join!(a.acquire(), b.acquire())
}

fn exactly_one_wins(results: (Result<(), KubeError>, Result<(), KubeError>), standin: &StandIn) {
    let winner = holder(standin);
    match results {
        (Ok(()), lost) => {
            assert_eq!(winner, Some("agent-a".to_owned()));
            assert_eq!(held_by(lost), winner);
        }
        (lost, Ok(())) => {
            assert_eq!(winner, Some("agent-b".to_owned()));
            assert_eq!(held_by(lost), winner);
        }
        (a, b) => panic!("no winner: {a:?} {b:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_takeovers_of_an_expired_lease_have_one_winner() {
    let standin = standin(StandInConfig::default()).await;
    assert!(standin.apply_lease(&expired_lease()).is_ok());
    // Both updates are sent on the same read before either is applied.
    standin.barrier(Verb::Update, Resource::Leases, 2);
    let results = race(&standin).await;
    exactly_one_wins(results, &standin);
    assert_eq!(standin.requests(Verb::Update, Resource::Leases), 2);
    // The loser read again after its 409 and found the winner.
    assert_eq!(standin.requests(Verb::Get, Resource::Leases), 3);
    assert_eq!(
        stored_lease(&standin).and_then(|s| s.lease_transitions),
        Some(4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creations_have_one_winner() {
    let standin = standin(StandInConfig::default()).await;
    standin.barrier(Verb::Create, Resource::Leases, 2);
    let results = race(&standin).await;
    exactly_one_wins(results, &standin);
    assert_eq!(standin.requests(Verb::Create, Resource::Leases), 2);
    assert_eq!(standin.requests(Verb::Get, Resource::Leases), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_the_lease_and_a_takeover_is_reported() {
    let standin = standin(StandInConfig::default()).await;
    let cancel = CancellationToken::new();
    let first = Arc::new(IdentityLease::new(
        client(&standin).await,
        lease_config("agent-a", 1),
    ));
    assert!(first.acquire().await.is_ok());
    let mut keeper = first.clone().keep_renewed(cancel.clone());

    // Three lease durations later it is still ours.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = IdentityLease::new(client(&standin).await, lease_config("agent-b", 1));
    assert_eq!(held_by(second.acquire().await), Some("agent-a".to_owned()));
    assert!(standin.requests(Verb::Update, Resource::Leases) >= 6);
    assert_eq!(keeper.loss(), None);

    // Someone overwrites it (as a takeover after a missed renewal would).
    let mut intruded = expired_lease();
    if let Some(spec) = intruded.spec.as_mut() {
        spec.holder_identity = Some("intruder".to_owned());
        spec.renew_time = Some(MicroTime(Timestamp::now()));
    }
    assert!(standin.apply_lease(&intruded).is_ok());
    let loss = tokio::time::timeout(Duration::from_secs(2), keeper.lost()).await;
    assert_eq!(
        loss.ok().flatten(),
        Some(LeaseLoss::TakenOver {
            holder: Some("intruder".to_owned())
        })
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_failing_until_the_renew_deadline_lose_the_lease() {
    let standin = standin(StandInConfig::default()).await;
    let cancel = CancellationToken::new();
    let lease = Arc::new(IdentityLease::new(
        client(&standin).await,
        lease_config("agent-a", 1),
    ));
    assert!(lease.acquire().await.is_ok());
    let acquired = Instant::now();
    let mut keeper = lease.clone().keep_renewed(cancel.clone());
    standin.deny(Verb::Update, Resource::Leases);
    let loss = tokio::time::timeout(Duration::from_secs(3), keeper.lost()).await;
    assert_eq!(loss.ok().flatten(), Some(LeaseLoss::NotRenewed));
    // Reported at two thirds of the 1 s duration, before others may take it.
    let reported = acquired.elapsed();
    assert!(
        reported >= Duration::from_millis(600) && reported < Duration::from_secs(1),
        "{reported:?}"
    );

    // A renewal that hangs (held at a barrier nobody else reaches) counts
    // as failed too.
    let hung = self::standin(StandInConfig::default()).await;
    let lease = Arc::new(IdentityLease::new(
        client(&hung).await,
        lease_config("agent-a", 1),
    ));
    assert!(lease.acquire().await.is_ok());
    let acquired = Instant::now();
    hung.barrier(Verb::Update, Resource::Leases, 100);
    let mut keeper = lease.clone().keep_renewed(cancel.clone());
    let loss = tokio::time::timeout(Duration::from_secs(3), keeper.lost()).await;
    assert_eq!(loss.ok().flatten(), Some(LeaseLoss::NotRenewed));
    assert!(
        acquired.elapsed() < Duration::from_secs(1),
        "{:?}",
        acquired.elapsed()
    );

    // Cancelled renewals report no loss.
    let stop = CancellationToken::new();
    let mut stopped = lease.clone().keep_renewed(stop.clone());
    stop.cancel();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(1), stopped.lost())
            .await
            .ok(),
        Some(None)
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_name_the_pod_and_the_reason() {
    let standin = standin(StandInConfig::default()).await;
    let stored = apply_pod(&standin, &pod("web", NODE, "Pending"));
    let web = PodMeta::from(&stored.metadata);
    let events = PodEvents::new(client(&standin).await, "hulk-vpc-node", NODE);
    events.record(&web, &PodEvent::address_waiting()).await;
    events
        .record(&web, &PodEvent::throttled("the cloud answered 429"))
        .await;

    let recorded = standin.events("default").unwrap_or_default();
    assert_eq!(recorded.len(), 2);
    let waiting = recorded
        .iter()
        .find(|event| event.reason.as_deref() == Some("AddressWaiting"));
    let Some(waiting) = waiting else {
        panic!("no AddressWaiting event in {recorded:?}");
    };
    assert_eq!(waiting.type_.as_deref(), Some("Normal"));
    assert_eq!(
        waiting.note.as_deref(),
        Some("waiting for the cloud to allocate an address")
    );
    assert_eq!(
        waiting.reporting_controller.as_deref(),
        Some("hulk-vpc-node")
    );
    assert_eq!(waiting.reporting_instance.as_deref(), Some(NODE));
    let regarding = waiting.regarding.clone().unwrap_or_default();
    assert_eq!(regarding.kind.as_deref(), Some("Pod"));
    assert_eq!(regarding.namespace.as_deref(), Some("default"));
    assert_eq!(regarding.name.as_deref(), Some("web"));
    assert_eq!(regarding.uid, stored.metadata.uid);
    let throttled = recorded
        .iter()
        .find(|event| event.reason.as_deref() == Some("Throttled"))
        .and_then(|event| event.type_.clone());
    assert_eq!(throttled.as_deref(), Some("Warning"));

    // A repeat is counted on the first event; a refused one is only logged.
    events.record(&web, &PodEvent::address_waiting()).await;
    let recorded = standin.events("default").unwrap_or_default();
    assert_eq!(recorded.len(), 2);
    assert_eq!(standin.requests(Verb::Patch, Resource::Events), 1);
    standin.deny(Verb::Create, Resource::Events);
    events
        .record(
            &web,
            &PodEvent::address_exhausted("no address left in subnet blue"),
        )
        .await;
    assert_eq!(standin.events("default").unwrap_or_default().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_and_forbidden_are_configuration_errors() {
    let standin = standin(StandInConfig {
        token: Some("right".to_owned()),
        ..StandInConfig::default()
    })
    .await;

    let wrong = client_with(&standin, Some("wrong")).await;
    let lease = IdentityLease::new(wrong.clone(), lease_config("agent-a", 30));
    let unauthorized = lease.acquire().await.err();
    assert_eq!(
        unauthorized.as_ref().and_then(KubeError::status_code),
        Some(401)
    );
    assert!(
        unauthorized
            .as_ref()
            .is_some_and(KubeError::is_configuration)
    );
    assert!(!unauthorized.as_ref().is_some_and(KubeError::is_transient));

    let cancel = CancellationToken::new();
    let pods = NodePods::start(wrong, NODE, cancel.clone());
    let not_synced = pods.wait_synced(Duration::from_secs(2)).await.err();
    assert!(
        not_synced.as_ref().is_some_and(KubeError::is_configuration),
        "{not_synced:?}"
    );

    let right = client_with(&standin, Some("right")).await;
    standin.deny(Verb::Get, Resource::Leases);
    let lease = IdentityLease::new(right.clone(), lease_config("agent-a", 30));
    let forbidden = lease.acquire().await.err();
    assert_eq!(
        forbidden.as_ref().and_then(KubeError::status_code),
        Some(403)
    );
    assert!(forbidden.as_ref().is_some_and(KubeError::is_configuration));

    standin.fail_next(Verb::Get, Resource::Pods, Failure::Status(500));
    let pods = NodePods::start(right.clone(), NODE, cancel.clone());
    let failed = pods.pod("default", "any").await.err();
    assert!(
        failed.as_ref().is_some_and(KubeError::is_transient),
        "{failed:?}"
    );
    assert!(!failed.as_ref().is_some_and(KubeError::is_configuration));

    // kube retries a 429 itself, after its Retry-After.
    let gets = standin.requests(Verb::Get, Resource::Pods);
    standin.fail_next(Verb::Get, Resource::Pods, Failure::Status(429));
    assert_eq!(pods.pod("default", "any").await.ok(), Some(None));
    assert_eq!(standin.requests(Verb::Get, Resource::Pods), gets + 2);

    standin.fail_next(Verb::Get, Resource::Pods, Failure::Drop);
    let dropped = pods.pod("default", "any").await.err();
    assert!(
        dropped.as_ref().is_some_and(KubeError::is_transient),
        "{dropped:?}"
    );
    cancel.cancel();
}
