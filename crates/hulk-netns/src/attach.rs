//! Pod attach (ADD), detach (DEL) and check (CHECK), written against
//! [`Kernel`] so every step and every rollback is unit-tested.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;

use crate::kernel::{
    Kernel, KernelError, Link, LinkUpdate, MacAddr, Neighbour, NsId, Route, SlaveKind,
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
    pub gateway_mac: Option<MacAddr>,
    /// The pod's MAC (macvlan only: ipvlan slaves share the parent's).
    pub mac: Option<MacAddr>,
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
    pub mac: Option<MacAddr>,
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
    Kernel(KernelError),
    /// CHECK found differences.
    #[error("the pod network differs from what ADD configured: {}", .0.join("; "))]
    Mismatch(Vec<String>),
}

impl From<KernelError> for DatapathError {
    /// Keeps the two namespace failures callers act on apart from other
    /// kernel refusals.
    fn from(error: KernelError) -> DatapathError {
        match error {
            KernelError::NamespaceNotFound(path) => DatapathError::NamespaceNotFound(path),
            KernelError::NotANamespace { path, reason } => {
                DatapathError::NotANamespace(path, reason)
            }
            error => DatapathError::Kernel(error),
        }
    }
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
            .map_or_else(|| "none".to_owned(), |mac| mac.to_string())
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

    /// The identity of the network namespace at `netns`, `None` when the
    /// path does not exist, [`DatapathError::NotANamespace`] when what is
    /// there is no network namespace. Never blocks on what it finds.
    pub async fn identify(&self, netns: &Path) -> Result<Option<NsId>, DatapathError> {
        Ok(self.kernel.identify(netns).await?)
    }

