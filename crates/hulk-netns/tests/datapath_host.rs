//! The datapath on the host kernel with macvlan (the host has no ipvlan;
//! `vm_ipvlan.rs` runs the same scenarios with ipvlan in the VM). Root;
//! nextest group `netns`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use hulk_netns::{
    Datapath, DatapathError, Kernel, MacVlanMode, NetlinkKernel, Ownership, PodNetwork, SlaveKind,
};
use support::{Namespace, Vpc};

const MACVLAN: SlaveKind = SlaveKind::MacVlan {
    mode: MacVlanMode::Bridge,
};

#[tokio::test]
async fn macvlan_pods_reach_each_other_the_gateway_the_node_and_services() {
    support::traffic_scenario("mvt", MACVLAN).await;
}

#[tokio::test]
async fn macvlan_detach_removes_the_pod_and_restore_rebuilds_the_node() {
    support::restore_scenario("mvr", MACVLAN).await;
}

/// A scratch directory under the system's temporary directory, removed on
/// drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let path = std::env::temp_dir().join(support::prefix(test));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch directory");
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `work` on a thread of its own and fails the test if it has not
/// finished within 5 s: a regression that opens a FIFO for reading blocks
/// until a writer comes, and must fail the test rather than hang it.
fn within<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    outcome
        .recv_timeout(Duration::from_secs(5))
        .expect("no answer within 5 s: the call blocked")
}

/// A pod spec whose parent does not exist: a request that got past the
/// namespace checks by mistake fails without creating anything.
fn spec_without_parent() -> PodNetwork {
    PodNetwork {
        parent: "hulk-none0".into(),
        kind: MACVLAN,
        ifname: "eth0".into(),
        address: "10.40.0.99/24".parse().expect("ip"),
        gateway: support::GATEWAY.parse().expect("ip"),
        gateway_mac: None,
        mac: None,
        mtu: None,
        service_path: None,
    }
}

#[test]
fn paths_that_are_not_network_namespaces_are_refused_quickly() {
    let scratch = Scratch::new("notns");
    let fifo = scratch.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let file = scratch.0.join("file");
    std::fs::write(&file, b"").expect("file");
    let directory = scratch.0.join("directory");
    std::fs::create_dir(&directory).expect("directory");
    for path in [fifo, file, directory, PathBuf::from("/proc/self/ns/mnt")] {
        let shown = path.display().to_string();
        let outcomes = within(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async move {
                    let datapath = Datapath::new(NetlinkKernel::new().expect("kernel"));
                    let spec = spec_without_parent();
                    vec![
                        datapath.attach(&path, &spec).await.map(drop),
                        datapath.check(&path, &spec).await.map(drop),
                        datapath.identify(&path).await.map(drop),
                    ]
                })
        });
        for outcome in outcomes {
            assert!(
                matches!(&outcome, Err(DatapathError::NotANamespace(found, _)) if found.display().to_string() == shown),
                "{shown}: {outcome:?}"
            );
        }
    }
}

#[tokio::test]
async fn the_agents_own_namespace_and_the_node_namespace_are_refused() {
    let vpc = Vpc::build("own", MACVLAN, 1).await;
    let node = &vpc.nodes[0];
    // The process's namespace is the test host's: only names that cannot
    // exist there, so a regression fails the test without touching it.
    let process = PathBuf::from(hulk_netns::PROCESS_NETNS);
    let outcome = node.datapath.attach(&process, &spec_without_parent()).await;
    assert!(
        matches!(outcome, Err(DatapathError::HostNamespace(_))),
        "{outcome:?}"
    );
    let outcome = node
        .datapath
        .detach_owned(Some(&process), "hulk-none0", Ownership::Unrecorded, None)
        .await;
    assert!(
        matches!(outcome, Err(DatapathError::HostNamespace(_))),
        "{outcome:?}"
    );

    // The node namespace (the host handle's) under its own path: its
    // host-side slave hulk0 is a macvlan slave an unrecorded DEL would take.
    let node_path = node.namespace.path();
    let mut spec = vpc.pod_spec(0, 1);
    spec.ifname = "hulk0".into();
    for outcome in [
        node.datapath.attach(&node_path, &spec).await.map(drop),
        node.datapath.check(&node_path, &spec).await.map(drop),
        node.datapath
            .detach_owned(Some(&node_path), "hulk0", Ownership::Unrecorded, None)
            .await
            .map(drop),
    ] {
        assert!(
            matches!(outcome, Err(DatapathError::HostNamespace(_))),
            "{outcome:?}"
        );
    }
    let kernel = node.datapath.kernel();
    let hulk0 = kernel.link(kernel.host(), "hulk0").await.expect("lookup");
    assert!(
        hulk0.is_some_and(|link| link.up),
        "the node's hulk0 is intact"
    );
}

