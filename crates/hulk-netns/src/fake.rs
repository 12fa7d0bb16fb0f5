//! An in-memory [`Kernel`] for unit tests: namespaces, links, addresses,
//! routes, neighbours and sysctls, with the kernel's rules that matter to
//! the datapath, and injectable failures. `tests/kernel_contract.rs` runs
//! one suite against it and against [`crate::NetlinkKernel`] in real
//! namespaces, so these rules are checked, not assumed:
//!
//! - a link name is unique in its namespace (EEXIST) and at most 15 bytes
//!   (ERANGE); a missing link is [`KernelError::LinkNotFound`];
//! - a slave is created down with its parent's MTU, an ipvlan slave with
//!   its parent's MAC, a macvlan slave with a MAC of its own; it cannot
//!   exceed its parent's MTU (EINVAL), follows the parent down when the
//!   parent's MTU is lowered, and dies with its parent;
//! - a link's changes apply in the kernel's order (MAC, MTU, name, up),
//!   each kept when a later one is refused; a MAC must be unicast and not
//!   all zero (EADDRNOTAVAIL), and a macvlan slave's MAC must differ from
//!   its parent's and its up siblings', when set and when it comes up
//!   (EADDRINUSE);
//! - an address on an up link brings the connected route of its prefix
//!   (metric 256 for IPv6); routes, addresses and neighbours follow a
//!   renamed link (renaming an up one needs Linux 6.2) and die with a
//!   deleted one;
//! - a route needs its link up (ENETDOWN), and one via an IPv4 next hop
//!   an IPv4 address in the namespace (EINVAL; `lo` gets 127.0.0.1/8 when
//!   it comes up); a route replace matches
//!   destination and metric whatever the link; an IPv6 route asked with
//!   metric 0 gets the kernel's 1024; a delete at metric 0 matches any
//!   metric and takes one route;
//! - a sysctl of a link (`net/ipv4/conf/LINK/...`) needs the link (ENOENT);
//! - every namespace has its own identity; `lo` is down, with MTU 65536
//!   and an all-zero MAC;
//! - the sandbox namespaces list each namespace reachable by a path once,
//!   never the host's, and not one whose paths are all removed.
//!
//! Left out (the datapath does not depend on them): IPv6 link-local
//! addresses and their `fe80::/64` routes, `lo`'s `::1`, the kernel's
//! local table, and neighbour entries the kernel makes itself (learned
//! ones, multicast ones for MLD).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::IpNet;
use nix::errno::Errno;

use crate::kernel::{
    Kernel, KernelError, Link, LinkUpdate, MacAddr, Neighbour, NsId, Route, SlaveKind,
};

use crate::netns::PROCESS_NETNS;

/// The device number every fake namespace identity carries, as nsfs gives
/// all namespaces one device.
const NSFS_DEVICE: u64 = 4;

/// The longest interface name the kernel takes (`IFNAMSIZ` - 1).
const MAX_NAME_LEN: usize = 15;

/// The metric the kernel gives an IPv6 route asked with metric 0.
const IPV6_DEFAULT_METRIC: u32 = 1024;

/// The metric of the route the kernel adds for an IPv6 address's prefix.
const IPV6_CONNECTED_METRIC: u32 = 256;

/// A namespace of the fake kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FakeNs(usize);

/// One link of the fake kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLink {
    /// The link as [`Kernel::link`] reports it.
    pub link: Link,
    /// Its addresses.
    pub addresses: Vec<IpNet>,
    /// Its neighbour entries.
    pub neighbours: Vec<Neighbour>,
    /// The host link it is a slave of.
    pub parent: Option<String>,
}

/// The contents of one fake namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeNamespace {
    /// Links by name.
    pub links: BTreeMap<String, FakeLink>,
    /// Main-table routes added through [`Kernel::replace_route`].
    pub routes: Vec<Route>,
    /// Main-table routes the kernel added itself: the connected route of
    /// each address on an up link (metric 256 for IPv6).
    pub connected: Vec<Route>,
    /// Sysctls written, by key.
    pub sysctls: BTreeMap<String, String>,
}