    /// Opens a pod's namespace, refusing the node's own: the namespace of
    /// the host handle, or the process's (an agent whose host handle is a
    /// node namespace still runs in a namespace with links of its own).
    async fn open(&self, netns: &Path) -> Result<K::Ns, DatapathError> {
        let pod = self.kernel.open(netns).await?;
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

    /// Re-pins the gateway's permanent neighbour entry on a pod interface
    /// ADD built (`recorded`, named `ifname` in the namespace at `netns`)
    /// to `mac`, the MAC the cloud now reports for `gateway`: the entry
    /// ADD pinned would otherwise keep sending the pod's traffic to a MAC
    /// the VPC no longer answers. Touches only the recorded link in the
    /// recorded namespace: `Ok(None)` when the namespace is gone or is
    /// another one now, or the link is not the recorded one (nothing of
    /// ours to re-pin); else the entry as installed. The node's own
    /// namespace is refused ([`DatapathError::HostNamespace`]).
    pub async fn repin_gateway(
        &self,
        netns: &Path,
        ifname: &str,
        recorded: &Attached,
        gateway: IpAddr,
        mac: MacAddr,
    ) -> Result<Option<Neighbour>, DatapathError> {
        let kernel = &self.kernel;
        let pod = match self.open(netns).await {
            Ok(pod) => pod,
            Err(DatapathError::NamespaceNotFound(_) | DatapathError::NotANamespace(..)) => {
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        if let (Some(recorded_id), Some(found)) = (recorded.netns, kernel.identity(&pod))
            && recorded_id != found
        {
            return Ok(None);
        }
        let Some(link) = kernel.link(&pod, ifname).await? else {
            return Ok(None);
        };
        if !Ownership::Recorded(recorded).owns(&link) {
            return Ok(None);
        }
        kernel.replace_neighbour(&pod, ifname, gateway, mac).await?;
        Ok(Some(Neighbour {
            ip: gateway,
            mac: Some(mac),
            permanent: true,
        }))
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
            differences.push(format!("{} does not have MAC {}", spec.ifname, mac));
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
                spec.gateway, mac
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
    use crate::netns::PROCESS_NETNS;

    const NETNS: &str = "/var/run/netns/pod-a";
    const GATEWAY_MAC: MacAddr = MacAddr([0xfa, 0x16, 0x3e, 0, 0, 1]);

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
    async fn a_gateway_is_repinned_only_on_the_recorded_link() {
        let (datapath, pod) = node();
        let attached = datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        let moved: MacAddr = MacAddr([0xfa, 0x16, 0x3e, 0, 0, 2]);
        let gateway = spec().gateway;
        let pinned = datapath
            .repin_gateway(Path::new(NETNS), "eth0", &attached, gateway, moved)
            .await
            .unwrap();
        assert_eq!(pinned.and_then(|entry| entry.mac), Some(moved));
        let eth0 = &datapath.kernel().namespace(pod).links["eth0"];
        assert_eq!(eth0.neighbours.len(), 1, "replaced, not added");
        assert_eq!(eth0.neighbours[0].mac, Some(moved));
        assert!(eth0.neighbours[0].permanent);
        // Another link under the name (the record says another index), or
        // a namespace that is gone: nothing of ours to re-pin.
        let other = Attached {
            index: attached.index + 100,
            ..attached.clone()
        };
        let untouched = datapath
            .repin_gateway(Path::new(NETNS), "eth0", &other, gateway, GATEWAY_MAC)
            .await
            .unwrap();
        assert_eq!(untouched, None);
        assert_eq!(
            datapath.kernel().namespace(pod).links["eth0"].neighbours[0].mac,
            Some(moved)
        );
        let gone = datapath
            .repin_gateway(
                Path::new("/var/run/netns/gone"),
                "eth0",
                &attached,
                gateway,
                moved,
            )
            .await
            .unwrap();
        assert_eq!(gone, None);
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
        ipvlan_mac.mac = Some(MacAddr([2, 0, 0, 0, 0, 1]));
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
        spec.mac = Some(MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]));
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
                .all(|name| name.len() <= 15 && is_temporary_name(name))
        );
        for other in [
            "hulk0",
            "hulk0123456789A",
            "hulk0123456789ab",
            "eth0123456789ab",
        ] {
            assert!(!is_temporary_name(other), "{other}");
        }
    }

    const OTHER_NETNS: &str = "/var/run/netns/pod-b";

    fn link_names(datapath: &Datapath<FakeKernel>, ns: FakeNs) -> Vec<String> {
        datapath.kernel().namespace(ns).links.into_keys().collect()
    }

    #[tokio::test]
    async fn attach_reports_everything_it_created_and_the_record_survives_json() {
        let (datapath, pod) = node();
        let attached = datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        assert_eq!(attached.addresses, [spec().address]);
        assert_eq!(attached.routes, spec().pod_routes());
        assert_eq!(
            attached.neighbours,
            [Neighbour {
                ip: spec().gateway,
                mac: Some(GATEWAY_MAC),
                permanent: true
            }]
        );
        assert_eq!(attached.host_route, spec().host_route());
        let identity = datapath.kernel().identity_of(pod);
        assert_eq!(attached.netns, Some(identity));
        assert_eq!(
            datapath.identify(Path::new(NETNS)).await.unwrap(),
            Some(identity)
        );
        assert_eq!(
            datapath.check(Path::new(NETNS), &spec()).await.unwrap(),
            attached,
            "CHECK reports what ADD did"
        );

        let json = serde_json::to_string(&attached).unwrap();
        assert!(
            json.contains(&format!("\"ino\":{}", identity.ino)),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Attached>(&json).unwrap(), attached);
        // A record written before the new fields still reads.
        let old: Attached =
            serde_json::from_str(r#"{"index":7,"mac":[2,0,0,0,0,1],"mtu":1450}"#).unwrap();
        assert_eq!((old.index, old.netns, old.routes.len()), (7, None, 0));
        let route: Route = serde_json::from_str(
            r#"{"dst":"0.0.0.0/0","gateway":"10.20.0.1","link":"eth0","onlink":true}"#,
        )
        .unwrap();
        assert_eq!(route.metric, 0);
        let detached = Detached {
            link_removed: true,
            foreign_link_kept: Some("eth0".into()),
            leftovers_removed: vec!["hulk0123456789a".into()],
            namespace_gone: false,
        };
        let json = serde_json::to_string(&detached).unwrap();
        assert_eq!(serde_json::from_str::<Detached>(&json).unwrap(), detached);
        assert_eq!(identity.to_string(), format!("4:{}", identity.ino));
    }

    #[tokio::test]
    async fn the_mtu_is_clamped_to_the_parents() {
        let kernel = FakeKernel::new();
        kernel.add_parent("eth1", 1400);
        kernel.add_parent("hulk0", 1400);
        let pod = kernel.add_namespace(NETNS);
        let datapath = Datapath::new(kernel);
        let attached = datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        assert_eq!(attached.mtu, 1400);
        assert_eq!(
            datapath.kernel().namespace(pod).links["eth0"].link.mtu,
            1400
        );
        assert_eq!(
            datapath.check(Path::new(NETNS), &spec()).await.unwrap().mtu,
            1400,
            "the clamped MTU is no mismatch"
        );
    }

    #[tokio::test]
    async fn a_second_network_leaves_the_first_ones_routes_and_takes_over_when_it_goes() {
        let (datapath, pod) = node();
        let kernel = datapath.kernel();
        // The first network: a veth with its address, the default route,
        // and a route to the Service range at metric 100.
        kernel.add_link(pod, "eth0", 1500);
        kernel
            .add_address(&pod, "eth0", "10.88.0.2/24".parse().unwrap())
            .await
            .unwrap();
        let first_default = Route::via(
            "0.0.0.0/0".parse().unwrap(),
            "10.88.0.1".parse().unwrap(),
            "eth0",
        );
        let mut first_services = Route::direct("10.96.0.0/12".parse().unwrap(), "eth0");
        first_services.metric = 100;
        for route in [&first_default, &first_services] {
            kernel.replace_route(&pod, route).await.unwrap();
        }
        let mut second = spec();
        second.ifname = "net1".into();
        let attached = datapath.attach(Path::new(NETNS), &second).await.unwrap();
        let metrics: Vec<(String, u32)> = attached
            .routes
            .iter()
            .map(|route| (route.dst.to_string(), route.metric))
            .collect();
        assert_eq!(
            metrics,
            [
                ("0.0.0.0/0".to_owned(), 1),
                ("10.20.0.250/32".to_owned(), 0),
                ("10.96.0.0/12".to_owned(), 101)
            ]
        );
        let routes = kernel.namespace(pod).routes;
        for first in [&first_default, &first_services] {
            assert!(routes.contains(first), "{first} was replaced: {routes:?}");
        }
        datapath.check(Path::new(NETNS), &second).await.unwrap();

        // `podman network disconnect` of the first network: ours is the
        // default route now.
        assert!(kernel.delete_link(&pod, "eth0").await.unwrap());
        let defaults: Vec<String> = kernel
            .all_routes(&pod)
            .await
            .unwrap()
            .iter()
            .filter(|route| route.dst.prefix_len() == 0)
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            defaults,
            ["0.0.0.0/0 via 10.20.0.1 dev net1 onlink metric 1"]
        );
        datapath.check(Path::new(NETNS), &second).await.unwrap();
    }

    async fn detach_recorded(datapath: &Datapath<FakeKernel>, record: &Attached) -> Detached {
        datapath
            .detach_owned(
                Some(Path::new(NETNS)),
                "eth0",
                Ownership::Recorded(record),
                record.host_route.as_ref(),
            )
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_recorded_detach_removes_only_the_recorded_link() {
        let (datapath, pod) = node();
        let attached = datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        let mut other_index = attached.clone();
        other_index.index += 100;
        let mut other_mac = attached.clone();
        other_mac.mac = Some(MacAddr([2, 0, 0, 0, 0, 0x99]));
        for stale in [other_index, other_mac] {
            let detached = detach_recorded(&datapath, &stale).await;
            assert!(!detached.link_removed);
            assert!(
                detached
                    .foreign_link_kept
                    .as_deref()
                    .is_some_and(|kept| kept.starts_with("eth0 (index ")),
                "{detached:?}"
            );
            assert!(link_names(&datapath, pod).contains(&"eth0".to_owned()));
        }
        let detached = detach_recorded(&datapath, &attached).await;
        assert_eq!(
            detached,
            Detached {
                link_removed: true,
                ..Detached::default()
            }
        );
        assert_clean(&datapath, pod);
        assert_eq!(
            detach_recorded(&datapath, &attached).await,
            Detached::default(),
            "repeatable"
        );
    }

    #[tokio::test]
    async fn a_recycled_namespace_path_is_not_mistaken_for_the_recorded_one() {
        let (datapath, _) = node();
        let first = datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        // The pod dies; a new pod's namespace gets the same path.
        datapath.kernel().remove_namespace(Path::new(NETNS));
        let recycled = datapath.kernel().add_namespace(NETNS);
        let mut newcomer = spec();
        newcomer.address = "10.20.0.6/24".parse().unwrap();
        let second = datapath.attach(Path::new(NETNS), &newcomer).await.unwrap();
        assert_ne!(first.netns, second.netns);
        // Even a record whose index and MAC happen to match the newcomer's
        // link does not delete it: the namespace is not the recorded one.
        let stale = Attached {
            index: second.index,
            mac: second.mac,
            ..first.clone()
        };
        let detached = datapath
            .detach_owned(
                Some(Path::new(NETNS)),
                "eth0",
                Ownership::Recorded(&stale),
                first.host_route.as_ref(),
            )
            .await
            .unwrap();
        assert!(
            detached.namespace_gone && !detached.link_removed,
            "{detached:?}"
        );
        assert_eq!(link_names(&datapath, recycled), ["eth0", "lo"]);
        assert_eq!(
            datapath.kernel().host_namespace().route_lines(),
            ["10.20.0.6/32 dev hulk0"],
            "the dead pod's host route is gone, the newcomer's kept"
        );
        datapath.check(Path::new(NETNS), &newcomer).await.unwrap();
    }

    #[tokio::test]
    async fn an_unrecorded_detach_keeps_a_foreign_link_and_removes_our_leftovers() {
        let (datapath, pod) = node();
        let kernel = datapath.kernel();
        kernel.add_link(pod, "eth0", 1500); // a veth of another plugin
        let leftover = "hulk0123456789a"; // what a killed ADD left
        kernel
            .create_slave("eth1", leftover, SlaveKind::default(), &pod)
            .await
            .unwrap();
        // Not ours: a temporary name on something else, another slave name.
        kernel.add_link(pod, "hulkfedcba98765", 1500);
        kernel
            .create_slave("eth1", "hulk-other", SlaveKind::default(), &pod)
            .await
            .unwrap();
        for round in 0..2 {
            let detached = datapath
                .detach_owned(Some(Path::new(NETNS)), "eth0", Ownership::Unrecorded, None)
                .await
                .unwrap();
            assert!(!detached.link_removed && !detached.namespace_gone);
            assert!(
                detached
                    .foreign_link_kept
                    .as_deref()
                    .is_some_and(|kept| kept.contains("eth0") && kept.contains("not a slave")),
                "{detached:?}"
            );
            let removed: &[&str] = if round == 0 { &[leftover] } else { &[] };
            assert_eq!(detached.leftovers_removed, removed);
        }
        assert_eq!(
            link_names(&datapath, pod),
            ["eth0", "hulk-other", "hulkfedcba98765", "lo"]
        );
        // The legacy detach follows the same rule.
        datapath
            .detach(Some(Path::new(NETNS)), "eth0", None, None)
            .await
            .unwrap();
        assert!(link_names(&datapath, pod).contains(&"eth0".to_owned()));
    }

    #[tokio::test]
    async fn a_half_built_interface_is_cleared_for_a_rebuild() {
        let (datapath, pod) = node();
        // A crash mid-ADD: the slave renamed but still down, no address.
        datapath
            .kernel()
            .create_slave("eth1", "eth0", SlaveKind::default(), &pod)
            .await
            .unwrap();
        let detached = datapath
            .detach_owned(Some(Path::new(NETNS)), "eth0", Ownership::Unrecorded, None)
            .await
            .unwrap();
        assert!(detached.link_removed, "{detached:?}");
        assert_clean(&datapath, pod);
        datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
    }

    #[tokio::test]
    async fn paths_that_are_not_network_namespaces_are_refused() {
        let (datapath, pod) = node();
        const FILE: &str = "/var/run/netns/not-a-namespace";
        datapath.kernel().add_file(FILE);
        let file = Path::new(FILE);
        let refused = |outcome: Result<_, DatapathError>| matches!(outcome, Err(DatapathError::NotANamespace(path, _)) if path == file);
        assert!(refused(datapath.attach(file, &spec()).await.map(drop)));
        assert!(refused(datapath.check(file, &spec()).await.map(drop)));
        assert!(refused(datapath.identify(file).await.map(drop)));
        // DEL has nothing to remove there: no links live in a file.
        let detached = datapath
            .detach_owned(Some(file), "eth0", Ownership::Unrecorded, None)
            .await
            .unwrap();
        assert!(detached.namespace_gone);
        assert_clean(&datapath, pod);
        assert_eq!(
            datapath.identify(Path::new(OTHER_NETNS)).await.unwrap(),
            None
        );
    }

    /// The host's links and routes, to see that nothing changed there.
    fn host_state(datapath: &Datapath<FakeKernel>) -> (Vec<String>, Vec<String>) {
        let host = datapath.kernel().host_namespace();
        (host.links.keys().cloned().collect(), host.route_lines())
    }

    #[tokio::test]
    async fn the_nodes_own_namespace_is_refused() {
        let (datapath, _) = node();
        let attached = datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
        // The host namespace under its own path and under a bind mount.
        let bound = Path::new(OTHER_NETNS);
        datapath.kernel().bind(bound, *datapath.kernel().host());
        let before = host_state(&datapath);
        for path in [Path::new(PROCESS_NETNS), bound] {
            let refused = |outcome: Result<_, DatapathError>| matches!(outcome, Err(DatapathError::HostNamespace(found)) if found == path);
            let mut spec = spec();
            spec.ifname = "eth1".into();
            assert!(refused(datapath.attach(path, &spec).await.map(drop)));
            assert!(refused(datapath.check(path, &spec).await.map(drop)));
            assert!(refused(
                datapath
                    .detach_owned(
                        Some(path),
                        "eth1",
                        Ownership::Unrecorded,
                        attached.host_route.as_ref()
                    )
                    .await
                    .map(drop)
            ));
            assert!(refused(
                datapath
                    .detach_owned(
                        Some(path),
                        "eth0",
                        Ownership::Recorded(&attached),
                        attached.host_route.as_ref()
                    )
                    .await
                    .map(drop)
            ));
            assert_eq!(host_state(&datapath), before, "{}", path.display());
        }
    }

    #[tokio::test]
    async fn the_agents_own_namespace_is_refused_when_the_host_handle_is_another() {
        // An agent whose host handle is a node namespace (node_netns) runs
        // in a namespace of its own, with links of its own.
        let (datapath, _) = node();
        let kernel = datapath.kernel();
        kernel.remove_namespace(Path::new(PROCESS_NETNS));
        let agent = kernel.add_namespace(PROCESS_NETNS);
        kernel.add_link(agent, "eth0", 1500);
        kernel.bind(OTHER_NETNS, agent);
        for path in [Path::new(PROCESS_NETNS), Path::new(OTHER_NETNS)] {
            let outcome = datapath
                .detach_owned(Some(path), "eth0", Ownership::Unrecorded, None)
                .await;
            assert!(
                matches!(&outcome, Err(DatapathError::HostNamespace(_))),
                "{outcome:?}"
            );
            assert!(matches!(
                datapath.attach(path, &spec()).await,
                Err(DatapathError::HostNamespace(_))
            ));
        }
        assert_eq!(link_names(&datapath, agent), ["eth0", "lo"]);
        // Pods are still served.
        datapath.attach(Path::new(NETNS), &spec()).await.unwrap();
    }
}