/// Adds a veth pair `eth0`/`eth0p` inside the pod with `10.88.0.2/24` and
/// a default route via `10.88.0.1`: another CNI network's interface.
fn add_first_network(pod: &Namespace) {
    for command in [
        "link add eth0 type veth peer name eth0p",
        "link set eth0p up",
        "link set eth0 up",
        "address add 10.88.0.2/24 dev eth0",
        "route add default via 10.88.0.1 dev eth0",
    ] {
        pod.exec("ip", &command.split(' ').collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn a_veth_named_eth0_survives_an_unrecorded_detach_and_our_leftovers_do_not() {
    let vpc = Vpc::build("veth", MACVLAN, 1).await;
    let pod = Namespace::create(format!("{}-pod", vpc.prefix));
    add_first_network(&pod);
    let kernel = vpc.nodes[0].datapath.kernel();
    let inside = kernel.open(&pod.path()).await.expect("open");
    let leftover = "hulk0123456789a";
    kernel
        .create_slave("eth1", leftover, MACVLAN, &inside)
        .await
        .expect("a killed ADD's temporary link");
    let detached = vpc.nodes[0]
        .datapath
        .detach_owned(Some(&pod.path()), "eth0", Ownership::Unrecorded, None)
        .await
        .expect("detach");
    assert!(!detached.link_removed, "{detached:?}");
    assert!(detached.foreign_link_kept.is_some(), "{detached:?}");
    assert_eq!(detached.leftovers_removed, [leftover]);
    let names: Vec<String> = kernel
        .links(&inside)
        .await
        .expect("links")
        .into_iter()
        .map(|link| link.name)
        .collect();
    assert!(names.contains(&"eth0".to_owned()), "{names:?}");
    assert!(!names.contains(&leftover.to_owned()), "{names:?}");
}

/// The pod's default routes, as the kernel lists them.
async fn default_routes(datapath: &Datapath<NetlinkKernel>, pod: &Namespace) -> Vec<String> {
    let kernel = datapath.kernel();
    let inside = kernel.open(&pod.path()).await.expect("open");
    kernel
        .all_routes(&inside)
        .await
        .expect("routes")
        .iter()
        .filter(|route| route.dst.prefix_len() == 0)
        .map(ToString::to_string)
        .collect()
}

#[tokio::test]
async fn a_default_route_via_a_veth_survives_our_attach_and_detach() {
    let vpc = Vpc::build("second", MACVLAN, 1).await;
    let datapath = &vpc.nodes[0].datapath;
    let pod = Namespace::create(format!("{}-pod", vpc.prefix));
    add_first_network(&pod);
    let first = default_routes(datapath, &pod).await;
    assert_eq!(first, ["0.0.0.0/0 via 10.88.0.1 dev eth0"]);
    let mut spec = vpc.pod_spec(0, 1);
    spec.ifname = "net1".into();

    let attached = datapath.attach(&pod.path(), &spec).await.expect("attach");
    assert_eq!(attached.routes[0].metric, 1, "{:?}", attached.routes);
    assert_eq!(
        default_routes(datapath, &pod).await,
        [
            "0.0.0.0/0 via 10.88.0.1 dev eth0",
            "0.0.0.0/0 via 10.40.0.1 dev net1 onlink metric 1"
        ]
    );
    datapath.check(&pod.path(), &spec).await.expect("check");
    let detached = datapath
        .detach_owned(
            Some(&pod.path()),
            "net1",
            Ownership::Recorded(&attached),
            attached.host_route.as_ref(),
        )
        .await
        .expect("detach");
    assert!(detached.link_removed, "{detached:?}");
    assert_eq!(default_routes(datapath, &pod).await, first);

    // Attached again, ours takes over when the first network goes.
    datapath
        .attach(&pod.path(), &spec)
        .await
        .expect("attach again");
    pod.exec("ip", &["link", "del", "eth0"]);
    assert_eq!(
        default_routes(datapath, &pod).await,
        ["0.0.0.0/0 via 10.40.0.1 dev net1 onlink metric 1"]
    );
    datapath.check(&pod.path(), &spec).await.expect("check");
}

#[tokio::test]
async fn an_mtu_above_the_parents_is_clamped_to_it() {
    let vpc = Vpc::build("mtu", MACVLAN, 1).await;
    let node = &vpc.nodes[0];
    node.namespace
        .exec("ip", &["link", "set", "eth1", "mtu", "1400"]);
    let pod = Namespace::create(format!("{}-pod", vpc.prefix));
    let mut spec = vpc.pod_spec(0, 1);
    spec.mtu = Some(1450);
    let attached = node
        .datapath
        .attach(&pod.path(), &spec)
        .await
        .expect("attach");
    assert_eq!(attached.mtu, 1400);
    let kernel = node.datapath.kernel();
    let inside = kernel.open(&pod.path()).await.expect("open");
    let eth0 = kernel
        .link(&inside, "eth0")
        .await
        .expect("lookup")
        .expect("eth0");
    assert_eq!(eth0.mtu, 1400);
    assert_eq!(
        node.datapath
            .check(&pod.path(), &spec)
            .await
            .expect("check")
            .mtu,
        1400
    );
}