impl FakeNamespace {
    /// Its routes added through [`Kernel::replace_route`], one line each as
    /// [`Route`]'s `Display` writes them, in the order they were added.
    pub fn route_lines(&self) -> Vec<String> {
        self.routes.iter().map(ToString::to_string).collect()
    }

    /// Every main-table route: the ones added, then the connected ones.
    fn main_table(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter().chain(&self.connected)
    }

    /// Adds the connected route of each address of the up link `name`
    /// (the loopback's go to the local table).
    fn connect(&mut self, name: &str) {
        let Some(link) = self
            .links
            .get(name)
            .filter(|link| link.link.up && name != "lo")
        else {
            return;
        };
        let routes: Vec<Route> = link
            .addresses
            .iter()
            .filter(|address| address.prefix_len() < address.max_prefix_len())
            .map(|address| Route {
                metric: if address.addr().is_ipv6() {
                    IPV6_CONNECTED_METRIC
                } else {
                    0
                },
                ..Route::direct(address.trunc(), name)
            })
            .collect();
        for route in routes {
            if !self.connected.contains(&route) {
                self.connected.push(route);
            }
        }
    }

    /// Removes a link with its routes (addresses and neighbours go with it).
    fn remove_link(&mut self, name: &str) -> bool {
        self.routes.retain(|route| route.link != name);
        self.connected.retain(|route| route.link != name);
        self.links.remove(name).is_some()
    }
}

#[derive(Debug, Default)]
struct FakeState {
    namespaces: Vec<FakeNamespace>,
    /// The identity of each namespace, by position.
    identities: Vec<NsId>,
    paths: BTreeMap<PathBuf, FakeNs>,
    /// Paths holding something that is not a namespace.
    files: BTreeMap<PathBuf, String>,
    next_index: u32,
    operations: usize,
    fail_at: Option<usize>,
    /// [`Kernel::sandbox_namespaces`] fails while set.
    listing_fails: bool,
}

impl FakeState {
    fn take_index(&mut self) -> u32 {
        let index = self.next_index;
        self.next_index += 1;
        index
    }

    /// Every slave of the host link `parent`, in any namespace, as
    /// (namespace, name).
    fn slaves_of(&self, parent: &str) -> Vec<(usize, String)> {
        self.namespaces
            .iter()
            .enumerate()
            .flat_map(|(ns, namespace)| {
                namespace
                    .links
                    .values()
                    .filter(|link| link.parent.as_deref() == Some(parent))
                    .map(move |link| (ns, link.link.name.clone()))
            })
            .collect()
    }
}

/// The fake kernel. Namespace 0 is the host, reachable at
/// [`PROCESS_NETNS`] as the process's own namespace (as with
/// [`crate::NetlinkKernel::new`]).
#[derive(Debug)]
pub struct FakeKernel {
    host: FakeNs,
    state: Mutex<FakeState>,
}

impl Default for FakeKernel {
    fn default() -> Self {
        FakeKernel::new()
    }
}

