//! Pod attach (ADD), detach (DEL) and check (CHECK), written against
//! [`Kernel`] so every step and every rollback is unit-tested.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;

use crate::kernel::{Kernel, KernelError, LinkUpdate, Mac, Route, SlaveKind, format_mac};

/// How pods reach Services and the node: through a host-side slave of the
/// same parent (an ipvlan slave cannot talk to its own master).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePath {
    /// The host-side slave, e.g. `hulk0`.
    pub host_link: String,
    /// The node address held by the host-side slave.
    pub node_address: IpAddr,
    /// Service (ClusterIP) ranges, routed from pods to the node so
    /// kube-proxy's rules see them.
    pub service_cidrs: Vec<IpNet>,
}

/// Everything ADD configures for one pod interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// The VPC-facing host interface the slave hangs off.
    pub parent: String,
    /// ipvlan (default l2) or macvlan.
    pub kind: SlaveKind,
    /// The interface name inside the pod (`CNI_IFNAME`).
    pub ifname: String,
    /// The pod address with the subnet's prefix length.
    pub address: IpNet,
    /// The subnet gateway: the default route's next hop.
    pub gateway: IpAddr,
    /// The gateway's MAC: installed as a permanent neighbour so the pod is
    /// reachable before the VPC's flow rules reach the node.
    pub gateway_mac: Option<Mac>,
    /// The pod's MAC (macvlan only: ipvlan slaves share the parent's).
    pub mac: Option<Mac>,
    /// The MTU; default: the parent's.
    pub mtu: Option<u32>,
    /// The Service and node path, when the node has a host-side slave.
    pub service_path: Option<ServicePath>,
}

/// What ADD created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The interface's index inside the pod.
    pub index: u32,
    /// Its MAC.
    pub mac: Option<Mac>,
    /// Its MTU.
    pub mtu: u32,
}

/// Datapath failures.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The pod's namespace does not exist.
    #[error("pod network namespace {0} does not exist")]
    NamespaceNotFound(PathBuf),
    /// The interface name is taken inside the pod.
    #[error("interface {0} already exists in the pod namespace")]
    InterfaceExists(String),
    /// The parent interface does not exist on the host.
    #[error("parent interface {0} does not exist on the host")]
    ParentNotFound(String),
    /// The request contradicts itself.
    #[error("invalid pod network: {0}")]
    Invalid(String),
    /// The kernel refused a step.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// CHECK found differences.
    #[error("the pod network differs from what ADD configured: {}", .0.join("; "))]
    Mismatch(Vec<String>),
}

impl PodNetwork {
    fn validate(&self) -> Result<(), DatapathError> {
        if self.address.addr().is_ipv4() != self.gateway.is_ipv4() {
            return Err(DatapathError::Invalid(format!(
                "address {} and gateway {} are of different IP versions",
                self.address, self.gateway
            )));
        }
        if self.mac.is_some() && matches!(self.kind, SlaveKind::IpVlan { .. }) {
            return Err(DatapathError::Invalid(
                "an ipvlan slave shares its parent's MAC; a pod MAC needs macvlan".into(),
            ));
        }
        Ok(())
    }

    /// The routes inside the pod: the default route via the gateway, and
    /// with a Service path, the node and the Service ranges via the
    /// host-side slave.
    pub fn pod_routes(&self) -> Vec<Route> {
        let mut routes = vec![Route::via(
            default_destination(self.gateway),
            self.gateway,
            &self.ifname,
        )];
        if let Some(path) = &self.service_path {
            routes.push(Route::direct(IpNet::from(path.node_address), &self.ifname));
            routes.extend(
                path.service_cidrs
                    .iter()
                    .filter(|cidr| cidr.addr().is_ipv4() == path.node_address.is_ipv4())
                    .map(|cidr| Route::via(*cidr, path.node_address, &self.ifname)),
            );
        }
        routes
    }

    /// The host's /32 (or /128) route to the pod through the host-side slave.
    pub fn host_route(&self) -> Option<Route> {
        self.service_path
            .as_ref()
            .map(|path| host_route_to(self.address.addr(), path))
    }
}

/// The default route's destination in `gateway`'s family: `0.0.0.0/0` or `::/0`.
pub fn default_destination(gateway: IpAddr) -> IpNet {
    let any = match gateway {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    IpNet::new(any, 0).expect("prefix 0 is valid")
}

fn host_route_to(pod: IpAddr, path: &ServicePath) -> Route {
    Route::direct(IpNet::from(pod), &path.host_link)
}

/// A link name no other ADD in flight uses: `hulk` and 11 hex digits.
fn temporary_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    format!("hulk{:011x}", hasher.finish() & 0xfff_ffff_ffff)
}

