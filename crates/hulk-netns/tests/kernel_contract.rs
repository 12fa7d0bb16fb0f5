//! One contract suite for the [`Kernel`] trait, run against
//! [`FakeKernel`] and against [`NetlinkKernel`] in namespaces the test
//! creates (a node namespace whose veth `eth1` is the parent of macvlan
//! slaves; the host has no ipvlan). Every rule the fake encodes and the
//! datapath relies on is asserted on both, so the fake's rules are checked
//! against the kernel rather than assumed. Root; nextest group `netns`;
//! Linux 6.2 or later (routes following a renamed link need an up link
//! renamed).

// Only the namespace guard is used here, not the VPC scenarios.
#[allow(dead_code)]
mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use hulk_netns::fake::FakeKernel;
use hulk_netns::{
    Kernel, KernelError, Link, LinkUpdate, MacAddr, MacVlanMode, Neighbour, NetlinkKernel, Route,
    SlaveKind,
};
use nix::errno::Errno;
use support::Namespace;

const MACVLAN: SlaveKind = SlaveKind::MacVlan {
    mode: MacVlanMode::Bridge,
};

/// The parent of every slave, in the host namespace.
const PARENT: &str = "eth1";

/// The parent's MTU as each setup builds it.
const PARENT_MTU: u32 = 1500;

/// A temporary name as ADD gives a new slave: 15 bytes, the most a name
/// may have.
const TEMPORARY: &str = "hulk0123456789a";

/// A kernel with a host namespace holding the parent, and the means to
/// make what the tests need around it.
trait Setup {
    /// The kernel under test.
    type K: Kernel;

    /// The kernel.
    fn kernel(&self) -> &Self::K;

    /// A new namespace, as a pod's; its path.
    fn pod(&mut self) -> PathBuf;

    /// Adds a link that is no slave (a bridge), up, with `mtu`, to the
    /// namespace at `path`.
    fn plain_link(&self, path: &Path, name: &str, mtu: u32);

    /// A path holding a regular file.
    fn file(&mut self) -> PathBuf;

    /// Removes the path of the namespace at `path`, as a runtime does when
    /// a pod dies; open handles keep the namespace.
    fn remove(&mut self, path: &Path);

    /// Makes the namespace at `path` reachable a second way: a process
    /// living in it (the real kernel), a second path (the fake).
    fn second_path(&mut self, path: &Path);

    /// A regular file where named namespaces are bound, as a failed
    /// `ip netns add` leaves one; its path.
    fn placeholder(&mut self) -> PathBuf;
}

/// The fake kernel.
struct Fake {
    kernel: FakeKernel,
    pods: usize,
}

impl Fake {
    fn new() -> Fake {
        let kernel = FakeKernel::new();
        kernel.add_parent(PARENT, PARENT_MTU);
        Fake { kernel, pods: 0 }
    }
}

impl Setup for Fake {
    type K = FakeKernel;

    fn kernel(&self) -> &FakeKernel {
        &self.kernel
    }

    fn pod(&mut self) -> PathBuf {
        self.pods += 1;
        let path = PathBuf::from(format!("/var/run/netns/contract-{}", self.pods));
        self.kernel.add_namespace(&path);
        path
    }

    fn plain_link(&self, path: &Path, name: &str, mtu: u32) {
        let ns = futures::executor::block_on(self.kernel.open(path)).expect("open");
        self.kernel.add_link(ns, name, mtu);
    }

    fn file(&mut self) -> PathBuf {
        let path = PathBuf::from("/var/run/netns/contract-file");
        self.kernel.add_file(&path);
        path
    }

    fn remove(&mut self, path: &Path) {
        self.kernel.remove_namespace(path);
    }

    fn second_path(&mut self, path: &Path) {
        let ns = futures::executor::block_on(self.kernel.open(path)).expect("open");
        self.kernel.bind("/proc/4242/ns/net", ns);
    }

    fn placeholder(&mut self) -> PathBuf {
        let path = PathBuf::from("/var/run/netns/contract-placeholder");
        self.kernel.add_file(&path);
        path
    }
}

/// The real kernel: a node namespace with a veth pair `eth1`/`eth1p`, up,
/// as the host; pods are named namespaces.
struct Real {
    // Dropped first: its worker lives in the node namespace.
    kernel: NetlinkKernel,
    node: Namespace,
    pods: Vec<Namespace>,
    prefix: String,
    scratch: PathBuf,
    /// Processes living in pod namespaces, killed on drop.
    processes: Vec<std::process::Child>,
    /// Files made in the named namespaces' directory, removed on drop.
    placeholders: Vec<PathBuf>,
}

impl Real {
    fn new(test: &str) -> Real {
        let prefix = support::prefix(test);
        let node = Namespace::create(format!("{prefix}-node"));
        for command in [
            "link add eth1 type veth peer name eth1p",
            "link set eth1 up",
            "link set eth1p up",
        ] {
            node.exec("ip", &command.split(' ').collect::<Vec<_>>());
        }
        let kernel =
            NetlinkKernel::with_host(node.netns.try_clone().expect("clone")).expect("kernel");
        let scratch = std::env::temp_dir().join(&prefix);
        Real {
            kernel,
            node,
            pods: Vec::new(),
            prefix,
            scratch,
            processes: Vec::new(),
            placeholders: Vec::new(),
        }
    }
}