impl FakeKernel {
    /// A kernel whose host namespace holds only `lo`.
    pub fn new() -> FakeKernel {
        let kernel = FakeKernel {
            host: FakeNs(0),
            state: Mutex::new(FakeState {
                next_index: 1,
                ..FakeState::default()
            }),
        };
        let host = kernel.add_namespace(PROCESS_NETNS);
        debug_assert_eq!(host, kernel.host);
        kernel
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a link that is no slave (a veth, a bridge, ...) to `ns`, up
    /// (`lo` stays down, as in a new namespace).
    pub fn add_link(&self, ns: FakeNs, name: &str, mtu: u32) {
        let mut state = self.state();
        let index = state.take_index();
        // The loopback has the all-zero address; others one of their own.
        let mac = if name == "lo" {
            [0; 6]
        } else {
            [0x52, 0x54, 0, 0, (index >> 8) as u8, index as u8]
        };
        state.namespaces[ns.0].links.insert(
            name.to_owned(),
            FakeLink {
                link: Link {
                    index,
                    name: name.to_owned(),
                    slave: None,
                    mtu,
                    mac: Some(MacAddr(mac)),
                    up: name != "lo",
                },
                addresses: Vec::new(),
                neighbours: Vec::new(),
                parent: None,
            },
        );
    }
    /// Adds a parent interface to the host.
    pub fn add_parent(&self, name: &str, mtu: u32) {
        self.add_link(self.host, name, mtu);
    }

    /// Creates a namespace reachable at `path`, holding only `lo` (down),
    /// with an identity no other namespace had.
    pub fn add_namespace(&self, path: impl Into<PathBuf>) -> FakeNs {
        let ns = {
            let mut state = self.state();
            state.namespaces.push(FakeNamespace::default());
            let ns = FakeNs(state.namespaces.len() - 1);
            // Namespace inodes as Linux numbers them, after the initial ones.
            let ino = 4_026_532_000 + ns.0 as u64;
            state.identities.push(NsId {
                dev: NSFS_DEVICE,
                ino,
            });
            state.paths.insert(path.into(), ns);
            ns
        };
        self.add_link(ns, "lo", 65536);
        ns
    }

    /// Makes `path` name the existing namespace `ns` too, as a bind mount
    /// of `/proc/PID/ns/net` does.
    pub fn bind(&self, path: impl Into<PathBuf>, ns: FakeNs) {
        self.state().paths.insert(path.into(), ns);
    }

    /// Puts a regular file at `path`: something that is not a namespace.
    pub fn add_file(&self, path: impl Into<PathBuf>) {
        self.state()
            .files
            .insert(path.into(), "a regular file".to_owned());
    }

    /// Removes the path of a namespace, as a runtime does when a pod dies.
    pub fn remove_namespace(&self, path: &Path) {
        self.state().paths.remove(path);
    }

    /// The identity of a namespace.
    pub fn identity_of(&self, ns: FakeNs) -> NsId {
        self.state().identities[ns.0]
    }

    /// A copy of a namespace's contents.
    pub fn namespace(&self, ns: FakeNs) -> FakeNamespace {
        self.state().namespaces[ns.0].clone()
    }

    /// The host's contents.
    pub fn host_namespace(&self) -> FakeNamespace {
        self.namespace(self.host)
    }

    /// Makes the `n`th state-changing operation from now (1-based) fail.
    pub fn fail_operation(&self, n: usize) {
        let mut state = self.state();
        state.fail_at = Some(state.operations + n);
    }

    /// Makes [`Kernel::sandbox_namespaces`] fail (as a real listing does
    /// when `/proc` cannot be read) while `fail` is set.
    pub fn fail_namespace_listing(&self, fail: bool) {
        self.state().listing_fails = fail;
    }

    /// How many state-changing operations ran so far.
    pub fn operations(&self) -> usize {
        self.state().operations
    }

    /// Runs a state-changing operation, counting it and failing it when
    /// told to.
    fn mutate<T>(
        &self,
        operation: &str,
        change: impl FnOnce(&mut FakeState) -> Result<T, KernelError>,
    ) -> Result<T, KernelError> {
        let mut state = self.state();
        state.operations += 1;
        if state.fail_at == Some(state.operations) {
            return Err(KernelError::Failed {
                operation: operation.to_owned(),
                source: std::io::Error::other("injected failure"),
            });
        }
        change(&mut state)
    }

    fn read<T>(&self, ns: &FakeNs, view: impl FnOnce(&FakeNamespace) -> T) -> T {
        view(&self.state().namespaces[ns.0])
    }

    /// The namespace at `path`, `None` when nothing is there.
    fn lookup(&self, path: &Path) -> Result<Option<FakeNs>, KernelError> {
        let state = self.state();
        if let Some(reason) = state.files.get(path) {
            return Err(KernelError::NotANamespace {
                path: path.to_path_buf(),
                reason: reason.clone(),
            });
        }
        Ok(state.paths.get(path).copied())
    }

    /// Applies `update` to the link `name` of `ns` in the kernel's order
    /// (MAC, MTU, name, up); a refused step keeps the earlier ones.
    fn apply_update(
        &self,
        state: &mut FakeState,
        ns: FakeNs,
        name: &str,
        update: &LinkUpdate,
        operation: &str,
    ) -> Result<(), KernelError> {
        let refuse = |errno| Err(KernelError::refused(operation, errno));
        let link = link_in(state, ns, name)?.clone();
        let parent = link
            .parent
            .as_deref()
            .and_then(|parent| state.namespaces[self.host.0].links.get(parent))
            .map(|parent| parent.link.clone());
        if let Some(mac) = update.mac {
            if mac.0[0] & 1 == 1 || mac.0 == [0; 6] {
                return refuse(Errno::EADDRNOTAVAIL);
            }
            if self.mac_in_use(state, ns, &link, mac) {
                return refuse(Errno::EADDRINUSE);
            }
            link_in(state, ns, name)?.link.mac = Some(mac);
        }
        if let Some(mtu) = update.mtu {
            if parent.as_ref().is_some_and(|parent| mtu > parent.mtu) {
                // What ipvlan and macvlan answer above the parent's MTU.
                return refuse(Errno::EINVAL);
            }
            link_in(state, ns, name)?.link.mtu = mtu;
            if ns == self.host {
                // The kernel lowers the slaves above a parent's new MTU.
                for (slave_ns, slave) in state.slaves_of(name) {
                    if let Some(slave) = state.namespaces[slave_ns].links.get_mut(&slave) {
                        slave.link.mtu = slave.link.mtu.min(mtu);
                    }
                }
            }
        }
        let mut name = name.to_owned();
        if let Some(new_name) = update.rename.as_ref().filter(|new| **new != name) {
            check_name(new_name, operation)?;
            let namespace = &mut state.namespaces[ns.0];
            if namespace.links.contains_key(new_name) {
                return refuse(Errno::EEXIST);
            }
            rename(namespace, &name, new_name);
            if ns == self.host {
                for (slave_ns, slave) in state.slaves_of(&name) {
                    if let Some(slave) = state.namespaces[slave_ns].links.get_mut(&slave) {
                        slave.parent = Some(new_name.clone());
                    }
                }
            }
            name.clone_from(new_name);
        }
        if update.up && !link.link.up {
            let current = link_in(state, ns, &name)?.clone();
            if let Some(mac) = current.link.mac
                && matches!(current.link.slave, Some(SlaveKind::MacVlan { .. }))
                && self.mac_in_use(state, ns, &current, mac)
            {
                return refuse(Errno::EADDRINUSE);
            }
            let link = link_in(state, ns, &name)?;
            link.link.up = true;
            if name == "lo" && !link.addresses.contains(&loopback()) {
                // The kernel gives the loopback its address when it comes up.
                link.addresses.push(loopback());
            }
            state.namespaces[ns.0].connect(&name);
        }
        Ok(())
    }

    /// Whether `mac` on the macvlan slave `link` of `ns` clashes with its
    /// parent's MAC or an up sibling's, as macvlan refuses.
    fn mac_in_use(&self, state: &FakeState, ns: FakeNs, link: &FakeLink, mac: MacAddr) -> bool {
        let Some(parent) = link.parent.as_deref() else {
            return false;
        };
        if !matches!(link.link.slave, Some(SlaveKind::MacVlan { .. })) {
            return false;
        }
        let parent_mac = state.namespaces[self.host.0]
            .links
            .get(parent)
            .and_then(|parent| parent.link.mac);
        parent_mac == Some(mac)
            || state
                .slaves_of(parent)
                .iter()
                .filter(|(slave_ns, slave)| !(*slave_ns == ns.0 && *slave == link.link.name))
                .filter_map(|(slave_ns, slave)| state.namespaces[*slave_ns].links.get(slave))
                .any(|sibling| sibling.link.up && sibling.link.mac == Some(mac))
    }
}

/// The link `name` of `ns`, or [`KernelError::LinkNotFound`].
fn link_in<'a>(
    state: &'a mut FakeState,
    ns: FakeNs,
    name: &str,
) -> Result<&'a mut FakeLink, KernelError> {
    link_mut(&mut state.namespaces[ns.0], name)
}