/// The datapath over some [`Kernel`].
#[derive(Debug)]
pub struct Datapath<K> {
    kernel: K,
}

impl<K: Kernel> Datapath<K> {
    /// A datapath on `kernel`.
    pub fn new(kernel: K) -> Self {
        Datapath { kernel }
    }

    /// The kernel underneath.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    async fn open(&self, netns: &Path) -> Result<K::Ns, DatapathError> {
        match self.kernel.open(netns).await {
            Err(KernelError::NamespaceNotFound(path)) => {
                Err(DatapathError::NamespaceNotFound(path))
            }
            other => Ok(other?),
        }
    }

    /// ADD: creates the slave under a temporary name directly in the pod's
    /// namespace, then names, addresses and routes it. On any failure
    /// everything created is removed before the error is returned.
    pub async fn attach(&self, netns: &Path, spec: &PodNetwork) -> Result<Attached, DatapathError> {
        spec.validate()?;
        let pod = self.open(netns).await?;
        if self.kernel.link(&pod, &spec.ifname).await?.is_some() {
            return Err(DatapathError::InterfaceExists(spec.ifname.clone()));
        }
        let temporary = temporary_name();
        match self
            .kernel
            .create_slave(&spec.parent, &temporary, spec.kind, &pod)
            .await
        {
            Err(KernelError::LinkNotFound(name)) if name == spec.parent => {
                return Err(DatapathError::ParentNotFound(name));
            }
            other => other?,
        }
        match self.configure(&pod, &temporary, spec).await {
            Ok(attached) => Ok(attached),
            Err(error) => {
                self.roll_back(&pod, &temporary, spec).await;
                Err(error)
            }
        }
    }

    async fn configure(
        &self,
        pod: &K::Ns,
        temporary: &str,
        spec: &PodNetwork,
    ) -> Result<Attached, DatapathError> {
        let kernel = &self.kernel;
        let rename = LinkUpdate {
            rename: Some(spec.ifname.clone()),
            mtu: spec.mtu,
            mac: spec.mac,
            up: false,
        };
        kernel.update_link(pod, temporary, &rename).await?;
        // Announce the address on link-up so neighbours (and the VPC's
        // gateway) learn the pod at once, as the reference plugin does.
        let notify = match spec.address.addr() {
            IpAddr::V4(_) => format!("net/ipv4/conf/{}/arp_notify", spec.ifname),
            IpAddr::V6(_) => format!("net/ipv6/conf/{}/ndisc_notify", spec.ifname),
        };
        kernel.write_sysctl(pod, &notify, "1").await?;
        let up = LinkUpdate {
            up: true,
            ..LinkUpdate::default()
        };
        kernel.update_link(pod, "lo", &up).await?;
        kernel.add_address(pod, &spec.ifname, spec.address).await?;
        kernel.update_link(pod, &spec.ifname, &up).await?;
        if let Some(mac) = spec.gateway_mac {
            kernel
                .replace_neighbour(pod, &spec.ifname, spec.gateway, mac)
                .await?;
        }
        for route in spec.pod_routes() {
            kernel.replace_route(pod, &route).await?;
        }
        if let Some(route) = spec.host_route() {
            kernel.replace_route(kernel.host(), &route).await?;
        }
        let link = kernel
            .link(pod, &spec.ifname)
            .await?
            .ok_or_else(|| KernelError::LinkNotFound(spec.ifname.clone()))?;
        Ok(Attached {
            index: link.index,
            mac: link.mac,
            mtu: link.mtu,
        })
    }

    /// Best effort: each step is tried even if an earlier one failed, and
    /// failures are logged, since the original error is what the caller needs.
    async fn roll_back(&self, pod: &K::Ns, temporary: &str, spec: &PodNetwork) {
        for name in [temporary, spec.ifname.as_str()] {
            if let Err(error) = self.kernel.delete_link(pod, name).await {
                tracing::warn!(%error, link = name, "rollback: cannot delete the pod link");
            }
        }
        if let Some(route) = spec.host_route()
            && let Err(error) = self.kernel.delete_route(self.kernel.host(), &route).await
        {
            tracing::warn!(%error, %route, "rollback: cannot delete the host route");
        }
    }

    /// DEL: removes the host route to the pod and the pod's interface.
    /// Whatever is already gone (the namespace, the link, the route) counts
    /// as removed, so DEL can be repeated.
    pub async fn detach(
        &self,
        netns: Option<&Path>,
        ifname: &str,
        pod_address: Option<IpAddr>,
        service_path: Option<&ServicePath>,
    ) -> Result<(), DatapathError> {
        if let (Some(address), Some(path)) = (pod_address, service_path) {
            self.kernel
                .delete_route(self.kernel.host(), &host_route_to(address, path))
                .await?;
        }
        let Some(netns) = netns else {
            return Ok(());
        };
        let pod = match self.open(netns).await {
            Ok(pod) => pod,
            Err(DatapathError::NamespaceNotFound(_)) => return Ok(()),
            Err(error) => return Err(error),
        };
        self.kernel.delete_link(&pod, ifname).await?;
        Ok(())
    }

    /// CHECK: compares the pod's interface, address, routes, gateway
    /// neighbour and host route with `spec`, and lists every difference
    /// (an MTU below `spec`'s is none: a chained plugin may lower it).
    /// When all matches, returns the interface as ADD reported it.
    pub async fn check(&self, netns: &Path, spec: &PodNetwork) -> Result<Attached, DatapathError> {
        let kernel = &self.kernel;
        let pod = self.open(netns).await?;
        let Some(link) = kernel.link(&pod, &spec.ifname).await? else {
            return Err(DatapathError::Mismatch(vec![format!(
                "interface {} is missing",
                spec.ifname
            )]));
        };
        let mut differences = Vec::new();
        if link.slave != Some(spec.kind) {
            let found = link
                .slave
                .map_or_else(|| "not a slave".to_owned(), |kind| kind.to_string());
            differences.push(format!(
                "{} is {found}, expected {}",
                spec.ifname, spec.kind
            ));
        }
        // Only above the subnet's MTU is wrong: a plugin later in the chain
        // (tuning) may lower it.
        if let Some(mtu) = spec.mtu
            && link.mtu > mtu
        {
            differences.push(format!(
                "{} has MTU {}, above the subnet's {mtu}",
                spec.ifname, link.mtu
            ));
        }
        if let Some(mac) = spec.mac
            && link.mac != Some(mac)
        {
            differences.push(format!(
                "{} does not have MAC {}",
                spec.ifname,
                format_mac(&mac)
            ));
        }
        if !link.up {
            differences.push(format!("{} is down", spec.ifname));
        }
        if !kernel
            .addresses(&pod, &spec.ifname)
            .await?
            .contains(&spec.address)
        {
            differences.push(format!("address {} is missing", spec.address));
        }
        let routes = kernel.routes(&pod, &spec.ifname).await?;
        for route in spec.pod_routes() {
            if !routes.iter().any(|found| same_route(found, &route)) {
                differences.push(format!("route {route} is missing"));
            }
        }
        if let Some(mac) = spec.gateway_mac {
            let neighbours = kernel.neighbours(&pod, &spec.ifname).await?;
            let static_entry = neighbours
                .iter()
                .any(|entry| entry.ip == spec.gateway && entry.mac == Some(mac) && entry.permanent);
            if !static_entry {
                differences.push(format!(
                    "the permanent neighbour {} -> {} is missing",
                    spec.gateway,
                    format_mac(&mac)
                ));
            }
        }
        if let (Some(route), Some(path)) = (spec.host_route(), &spec.service_path) {
            let host_routes = kernel.routes(kernel.host(), &path.host_link).await?;
            if !host_routes.iter().any(|found| same_route(found, &route)) {
                differences.push(format!("host route {route} is missing"));
            }
        }
        if differences.is_empty() {
            Ok(Attached {
                index: link.index,
                mac: link.mac,
                mtu: link.mtu,
            })
        } else {
            Err(DatapathError::Mismatch(differences))
        }
    }
}

