//! The node's ADD/DEL/CHECK/GC/restore over the mock backend and the
//! in-memory kernel: addresses and interfaces go together, failures give
//! the address back, repeats are harmless, errors get their CNI codes.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use hulk_node::testing as support;

use support::{key, network, pod};

use std::sync::Arc;
use std::time::Duration;

use hulk_agent_api::codes;
use hulk_cni::{Attachment, ErrorCode};
use hulk_ipam::{IpamError, MacAddr, MemoryBackend, Owner};
use hulk_netns::fake::{FakeKernel, FakeNs};
use hulk_netns::{Datapath, DatapathError, Kernel};
use hulk_node::{Node, NodeError, PodRequest};
use hulk_pool::{MemoryStore, PoolConfig, PoolError, PoolManager, SystemClock};

async fn node(pods: &[&str]) -> (Node<FakeKernel>, Vec<FakeNs>) {
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    let namespaces = pods
        .iter()
        .map(|name| kernel.add_namespace(format!("/var/run/netns/{name}")))
        .collect();
    let config = PoolConfig {
        assign_timeout: Duration::from_millis(50),
        ..PoolConfig::default()
    };
    let pools = PoolManager::open(
        Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap())),
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        "node-1",
        config,
    )
    .await
    .unwrap();
    pools.warm_up(&key()).await.unwrap();
    let node = Node::new(pools, Datapath::new(kernel), network(), key());
    node.restore().await.unwrap();
    (node, namespaces)
}

#[tokio::test]
async fn add_builds_the_interface_with_a_pool_address_and_a_repeat_is_refused_harmlessly() {
    let (node, namespaces) = node(&["a"]).await;
    let attached = node.add(&pod("a")).await.unwrap();
    assert_eq!(attached.lease.address.to_string(), "10.20.0.2/24");
    let inside = node.datapath().kernel().namespace(namespaces[0]);
    assert_eq!(inside.links["eth0"].addresses, [attached.lease.address]);
    assert_eq!(inside.links["eth0"].link.index, attached.index);
    assert_eq!(host_routes(&node), ["10.20.0.2/32 dev hulk0"]);

    // The CNI spec: an ADD of an attachment that exists is an error; the
    // existing one is left as it was (a retry after a half-built ADD is
    // rebuilt instead: tests/sandbox.rs).
    let again = node.add(&pod("a")).await.unwrap_err();
    assert!(matches!(again, NodeError::AlreadyAttached(_)), "{again}");
    assert_eq!(host_routes(&node), ["10.20.0.2/32 dev hulk0"]);
    node.check(&pod("a")).await.unwrap();
}

#[tokio::test]
async fn a_failed_attach_gives_the_address_back() {
    let (node, namespaces) = node(&["a"]).await;
    node.datapath().kernel().fail_operation(3);
    let error = node.add(&pod("a")).await.unwrap_err();
    assert_eq!(error.to_cni().code, codes::DATAPATH);
    assert_eq!(
        node.pools().stats(&key()).assigned,
        0,
        "the address went back"
    );
    assert_eq!(
        node.datapath()
            .kernel()
            .namespace(namespaces[0])
            .links
            .len(),
        1,
        "only lo"
    );
    node.add(&pod("a")).await.unwrap();
}

#[tokio::test]
async fn del_returns_everything_and_can_repeat_even_without_the_namespace() {
    let (node, namespaces) = node(&["a", "b"]).await;
    node.add(&pod("a")).await.unwrap();
    node.add(&pod("b")).await.unwrap();
    for _ in 0..2 {
        node.del(&pod("a")).await.unwrap();
    }
    assert_eq!(
        node.datapath()
            .kernel()
            .namespace(namespaces[0])
            .links
            .len(),
        1
    );
    assert_eq!(node.pools().stats(&key()).assigned, 1);
    let mut gone = pod("b");
    node.datapath()
        .kernel()
        .remove_namespace(gone.netns.as_deref().unwrap());
    node.del(&gone).await.unwrap();
    gone.netns = None;
    node.del(&gone).await.unwrap();
    assert_eq!(node.pools().stats(&key()).assigned, 0);
    assert!(node.datapath().kernel().host_namespace().routes.is_empty());
}