fn link_mut<'a>(
    namespace: &'a mut FakeNamespace,
    name: &str,
) -> Result<&'a mut FakeLink, KernelError> {
    namespace
        .links
        .get_mut(name)
        .ok_or_else(|| KernelError::LinkNotFound(name.to_owned()))
}

/// Refuses a name longer than the kernel takes (`IFNAMSIZ` - 1 bytes).
fn check_name(name: &str, operation: &str) -> Result<(), KernelError> {
    if name.len() > MAX_NAME_LEN {
        return Err(KernelError::refused(operation, Errno::ERANGE));
    }
    Ok(())
}

/// Renames a link; its routes follow it, as the kernel's follow its index.
fn rename(namespace: &mut FakeNamespace, from: &str, to: &str) {
    if let Some(mut link) = namespace.links.remove(from) {
        link.link.name = to.to_owned();
        namespace.links.insert(to.to_owned(), link);
    }
    for route in namespace
        .routes
        .iter_mut()
        .chain(namespace.connected.iter_mut())
    {
        if route.link == from {
            route.link = to.to_owned();
        }
    }
}

/// The loopback's IPv4 address.
fn loopback() -> IpNet {
    IpNet::new(IpAddr::from([127, 0, 0, 1]), 8).expect("8 is a valid IPv4 prefix length")
}

