//! The sandbox is the unit of truth: every attachment is recorded with its
//! sandbox, operations on one attachment are serialized, an ADD whose
//! caller gave up is undone, a gone sandbox gives its address back with or
//! without Kubernetes, teardown touches only what ADD built, and every
//! crash point of an ADD leaves a state a retry or a restart repairs.
//! Over the mock backend and the in-memory kernel.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use hulk_node::testing as support;

use support::{key, network};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hulk_agent_api::codes;
use hulk_agent_api::del_notes::DelNotes;
use hulk_cni::ErrorCode;
use hulk_ipam::{FaultPlan, Faulty, IpamBackend, MacAddr, MemoryBackend, Owner};
use hulk_netns::fake::{FakeKernel, FakeNs};
use hulk_netns::{Datapath, Kernel, SlaveKind};
use hulk_node::attachments::Phase;
use hulk_node::{Node, NodeError, PodRequest};
use hulk_pool::{MemoryStore, PoolConfig, PoolManager, PoolStore, SystemClock};

fn netns(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{name}"))
}

fn pod(name: &str) -> PodRequest {
    PodRequest {
        owner: Owner {
            container_id: name.into(),
            ifname: "eth0".into(),
            pod: None,
            cni_network: Some("vpc".into()),
            pod_uid: None,
        },
        netns: Some(netns(name)),
        pool: None,
        timeout_ms: None,
        address: None,
        mac: None,
    }
}

/// A node over `backend` and `store`, with pod namespaces for `pods`.
struct Harness {
    node: Arc<Node<Arc<FakeKernel>>>,
    namespaces: Vec<FakeNs>,
}

async fn node_over(
    backend: Arc<dyn IpamBackend>,
    store: Arc<dyn PoolStore>,
    kernel: Arc<FakeKernel>,
    warm: bool,
) -> Node<Arc<FakeKernel>> {
    let config = PoolConfig {
        assign_timeout: Duration::from_secs(10),
        ..PoolConfig::default()
    };
    let pools = PoolManager::open(backend, store, Arc::new(SystemClock), "node-1", config)
        .await
        .unwrap();
    if warm {
        pools.warm_up(&key()).await.unwrap();
    }
    let node = Node::new(pools, Datapath::new(kernel), network(), key());
    node.restore().await.unwrap();
    node
}

fn kernel(pods: &[&str]) -> (Arc<FakeKernel>, Vec<FakeNs>) {
    let kernel = Arc::new(FakeKernel::new());
    kernel.add_parent("eth1", 1500);
    let namespaces = pods
        .iter()
        .map(|name| kernel.add_namespace(netns(name)))
        .collect();
    (kernel, namespaces)
}

async fn harness(pods: &[&str]) -> Harness {
    let (kernel, namespaces) = kernel(pods);
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    let node = node_over(backend, Arc::new(MemoryStore::default()), kernel, true).await;
    Harness {
        node: Arc::new(node),
        namespaces,
    }
}

impl Harness {
    fn links(&self, index: usize) -> Vec<String> {
        self.node
            .datapath()
            .kernel()
            .namespace(self.namespaces[index])
            .links
            .keys()
            .cloned()
            .collect()
    }

    fn assigned(&self) -> usize {
        self.node.pools().stats(&key()).assigned
    }

    fn host_routes(&self) -> Vec<String> {
        self.node.datapath().kernel().host_namespace().route_lines()
    }
}

#[tokio::test]
async fn add_records_the_sandbox_and_what_it_built() {
    let h = harness(&["a"]).await;
    let attached = h.node.add(&pod("a")).await.unwrap();
    let record = h.node.attachments().get(&pod("a").attachment_id()).unwrap();
    assert_eq!(record.phase, Phase::Ready);
    assert_eq!(record.netns, netns("a"));
    let identity = h
        .node
        .datapath()
        .kernel()
        .identify(&netns("a"))
        .await
        .unwrap();
    assert_eq!(record.netns_id, identity);
    let created = record.created.unwrap();
    assert_eq!(created.index, attached.index);
    assert_eq!(created.addresses, [attached.lease.address]);
    assert_eq!(
        created.host_route.unwrap().to_string(),
        "10.20.0.2/32 dev hulk0"
    );
    assert!(
        created
            .routes
            .iter()
            .any(|route| route.dst.prefix_len() == 0)
    );
}

