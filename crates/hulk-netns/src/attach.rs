//! Pod attach (ADD), detach (DEL) and check (CHECK), written against
//! [`Kernel`] so every step and every rollback is unit-tested.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;

use crate::kernel::{
    Kernel, KernelError, Link, LinkUpdate, Mac, Neighbour, NsId, Route, SlaveKind, format_mac,
};
use crate::netns::PROCESS_NETNS;

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
    /// The MTU; default: the parent's. Above the parent's, the parent's is
    /// used (a slave cannot exceed it).
    pub mtu: Option<u32>,
    /// The Service and node path, when the node has a host-side slave.
    pub service_path: Option<ServicePath>,
}

/// What ADD created, as a node agent records it so DEL and GC can undo
/// exactly that.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attached {
    /// The interface's index inside the pod.
    pub index: u32,
    /// Its MAC.
    pub mac: Option<Mac>,
    /// Its MTU.
    pub mtu: u32,
    /// The addresses given to it.
    #[serde(default)]
    pub addresses: Vec<IpNet>,
    /// The pod's routes through it, as installed (with their metrics).
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The static neighbour entries on it (the gateway's).
    #[serde(default)]
    pub neighbours: Vec<Neighbour>,
    /// The host's route to the pod through the host-side slave.
    #[serde(default)]
    pub host_route: Option<Route>,
    /// The namespace it was built in, to recognise a recycled path.
    #[serde(default)]
    pub netns: Option<NsId>,
}

/// Which pod link a DEL may remove.
#[derive(Debug, Clone, Copy)]
pub enum Ownership<'a> {
    /// What ADD recorded: remove `ifname` only if it is that link (same
    /// index, and same MAC when recorded) and the namespace at the path is
    /// still the recorded one ([`NsId`]).
    Recorded(&'a Attached),
    /// No record (e.g. the plugin tearing down locally while the agent is
    /// down): remove `ifname` only if it is an ipvlan or macvlan slave
    /// (never a veth or anything else).
    Unrecorded,
}

impl Ownership<'_> {
    /// Whether `link` is the pod link this DEL may remove. Only slaves are
    /// ever ours: ADD creates nothing else.
    fn owns(&self, link: &Link) -> bool {
        link.slave.is_some()
            && match self {
                Ownership::Recorded(record) => {
                    link.index == record.index && (record.mac.is_none() || link.mac == record.mac)
                }
                Ownership::Unrecorded => true,
            }
    }
}

/// What [`Datapath::detach_owned`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Detached {
    /// The pod's interface was there and was removed.
    pub link_removed: bool,
    /// A link under the pod's interface name that is not ours, described,
    /// left in place.
    pub foreign_link_kept: Option<String>,
    /// Temporary links a killed ADD left behind, removed.
    pub leftovers_removed: Vec<String>,
    /// The pod side was not touched because its namespace is gone: no path
    /// was given, nothing is at the path, what is there is no network
    /// namespace, or it is another namespace than the recorded one.
    pub namespace_gone: bool,
}

/// Datapath failures.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The pod's namespace does not exist.
    #[error("pod network namespace {0} does not exist")]
    NamespaceNotFound(PathBuf),
    /// Something exists at the pod's namespace path, but it is not a
    /// network namespace.
    #[error("{0} is not a network namespace: {1}")]
    NotANamespace(PathBuf, String),
    /// The pod's namespace path names the node's own namespace: changing
    /// it as a pod's would delete or re-route the node's links.
    #[error("{0} is the node's own network namespace, not a pod's")]
    HostNamespace(PathBuf),
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
    /// host-side slave. Their metric is 0; ADD raises it where another
    /// interface of the pod already routes the destination.
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

    /// The gateway's permanent neighbour entry, when its MAC is known.
    fn gateway_neighbour(&self) -> Option<Neighbour> {
        self.gateway_mac.map(|mac| Neighbour {
            ip: self.gateway,
            mac: Some(mac),
            permanent: true,
        })
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

/// The metric for `route` that keeps every route another link of the pod
/// holds to the same destination preferred: the lowest above all of
/// theirs, or 0 when there is none. Installing ours at their metric would
/// replace theirs (a route replace matches destination and metric whatever
/// the link), taking a second network's default route from the first.
fn metric_below_others(present: &[Route], route: &Route) -> u32 {
    present
        .iter()
        .filter(|other| other.dst == route.dst && other.link != route.link)
        .map(|other| other.metric.saturating_add(1))
        .max()
        .unwrap_or(0)
}

/// A link name no other ADD in flight uses: `hulk` and 11 hex digits.
fn temporary_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    format!("hulk{:011x}", hasher.finish() & 0xfff_ffff_ffff)
}