/// The metric the kernel stores for `route`: 1024 for an IPv6 route asked
/// with 0.
fn stored_metric(route: &Route) -> u32 {
    if route.metric == 0 && route.dst.addr().is_ipv6() {
        IPV6_DEFAULT_METRIC
    } else {
        route.metric
    }
}

/// The link a sysctl key such as `net/ipv4/conf/eth0/arp_notify` is about,
/// `None` for a key of no single link (`all`, `default`, or no link at all).
fn sysctl_link(key: &str) -> Option<&str> {
    let mut parts = key.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("net"), Some("ipv4" | "ipv6"), Some("conf" | "neigh"), Some(link))
            if link != "all" && link != "default" =>
        {
            Some(link)
        }
        _ => None,
    }
}

#[async_trait::async_trait]
impl Kernel for FakeKernel {
    type Ns = FakeNs;

    fn host(&self) -> &FakeNs {
        &self.host
    }

    async fn open(&self, path: &Path) -> Result<FakeNs, KernelError> {
        self.lookup(path)?
            .ok_or_else(|| KernelError::NamespaceNotFound(path.to_path_buf()))
    }

    async fn identify(&self, path: &Path) -> Result<Option<NsId>, KernelError> {
        Ok(self.lookup(path)?.map(|ns| self.identity_of(ns)))
    }

    fn identity(&self, ns: &FakeNs) -> Option<NsId> {
        Some(self.identity_of(*ns))
    }

    async fn sandbox_namespaces(&self) -> Result<Vec<PathBuf>, KernelError> {
        let state = self.state();
        if state.listing_fails {
            return Err(KernelError::Failed {
                operation: "listing network namespaces".to_owned(),
                source: std::io::Error::other("injected failure"),
            });
        }
        // Every path bound to a namespace, the named ones before those of
        // processes (`/proc/...`) as the kernel lists them, each namespace
        // once; the host (also the process's namespace here) left out.
        let mut paths: Vec<(&PathBuf, FakeNs)> =
            state.paths.iter().map(|(path, ns)| (path, *ns)).collect();
        paths.sort_by_key(|(path, _)| (path.starts_with("/proc"), *path));
        let mut seen = std::collections::BTreeSet::from([self.host]);
        Ok(paths
            .into_iter()
            .filter(|(_, ns)| seen.insert(*ns))
            .map(|(path, _)| path.clone())
            .collect())
    }