#[tokio::test]
async fn a_second_add_of_a_completed_attachment_is_the_specs_error() {
    let h = harness(&["a"]).await;
    h.node.add(&pod("a")).await.unwrap();
    let error = h.node.add(&pod("a")).await.unwrap_err();
    assert!(matches!(error, NodeError::AlreadyAttached(_)), "{error}");
    assert_eq!(error.to_cni().code, codes::DATAPATH);
    // Nothing was undone by the refused ADD.
    assert_eq!(h.assigned(), 1);
    h.node.check(&pod("a")).await.unwrap();
}

#[tokio::test]
async fn an_add_whose_caller_gave_up_is_undone_and_the_del_finds_nothing_left() {
    // The input: 4 s per cloud call, an empty pool, a plugin
    // waiting 2 s.
    let (kernel, namespaces) = kernel(&["a"]);
    let backend = Arc::new(Faulty::new(
        MemoryBackend::new("10.20.0.0/24".parse().unwrap()),
        FaultPlan::fixed_latency(Duration::from_millis(4000)),
    ));
    let node = Arc::new(node_over(backend, Arc::new(MemoryStore::default()), kernel, false).await);
    let mut request = pod("a");
    request.timeout_ms = Some(2000);
    let started = std::time::Instant::now();
    let error = node.add(&request).await.unwrap_err();
    assert!(matches!(error, NodeError::Abandoned { .. }), "{error}");
    assert_eq!(error.to_cni().code, ErrorCode::TryAgainLater);
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "answered before the caller's timeout"
    );
    node.del(&request).await.unwrap();
    // Let the allocation finish: the address must not end up assigned to
    // the dead sandbox, nor an interface in it.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(node.pools().stats(&key()).assigned, 0);
    assert!(node.attachments().all().is_empty());
    let links = node.datapath().kernel().namespace(namespaces[0]).links;
    assert_eq!(links.keys().collect::<Vec<_>>(), ["lo"]);
}