impl Setup for Real {
    type K = NetlinkKernel;

    fn kernel(&self) -> &NetlinkKernel {
        &self.kernel
    }

    fn pod(&mut self) -> PathBuf {
        let pod = Namespace::create(format!("{}-p{}", self.prefix, self.pods.len() + 1));
        let path = pod.path();
        self.pods.push(pod);
        path
    }

    fn plain_link(&self, path: &Path, name: &str, mtu: u32) {
        let namespace = self
            .pods
            .iter()
            .chain([&self.node])
            .find(|namespace| namespace.path() == path)
            .expect("a namespace of this setup");
        let mtu = mtu.to_string();
        namespace.exec("ip", &["link", "add", name, "mtu", &mtu, "type", "bridge"]);
        namespace.exec("ip", &["link", "set", name, "up"]);
    }

    fn file(&mut self) -> PathBuf {
        std::fs::create_dir_all(&self.scratch).expect("scratch directory");
        let path = self.scratch.join("file");
        std::fs::write(&path, b"").expect("file");
        path
    }

    fn remove(&mut self, path: &Path) {
        self.pods.retain(|pod| pod.path() != path);
    }

    fn second_path(&mut self, path: &Path) {
        let pod = self
            .pods
            .iter()
            .find(|pod| pod.path() == path)
            .expect("a pod of this setup");
        // A child forked by a thread inside the namespace lives there.
        let child = hulk_netns::run_blocking_in(&pod.netns, || {
            std::process::Command::new("sleep").arg("600").spawn()
        })
        .expect("enter the namespace")
        .expect("start a process");
        self.processes.push(child);
    }

    fn placeholder(&mut self) -> PathBuf {
        let path =
            Path::new(hulk_netns::NETNS_RUN_DIR).join(format!("{}-placeholder", self.prefix));
        std::fs::write(&path, b"").expect("placeholder");
        self.placeholders.push(path.clone());
        path
    }
}