fn host_routes(node: &Node<FakeKernel>) -> Vec<String> {
    node.datapath().kernel().host_namespace().route_lines()
}

#[tokio::test]
async fn gc_tears_down_every_attachment_of_its_network_not_valid_in_one_call() {
    let (node, _) = node(&["a", "b", "c", "d"]).await;
    let a = node.add(&pod("a")).await.unwrap();
    node.add(&pod("b")).await.unwrap();
    node.add(&pod("c")).await.unwrap();
    // A second network (a secondary interface through Multus, say).
    let other_network = PodRequest {
        timeout_ms: None,
        address: None,
        mac: None,
        owner: Owner {
            ifname: "net1".into(),
            cni_network: Some("storage".into()),
            pod_uid: None,
            ..pod("d").owner.clone()
        },
        ..pod("d")
    };
    let d = node.add(&other_network).await.unwrap();
    let valid = [Attachment {
        container_id: "a".into(),
        ifname: "eth0".into(),
    }];
    let mut released: Vec<String> = node
        .gc(Some("vpc"), &valid)
        .await
        .unwrap()
        .into_iter()
        .map(|owner| owner.container_id)
        .collect();
    released.sort();
    assert_eq!(released, ["b", "c"]);
    let kept = [a.lease.address.addr(), d.lease.address.addr()];
    assert_eq!(
        host_routes(&node),
        kept.map(|address| format!("{address}/32 dev hulk0")),
        "the gone pods' host routes leave with their addresses"
    );
    let mut assigned = node.pools().assigned_addresses();
    assigned.sort();
    assert_eq!(assigned, kept);
    assert!(
        node.gc(Some("vpc"), &valid).await.unwrap().is_empty(),
        "a second GC has nothing left to do"
    );
}

#[tokio::test]
async fn status_is_51_while_the_node_datapath_is_broken_until_restored() {
    let (node, _) = node(&["a"]).await;
    node.status().await.unwrap();
    let kernel = node.datapath().kernel();
    kernel.delete_link(kernel.host(), "hulk0").await.unwrap();
    let error = node.status().await.unwrap_err();
    assert_eq!(
        error.code,
        ErrorCode::PluginNotAvailableLimitedConnectivity,
        "{error:?}"
    );
    assert!(error.msg.contains("hulk0 is missing"), "{}", error.msg);
    node.restore().await.unwrap();
    node.status().await.unwrap();
}

#[tokio::test]
async fn restore_brings_back_host_routes_of_pods_holding_addresses() {
    let (node, _) = node(&["a"]).await;
    let attached = node.add(&pod("a")).await.unwrap();
    let kernel = node.datapath().kernel();
    kernel.delete_link(kernel.host(), "hulk0").await.unwrap();
    let report = node.restore().await.unwrap();
    assert_eq!(report.node.routes_installed, 1);
    assert_eq!(
        host_routes(&node),
        [format!("{}/32 dev hulk0", attached.lease.address.addr())]
    );
}

#[test]
fn failures_map_to_their_cni_codes() {
    let cases: Vec<(NodeError, ErrorCode)> = vec![
        (
            PoolError::Empty {
                subnet: "s".into(),
                waited: Duration::from_secs(30),
            }
            .into(),
            ErrorCode::TryAgainLater,
        ),
        (
            PoolError::Degraded {
                subnet: "s".into(),
                reason: "throttled".into(),
                exhausted: false,
            }
            .into(),
            ErrorCode::TryAgainLater,
        ),
        (
            PoolError::Degraded {
                subnet: "s".into(),
                reason: "quota".into(),
                exhausted: true,
            }
            .into(),
            codes::ADDRESS_EXHAUSTED,
        ),
        (
            PoolError::Backend(IpamError::Exhausted { subnet: "s".into() }).into(),
            codes::ADDRESS_EXHAUSTED,
        ),
        (
            PoolError::Backend(IpamError::Throttled { retry_after: None }).into(),
            ErrorCode::TryAgainLater,
        ),
        (
            PoolError::Backend(IpamError::Auth("no".into())).into(),
            codes::IPAM_BACKEND,
        ),
        (
            PoolError::AddressUnavailable {
                address: "10.0.0.9".parse().unwrap(),
                reason: "held by c1/eth0".into(),
            }
            .into(),
            ErrorCode::TryAgainLater,
        ),
        (
            PoolError::Backend(IpamError::InvalidRequest("not in the subnet".into())).into(),
            ErrorCode::InvalidNetworkConfig,
        ),
        (
            DatapathError::NamespaceNotFound("/x".into()).into(),
            codes::NAMESPACE,
        ),
        (
            DatapathError::ParentNotFound("eth9".into()).into(),
            codes::DATAPATH,
        ),
        (
            DatapathError::Invalid("mac".into()).into(),
            ErrorCode::InvalidNetworkConfig,
        ),
        (
            NodeError::InvalidRequest("no netns".into()),
            ErrorCode::InvalidNetworkConfig,
        ),
    ];
    for (error, code) in cases {
        let cni = error.to_cni();
        assert_eq!(cni.code, code, "{error}");
        assert_eq!(cni.msg, error.to_string());
    }
}