    async fn links(&self, ns: &FakeNs) -> Result<Vec<Link>, KernelError> {
        Ok(self.read(ns, |namespace| {
            namespace
                .links
                .values()
                .map(|link| link.link.clone())
                .collect()
        }))
    }

    async fn link(&self, ns: &FakeNs, name: &str) -> Result<Option<Link>, KernelError> {
        Ok(self.read(ns, |namespace| {
            namespace.links.get(name).map(|link| link.link.clone())
        }))
    }

    async fn create_slave(
        &self,
        parent: &str,
        name: &str,
        kind: SlaveKind,
        into: &FakeNs,
    ) -> Result<(), KernelError> {
        let parent_link = self
            .read(&self.host, |host| {
                host.links.get(parent).map(|link| link.link.clone())
            })
            .ok_or_else(|| KernelError::LinkNotFound(parent.to_owned()))?;
        let operation = format!("creating {kind} {name} on {parent}");
        self.mutate(&operation, |state| {
            check_name(name, &operation)?;
            if state.namespaces[into.0].links.contains_key(name) {
                return Err(KernelError::refused(&operation, Errno::EEXIST));
            }
            let index = state.take_index();
            let mac = match kind {
                SlaveKind::IpVlan { .. } => parent_link.mac,
                // macvlan picks a random, locally administered unicast MAC.
                SlaveKind::MacVlan { .. } => Some(MacAddr([
                    0x02,
                    0x4d,
                    0x56,
                    0,
                    (index >> 8) as u8,
                    index as u8,
                ])),
            };
            state.namespaces[into.0].links.insert(
                name.to_owned(),
                FakeLink {
                    link: Link {
                        index,
                        name: name.to_owned(),
                        slave: Some(kind),
                        mtu: parent_link.mtu,
                        mac,
                        up: false,
                    },
                    addresses: Vec::new(),
                    neighbours: Vec::new(),
                    parent: Some(parent.to_owned()),
                },
            );
            Ok(())
        })
    }

    async fn delete_link(&self, ns: &FakeNs, name: &str) -> Result<bool, KernelError> {
        self.mutate(&format!("deleting {name}"), |state| {
            if *ns == self.host {
                // Slaves die with their parent, in whatever namespace.
                for (slave_ns, slave) in state.slaves_of(name) {
                    state.namespaces[slave_ns].remove_link(&slave);
                }
            }
            Ok(state.namespaces[ns.0].remove_link(name))
        })
    }

    async fn update_link(
        &self,
        ns: &FakeNs,
        name: &str,
        update: &LinkUpdate,
    ) -> Result<(), KernelError> {
        let operation = format!("updating {name}");
        self.mutate(&operation, |state| {
            self.apply_update(state, *ns, name, update, &operation)
        })
    }

    async fn add_address(
        &self,
        ns: &FakeNs,
        link: &str,
        address: IpNet,
    ) -> Result<(), KernelError> {
        self.mutate(&format!("adding {address} to {link}"), |state| {
            let namespace = &mut state.namespaces[ns.0];
            let found = link_mut(namespace, link)?;
            if !found.addresses.contains(&address) {
                found.addresses.push(address);
            }
            namespace.connect(link);
            Ok(())
        })
    }

    async fn addresses(&self, ns: &FakeNs, link: &str) -> Result<Vec<IpNet>, KernelError> {
        self.read(ns, |namespace| {
            namespace
                .links
                .get(link)
                .map(|link| link.addresses.clone())
                .ok_or_else(|| KernelError::LinkNotFound(link.to_owned()))
        })
    }