impl Drop for Real {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for path in &self.placeholders {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Runs every rule against both kernels, one test each.
macro_rules! contract {
    ($($rule:ident),* $(,)?) => {
        /// The rules against the fake kernel.
        mod fake {
            $(
                #[tokio::test]
                async fn $rule() {
                    super::$rule(super::Fake::new()).await;
                }
            )*
        }

        /// The rules against the real kernel.
        mod netlink {
            $(
                #[tokio::test]
                async fn $rule() {
                    super::$rule(super::Real::new(stringify!($rule))).await;
                }
            )*
        }
    };
}

contract!(
    a_new_namespace_holds_only_lo_down,
    namespaces_are_told_apart_and_missing_ones_classified,
    a_slave_is_created_down_inside_its_namespace_and_renamed_there,
    names_are_unique_in_a_namespace_and_at_most_15_bytes,
    missing_links_are_classified,
    a_slave_cannot_exceed_its_parents_mtu_and_follows_it_down,
    link_changes_apply_in_the_kernels_order,
    macvlan_macs_must_be_unicast_and_not_in_use,
    addresses_bring_their_connected_route_on_an_up_link,
    routes_need_an_up_link_and_replace_by_destination_and_metric,
    routes_follow_a_renamed_link_and_die_with_a_deleted_one,
    ipv6_routes_get_the_kernels_default_metric,
    neighbours_are_permanent_and_replaced,
    slaves_die_with_their_parent,
    link_sysctls_need_the_link,
    sandbox_namespaces_are_listed_once_each_without_the_hosts,
);

fn names(links: &[Link]) -> Vec<String> {
    let mut names: Vec<String> = links.iter().map(|link| link.name.clone()).collect();
    names.sort();
    names
}

/// Routes as lines, sorted; IPv6 link-local routes (`fe80::/64`, which
/// the kernel adds on every up link and the fake leaves out) dropped.
fn lines(routes: &[Route]) -> Vec<String> {
    let link_local: ipnet::IpNet = "fe80::/64".parse().expect("prefix");
    let mut lines: Vec<String> = routes
        .iter()
        .filter(|route| route.dst != link_local)
        .map(ToString::to_string)
        .collect();
    lines.sort();
    lines
}

/// The errno of a refusal, asserting the refusal.
fn errno_of<T: std::fmt::Debug>(outcome: Result<T, KernelError>) -> Option<Errno> {
    let error = outcome.expect_err("the kernel refuses");
    error.raw_os_error().map(Errno::from_raw)
}

/// The permanent entries: the kernel also lists entries it makes itself
/// (multicast ones for IPv6 MLD, learned ones), which the fake leaves out.
fn permanent(entries: Vec<Neighbour>) -> Vec<Neighbour> {
    entries
        .into_iter()
        .filter(|entry| entry.permanent)
        .collect()
}

fn up() -> LinkUpdate {
    LinkUpdate {
        up: true,
        ..LinkUpdate::default()
    }
}

fn mtu(mtu: u32) -> LinkUpdate {
    LinkUpdate {
        mtu: Some(mtu),
        ..LinkUpdate::default()
    }
}

fn rename(name: &str) -> LinkUpdate {
    LinkUpdate {
        rename: Some(name.to_owned()),
        ..LinkUpdate::default()
    }
}

fn net(text: &str) -> ipnet::IpNet {
    text.parse().expect("prefix")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

/// A new pod namespace, opened.
async fn open_pod<S: Setup>(setup: &mut S) -> <S::K as Kernel>::Ns {
    let path = setup.pod();
    setup.kernel().open(&path).await.expect("open")
}

/// Creates the macvlan slave `name` of the parent in `ns`.
async fn add_slave<K: Kernel>(kernel: &K, ns: &K::Ns, name: &str) {
    kernel
        .create_slave(PARENT, name, MACVLAN, ns)
        .await
        .expect("create");
}

/// The link `name` of `ns`, which must exist.
async fn link_of<K: Kernel>(kernel: &K, ns: &K::Ns, name: &str) -> Link {
    kernel
        .link(ns, name)
        .await
        .expect("lookup")
        .unwrap_or_else(|| panic!("{name} exists"))
}

/// The IPv4 ones of `addresses` (the fake leaves IPv6 link-local ones out).
fn ipv4(addresses: Vec<ipnet::IpNet>) -> Vec<ipnet::IpNet> {
    addresses
        .into_iter()
        .filter(|address| address.addr().is_ipv4())
        .collect()
}

/// A pod namespace with a macvlan slave `name`, up.
async fn pod_with_slave<S: Setup>(setup: &mut S, name: &str) -> (PathBuf, <S::K as Kernel>::Ns) {
    let path = setup.pod();
    let kernel = setup.kernel();
    let pod = kernel.open(&path).await.expect("open");
    add_slave(kernel, &pod, name).await;
    kernel.update_link(&pod, name, &up()).await.expect("up");
    (path, pod)
}

async fn a_new_namespace_holds_only_lo_down<S: Setup>(mut setup: S) {
    let pod = open_pod(&mut setup).await;
    let kernel = setup.kernel();
    let links = kernel.links(&pod).await.expect("links");
    assert_eq!(names(&links), ["lo"]);
    let lo = &links[0];
    assert_eq!(
        (lo.up, lo.mtu, lo.mac, lo.slave),
        (false, 65536, Some(MacAddr([0; 6])), None)
    );
    assert_eq!(
        kernel.link(&pod, "lo").await.expect("lo").as_ref(),
        Some(lo)
    );
    assert!(kernel.all_routes(&pod).await.expect("routes").is_empty());
}

async fn namespaces_are_told_apart_and_missing_ones_classified<S: Setup>(mut setup: S) {
    let (first, second) = (setup.pod(), setup.pod());
    let file = setup.file();
    let kernel = setup.kernel();
    let pod = kernel.open(&first).await.expect("open");
    let id = kernel.identify(&first).await.expect("identify");
    assert!(id.is_some());
    assert_eq!(kernel.identity(&pod), id);
    assert_ne!(kernel.identify(&second).await.expect("identify"), id);
    assert_ne!(kernel.host_identity(), id);
    assert!(kernel.host_identity().is_some());

    let missing = Path::new("/var/run/netns/hulk-contract-missing");
    assert_eq!(kernel.identify(missing).await.expect("identify"), None);
    let outcome = kernel.open(missing).await.map(drop);
    assert!(
        matches!(&outcome, Err(KernelError::NamespaceNotFound(path)) if path == missing),
        "{outcome:?}"
    );
    assert_eq!(errno_of(outcome), Some(Errno::ENOENT));
    for outcome in [
        kernel.open(&file).await.map(drop),
        kernel.identify(&file).await.map(drop),
    ] {
        assert!(
            matches!(&outcome, Err(KernelError::NotANamespace { path, .. }) if *path == file),
            "{outcome:?}"
        );
    }

    // The path goes; the namespace lives on while a handle holds it.
    setup.remove(&first);
    let kernel = setup.kernel();
    assert_eq!(kernel.identify(&first).await.expect("identify"), None);
    assert!(matches!(
        kernel.open(&first).await,
        Err(KernelError::NamespaceNotFound(_))
    ));
    assert_eq!(names(&kernel.links(&pod).await.expect("links")), ["lo"]);
}

async fn a_slave_is_created_down_inside_its_namespace_and_renamed_there<S: Setup>(mut setup: S) {
    let pod = open_pod(&mut setup).await;
    let kernel = setup.kernel();
    let host = kernel.host();
    let parent = link_of(kernel, host, PARENT).await;
    add_slave(kernel, &pod, TEMPORARY).await;
    assert_eq!(kernel.link(host, TEMPORARY).await.expect("lookup"), None);
    let slave = link_of(kernel, &pod, TEMPORARY).await;
    assert_eq!(slave.slave, Some(MACVLAN));
    assert!(!slave.up);
    assert_eq!(slave.mtu, PARENT_MTU);
    let mac = slave.mac.expect("a MAC");
    assert_ne!(
        Some(mac),
        parent.mac,
        "a macvlan slave has a MAC of its own"
    );
    assert_eq!(mac.0[0] & 0b11, 0b10, "locally administered unicast");

    // A second slave of the parent gets yet another MAC.
    add_slave(kernel, &pod, "net1").await;
    let other = link_of(kernel, &pod, "net1").await;
    assert_ne!(other.mac, slave.mac);
    assert_ne!(other.index, slave.index);

    // Renamed in place: the same link, under its new name only.
    kernel
        .update_link(&pod, TEMPORARY, &rename("eth0"))
        .await
        .expect("rename");
    assert_eq!(kernel.link(&pod, TEMPORARY).await.expect("lookup"), None);
    let eth0 = link_of(kernel, &pod, "eth0").await;
    assert_eq!(
        Link {
            name: TEMPORARY.to_owned(),
            ..eth0.clone()
        },
        slave
    );
    assert_eq!(
        names(&kernel.links(&pod).await.expect("links")),
        ["eth0", "lo", "net1"]
    );

    // An up link can be renamed too (Linux 6.2 and later).
    kernel.update_link(&pod, "eth0", &up()).await.expect("up");
    kernel
        .update_link(&pod, "eth0", &rename("eth2"))
        .await
        .expect("rename an up link");
    let eth2 = link_of(kernel, &pod, "eth2").await;
    assert!(eth2.up);
    assert_eq!(eth2.index, slave.index);
}

async fn names_are_unique_in_a_namespace_and_at_most_15_bytes<S: Setup>(mut setup: S) {
    let (first, second) = (setup.pod(), setup.pod());
    let kernel = setup.kernel();
    let (a, b) = (
        kernel.open(&first).await.expect("open"),
        kernel.open(&second).await.expect("open"),
    );
    add_slave(kernel, &a, "eth0").await;
    let clash = kernel.create_slave(PARENT, "eth0", MACVLAN, &a).await;
    let Err(error) = clash else {
        panic!("a second eth0 was created: {clash:?}");
    };
    assert!(matches!(error, KernelError::Exists { .. }), "{error:?}");
    assert_eq!(error.raw_os_error(), Some(Errno::EEXIST as i32));
    assert_eq!(
        error.to_string(),
        "creating macvlan Bridge eth0 on eth1: File exists (os error 17)"
    );
    assert!(
        std::error::Error::source(&error).is_some(),
        "the cause is kept"
    );

    // Other namespaces have names of their own, the host's included.
    kernel
        .create_slave(PARENT, "eth0", MACVLAN, &b)
        .await
        .expect("eth0 in another namespace");
    kernel
        .create_slave(PARENT, PARENT, MACVLAN, &b)
        .await
        .expect("the parent's name in a pod");

    // Renaming onto a taken name.
    add_slave(kernel, &a, TEMPORARY).await;
    let outcome = kernel.update_link(&a, TEMPORARY, &rename("eth0")).await;
    assert!(
        matches!(outcome, Err(KernelError::Exists { .. })),
        "{outcome:?}"
    );
    assert!(kernel.link(&a, TEMPORARY).await.expect("lookup").is_some());

    // IFNAMSIZ: 15 bytes and a NUL.
    let long = "hulk0123456789ab";
    assert_eq!(
        errno_of(kernel.create_slave(PARENT, long, MACVLAN, &a).await),
        Some(Errno::ERANGE)
    );
    assert_eq!(
        errno_of(kernel.update_link(&a, TEMPORARY, &rename(long)).await),
        Some(Errno::ERANGE)
    );
    assert_eq!(
        names(&kernel.links(&a).await.expect("links")),
        ["eth0", TEMPORARY, "lo"]
    );
}

async fn missing_links_are_classified<S: Setup>(mut setup: S) {
    let pod = open_pod(&mut setup).await;
    let kernel = setup.kernel();
    let not_found = |outcome: Result<(), KernelError>, name: &str| {
        assert!(
            matches!(&outcome, Err(KernelError::LinkNotFound(missing)) if missing == name),
            "{name}: {outcome:?}"
        );
        assert_eq!(
            outcome.err().and_then(|error| error.raw_os_error()),
            Some(Errno::ENODEV as i32)
        );
    };
    not_found(
        kernel.create_slave("eth9", "eth0", MACVLAN, &pod).await,
        "eth9",
    );
    // The parent is looked up in the host, never in the pod.
    add_slave(kernel, &pod, "eth1").await;
    kernel
        .update_link(&pod, "eth1", &rename("eth0"))
        .await
        .expect("rename");
    not_found(
        kernel
            .create_slave("eth0", "net1", MACVLAN, kernel.host())
            .await,
        "eth0",
    );

    let route = Route::via(net("0.0.0.0/0"), ip("10.40.0.1"), "eth9");
    not_found(kernel.update_link(&pod, "eth9", &up()).await, "eth9");
    not_found(
        kernel.add_address(&pod, "eth9", net("10.40.0.5/24")).await,
        "eth9",
    );
    not_found(kernel.replace_route(&pod, &route).await, "eth9");
    not_found(
        kernel
            .replace_neighbour(&pod, "eth9", ip("10.40.0.1"), MacAddr([2, 0, 0, 0, 0, 1]))
            .await,
        "eth9",
    );
    not_found(kernel.addresses(&pod, "eth9").await.map(drop), "eth9");
    not_found(kernel.routes(&pod, "eth9").await.map(drop), "eth9");
    not_found(kernel.neighbours(&pod, "eth9").await.map(drop), "eth9");
    assert_eq!(kernel.link(&pod, "eth9").await.expect("lookup"), None);

    // Deleting what is already gone is no error.
    assert!(!kernel.delete_link(&pod, "eth9").await.expect("delete"));
    assert!(!kernel.delete_route(&pod, &route).await.expect("delete"));
    assert!(kernel.delete_link(&pod, "eth0").await.expect("delete"));
    assert!(!kernel.delete_link(&pod, "eth0").await.expect("delete"));
}

async fn a_slave_cannot_exceed_its_parents_mtu_and_follows_it_down<S: Setup>(mut setup: S) {
    let (path, pod) = pod_with_slave(&mut setup, "eth0").await;
    setup.plain_link(&path, "br0", 1500);
    let kernel = setup.kernel();
    add_slave(kernel, &pod, "net1").await;
    let outcome = kernel.update_link(&pod, "eth0", &mtu(PARENT_MTU + 1)).await;
    assert!(
        matches!(&outcome, Err(KernelError::Failed { .. })),
        "{outcome:?}"
    );
    assert_eq!(errno_of(outcome), Some(Errno::EINVAL));
    let mtu_of = |name: &'static str| {
        let pod = &pod;
        async move {
            kernel
                .link(pod, name)
                .await
                .expect("lookup")
                .expect("link")
                .mtu
        }
    };
    assert_eq!(mtu_of("eth0").await, PARENT_MTU, "unchanged");
    kernel
        .update_link(&pod, "net1", &mtu(1300))
        .await
        .expect("below the parent's");
    assert_eq!(mtu_of("net1").await, 1300);
    // A link that is no slave has no parent to stay under.
    kernel
        .update_link(&pod, "br0", &mtu(9000))
        .await
        .expect("a bridge takes 9000");
    assert_eq!(mtu_of("br0").await, 9000);

    // Lowering the parent's lowers the slaves above it, and only them.
    kernel
        .update_link(kernel.host(), PARENT, &mtu(1400))
        .await
        .expect("parent MTU");
    assert_eq!(mtu_of("eth0").await, 1400);
    assert_eq!(mtu_of("net1").await, 1300);
    assert_eq!(
        errno_of(kernel.update_link(&pod, "net1", &mtu(1450)).await),
        Some(Errno::EINVAL)
    );
}

async fn link_changes_apply_in_the_kernels_order<S: Setup>(mut setup: S) {
    let pod = open_pod(&mut setup).await;
    let kernel = setup.kernel();
    add_slave(kernel, &pod, TEMPORARY).await;
    let mac = MacAddr([0x02, 0x10, 0x20, 0x30, 0x40, 0x50]);
    // MAC, then MTU (refused here), then name: the MAC stays.
    let refused = LinkUpdate {
        rename: Some("eth0".to_owned()),
        mtu: Some(PARENT_MTU + 100),
        mac: Some(mac),
        up: true,
    };
    assert_eq!(
        errno_of(kernel.update_link(&pod, TEMPORARY, &refused).await),
        Some(Errno::EINVAL)
    );
    let link = link_of(kernel, &pod, TEMPORARY).await;
    assert_eq!(
        (link.mac, link.mtu, link.up),
        (Some(mac), PARENT_MTU, false)
    );

    // MTU, then name (refused here): the MTU stays, the link stays down.
    add_slave(kernel, &pod, "eth0").await;
    let refused = LinkUpdate {
        rename: Some("eth0".to_owned()),
        mtu: Some(1400),
        mac: None,
        up: true,
    };
    let outcome = kernel.update_link(&pod, TEMPORARY, &refused).await;
    assert!(
        matches!(outcome, Err(KernelError::Exists { .. })),
        "{outcome:?}"
    );
    let link = link_of(kernel, &pod, TEMPORARY).await;
    assert_eq!((link.mtu, link.up), (1400, false));

    // All at once, as ADD asks.
    kernel.delete_link(&pod, "eth0").await.expect("delete");
    let wanted = LinkUpdate {
        mtu: Some(1450),
        ..refused
    };
    kernel
        .update_link(&pod, TEMPORARY, &wanted)
        .await
        .expect("update");
    let link = link_of(kernel, &pod, "eth0").await;
    assert_eq!((link.mac, link.mtu, link.up), (Some(mac), 1450, true));
}

async fn macvlan_macs_must_be_unicast_and_not_in_use<S: Setup>(mut setup: S) {
    let (_, pod) = pod_with_slave(&mut setup, "eth0").await;
    let kernel = setup.kernel();
    let set_mac = |mac| LinkUpdate {
        mac: Some(mac),
        ..LinkUpdate::default()
    };
    for invalid in [MacAddr([0x03, 0, 0, 0, 0, 1]), MacAddr([0; 6])] {
        assert_eq!(
            errno_of(kernel.update_link(&pod, "eth0", &set_mac(invalid)).await),
            Some(Errno::EADDRNOTAVAIL),
            "{invalid:?}"
        );
    }
    let eth0 = link_of(kernel, &pod, "eth0").await;
    let parent = link_of(kernel, kernel.host(), PARENT).await;
    // Not the parent's, nor an up sibling's, even while down.
    add_slave(kernel, &pod, "net1").await;
    for taken in [parent.mac, eth0.mac] {
        assert_eq!(
            errno_of(
                kernel
                    .update_link(&pod, "net1", &set_mac(taken.expect("a MAC")))
                    .await
            ),
            Some(Errno::EADDRINUSE),
            "{taken:?}"
        );
    }
    // Two down slaves may share one; only the first comes up with it.
    add_slave(kernel, &pod, "net2").await;
    let shared = MacAddr([0x02, 0, 0, 0, 0, 0x99]);
    for name in ["net1", "net2"] {
        kernel
            .update_link(&pod, name, &set_mac(shared))
            .await
            .expect("a MAC no up slave has");
    }
    kernel.update_link(&pod, "net1", &up()).await.expect("up");
    assert_eq!(
        errno_of(kernel.update_link(&pod, "net2", &up()).await),
        Some(Errno::EADDRINUSE)
    );
    let net2 = link_of(kernel, &pod, "net2").await;
    assert!(!net2.up);
}

async fn addresses_bring_their_connected_route_on_an_up_link<S: Setup>(mut setup: S) {
    let pod = open_pod(&mut setup).await;
    let kernel = setup.kernel();
    add_slave(kernel, &pod, "eth0").await;
    let address = net("10.40.0.5/24");
    kernel
        .add_address(&pod, "eth0", address)
        .await
        .expect("address");
    kernel
        .add_address(&pod, "eth0", address)
        .await
        .expect("the same address again");
    kernel
        .add_address(&pod, "eth0", net("10.50.0.5/32"))
        .await
        .expect("a /32");
    assert_eq!(
        ipv4(kernel.addresses(&pod, "eth0").await.expect("addresses")),
        [address, net("10.50.0.5/32")]
    );
    assert!(
        lines(&kernel.routes(&pod, "eth0").await.expect("routes")).is_empty(),
        "no route while the link is down"
    );
    kernel.update_link(&pod, "eth0", &up()).await.expect("up");
    assert_eq!(
        lines(&kernel.routes(&pod, "eth0").await.expect("routes")),
        ["10.40.0.0/24 dev eth0"]
    );
    kernel
        .add_address(&pod, "eth0", net("10.60.0.5/16"))
        .await
        .expect("on an up link");
    assert_eq!(
        lines(&kernel.all_routes(&pod).await.expect("routes")),
        ["10.40.0.0/24 dev eth0", "10.60.0.0/16 dev eth0"]
    );
    kernel
        .add_address(&pod, "eth0", net("2001:db8:5::5/64"))
        .await
        .expect("an IPv6 address");
    assert_eq!(
        lines(&kernel.routes(&pod, "eth0").await.expect("routes")),
        [
            "10.40.0.0/24 dev eth0",
            "10.60.0.0/16 dev eth0",
            "2001:db8:5::/64 dev eth0 metric 256"
        ]
    );
    assert!(kernel.delete_link(&pod, "eth0").await.expect("delete"));
    assert!(
        lines(&kernel.all_routes(&pod).await.expect("routes")).is_empty(),
        "routes die with their link"
    );
}

async fn routes_need_an_up_link_and_replace_by_destination_and_metric<S: Setup>(mut setup: S) {
    let pod = open_pod(&mut setup).await;
    let kernel = setup.kernel();
    add_slave(kernel, &pod, "eth0").await;
    let default = |gateway: &str, link: &str, metric: u32| Route {
        metric,
        ..Route::via(net("0.0.0.0/0"), ip(gateway), link)
    };
    let first = default("10.88.0.1", "eth0", 0);
    let outcome = kernel.replace_route(&pod, &first).await;
    assert_eq!(errno_of(outcome), Some(Errno::ENETDOWN), "eth0 is down");
    kernel.update_link(&pod, "eth0", &up()).await.expect("up");
    // With no IPv4 address in the namespace the kernel has no local table
    // to check the next hop against; ADD brings lo up before its routes.
    let outcome = kernel.replace_route(&pod, &first).await;
    assert_eq!(errno_of(outcome), Some(Errno::EINVAL), "no IPv4 address");
    kernel.update_link(&pod, "lo", &up()).await.expect("lo up");
    kernel.replace_route(&pod, &first).await.expect("route");
    kernel
        .replace_route(&pod, &first)
        .await
        .expect("the same route again");
    let node = Route::direct(net("10.40.0.251/32"), "eth0");
    kernel.replace_route(&pod, &node).await.expect("route");
    assert_eq!(
        lines(&kernel.routes(&pod, "eth0").await.expect("routes")),
        [
            "0.0.0.0/0 via 10.88.0.1 dev eth0 onlink",
            "10.40.0.251/32 dev eth0"
        ]
    );

    add_slave(kernel, &pod, "net1").await;
    kernel.update_link(&pod, "net1", &up()).await.expect("up");
    // Another metric: both stay.
    let second = default("10.40.0.1", "net1", 1);
    kernel.replace_route(&pod, &second).await.expect("route");
    let defaults = |routes: Vec<Route>| {
        lines(
            &routes
                .into_iter()
                .filter(|route| route.dst.prefix_len() == 0)
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        defaults(kernel.all_routes(&pod).await.expect("routes")),
        [
            "0.0.0.0/0 via 10.40.0.1 dev net1 onlink metric 1",
            "0.0.0.0/0 via 10.88.0.1 dev eth0 onlink",
        ]
    );
    // The same destination and metric through another link replaces.
    kernel
        .replace_route(&pod, &default("10.40.0.1", "net1", 0))
        .await
        .expect("route");
    assert_eq!(
        defaults(kernel.all_routes(&pod).await.expect("routes")),
        [
            "0.0.0.0/0 via 10.40.0.1 dev net1 onlink",
            "0.0.0.0/0 via 10.40.0.1 dev net1 onlink metric 1",
        ]
    );
    assert_eq!(
        lines(&kernel.routes(&pod, "eth0").await.expect("routes")),
        ["10.40.0.251/32 dev eth0"]
    );

    // A delete at metric 0 takes one route of any metric; a wrong next hop
    // or link takes none.
    let any = default("10.40.0.1", "net1", 0);
    assert!(
        !kernel
            .delete_route(&pod, &default("10.40.0.9", "net1", 0))
            .await
            .expect("delete")
    );
    assert!(
        !kernel
            .delete_route(&pod, &default("10.40.0.1", "eth0", 0))
            .await
            .expect("delete")
    );
    assert!(kernel.delete_route(&pod, &any).await.expect("delete"));
    assert_eq!(
        defaults(kernel.all_routes(&pod).await.expect("routes")).len(),
        1
    );
    assert!(kernel.delete_route(&pod, &any).await.expect("delete"));
    assert!(!kernel.delete_route(&pod, &any).await.expect("delete"));
    // A metric given must match.
    assert!(
        !kernel
            .delete_route(
                &pod,
                &Route {
                    metric: 7,
                    ..node.clone()
                }
            )
            .await
            .expect("delete")
    );
    assert!(kernel.delete_route(&pod, &node).await.expect("delete"));
    assert!(
        lines(&kernel.all_routes(&pod).await.expect("routes")).is_empty(),
        "{:?}",
        kernel.all_routes(&pod).await
    );
}

async fn routes_follow_a_renamed_link_and_die_with_a_deleted_one<S: Setup>(mut setup: S) {
    let (_, pod) = pod_with_slave(&mut setup, TEMPORARY).await;
    let kernel = setup.kernel();
    kernel
        .add_address(&pod, TEMPORARY, net("10.40.0.5/24"))
        .await
        .expect("address");
    kernel
        .replace_route(
            &pod,
            &Route::via(net("10.96.0.0/12"), ip("10.40.0.251"), TEMPORARY),
        )
        .await
        .expect("route");
    let neighbour = Neighbour {
        ip: ip("10.40.0.1"),
        mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
        permanent: true,
    };
    kernel
        .replace_neighbour(&pod, TEMPORARY, neighbour.ip, MacAddr([2, 0, 0, 0, 0, 1]))
        .await
        .expect("neighbour");
    kernel
        .update_link(&pod, TEMPORARY, &rename("eth0"))
        .await
        .expect("rename");
    assert_eq!(
        lines(&kernel.routes(&pod, "eth0").await.expect("routes")),
        [
            "10.40.0.0/24 dev eth0",
            "10.96.0.0/12 via 10.40.0.251 dev eth0 onlink"
        ]
    );
    assert!(
        kernel
            .addresses(&pod, "eth0")
            .await
            .expect("addresses")
            .contains(&net("10.40.0.5/24"))
    );
    assert_eq!(
        permanent(kernel.neighbours(&pod, "eth0").await.expect("neighbours")),
        [neighbour]
    );
    assert!(kernel.delete_link(&pod, "eth0").await.expect("delete"));
    assert!(lines(&kernel.all_routes(&pod).await.expect("routes")).is_empty());
}

async fn ipv6_routes_get_the_kernels_default_metric<S: Setup>(mut setup: S) {
    let (_, pod) = pod_with_slave(&mut setup, "eth0").await;
    let kernel = setup.kernel();
    let route = Route::via(net("::/0"), ip("fe80::1"), "eth0");
    kernel.replace_route(&pod, &route).await.expect("route");
    let found: Vec<Route> = kernel
        .routes(&pod, "eth0")
        .await
        .expect("routes")
        .into_iter()
        .filter(|found| found.dst.prefix_len() == 0)
        .collect();
    assert_eq!(
        lines(&found),
        ["::/0 via fe80::1 dev eth0 onlink metric 1024"]
    );
    // Asked again with 0, it is the same route, not a second one.
    kernel.replace_route(&pod, &route).await.expect("route");
    assert_eq!(
        lines(&kernel.routes(&pod, "eth0").await.expect("routes")).len(),
        1
    );
    assert!(kernel.delete_route(&pod, &route).await.expect("delete"));
    assert!(lines(&kernel.routes(&pod, "eth0").await.expect("routes")).is_empty());
}

async fn neighbours_are_permanent_and_replaced<S: Setup>(mut setup: S) {
    let (_, pod) = pod_with_slave(&mut setup, "eth0").await;
    let kernel = setup.kernel();
    add_slave(kernel, &pod, "net1").await;
    kernel.update_link(&pod, "net1", &up()).await.expect("up");
    let gateway = ip("10.40.0.1");
    let (old, new) = (
        MacAddr([0xfa, 0x16, 0x3e, 0, 0, 1]),
        MacAddr([0xfa, 0x16, 0x3e, 0, 0, 2]),
    );
    // A down link takes a permanent entry too.
    add_slave(kernel, &pod, "net2").await;
    kernel
        .replace_neighbour(&pod, "net2", gateway, old)
        .await
        .expect("neighbour on a down link");
    kernel
        .replace_neighbour(&pod, "eth0", gateway, old)
        .await
        .expect("neighbour");
    kernel
        .replace_neighbour(&pod, "net1", gateway, old)
        .await
        .expect("neighbour");
    kernel
        .replace_neighbour(&pod, "eth0", gateway, new)
        .await
        .expect("re-pinned");
    let entry = |mac| Neighbour {
        ip: gateway,
        mac: Some(mac),
        permanent: true,
    };
    assert_eq!(
        permanent(kernel.neighbours(&pod, "eth0").await.expect("neighbours")),
        [entry(new)]
    );
    for link in ["net1", "net2"] {
        assert_eq!(
            permanent(kernel.neighbours(&pod, link).await.expect("neighbours")),
            [entry(old)]
        );
    }
}

async fn slaves_die_with_their_parent<S: Setup>(mut setup: S) {
    let (_, pod) = pod_with_slave(&mut setup, "eth0").await;
    let kernel = setup.kernel();
    kernel
        .create_slave(PARENT, "hulk0", MACVLAN, kernel.host())
        .await
        .expect("a host-side slave");
    assert!(
        kernel
            .delete_link(kernel.host(), PARENT)
            .await
            .expect("delete")
    );
    assert_eq!(names(&kernel.links(&pod).await.expect("links")), ["lo"]);
    assert_eq!(
        kernel.link(kernel.host(), "hulk0").await.expect("lookup"),
        None
    );
}

async fn link_sysctls_need_the_link<S: Setup>(mut setup: S) {
    let (_, pod) = pod_with_slave(&mut setup, "eth0").await;
    let kernel = setup.kernel();
    kernel
        .write_sysctl(&pod, "net/ipv4/conf/eth0/arp_notify", "1")
        .await
        .expect("a link's sysctl");
    kernel
        .write_sysctl(&pod, "net/ipv4/conf/all/rp_filter", "2")
        .await
        .expect("all links'");
    kernel
        .write_sysctl(&pod, "net/ipv4/ip_forward", "1")
        .await
        .expect("the namespace's");
    let outcome = kernel
        .write_sysctl(&pod, "net/ipv4/conf/eth9/arp_notify", "1")
        .await;
    let Err(error) = outcome else {
        panic!("a missing link's sysctl was written");
    };
    assert_eq!(error.raw_os_error(), Some(Errno::ENOENT as i32));
    assert_eq!(
        error.to_string(),
        "writing /proc/sys/net/ipv4/conf/eth9/arp_notify: No such file or directory (os error 2)"
    );
}

async fn sandbox_namespaces_are_listed_once_each_without_the_hosts<S: Setup>(mut setup: S) {
    let (first, second) = (setup.pod(), setup.pod());
    setup.second_path(&first);
    let placeholder = setup.placeholder();
    let kernel = setup.kernel();
    let listed = kernel.sandbox_namespaces().await.expect("listing");
    // The named path comes before any other path of the same namespace.
    assert!(listed.contains(&first), "{first:?} in {listed:?}");
    assert!(listed.contains(&second), "{second:?} in {listed:?}");
    assert!(!listed.contains(&placeholder), "not a namespace");
    let (first_id, second_id) = (
        kernel.identify(&first).await.expect("identify"),
        kernel.identify(&second).await.expect("identify"),
    );
    let mut ids = Vec::new();
    for path in &listed {
        // The real listing holds every process's namespace: one that
        // exits or moves by now is not this test's concern.
        if let Ok(Some(id)) = kernel.identify(path).await {
            ids.push(id);
        }
    }
    for ours in [first_id, second_id] {
        assert!(ours.is_some());
        assert_eq!(
            ids.iter().filter(|id| Some(**id) == ours).count(),
            1,
            "each namespace once: {listed:?}"
        );
    }
    assert!(
        !ids.iter().any(|id| Some(*id) == kernel.host_identity()),
        "never the host's: {listed:?}"
    );

    // A namespace nothing holds any more is no sandbox's.
    setup.remove(&second);
    let kernel = setup.kernel();
    let listed = kernel.sandbox_namespaces().await.expect("listing");
    assert!(!listed.contains(&second), "{listed:?}");
    assert!(listed.contains(&first), "{listed:?}");
}