/// Whether `name` has the shape [`temporary_name`] gives.
fn is_temporary_name(name: &str) -> bool {
    name.strip_prefix("hulk").is_some_and(|digits| {
        digits.len() == 11
            && digits
                .bytes()
                .all(|digit| matches!(digit, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A link for messages: name, index, kind and MAC.
fn describe(link: &Link) -> String {
    format!(
        "{} (index {}, {}, MAC {})",
        link.name,
        link.index,
        link.kind_description(),
        link.mac
            .map_or_else(|| "none".to_owned(), |mac| format_mac(&mac))
    )
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

    /// Opens a pod's namespace, refusing the node's own: the namespace of
    /// the host handle, or the process's (an agent whose host handle is a
    /// node namespace still runs in a namespace with links of its own).
    async fn open(&self, netns: &Path) -> Result<K::Ns, DatapathError> {
        let pod = match self.kernel.open(netns).await {
            Err(KernelError::NamespaceNotFound(path)) => {
                return Err(DatapathError::NamespaceNotFound(path));
            }
            Err(KernelError::NotANamespace { path, reason }) => {
                return Err(DatapathError::NotANamespace(path, reason));
            }
            other => other?,
        };
        if let Some(id) = self.kernel.identity(&pod)
            && (Some(id) == self.kernel.host_identity()
                || Some(id) == self.kernel.identify(Path::new(PROCESS_NETNS)).await?)
        {
            return Err(DatapathError::HostNamespace(netns.to_path_buf()));
        }
        Ok(pod)
    }

    /// ADD: creates the slave under a temporary name directly in the pod's
    /// namespace, then names, addresses and routes it. On any failure
    /// everything created is removed before the error is returned.
    ///
    /// An MTU above the parent's is lowered to the parent's (with a
    /// warning); where another interface of the pod already routes one of
    /// the pod routes' destinations, ours gets a higher metric so the
    /// first network stays preferred.
    pub async fn attach(&self, netns: &Path, spec: &PodNetwork) -> Result<Attached, DatapathError> {
        spec.validate()?;
        let pod = self.open(netns).await?;
        let parent = self
            .kernel
            .link(self.kernel.host(), &spec.parent)
            .await?
            .ok_or_else(|| DatapathError::ParentNotFound(spec.parent.clone()))?;
        let mtu = spec.mtu.map(|requested| {
            if requested > parent.mtu {
                tracing::warn!(
                    requested,
                    parent = %spec.parent,
                    parent_mtu = parent.mtu,
                    "the requested MTU is above the parent's; the pod gets the parent's"
                );
            }
            requested.min(parent.mtu)
        });
        if self.kernel.link(&pod, &spec.ifname).await?.is_some() {
            return Err(DatapathError::InterfaceExists(spec.ifname.clone()));
        }
        let temporary = temporary_name();
        match self
            .kernel
            .create_slave(&spec.parent, &temporary, spec.kind, &pod)
            .await
        {
            // The parent can still vanish after the lookup above.
            Err(KernelError::LinkNotFound(name)) if name == spec.parent => {
                return Err(DatapathError::ParentNotFound(name));
            }
            other => other?,
        }
        match self.configure(&pod, &temporary, spec, mtu).await {
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
        mtu: Option<u32>,
    ) -> Result<Attached, DatapathError> {
        let kernel = &self.kernel;
        let rename = LinkUpdate {
            rename: Some(spec.ifname.clone()),
            mtu,
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
        let present = kernel.all_routes(pod).await?;
        let mut routes = Vec::new();
        for mut route in spec.pod_routes() {
            route.metric = metric_below_others(&present, &route);
            kernel.replace_route(pod, &route).await?;
            routes.push(route);
        }
        let host_route = spec.host_route();
        if let Some(route) = &host_route {
            kernel.replace_route(kernel.host(), route).await?;
        }
        let link = kernel
            .link(pod, &spec.ifname)
            .await?
            .ok_or_else(|| KernelError::LinkNotFound(spec.ifname.clone()))?;
        Ok(Attached {
            index: link.index,
            mac: link.mac,
            mtu: link.mtu,
            addresses: vec![spec.address],
            routes,
            neighbours: spec.gateway_neighbour().into_iter().collect(),
            host_route,
            netns: kernel.identity(pod),
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

    /// DEL without a record: removes the host route to the pod and the
    /// pod's interface if it is an ipvlan or macvlan slave, as
    /// [`Datapath::detach_owned`] with [`Ownership::Unrecorded`] does.
    /// Whatever is already gone (the namespace, the link, the route) counts
    /// as removed, so DEL can be repeated.
    pub async fn detach(
        &self,
        netns: Option<&Path>,
        ifname: &str,
        pod_address: Option<IpAddr>,
        service_path: Option<&ServicePath>,
    ) -> Result<(), DatapathError> {
        let host_route = pod_address
            .zip(service_path)
            .map(|(address, path)| host_route_to(address, path));
        self.detach_owned(netns, ifname, Ownership::Unrecorded, host_route.as_ref())
            .await
            .map(drop)
    }

    /// DEL touching only what is ours: removes `host_route` (if given) from
    /// the host, then in the pod's namespace the interface `ifname` if
    /// `ownership` says it is ours (with [`Ownership::Recorded`], the
    /// recorded routes still on it first), and temporary links a killed ADD
    /// left behind. A link under `ifname` that is not ours is left and
    /// reported. A missing namespace, a path that holds no network
    /// namespace, or a path now naming another namespace than the recorded
    /// one counts as done: the pod's interfaces died with its namespace.
    /// Repeating it is fine. The node's own namespace is refused
    /// ([`DatapathError::HostNamespace`]) before anything is deleted.
    pub async fn detach_owned(
        &self,
        netns: Option<&Path>,
        ifname: &str,
        ownership: Ownership<'_>,
        host_route: Option<&Route>,
    ) -> Result<Detached, DatapathError> {
        let kernel = &self.kernel;
        let pod = match netns {
            None => None,
            Some(path) => match self.open(path).await {
                Ok(pod) => Some(pod),
                Err(DatapathError::NamespaceNotFound(_)) => None,
                // No links can live in it: e.g. the mount point a runtime
                // left behind after unmounting the namespace.
                Err(DatapathError::NotANamespace(path, reason)) => {
                    tracing::warn!(
                        path = %path.display(),
                        %reason,
                        "DEL: the pod's namespace path holds no network namespace"
                    );
                    None
                }
                Err(error) => return Err(error),
            },
        };
        if let Some(route) = host_route {
            kernel.delete_route(kernel.host(), route).await?;
        }
        let gone = Detached {
            namespace_gone: true,
            ..Detached::default()
        };
        let Some(pod) = pod else {
            return Ok(gone);
        };
        if let Ownership::Recorded(record) = ownership
            && let (Some(recorded), Some(found)) = (record.netns, kernel.identity(&pod))
            && recorded != found
        {
            tracing::info!(
                %recorded,
                %found,
                "DEL: the namespace path now names another namespace; the recorded one is gone"
            );
            return Ok(gone);
        }
        let mut detached = Detached::default();
        if let Some(link) = kernel.link(&pod, ifname).await? {
            if ownership.owns(&link) {
                if let Ownership::Recorded(record) = ownership {
                    for route in record.routes.iter().filter(|route| route.link == ifname) {
                        kernel.delete_route(&pod, route).await?;
                    }
                }
                detached.link_removed = kernel.delete_link(&pod, ifname).await?;
            } else {
                let found = describe(&link);
                tracing::warn!(link = %found, "DEL: the pod's interface is not ours; left in place");
                detached.foreign_link_kept = Some(found);
            }
        }
        for link in kernel.links(&pod).await? {
            if link.slave.is_some()
                && link.name != ifname
                && is_temporary_name(&link.name)
                && kernel.delete_link(&pod, &link.name).await?
            {
                detached.leftovers_removed.push(link.name);
            }
        }
        Ok(detached)
    }

    /// CHECK: compares the pod's interface, address, routes, gateway
    /// neighbour and host route with `spec`, and lists every difference
    /// (an MTU below `spec`'s, or its parent's when that is lower, is none:
    /// a chained plugin may lower it; a route at any metric matches). When
    /// all matches, returns the interface as ADD reported it.
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
            differences.push(format!(
                "{} is {}, expected {}",
                spec.ifname,
                link.kind_description(),
                spec.kind
            ));
        }
        // Only above the subnet's MTU is wrong: a plugin later in the chain
        // (tuning) may lower it, and ADD lowers it to the parent's.
        let parent_mtu = kernel
            .link(kernel.host(), &spec.parent)
            .await?
            .map(|parent| parent.mtu);
        if let Some(mtu) = spec.mtu {
            let limit = parent_mtu.map_or(mtu, |parent| mtu.min(parent));
            if link.mtu > limit {
                let whose = if limit == mtu {
                    "the subnet's"
                } else {
                    "its parent's"
                };
                differences.push(format!(
                    "{} has MTU {}, above {whose} {limit}",
                    spec.ifname, link.mtu
                ));
            }
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
        let present = kernel.routes(&pod, &spec.ifname).await?;
        let mut routes = Vec::new();
        for route in spec.pod_routes() {
            match present.iter().find(|found| same_route(found, &route)) {
                Some(found) => routes.push(found.clone()),
                None => differences.push(format!("route {route} is missing")),
            }
        }
        let neighbours: Vec<Neighbour> = spec.gateway_neighbour().into_iter().collect();
        if let Some(mac) = spec.gateway_mac
            && !kernel
                .neighbours(&pod, &spec.ifname)
                .await?
                .iter()
                .any(|found| neighbours.contains(found))
        {
            differences.push(format!(
                "the permanent neighbour {} -> {} is missing",
                spec.gateway,
                format_mac(&mac)
            ));
        }
        let host_route = spec.host_route();
        if let Some(route) = &host_route {
            let host_routes = kernel.routes(kernel.host(), &route.link).await?;
            if !host_routes.iter().any(|found| same_route(found, route)) {
                differences.push(format!("host route {route} is missing"));
            }
        }
        if differences.is_empty() {
            Ok(Attached {
                index: link.index,
                mac: link.mac,
                mtu: link.mtu,
                addresses: vec![spec.address],
                routes,
                neighbours,
                host_route,
                netns: kernel.identity(&pod),
            })
        } else {
            Err(DatapathError::Mismatch(differences))
        }
    }
}

/// Routes match on destination, next hop and device, whatever the metric
/// (ADD chose it by what else the pod routes); the kernel does not always
/// echo the onlink flag back.
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
                    mtu: Some(1500),
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
                "eth0 has MTU 1500, above the subnet's 1450",
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