    async fn replace_route(&self, ns: &FakeNs, route: &Route) -> Result<(), KernelError> {
        let operation = format!("adding route {route}");
        self.mutate(&operation, |state| {
            let namespace = &mut state.namespaces[ns.0];
            let link = namespace
                .links
                .get(&route.link)
                .ok_or_else(|| KernelError::LinkNotFound(route.link.clone()))?;
            if !link.link.up {
                return Err(KernelError::refused(&operation, Errno::ENETDOWN));
            }
            // The kernel checks an IPv4 next hop against the local table,
            // which only exists once the namespace has an IPv4 address.
            let no_ipv4 = || {
                !namespace.links.values().any(|link| {
                    link.addresses
                        .iter()
                        .any(|address| address.addr().is_ipv4())
                })
            };
            if route.gateway.is_some_and(|gateway| gateway.is_ipv4()) && no_ipv4() {
                return Err(KernelError::refused(&operation, Errno::EINVAL));
            }
            let stored = Route {
                metric: stored_metric(route),
                ..route.clone()
            };
            let replaced =
                |existing: &Route| existing.dst == stored.dst && existing.metric == stored.metric;
            namespace.routes.retain(|existing| !replaced(existing));
            namespace.connected.retain(|existing| !replaced(existing));
            namespace.routes.push(stored);
            Ok(())
        })
    }

    async fn delete_route(&self, ns: &FakeNs, route: &Route) -> Result<bool, KernelError> {
        self.mutate(&format!("deleting route {route}"), |state| {
            let namespace = &mut state.namespaces[ns.0];
            let matches = |existing: &Route| {
                existing.dst == route.dst
                    && existing.gateway == route.gateway
                    && existing.link == route.link
                    && (route.metric == 0 || existing.metric == route.metric)
            };
            // Like the kernel, one request deletes one route.
            if let Some(index) = namespace.routes.iter().position(matches) {
                namespace.routes.remove(index);
                Ok(true)
            } else if let Some(index) = namespace.connected.iter().position(matches) {
                namespace.connected.remove(index);
                Ok(true)
            } else {
                Ok(false)
            }
        })
    }

    async fn routes(&self, ns: &FakeNs, link: &str) -> Result<Vec<Route>, KernelError> {
        self.read(ns, |namespace| {
            if !namespace.links.contains_key(link) {
                return Err(KernelError::LinkNotFound(link.to_owned()));
            }
            Ok(namespace
                .main_table()
                .filter(|route| route.link == link)
                .cloned()
                .collect())
        })
    }

    async fn all_routes(&self, ns: &FakeNs) -> Result<Vec<Route>, KernelError> {
        Ok(self.read(ns, |namespace| namespace.main_table().cloned().collect()))
    }