/// Routes match on destination, next hop and device; the kernel does not
/// always echo the onlink flag back.
fn same_route(found: &Route, wanted: &Route) -> bool {
    found.dst == wanted.dst && found.gateway == wanted.gateway && found.link == wanted.link
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeKernel, FakeNs};
    use crate::kernel::{IpVlanFlag, IpVlanMode, MacVlanMode};

    const NETNS: &str = "/var/run/netns/pod-a";
    const GATEWAY_MAC: Mac = [0xfa, 0x16, 0x3e, 0, 0, 1];

    fn spec() -> PodNetwork {
        PodNetwork {
            parent: "eth1".into(),
            kind: SlaveKind::default(),
            ifname: "eth0".into(),
            address: "10.20.0.5/24".parse().unwrap(),
            gateway: "10.20.0.1".parse().unwrap(),
            gateway_mac: Some(GATEWAY_MAC),
            mac: None,
            mtu: Some(1450),
            service_path: Some(ServicePath {
                host_link: "hulk0".into(),
                node_address: "10.20.0.250".parse().unwrap(),
                service_cidrs: vec![
                    "10.96.0.0/12".parse().unwrap(),
                    "fd00::/108".parse().unwrap(),
                ],
            }),
        }
    }

    fn node() -> (Datapath<FakeKernel>, FakeNs) {
        let kernel = FakeKernel::new();
        kernel.add_parent("eth1", 1500);
        kernel.add_parent("hulk0", 1500);
        let pod = kernel.add_namespace(NETNS);
        (Datapath::new(kernel), pod)
    }

    /// The pod namespace holds nothing but loopback, and the host no route to the pod.
    fn assert_clean(datapath: &Datapath<FakeKernel>, pod: FakeNs) {
        let namespace = datapath.kernel().namespace(pod);
        assert_eq!(namespace.links.keys().collect::<Vec<_>>(), ["lo"]);
        assert!(namespace.routes.is_empty());
        assert!(datapath.kernel().host_namespace().routes.is_empty());
    }

    #[tokio::test]
    async fn attach_configures_the_pod_and_the_host() {
        let (datapath, pod) = node();
        let attached = datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        let namespace = datapath.kernel().namespace(pod);
        assert_eq!(namespace.links.keys().collect::<Vec<_>>(), ["eth0", "lo"]);
        let eth0 = &namespace.links["eth0"];
        assert_eq!(eth0.link.index, attached.index);
        assert_eq!(
            eth0.link.slave,
            Some(SlaveKind::IpVlan {
                mode: IpVlanMode::L2,
                flag: IpVlanFlag::Bridge
            })
        );
        assert_eq!(eth0.link.mtu, 1450);
        assert!(eth0.link.up && namespace.links["lo"].link.up);
        assert_eq!(eth0.addresses, ["10.20.0.5/24".parse::<IpNet>().unwrap()]);
        assert_eq!(eth0.neighbours[0].mac, Some(GATEWAY_MAC));
        assert!(eth0.neighbours[0].permanent);
        assert_eq!(namespace.sysctls["net/ipv4/conf/eth0/arp_notify"], "1");
        let routes: Vec<String> = namespace.routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            routes,
            [
                "0.0.0.0/0 via 10.20.0.1 dev eth0 onlink",
                "10.20.0.250/32 dev eth0",
                "10.96.0.0/12 via 10.20.0.250 dev eth0 onlink",
            ]
        );
        assert_eq!(
            datapath.kernel().host_namespace().route_lines(),
            ["10.20.0.5/32 dev hulk0"]
        );
        datapath.check(Path::new(NETNS), &spec()).await.unwrap();
    }

    #[tokio::test]
    async fn a_failure_at_any_step_leaves_nothing_behind() {
        let (datapath, _) = node();
        datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        let steps = datapath.kernel().operations();
        assert!(steps >= 8, "only {steps} steps");
        for step in 1..=steps {
            let (datapath, pod) = node();
            datapath.kernel().fail_operation(step);
            let error = datapath
                .attach(Path::new(NETNS), &spec())
                .await
                .unwrap_err();
            assert!(
                error.to_string().contains("injected failure"),
                "step {step}: {error}"
            );
            assert_clean(&datapath, pod);
            // The same ADD retried after the failure succeeds.
            datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn detach_is_idempotent_and_tolerates_a_missing_namespace() {
        let (datapath, pod) = node();
        let spec = spec();
        let detach = || {
            datapath.detach(
                Some(Path::new(NETNS)),
                "eth0",
                Some(spec.address.addr()),
                spec.service_path.as_ref(),
            )
        };
        datapath.attach(Path::new(NETNS), &spec).await.unwrap();
        for _ in 0..2 {
            detach().await.unwrap();
            assert_clean(&datapath, pod);
        }
        datapath.attach(Path::new(NETNS), &spec).await.unwrap();
        datapath.kernel().remove_namespace(Path::new(NETNS));
        detach().await.unwrap();
        assert!(datapath.kernel().host_namespace().routes.is_empty());
        datapath.detach(None, "eth0", None, None).await.unwrap();
    }

    #[tokio::test]
    async fn check_accepts_an_mtu_lowered_by_a_chained_plugin() {
        let (datapath, pod) = node();
        let spec = spec();
        datapath.attach(Path::new(NETNS), &spec).await.unwrap();
        let lowered = LinkUpdate {
            mtu: Some(1400),
            ..LinkUpdate::default()
        };
        datapath
            .kernel()
            .update_link(&pod, "eth0", &lowered)
            .await
            .unwrap();
        let attached = datapath.check(Path::new(NETNS), &spec).await.unwrap();
        assert_eq!(attached.mtu, 1400);
    }

    #[tokio::test]
    async fn check_lists_every_difference() {
        let (datapath, pod) = node();
        let spec = spec();
        datapath.attach(Path::new(NETNS), &spec).await.unwrap();
        let kernel = datapath.kernel();
        kernel
            .delete_route(&pod, &spec.pod_routes()[0])
            .await
            .unwrap();
        kernel
            .update_link(
                &pod,
                "eth0",
                &LinkUpdate {
                    mtu: Some(9000),
                    ..LinkUpdate::default()
                },
            )
            .await
            .unwrap();
        kernel
            .delete_route(kernel.host(), &spec.host_route().unwrap())
            .await
            .unwrap();
        let mut macvlan = spec.clone();
        macvlan.kind = SlaveKind::MacVlan {
            mode: MacVlanMode::Bridge,
        };
        let DatapathError::Mismatch(differences) = datapath
            .check(Path::new(NETNS), &macvlan)
            .await
            .unwrap_err()
        else {
            panic!("expected a mismatch");
        };
        assert_eq!(
            differences,
            [
                "eth0 is ipvlan L2 Bridge, expected macvlan Bridge",
                "eth0 has MTU 9000, above the subnet's 1450",
                "route 0.0.0.0/0 via 10.20.0.1 dev eth0 onlink is missing",
                "host route 10.20.0.5/32 dev hulk0 is missing",
            ]
        );
        datapath.kernel().remove_namespace(Path::new(NETNS));
        assert!(matches!(
            datapath.check(Path::new(NETNS), &spec).await,
            Err(DatapathError::NamespaceNotFound(_))
        ));
    }

    #[tokio::test]
    async fn attach_refuses_what_it_cannot_do_cleanly() {
        let (datapath, pod) = node();
        datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        assert!(matches!(
            datapath.attach(Path::new(NETNS), &spec()).await,
            Err(DatapathError::InterfaceExists(name)) if name == "eth0"
        ));
        assert_eq!(datapath.kernel().namespace(pod).links.len(), 2);

        let (datapath, pod) = node();
        let mut no_parent = spec();
        no_parent.parent = "eth9".into();
        assert!(matches!(
            datapath.attach(Path::new(NETNS), &no_parent).await,
            Err(DatapathError::ParentNotFound(name)) if name == "eth9"
        ));
        assert_clean(&datapath, pod);

        assert!(matches!(
            datapath
                .attach(Path::new("/var/run/netns/none"), &spec())
                .await,
            Err(DatapathError::NamespaceNotFound(_))
        ));
        let mut mixed = spec();
        mixed.gateway = "fd00::1".parse().unwrap();
        assert!(matches!(
            datapath.attach(Path::new(NETNS), &mixed).await,
            Err(DatapathError::Invalid(_))
        ));
        let mut ipvlan_mac = spec();
        ipvlan_mac.mac = Some([2, 0, 0, 0, 0, 1]);
        assert!(matches!(
            datapath.attach(Path::new(NETNS), &ipvlan_mac).await,
            Err(DatapathError::Invalid(_))
        ));
        assert_clean(&datapath, pod);
    }

    #[tokio::test]
    async fn macvlan_pods_get_their_own_mac() {
        let (datapath, pod) = node();
        let mut spec = spec();
        spec.kind = SlaveKind::MacVlan {
            mode: MacVlanMode::Bridge,
        };
        spec.mac = Some([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        let attached = datapath.attach(Path::new(NETNS), &spec).await.unwrap();
        assert_eq!(attached.mac, spec.mac);
        assert_eq!(
            datapath.kernel().namespace(pod).links["eth0"].link.mac,
            spec.mac
        );
        datapath.check(Path::new(NETNS), &spec).await.unwrap();
    }

    #[test]
    fn temporary_names_fit_the_kernel_limit_and_differ() {
        let names: std::collections::HashSet<String> =
            (0..1000).map(|_| temporary_name()).collect();
        assert_eq!(names.len(), 1000);
        assert!(
            names
                .iter()
                .all(|name| name.len() <= 15 && name.starts_with("hulk"))
        );
    }
}
