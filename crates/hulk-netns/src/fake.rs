//! An in-memory [`Kernel`] for unit tests: namespaces, links, addresses,
//! routes, neighbours and sysctls, with the kernel's rules that matter to
//! the datapath (unique names, routes die with their link, a route replace
//! matches destination and metric whatever the link, a slave's MTU cannot
//! exceed its parent's, every namespace has its own identity) and
//! injectable failures.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::IpNet;

use crate::kernel::{
    Kernel, KernelError, Link, LinkUpdate, Mac, Neighbour, NsId, Route, SlaveKind,
};

use crate::netns::PROCESS_NETNS;

/// The device number every fake namespace identity carries, as nsfs gives
/// all namespaces one device.
const NSFS_DEVICE: u64 = 4;

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
    /// Main-table routes.
    pub routes: Vec<Route>,
    /// Sysctls written, by key.
    pub sysctls: BTreeMap<String, String>,
}

impl FakeNamespace {
    /// Its routes, one line each as [`Route`]'s `Display` writes them, in
    /// the order they were added.
    pub fn route_lines(&self) -> Vec<String> {
        self.routes.iter().map(ToString::to_string).collect()
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

    /// Adds a link that is no slave (a veth, a bridge, ...) to `ns`.
    pub fn add_link(&self, ns: FakeNs, name: &str, mtu: u32) {
        let mut state = self.state();
        let index = state.next_index;
        state.next_index += 1;
        state.namespaces[ns.0].links.insert(
            name.to_owned(),
            FakeLink {
                link: Link {
                    index,
                    name: name.to_owned(),
                    slave: None,
                    mtu,
                    mac: Some([0x52, 0x54, 0, 0, 0, index as u8]),
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

    /// How many state-changing operations ran so far.
    pub fn operations(&self) -> usize {
        self.state().operations
    }

    /// Runs a state-changing operation on `ns`, counting it and failing it
    /// when told to.
    fn mutate<T>(
        &self,
        ns: &FakeNs,
        operation: &str,
        change: impl FnOnce(&mut FakeNamespace, &mut u32) -> Result<T, KernelError>,
    ) -> Result<T, KernelError> {
        let mut state = self.state();
        state.operations += 1;
        if state.fail_at == Some(state.operations) {
            return Err(KernelError::failed(operation, "injected failure"));
        }
        let FakeState {
            namespaces,
            next_index,
            ..
        } = &mut *state;
        change(&mut namespaces[ns.0], next_index)
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

    /// The MTU of the parent of the slave `name` in `ns`, if it is one.
    fn parent_mtu(&self, ns: &FakeNs, name: &str) -> Option<u32> {
        let parent = self.read(ns, |namespace| namespace.links.get(name)?.parent.clone())?;
        self.read(&self.host, |host| {
            host.links.get(&parent).map(|link| link.link.mtu)
        })
    }
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
        let mac = match kind {
            SlaveKind::IpVlan { .. } => parent_link.mac,
            SlaveKind::MacVlan { .. } => Some([0x02, 0, 0, 0, 0, 0x42]),
        };
        self.mutate(into, "create slave", |namespace, next_index| {
            if namespace.links.contains_key(name) {
                return Err(KernelError::Exists(name.to_owned()));
            }
            let index = *next_index;
            *next_index += 1;
            namespace.links.insert(
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
        self.mutate(ns, "delete link", |namespace, _| {
            let existed = namespace.links.remove(name).is_some();
            namespace.routes.retain(|route| route.link != name);
            Ok(existed)
        })
    }

    async fn update_link(
        &self,
        ns: &FakeNs,
        name: &str,
        update: &LinkUpdate,
    ) -> Result<(), KernelError> {
        let mtu_limit = self.parent_mtu(ns, name);
        self.mutate(ns, "update link", |namespace, _| {
            if let (Some(mtu), Some(limit)) = (update.mtu, mtu_limit)
                && mtu > limit
            {
                // What ipvlan and macvlan answer above the parent's MTU.
                return Err(KernelError::failed(
                    format!("updating {name}"),
                    "Invalid argument (os error 22)",
                ));
            }
            if let Some(new_name) = &update.rename
                && new_name != name
                && namespace.links.contains_key(new_name)
            {
                return Err(KernelError::Exists(new_name.clone()));
            }
            let mut link = namespace
                .links
                .remove(name)
                .ok_or_else(|| KernelError::LinkNotFound(name.to_owned()))?;
            if let Some(mtu) = update.mtu {
                link.link.mtu = mtu;
            }
            if update.mac.is_some() {
                link.link.mac = update.mac;
            }
            link.link.up |= update.up;
            let new_name = update.rename.clone().unwrap_or_else(|| name.to_owned());
            link.link.name = new_name.clone();
            namespace.links.insert(new_name, link);
            Ok(())
        })
    }

    async fn add_address(
        &self,
        ns: &FakeNs,
        link: &str,
        address: IpNet,
    ) -> Result<(), KernelError> {
        self.mutate(ns, "add address", |namespace, _| {
            let link = link_mut(namespace, link)?;
            if !link.addresses.contains(&address) {
                link.addresses.push(address);
            }
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
        self.mutate(ns, "replace route", |namespace, _| {
            if !namespace.links.contains_key(&route.link) {
                return Err(KernelError::LinkNotFound(route.link.clone()));
            }
            namespace
                .routes
                .retain(|existing| existing.dst != route.dst || existing.metric != route.metric);
            namespace.routes.push(route.clone());
            Ok(())
        })
    }

    async fn delete_route(&self, ns: &FakeNs, route: &Route) -> Result<bool, KernelError> {
        self.mutate(ns, "delete route", |namespace, _| {
            // Like the kernel, one request deletes one route.
            let found = namespace.routes.iter().position(|existing| {
                existing.dst == route.dst
                    && existing.gateway == route.gateway
                    && existing.link == route.link
                    && (route.metric == 0 || existing.metric == route.metric)
            });
            Ok(found.map(|index| namespace.routes.remove(index)).is_some())
        })
    }

    async fn routes(&self, ns: &FakeNs, link: &str) -> Result<Vec<Route>, KernelError> {
        Ok(self.read(ns, |namespace| {
            namespace
                .routes
                .iter()
                .filter(|route| route.link == link)
                .cloned()
                .collect()
        }))
    }

    async fn all_routes(&self, ns: &FakeNs) -> Result<Vec<Route>, KernelError> {
        Ok(self.read(ns, |namespace| namespace.routes.clone()))
    }

    async fn replace_neighbour(
        &self,
        ns: &FakeNs,
        link: &str,
        ip: IpAddr,
        mac: Mac,
    ) -> Result<(), KernelError> {
        self.mutate(ns, "replace neighbour", |namespace, _| {
            let link = link_mut(namespace, link)?;
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
        self.mutate(ns, "write sysctl", |namespace, _| {
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