#[tokio::test]
async fn add_without_a_namespace_is_an_invalid_request() {
    let (node, _) = node(&[]).await;
    let mut request = pod("a");
    request.netns = None;
    let error = node.add(&request).await.unwrap_err();
    assert_eq!(error.to_cni().code, ErrorCode::InvalidNetworkConfig);
    assert_eq!(node.pools().stats(&key()).assigned, 0);
}

#[tokio::test]
async fn the_add_result_lists_every_route_add_made() {
    let (node, _) = node(&["a"]).await;
    let attached = node.add(&pod("a")).await.unwrap();
    let result = attached.to_cni_result("eth0", std::path::Path::new("/var/run/netns/a"));
    let routes: Vec<String> = result
        .routes
        .iter()
        .map(|route| format!("{} {:?} {:?}", route.dst, route.gw, route.scope))
        .collect();
    assert_eq!(
        routes,
        [
            "0.0.0.0/0 Some(10.20.0.1) None",
            "10.20.0.250/32 None Some(253)",
            "10.96.0.0/12 Some(10.20.0.250) None",
        ]
    );
    // CHECK answers with the same facts, for the plugin's prevResult check.
    let checked = node.check(&pod("a")).await.unwrap();
    assert_eq!(checked, attached);
}

#[tokio::test]
async fn an_address_the_runtime_asks_for_is_given_or_refused_never_replaced() {
    let (node, _) = node(&["a", "b", "c"]).await;
    let asking = |name: &str, address: &str| PodRequest {
        address: Some(address.parse().unwrap()),
        ..pod(name)
    };
    let given = node.add(&asking("a", "10.20.0.50")).await.unwrap();
    assert_eq!(given.lease.address.to_string(), "10.20.0.50/24");
    // Held by another pod: try again later (11), not another address.
    let held = node.add(&asking("b", "10.20.0.50")).await.unwrap_err();
    assert_eq!(held.to_cni().code, ErrorCode::TryAgainLater, "{held}");
    // Outside the subnet: the request is wrong (7).
    let outside = node.add(&asking("c", "192.0.2.9")).await.unwrap_err();
    assert_eq!(
        outside.to_cni().code,
        ErrorCode::InvalidNetworkConfig,
        "{outside}"
    );
    assert_eq!(node.pools().stats(&key()).assigned, 1);
}

#[tokio::test]
async fn an_ipvlan_pod_can_have_only_its_parents_mac() {
    let (node, namespaces) = node(&["a", "b"]).await;
    let kernel = node.datapath().kernel();
    let parent = kernel
        .link(kernel.host(), "eth1")
        .await
        .unwrap()
        .unwrap()
        .mac
        .unwrap();
    let with_mac = |name: &str, mac| PodRequest {
        mac: Some(mac),
        ..pod(name)
    };
    node.add(&with_mac("a", parent)).await.unwrap();
    let refused = node
        .add(&with_mac("b", MacAddr([2, 0, 0, 0, 0, 7])))
        .await
        .unwrap_err();
    assert_eq!(
        refused.to_cni().code,
        ErrorCode::InvalidNetworkConfig,
        "{refused}"
    );
    assert!(refused.to_string().contains("ipvlan"), "{refused}");
    assert_eq!(kernel.namespace(namespaces[1]).links.len(), 1, "only lo");
    assert_eq!(
        node.pools().stats(&key()).assigned,
        1,
        "b's address went back"
    );
}