    async fn replace_neighbour(
        &self,
        ns: &FakeNs,
        link: &str,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<(), KernelError> {
        self.mutate(&format!("adding neighbour {ip} on {link}"), |state| {
            let link = link_in(state, *ns, link)?;
            link.neighbours.retain(|entry| entry.ip != ip);
            link.neighbours.push(Neighbour {
                ip,
                mac: Some(mac),
                permanent: true,
            });
            Ok(())
        })
    }

    async fn neighbours(&self, ns: &FakeNs, link: &str) -> Result<Vec<Neighbour>, KernelError> {
        self.read(ns, |namespace| {
            namespace
                .links
                .get(link)
                .map(|link| link.neighbours.clone())
                .ok_or_else(|| KernelError::LinkNotFound(link.to_owned()))
        })
    }

    async fn write_sysctl(&self, ns: &FakeNs, key: &str, value: &str) -> Result<(), KernelError> {
        let operation = format!("writing /proc/sys/{key}");
        self.mutate(&operation, |state| {
            let namespace = &mut state.namespaces[ns.0];
            // A link's settings are a directory that exists with the link.
            if sysctl_link(key).is_some_and(|link| !namespace.links.contains_key(link)) {
                return Err(KernelError::refused(&operation, Errno::ENOENT));
            }
            namespace.sysctls.insert(key.to_owned(), value.to_owned());
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_route_replace_takes_over_the_destination_and_metric_whatever_the_link() {
        let kernel = FakeKernel::new();
        let pod = kernel.add_namespace("/var/run/netns/p");
        kernel.add_link(pod, "eth0", 1500);
        kernel.add_link(pod, "eth1", 1500);
        // A next hop is checked against the namespace's IPv4 addresses.
        kernel
            .add_address(&pod, "eth0", "10.88.0.2/24".parse().unwrap())
            .await
            .unwrap();
        let default = default_route("10.88.0.1", "eth0");
        kernel.replace_route(&pod, &default).await.unwrap();
        let mut ours = default_route("10.20.0.1", "eth1");
        ours.metric = 1;
        kernel.replace_route(&pod, &ours).await.unwrap();
        assert_eq!(
            kernel.namespace(pod).route_lines(),
            [
                "0.0.0.0/0 via 10.88.0.1 dev eth0 onlink",
                "0.0.0.0/0 via 10.20.0.1 dev eth1 onlink metric 1"
            ]
        );
        ours.metric = 0;
        kernel.replace_route(&pod, &ours).await.unwrap();
        assert_eq!(
            kernel.namespace(pod).route_lines(),
            [
                "0.0.0.0/0 via 10.20.0.1 dev eth1 onlink metric 1",
                "0.0.0.0/0 via 10.20.0.1 dev eth1 onlink"
            ],
            "metric 0 through eth1 replaced eth0's route"
        );
        // A delete at metric 0 takes any metric; the next one finds the other.
        assert!(kernel.delete_route(&pod, &ours).await.unwrap());
        assert!(kernel.delete_route(&pod, &ours).await.unwrap());
        assert!(!kernel.delete_route(&pod, &ours).await.unwrap());
    }

    fn default_route(gateway: &str, link: &str) -> Route {
        Route::via("0.0.0.0/0".parse().unwrap(), gateway.parse().unwrap(), link)
    }

    #[tokio::test]
    async fn namespaces_have_their_own_identity_and_a_recycled_path_a_new_one() {
        let kernel = FakeKernel::new();
        let path = Path::new("/var/run/netns/p");
        assert_eq!(kernel.identify(path).await.unwrap(), None);
        let first = kernel.add_namespace(path);
        let first_id = kernel.identify(path).await.unwrap();
        assert_eq!(first_id, Some(kernel.identity_of(first)));
        assert_ne!(first_id, kernel.host_identity());
        assert_eq!(
            kernel.identify(Path::new(PROCESS_NETNS)).await.unwrap(),
            kernel.host_identity()
        );
        kernel.remove_namespace(path);
        kernel.add_namespace(path);
        let second_id = kernel.identify(path).await.unwrap();
        assert!(second_id.is_some() && second_id != first_id);

        kernel.add_file("/var/run/netns/file");
        assert!(matches!(
            kernel.identify(Path::new("/var/run/netns/file")).await,
            Err(KernelError::NotANamespace { .. })
        ));
        assert!(matches!(
            kernel.open(Path::new("/var/run/netns/file")).await,
            Err(KernelError::NotANamespace { .. })
        ));
    }

    #[tokio::test]
    async fn a_slave_cannot_exceed_its_parents_mtu() {
        let kernel = FakeKernel::new();
        kernel.add_parent("eth1", 1400);
        let pod = kernel.add_namespace("/var/run/netns/p");
        kernel
            .create_slave("eth1", "eth0", SlaveKind::default(), &pod)
            .await
            .unwrap();
        let mtu = |mtu| LinkUpdate {
            mtu: Some(mtu),
            ..LinkUpdate::default()
        };
        assert!(kernel.update_link(&pod, "eth0", &mtu(1450)).await.is_err());
        kernel.update_link(&pod, "eth0", &mtu(1400)).await.unwrap();
        // A link that is no slave has no such limit.
        kernel.add_link(pod, "veth0", 1500);
        kernel.update_link(&pod, "veth0", &mtu(9000)).await.unwrap();
    }
}