#[tokio::test]
async fn a_del_during_an_add_cancels_it_and_waits_for_the_undo() {
    let (kernel, namespaces) = kernel(&["a"]);
    let backend = Arc::new(Faulty::new(
        MemoryBackend::new("10.20.0.0/24".parse().unwrap()),
        FaultPlan::fixed_latency(Duration::from_millis(1500)),
    ));
    let node = Arc::new(node_over(backend, Arc::new(MemoryStore::default()), kernel, false).await);
    let adding = {
        let node = node.clone();
        tokio::spawn(async move { node.add(&pod("a")).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    node.del(&pod("a")).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(500),
        "DEL waited {waited:?} for the cancelled ADD"
    );
    let error = adding.await.unwrap().unwrap_err();
    assert!(matches!(error, NodeError::Abandoned { .. }), "{error}");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(node.pools().stats(&key()).assigned, 0);
    assert!(node.attachments().all().is_empty());
    let links = node.datapath().kernel().namespace(namespaces[0]).links;
    assert_eq!(links.keys().collect::<Vec<_>>(), ["lo"]);
}

#[tokio::test]
async fn without_kubernetes_a_gone_sandbox_gives_its_address_back_after_two_passes() {
    let h = harness(&["a", "b"]).await;
    h.node.add(&pod("a")).await.unwrap();
    h.node.add(&pod("b")).await.unwrap();
    h.node.datapath().kernel().remove_namespace(&netns("a"));
    assert!(
        h.node.collect_gone_sandboxes().await.unwrap().is_empty(),
        "one pass is not enough"
    );
    assert_eq!(h.assigned(), 2);
    let collected = h.node.collect_gone_sandboxes().await.unwrap();
    assert_eq!(collected, [pod("a").attachment_id()]);
    assert_eq!(h.assigned(), 1, "b lives on");
    assert_eq!(h.host_routes(), ["10.20.0.3/32 dev hulk0"]);
    assert!(
        h.node
            .attachments()
            .get(&pod("a").attachment_id())
            .is_none()
    );
}

#[tokio::test]
async fn a_recycled_netns_path_is_another_sandbox_and_is_left_alone() {
    let h = harness(&["a"]).await;
    h.node.add(&pod("a")).await.unwrap();
    let kernel = h.node.datapath().kernel();
    kernel.remove_namespace(&netns("a"));
    // The runtime reuses the path for a new sandbox that holds its own eth0.
    let recycled = kernel.add_namespace(netns("a"));
    kernel
        .create_slave("eth1", "eth0", SlaveKind::default(), &recycled)
        .await
        .unwrap();
    h.node.collect_gone_sandboxes().await.unwrap();
    let collected = h.node.collect_gone_sandboxes().await.unwrap();
    assert_eq!(collected.len(), 1);
    assert_eq!(h.assigned(), 0);
    assert!(
        kernel.namespace(recycled).links.contains_key("eth0"),
        "the new sandbox's interface is not ours to remove"
    );
}

#[tokio::test]
async fn gc_removes_the_interface_in_the_recorded_sandbox_before_releasing() {
    // A force-deleted pod whose sandbox the runtime has not torn down: the
    // address must not stay on a live interface while it serves another pod.
    let h = harness(&["a"]).await;
    h.node.add(&pod("a")).await.unwrap();
    let released = h.node.gc(Some("vpc"), &[]).await.unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(h.links(0), ["lo"], "the old sandbox's eth0 went first");
    assert_eq!(h.assigned(), 0);
    assert!(h.host_routes().is_empty());
}

#[tokio::test]
async fn del_touches_only_what_add_built() {
    let h = harness(&["a", "b"]).await;
    let kernel = h.node.datapath().kernel();
    // A foreign eth0 (another plugin's link, not a slave) in a's pod.
    kernel.add_link(h.namespaces[0], "eth0", 1500);
    let error = h.node.add(&pod("a")).await.unwrap_err();
    assert_eq!(error.to_cni().code, codes::DATAPATH, "{error}");
    h.node.del(&pod("a")).await.unwrap();
    assert_eq!(
        h.links(0),
        ["eth0", "lo"],
        "the foreign eth0 survives our DEL"
    );
    assert_eq!(h.assigned(), 0);

    // A DEL naming container a with b's namespace leaves b alone.
    h.node.add(&pod("b")).await.unwrap();
    let mut confused = pod("a");
    confused.netns = Some(netns("b"));
    h.node.del(&confused).await.unwrap();
    assert_eq!(h.links(1), ["eth0", "lo"]);
    assert_eq!(h.assigned(), 1);
    h.node.check(&pod("b")).await.unwrap();
}

/// What a SIGKILL mid-ADD leaves: the record says Adding, the pod holds
/// `eth0` DOWN without an address (renamed, not configured) and maybe a
/// temporary link, and the store already assigns the address.
async fn crash_mid_add(store: Arc<dyn PoolStore>, kernel: Arc<FakeKernel>) {
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    let node = node_over(backend, store, kernel, true).await;
    node.add(&pod("a")).await.unwrap();
    // Turn the finished ADD back into a half-built one, as a kill between
    // the rename and the address would have left it.
    let mut record = node.attachments().get(&pod("a").attachment_id()).unwrap();
    record.phase = Phase::Adding;
    record.created = None;
    node.attachments().put(record).unwrap();
    let kernel = node.datapath().kernel();
    let ns = kernel.open(&netns("a")).await.unwrap();
    let address = kernel.addresses(&ns, "eth0").await.unwrap()[0];
    kernel.delete_link(&ns, "eth0").await.unwrap();
    kernel
        .create_slave("eth1", "eth0", SlaveKind::default(), &ns)
        .await
        .unwrap();
    kernel
        .create_slave("eth1", "hulk0123456789a", SlaveKind::default(), &ns)
        .await
        .unwrap();
    assert_eq!(address.to_string(), "10.20.0.2/24");
}

#[tokio::test]
async fn a_retried_add_after_a_crash_mid_add_rebuilds_the_interface() {
    let store: Arc<dyn PoolStore> = Arc::new(MemoryStore::default());
    let (kernel, _) = kernel(&["a"]);
    crash_mid_add(store.clone(), kernel.clone()).await;
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    let node = node_over(backend, store, kernel, false).await;
    let attached = node.add(&pod("a")).await.unwrap();
    assert_eq!(
        attached.lease.address.to_string(),
        "10.20.0.2/24",
        "the same address"
    );
    node.check(&pod("a")).await.unwrap();
    let ns = node.datapath().kernel().open(&netns("a")).await.unwrap();
    let links: Vec<String> = node
        .datapath()
        .kernel()
        .links(&ns)
        .await
        .unwrap()
        .into_iter()
        .map(|link| link.name)
        .collect();
    assert!(
        !links.iter().any(|name| name.starts_with("hulk")),
        "{links:?}"
    );
}

#[tokio::test]
async fn a_del_after_a_crash_mid_add_removes_the_half_built_interface_and_leftovers() {
    let store: Arc<dyn PoolStore> = Arc::new(MemoryStore::default());
    let (kernel, _) = kernel(&["a"]);
    crash_mid_add(store.clone(), kernel.clone()).await;
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    let node = node_over(backend, store, kernel, false).await;
    node.restore().await.unwrap();
    node.del(&pod("a")).await.unwrap();
    let ns = node.datapath().kernel().open(&netns("a")).await.unwrap();
    let links = node.datapath().kernel().links(&ns).await.unwrap();
    assert_eq!(links.len(), 1, "only lo: {links:?}");
    assert_eq!(node.pools().stats(&key()).assigned, 0);
    assert!(node.datapath().kernel().host_namespace().routes.is_empty());
}

#[tokio::test]
async fn a_del_noted_while_the_agent_was_down_is_replayed_once() {
    let directory = std::env::temp_dir().join(format!("hulk-del-notes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    let (kernel, _) = kernel(&["a", "b"]);
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    let node = node_over(backend, Arc::new(MemoryStore::default()), kernel, true)
        .await
        .with_del_notes(DelNotes::new(&directory));
    node.add(&pod("a")).await.unwrap();
    // The plugin's note for a (agent unreachable), and a stale note for b
    // written before b's ADD.
    let notes = DelNotes::new(&directory);
    notes.write(&pod("b")).unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    node.add(&pod("b")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    notes.write(&pod("a")).unwrap();
    assert_eq!(node.replay_del_notes().await, 1);
    assert!(node.attachments().get(&pod("a").attachment_id()).is_none());
    assert!(
        node.attachments().get(&pod("b").attachment_id()).is_some(),
        "b was added after its note"
    );
    assert_eq!(node.pools().stats(&key()).assigned, 1);
    assert!(notes.list().unwrap().is_empty());
    std::fs::remove_dir_all(&directory).unwrap();
}

#[tokio::test]
async fn attachments_survive_a_restart_of_the_node() {
    let store: Arc<dyn PoolStore> = Arc::new(MemoryStore::default());
    let (kernel, _) = kernel(&["a"]);
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    let first = node_over(backend.clone(), store.clone(), kernel.clone(), true).await;
    first.add(&pod("a")).await.unwrap();
    let records = first.attachments().all();
    drop(first);
    let second = node_over(backend, store, kernel, false).await;
    assert_eq!(second.attachments().all(), records);
    second.del(&pod("a")).await.unwrap();
    assert_eq!(second.pools().stats(&key()).assigned, 0);
}

#[tokio::test]
async fn an_add_an_earlier_agent_completed_but_may_not_have_answered_is_answered_again() {
    // Killed between recording "ready" and answering: the runtime saw a
    // failure and retries the ADD without a DEL. The restarted agent
    // answers what was built; its own answered ADDs stay the spec's error.
    let store: Arc<dyn PoolStore> = Arc::new(MemoryStore::default());
    let (kernel, _) = kernel(&["a"]);
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    let first = node_over(backend.clone(), store.clone(), kernel.clone(), true).await;
    let built = first.add(&pod("a")).await.unwrap();
    drop(first);
    let second = node_over(backend, store, kernel, false).await;
    let again = second.add(&pod("a")).await.unwrap();
    assert_eq!(again.lease.address, built.lease.address);
    assert_eq!(again.index, built.index, "the same interface, not rebuilt");
    assert!(matches!(
        second.add(&pod("a")).await,
        Err(NodeError::AlreadyAttached(_))
    ));
    second.del(&pod("a")).await.unwrap();
    assert_eq!(second.pools().stats(&key()).assigned, 0);
}

/// The gateway MAC pinned on eth0 in `pod`.
fn pinned_gateway(kernel: &FakeKernel, pod: FakeNs) -> Option<hulk_ipam::MacAddr> {
    let namespace = kernel.namespace(pod);
    let neighbours = &namespace.links.get("eth0")?.neighbours;
    assert!(neighbours.len() <= 1, "{neighbours:?}");
    neighbours.first().and_then(|entry| entry.mac)
}

#[tokio::test]
async fn a_gateway_mac_the_cloud_moves_is_repinned_in_running_pods_and_given_to_new_ones() {
    let old = MacAddr([0xfa, 0x16, 0x3e, 0, 0, 1]);
    let new = MacAddr([0xfa, 0x16, 0x3e, 0, 0, 2]);
    let newer = MacAddr([0xfa, 0x16, 0x3e, 0, 0, 3]);
    let (kernel, namespaces) = kernel(&["a", "b"]);
    let backend =
        Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()).with_gateway_mac(old));
    let store: Arc<dyn PoolStore> = Arc::new(MemoryStore::default());
    let node = node_over(backend.clone(), store.clone(), kernel.clone(), true).await;
    node.add(&pod("a")).await.unwrap();
    assert_eq!(pinned_gateway(&kernel, namespaces[0]), Some(old));

    // The cloud moves its router: an operator's reapply picks it up.
    backend.set_gateway_mac(Some(new));
    let reapplied = node.reapply().await.unwrap();
    assert_eq!(reapplied.gateways_repinned, 1);
    assert_eq!(pinned_gateway(&kernel, namespaces[0]), Some(new));
    let record = node.attachments().get(&pod("a").attachment_id()).unwrap();
    let recorded = &record.created.unwrap().neighbours;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].mac, Some(new), "the record follows");
    // A pod from the warm pool gets the new facts too.
    node.add(&pod("b")).await.unwrap();
    assert_eq!(pinned_gateway(&kernel, namespaces[1]), Some(new));
    assert_eq!(node.reapply().await.unwrap().gateways_repinned, 0);

    // Moved again while the agent is down: the restart picks it up.
    drop(node);
    backend.set_gateway_mac(Some(newer));
    let restarted = node_over(backend.clone(), store, kernel.clone(), false).await;
    for namespace in &namespaces {
        assert_eq!(pinned_gateway(&kernel, *namespace), Some(newer));
    }
    assert_eq!(restarted.repin_gateways().await, 0);
}

/// Three leases of node-1 the backend marks as held by pods `names`' eth0,
/// as a node that died leaves them.
async fn marked_by_pods(backend: &MemoryBackend, names: &[&str]) -> Vec<hulk_ipam::Lease> {
    let leases = backend
        .allocate(&hulk_ipam::AllocationRequest::new(
            key(),
            "node-1",
            names.len(),
        ))
        .await
        .unwrap();
    for (lease, name) in leases.iter().zip(names) {
        backend
            .update_owner(&lease.id, Some(pod(name).owner), None)
            .await
            .unwrap();
    }
    leases
}

/// A node named node-1 with a new, empty store over `backend`: its
/// start adopts the marked addresses as their pods'.
async fn node_with_lost_store(
    backend: Arc<MemoryBackend>,
    kernel: Arc<FakeKernel>,
) -> Node<Arc<FakeKernel>> {
    let node = node_over(backend, Arc::new(MemoryStore::default()), kernel, false).await;
    assert_eq!(node.pools().stats(&key()).assigned, 3, "adopted as held");
    assert!(node.attachments().all().is_empty());
    node
}

fn host_routes_of(node: &Node<Arc<FakeKernel>>) -> Vec<String> {
    node.datapath().kernel().host_namespace().route_lines()
}

const DEAD: [&str; 3] = ["dead-1", "dead-2", "dead-3"];

#[tokio::test]
async fn a_replacement_node_gives_a_dead_predecessors_pod_addresses_back_unrouted() {
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    let leases = marked_by_pods(&backend, &DEAD).await;
    // A new machine: none of the dead pods' namespaces exists.
    let (kernel, _) = kernel(&[]);
    let node = node_with_lost_store(backend.clone(), kernel).await;
    assert!(host_routes_of(&node).is_empty(), "restore routes none");
    let releases = node.pools().metrics().gc_releases.get();

    assert!(
        node.collect_unproven_addresses().await.unwrap().is_empty(),
        "one pass is not enough"
    );
    assert_eq!(node.pools().stats(&key()).assigned, 3);
    assert!(host_routes_of(&node).is_empty());
    let mut released = node.collect_unproven_addresses().await.unwrap();
    released.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    assert_eq!(
        released,
        DEAD.iter().map(|name| pod(name).owner).collect::<Vec<_>>()
    );
    assert_eq!(node.pools().stats(&key()).assigned, 0);
    for lease in &leases {
        assert_eq!(node.pools().holder_of(lease.address.addr()), None);
    }
    assert_eq!(node.pools().metrics().gc_releases.get(), releases + 3);
    assert!(host_routes_of(&node).is_empty(), "never routed");
    assert!(node.collect_unproven_addresses().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_lost_store_keeps_and_routes_the_addresses_live_interfaces_hold() {
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    let leases = marked_by_pods(&backend, &DEAD).await;
    // The same machine: the pods' sandboxes still hold their addresses.
    let (kernel, namespaces) = kernel(&DEAD);
    for (ns, lease) in namespaces.iter().zip(&leases) {
        kernel
            .create_slave("eth1", "eth0", SlaveKind::default(), ns)
            .await
            .unwrap();
        kernel.add_address(ns, "eth0", lease.address).await.unwrap();
    }
    let node = node_with_lost_store(backend, kernel.clone()).await;
    let mut routes: Vec<String> = leases
        .iter()
        .map(|lease| format!("{}/32 dev hulk0", lease.address.addr()))
        .collect();
    routes.sort();
    for _ in 0..5 {
        assert!(node.collect_unproven_addresses().await.unwrap().is_empty());
        assert_eq!(node.pools().stats(&key()).assigned, 3);
        let mut found = host_routes_of(&node);
        found.sort();
        assert_eq!(found, routes, "routed once proven");
    }
    let restored = node.restore().await.unwrap();
    assert_eq!(restored.node.routes_installed, 3);
    assert!(restored.node.stale_routes_removed.is_empty());

    // One sandbox dies: its address goes back after the same grace.
    kernel.remove_namespace(&netns("dead-2"));
    assert!(node.collect_unproven_addresses().await.unwrap().is_empty());
    assert_eq!(
        node.collect_unproven_addresses().await.unwrap(),
        [pod("dead-2").owner]
    );
    assert_eq!(node.pools().stats(&key()).assigned, 2);
    assert!(
        !host_routes_of(&node).contains(&format!("{}/32 dev hulk0", leases[1].address.addr())),
        "its route leaves with it"
    );
}

#[tokio::test]
async fn a_failed_namespace_scan_judges_nothing() {
    let backend = Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap()));
    marked_by_pods(&backend, &DEAD).await;
    let (kernel, _) = kernel(&[]);
    let node = node_with_lost_store(backend, kernel.clone()).await;
    kernel.fail_namespace_listing(true);
    for _ in 0..4 {
        assert!(node.collect_unproven_addresses().await.is_err());
    }
    assert_eq!(node.pools().stats(&key()).assigned, 3, "all kept");
    kernel.fail_namespace_listing(false);
    assert!(
        node.collect_unproven_addresses().await.unwrap().is_empty(),
        "failed scans counted no pass"
    );
    assert_eq!(node.collect_unproven_addresses().await.unwrap().len(), 3);
}

#[tokio::test]
async fn an_address_with_an_attachment_record_is_not_judged_by_the_kernel_scan() {
    let h = harness(&["a"]).await;
    let attached = h.node.add(&pod("a")).await.unwrap();
    // The interface is gone but the sandbox lives: the record's pass
    // judges this attachment, not the scan of addresses without one.
    let kernel = h.node.datapath().kernel();
    kernel.delete_link(&h.namespaces[0], "eth0").await.unwrap();
    for _ in 0..3 {
        assert!(
            h.node
                .collect_unproven_addresses()
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(h.assigned(), 1);
    assert!(
        h.node
            .attachments()
            .get(&pod("a").attachment_id())
            .is_some()
    );
    assert_eq!(
        h.host_routes(),
        [format!("{}/32 dev hulk0", attached.lease.address.addr())]
    );
}