/// A store whose writes can be made to fail, as a full disk does.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    full: std::sync::atomic::AtomicBool,
}

impl hulk_pool::PoolStore for FlakyStore {
    fn load(&self) -> Result<hulk_pool::Snapshot, hulk_pool::StoreError> {
        self.inner.load()
    }

    fn apply(&self, ops: &[hulk_pool::StoreOp]) -> Result<(), hulk_pool::StoreError> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            // ENOSPC, as redb reports a write to a full disk.
            return Err(hulk_pool::StoreError::Database(Box::new(redb::Error::Io(
                std::io::Error::from_raw_os_error(28),
            ))));
        }
        self.inner.apply(ops)
    }

    fn failing(&self) -> Option<String> {
        self.full
            .load(std::sync::atomic::Ordering::SeqCst)
            .then(|| "No space left on device".to_owned())
    }
}

#[tokio::test]
async fn status_tells_the_truth_about_the_store_and_the_backends_credentials() {
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    let store = Arc::new(FlakyStore::default());
    let refusing = hulk_ipam::FaultPlan {
        error_rate: 1.0,
        random_error: IpamError::Auth("401 Unauthorized".into()),
        ..hulk_ipam::FaultPlan::default()
    };
    let backend = Arc::new(hulk_ipam::Faulty::new(
        MemoryBackend::new("10.20.0.0/24".parse().unwrap()),
        refusing,
    ));
    let pools = PoolManager::open(
        backend,
        store.clone(),
        Arc::new(SystemClock),
        "node-1",
        PoolConfig::default(),
    )
    .await
    .unwrap();
    let node = Node::new(pools, Datapath::new(kernel), network(), key());
    node.restore().await.unwrap();
    node.status().await.unwrap();
    hulk_node::agent_problems(node.pools())
        .is_empty()
        .then_some(())
        .unwrap();

    for _ in 0..hulk_pool::AUTH_FAILING_AFTER {
        let _ = node.pools().warm_up(&key()).await;
    }
    let error = node.status().await.unwrap_err();
    assert_eq!(error.code, ErrorCode::PluginNotAvailable, "{}", error.msg);
    assert!(error.msg.contains("credentials"), "{}", error.msg);

    store.full.store(true, std::sync::atomic::Ordering::SeqCst);
    let error = node.status().await.unwrap_err();
    assert!(
        error.msg.contains("pool store cannot write"),
        "{}",
        error.msg
    );
}

#[tokio::test]
async fn the_collector_sweeps_every_pass_until_a_starts_intents_are_settled() {
    use hulk_ipam::{Fault, FaultPlan, Faulty};
    use hulk_pool::{Intent, IntentKind, PoolStore, StoreOp};

    // A crash mid-allocation, then a start while the backend is down: its
    // sweep (the list, call 1) fails and the allocation's intent stays.
    let store = Arc::new(MemoryStore::default());
    store
        .apply(&[StoreOp::PutIntent(Intent {
            id: 1,
            kind: IntentKind::Allocate {
                key: key(),
                count: 1,
            },
        })])
        .unwrap();
    let backend = Faulty::new(
        MemoryBackend::new("10.20.0.0/24".parse().unwrap()),
        FaultPlan {
            on_call: [(1, Fault::Error(IpamError::Transient("down".into())))].into(),
            ..FaultPlan::default()
        },
    );
    let pools = PoolManager::open(
        Arc::new(backend),
        store.clone(),
        Arc::new(SystemClock),
        "node-1",
        PoolConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(pools.unsettled_intents(), 1);
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    let node = Arc::new(Node::new(
        pools.clone(),
        Datapath::new(kernel),
        network(),
        key(),
    ));
    // Ten passes (the usual sweep) take two seconds; the intent must go
    // on the first pass that reaches the backend.
    let interval = Duration::from_millis(200);
    let stop = tokio_util::sync::CancellationToken::new();
    let collector = tokio::spawn(node.run_collector(interval, stop.clone()));
    let started = std::time::Instant::now();
    while pools.unsettled_intents() > 0 {
        assert!(
            started.elapsed() < interval * 7,
            "still unsettled after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.load().unwrap().intents.is_empty());
    stop.cancel();
    collector.await.unwrap();
}
