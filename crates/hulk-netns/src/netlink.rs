//! [`Kernel`] over rtnetlink: every namespace is a [`NetlinkWorker`].

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::IpNet;
use nix::errno::Errno;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoIpVlan, InfoMacVlan, IpVlanFlags, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteScope,
};
use rtnetlink::{Handle, LinkIpVlan, LinkMacVlan, LinkUnspec, RouteMessageBuilder};

use crate::kernel::{
    IpVlanFlag, IpVlanMode, Kernel, KernelError, Link, LinkUpdate, MacAddr, MacVlanMode, Neighbour,
    NsId, Route, SlaveKind,
};
use crate::netns::{
    NETNS_RUN_DIR, NetlinkWorker, Netns, NetnsError, PROCESS_NETNS, identify_netns, link_by_name,
};

/// Where runtimes and `ip netns` bind-mount the namespaces they name:
/// `/run/netns`, and `/var/run/netns` for systems where `/var/run` is not
/// a link to `/run` (most have both name the same directory, and the
/// namespaces are listed once either way).
const NAMED_NETNS_DIRS: [&str; 2] = [NETNS_RUN_DIR, "/var/run/netns"];

/// Whether `error` says the object went away while it was read: a bind
/// mount removed, a process gone (ENOENT, or ESRCH from a task that is
/// exiting).
fn vanished(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::NotFound
        || error.raw_os_error() == Some(Errno::ESRCH as i32)
}

/// [`Kernel::sandbox_namespaces`] of the real kernel, blocking: the named
/// namespaces, then every process's, each identity once, none of
/// `excluded`.
fn list_sandbox_namespaces(excluded: &[NsId]) -> Result<Vec<PathBuf>, KernelError> {
    let mut seen: HashSet<NsId> = excluded.iter().copied().collect();
    let mut found = Vec::new();
    let listing = |dir: &Path| -> Result<Vec<PathBuf>, KernelError> {
        let failed = |source| KernelError::Failed {
            operation: format!("listing {}", dir.display()),
            source,
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(failed(error)),
        };
        let mut paths = Vec::new();
        for entry in entries {
            paths.push(entry.map_err(failed)?.path());
        }
        paths.sort();
        Ok(paths)
    };
    for dir in NAMED_NETNS_DIRS {
        for path in listing(Path::new(dir))? {
            // Checked to be a namespace file without opening what is
            // there (a placeholder file, a FIFO, a directory is skipped).
            let id = match Netns::open(&path) {
                Ok(netns) => netns.id(),
                Err(NetnsError::Open { source, .. }) if vanished(&source) => continue,
                Err(NetnsError::NotANamespace { .. }) => continue,
                Err(source) => return Err(KernelError::Namespace { path, source }),
            };
            if seen.insert(id) {
                found.push(path);
            }
        }
    }
    let mut processes: Vec<(u32, PathBuf)> = listing(Path::new("/proc"))?
        .into_iter()
        .filter_map(|path| {
            let pid = path.file_name()?.to_str()?.parse::<u32>().ok()?;
            Some((pid, path.join("ns/net")))
        })
        .collect();
    processes.sort();
    for (_, path) in processes {
        // A process's namespace link is always a network namespace: its
        // identity is what stat(2) of the link's target says.
        let metadata = match std::fs::metadata(&path) {
            Ok(metadata) => metadata,
            Err(error) if vanished(&error) => continue,
            // Not ours to look into (ptrace rules: a process of another
            // user namespace, the sandbox manager of a container): every
            // CNI runtime names its sandboxes' namespaces in the
            // directories above, which must be readable.
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::debug!(path = %path.display(), %error, "a process's network namespace cannot be read; skipped");
                continue;
            }
            Err(source) => {
                return Err(KernelError::Namespace {
                    source: NetnsError::Open {
                        path: path.clone(),
                        source,
                    },
                    path,
                });
            }
        };
        let id = NsId {
            dev: metadata.dev(),
            ino: metadata.ino(),
        };
        if seen.insert(id) {
            found.push(path);
        }
    }
    Ok(found)
}

/// The real kernel, reached through netlink.
#[derive(Debug)]
pub struct NetlinkKernel {
    host: NetlinkWorker,
}

impl NetlinkKernel {
    /// A kernel whose host namespace is the process's own.
    pub fn new() -> Result<NetlinkKernel, NetnsError> {
        NetlinkKernel::with_host(Netns::open(PROCESS_NETNS)?)
    }

    /// A kernel whose "host" is `netns` (a node namespace in tests).
    pub fn with_host(netns: Netns) -> Result<NetlinkKernel, NetnsError> {
        Ok(NetlinkKernel {
            host: NetlinkWorker::spawn_in(netns)?,
        })
    }
}

fn errno_of(error: &rtnetlink::Error) -> Option<Errno> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(Errno::from_raw(-message.raw_code())),
        _ => None,
    }
}

/// The kernel's answer to `operation`, keeping its errno.
fn kernel_error(operation: impl Into<String>, error: rtnetlink::Error) -> KernelError {
    match error {
        rtnetlink::Error::NetlinkError(message) => KernelError::os(operation, message.to_io()),
        // Not an answer of the kernel: a message rtnetlink could not use.
        error => KernelError::Failed {
            operation: operation.into(),
            source: std::io::Error::other(error),
        },
    }
}

/// A failure of a request made through [`link_by_name`].
fn request_error(operation: impl Into<String>, error: NetnsError) -> KernelError {
    match error {
        NetnsError::Netlink(error) => kernel_error(operation, error),
        error => KernelError::Worker(error),
    }
}

/// Classifies a failure to open or enter the namespace at `path`.
fn namespace_error(path: &Path, error: NetnsError) -> KernelError {
    match error {
        NetnsError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            KernelError::NamespaceNotFound(path.to_path_buf())
        }
        NetnsError::NotANamespace { path, reason } => KernelError::NotANamespace { path, reason },
        source => KernelError::Namespace {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Runs `job` on `ns`'s worker, flattening the worker's own failure.
async fn on<F, Fut, T>(ns: &NetlinkWorker, job: F) -> Result<T, KernelError>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, KernelError>> + 'static,
    T: Send + 'static,
{
    ns.run(job).await.map_err(KernelError::Worker)?
}

/// Runs a namespace file operation on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> Result<T, NetnsError> + Send + 'static,
) -> Result<T, KernelError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|error| namespace_error(path, error)),
        Err(error) => Err(KernelError::Failed {
            operation: format!("opening namespace {}", path.display()),
            source: std::io::Error::other(error),
        }),
    }
}

/// [`on`] for a job that dumps: one dump at a time per worker socket.
async fn on_dump<F, Fut, T>(ns: &NetlinkWorker, job: F) -> Result<T, KernelError>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, KernelError>> + 'static,
    T: Send + 'static,
{
    ns.run_dump(job).await.map_err(KernelError::Worker)?
}

async fn index_of(handle: &Handle, name: &str) -> Result<u32, KernelError> {
    match link_by_name(handle, name).await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(KernelError::LinkNotFound(name.to_owned())),
        Err(error) => Err(request_error(format!("looking up {name}"), error)),
    }
}

fn slave_kind(message: &LinkMessage) -> Option<SlaveKind> {
    let infos = message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })?;
    infos.iter().find_map(|info| match info {
        LinkInfo::Data(InfoData::IpVlan(data)) => {
            let mut mode = IpVlanMode::L2;
            let mut flag = IpVlanFlag::Bridge;
            for item in data {
                match item {
                    InfoIpVlan::Mode(kernel_mode) => {
                        mode = match u16::from(*kernel_mode) {
                            1 => IpVlanMode::L3,
                            2 => IpVlanMode::L3s,
                            _ => IpVlanMode::L2,
                        }
                    }
                    InfoIpVlan::Flags(flags) => {
                        flag = if flags.contains(IpVlanFlags::Private) {
                            IpVlanFlag::Private
                        } else if flags.contains(IpVlanFlags::Vepa) {
                            IpVlanFlag::Vepa
                        } else {
                            IpVlanFlag::Bridge
                        }
                    }
                    _ => {}
                }
            }
            Some(SlaveKind::IpVlan { mode, flag })
        }
        LinkInfo::Data(InfoData::MacVlan(data)) => {
            let mode = data.iter().find_map(|item| match item {
                InfoMacVlan::Mode(mode) => Some(*mode),
                _ => None,
            });
            use rtnetlink::packet_route::link::MacVlanMode as Kernel;
            let mode = match mode {
                Some(Kernel::Private) => MacVlanMode::Private,
                Some(Kernel::Vepa) => MacVlanMode::Vepa,
                Some(Kernel::Passthrough) => MacVlanMode::Passthru,
                _ => MacVlanMode::Bridge,
            };
            Some(SlaveKind::MacVlan { mode })
        }
        _ => None,
    })
}

fn to_link(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        slave: slave_kind(message),
        mtu: 0,
        mac: None,
        up: message.header.flags.contains(LinkFlags::Up),
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(bytes) => link.mac = <MacAddr>::try_from(bytes.as_slice()).ok(),
            _ => {}
        }
    }
    link
}

fn slave_message(name: &str, parent: u32, kind: SlaveKind) -> LinkMessage {
    use rtnetlink::packet_route::link::{IpVlanMode as KernelIpVlan, MacVlanMode as KernelMacVlan};
    match kind {
        SlaveKind::IpVlan { mode, flag } => {
            let mode = match mode {
                IpVlanMode::L2 => KernelIpVlan::L2,
                IpVlanMode::L3 => KernelIpVlan::L3,
                IpVlanMode::L3s => KernelIpVlan::L3S,
            };
            let builder = LinkIpVlan::new(name, parent, mode);
            // The kernel takes one flags attribute; bridge is "no flag".
            match flag {
                IpVlanFlag::Bridge => builder.build(),
                IpVlanFlag::Private => builder.flag(IpVlanFlags::Private).build(),
                IpVlanFlag::Vepa => builder.flag(IpVlanFlags::Vepa).build(),
            }
        }
        SlaveKind::MacVlan { mode } => {
            let mode = match mode {
                MacVlanMode::Bridge => KernelMacVlan::Bridge,
                MacVlanMode::Private => KernelMacVlan::Private,
                MacVlanMode::Vepa => KernelMacVlan::Vepa,
                MacVlanMode::Passthru => KernelMacVlan::Passthrough,
            };
            LinkMacVlan::new(name, parent, mode).build()
        }
    }
}

fn route_message(route: &Route, index: u32) -> Result<RouteMessage, KernelError> {
    // A route the kernel cannot be asked for, e.g. a gateway of the other family.
    let invalid = |error| KernelError::Failed {
        operation: format!("building route {route}"),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, error),
    };
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.dst.addr(), route.dst.prefix_len())
        .map_err(invalid)?
        .output_interface(index);
    match route.gateway {
        Some(gateway) => builder = builder.gateway(gateway).map_err(invalid)?,
        None => builder = builder.scope(RouteScope::Link),
    }
    if route.onlink {
        builder = builder.onlink();
    }
    if route.metric != 0 {
        builder = builder.priority(route.metric);
    }
    Ok(builder.build())
}

fn address_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn to_route(message: &RouteMessage, link: &str) -> Option<Route> {
    let mut dst = None;
    let mut gateway = None;
    let mut metric = 0;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(address) => dst = address_of(address),
            RouteAttribute::Gateway(address) => gateway = address_of(address),
            RouteAttribute::Priority(priority) => metric = *priority,
            _ => {}
        }
    }
    let dst = match dst {
        Some(address) => address,
        None if message.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6 => {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        }
        None => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    };
    Some(Route {
        dst: IpNet::new(dst, message.header.destination_prefix_length).ok()?,
        gateway,
        link: link.to_owned(),
        onlink: message.header.flags.contains(RouteFlags::Onlink),
        metric,
    })
}

/// The output interface of a route through one link.
fn output_interface(message: &RouteMessage) -> Option<u32> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        })
}

/// Every IPv4 and IPv6 route of the main table.
async fn main_routes(handle: &Handle) -> Result<Vec<RouteMessage>, KernelError> {
    let mut routes = Vec::new();
    for request in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let messages: Vec<RouteMessage> = handle
            .route()
            .get(request)
            .execute()
            .try_collect()
            .await
            .map_err(|error| kernel_error("listing routes", error))?;
        routes.extend(
            messages
                .into_iter()
                .filter(|message| message.header.table == RouteHeader::RT_TABLE_MAIN),
        );
    }
    Ok(routes)
}

/// Every link of the worker's namespace.
async fn all_links(handle: &Handle) -> Result<Vec<Link>, KernelError> {
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|error| kernel_error("listing links", error))?;
    Ok(messages.iter().map(to_link).collect())
}

#[async_trait::async_trait]
impl Kernel for NetlinkKernel {
    type Ns = NetlinkWorker;

    fn host(&self) -> &NetlinkWorker {
        &self.host
    }

    async fn open(&self, path: &Path) -> Result<NetlinkWorker, KernelError> {
        // Off the async workers: a path on a hung filesystem must not stall
        // the agent's other requests (the socket servers, /healthz).
        let owned = path.to_path_buf();
        blocking(path, move || {
            let netns = Netns::open(&owned)?;
            NetlinkWorker::spawn_in(netns)
        })
        .await
    }

    async fn identify(&self, path: &Path) -> Result<Option<NsId>, KernelError> {
        let owned = path.to_path_buf();
        blocking(path, move || identify_netns(owned)).await
    }

    fn identity(&self, ns: &NetlinkWorker) -> Option<NsId> {
        Some(ns.netns().id())
    }

    async fn sandbox_namespaces(&self) -> Result<Vec<PathBuf>, KernelError> {
        let host = self.host.netns().id();
        // Off the async workers: thousands of processes mean thousands of
        // stat(2) calls, and a hung mount must not stall the agent.
        match tokio::task::spawn_blocking(move || {
            let process =
                std::fs::metadata(PROCESS_NETNS).map_err(|source| KernelError::Namespace {
                    path: PathBuf::from(PROCESS_NETNS),
                    source: NetnsError::Open {
                        path: PathBuf::from(PROCESS_NETNS),
                        source,
                    },
                })?;
            let process = NsId {
                dev: process.dev(),
                ino: process.ino(),
            };
            list_sandbox_namespaces(&[host, process])
        })
        .await
        {
            Ok(listed) => listed,
            Err(error) => Err(KernelError::Failed {
                operation: "listing network namespaces".to_owned(),
                source: std::io::Error::other(error),
            }),
        }
    }

    async fn links(&self, ns: &NetlinkWorker) -> Result<Vec<Link>, KernelError> {
        on_dump(ns, |handle| async move { all_links(&handle).await }).await
    }

    async fn link(&self, ns: &NetlinkWorker, name: &str) -> Result<Option<Link>, KernelError> {
        let name = name.to_owned();
        on(ns, move |handle| async move {
            link_by_name(&handle, &name)
                .await
                .map(|link| link.as_ref().map(to_link))
                .map_err(|error| request_error(format!("looking up {name}"), error))
        })
        .await
    }

    async fn create_slave(
        &self,
        parent: &str,
        name: &str,
        kind: SlaveKind,
        into: &NetlinkWorker,
    ) -> Result<(), KernelError> {
        let (parent, name) = (parent.to_owned(), name.to_owned());
        // Creating the link with IFLA_NET_NS_FD puts it straight into the
        // pod's namespace: it never exists in the host under a pod's name.
        let target = (!std::ptr::eq(into, &self.host)).then(|| into.netns().as_fd().as_raw_fd());
        on(&self.host, move |handle| async move {
            let parent_index = index_of(&handle, &parent).await?;
            let mut message = slave_message(&name, parent_index, kind);
            if let Some(fd) = target {
                message.attributes.push(LinkAttribute::NetNsFd(fd));
            }
            handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(|error| kernel_error(format!("creating {kind} {name} on {parent}"), error))
        })
        .await
    }

    async fn delete_link(&self, ns: &NetlinkWorker, name: &str) -> Result<bool, KernelError> {
        let name = name.to_owned();
        on(ns, move |handle| async move {
            let index = match index_of(&handle, &name).await {
                Ok(index) => index,
                Err(KernelError::LinkNotFound(_)) => return Ok(false),
                Err(error) => return Err(error),
            };
            match handle.link().del(index).execute().await {
                Ok(()) => Ok(true),
                Err(error) if errno_of(&error) == Some(Errno::ENODEV) => Ok(false),
                Err(error) => Err(kernel_error(format!("deleting {name}"), error)),
            }
        })
        .await
    }

    async fn update_link(
        &self,
        ns: &NetlinkWorker,
        name: &str,
        update: &LinkUpdate,
    ) -> Result<(), KernelError> {
        let (name, update) = (name.to_owned(), update.clone());
        on(ns, move |handle| async move {
            let index = index_of(&handle, &name).await?;
            let mut builder = LinkUnspec::new_with_index(index);
            if let Some(new_name) = &update.rename {
                builder = builder.name(new_name.clone());
            }
            if let Some(mtu) = update.mtu {
                builder = builder.mtu(mtu);
            }
            if let Some(mac) = update.mac {
                builder = builder.address(mac.0.to_vec());
            }
            if update.up {
                builder = builder.up();
            }
            handle
                .link()
                .set(builder.build())
                .execute()
                .await
                .map_err(|error| kernel_error(format!("updating {name}"), error))
        })
        .await
    }

    async fn add_address(
        &self,
        ns: &NetlinkWorker,
        link: &str,
        address: IpNet,
    ) -> Result<(), KernelError> {
        let link = link.to_owned();
        on(ns, move |handle| async move {
            let index = index_of(&handle, &link).await?;
            handle
                .address()
                .add(index, address.addr(), address.prefix_len())
                .replace()
                .execute()
                .await
                .map_err(|error| kernel_error(format!("adding {address} to {link}"), error))
        })
        .await
    }

    async fn addresses(&self, ns: &NetlinkWorker, link: &str) -> Result<Vec<IpNet>, KernelError> {
        let link = link.to_owned();
        on_dump(ns, move |handle| async move {
            let index = index_of(&handle, &link).await?;
            let messages: Vec<_> = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
                .map_err(|error| kernel_error(format!("listing addresses of {link}"), error))?;
            Ok(messages
                .iter()
                .filter(|message| message.header.index == index)
                .filter_map(|message| {
                    message
                        .attributes
                        .iter()
                        .find_map(|attribute| match attribute {
                            AddressAttribute::Address(ip) => {
                                IpNet::new(*ip, message.header.prefix_len).ok()
                            }
                            _ => None,
                        })
                })
                .collect())
        })
        .await
    }

    async fn replace_route(&self, ns: &NetlinkWorker, route: &Route) -> Result<(), KernelError> {
        let route = route.clone();
        on(ns, move |handle| async move {
            let index = index_of(&handle, &route.link).await?;
            handle
                .route()
                .add(route_message(&route, index)?)
                .replace()
                .execute()
                .await
                .map_err(|error| kernel_error(format!("adding route {route}"), error))
        })
        .await
    }

    async fn delete_route(&self, ns: &NetlinkWorker, route: &Route) -> Result<bool, KernelError> {
        let route = route.clone();
        on(ns, move |handle| async move {
            let index = match index_of(&handle, &route.link).await {
                Ok(index) => index,
                Err(KernelError::LinkNotFound(_)) => return Ok(false),
                Err(error) => return Err(error),
            };
            match handle
                .route()
                .del(route_message(&route, index)?)
                .execute()
                .await
            {
                Ok(()) => Ok(true),
                Err(error) if errno_of(&error) == Some(Errno::ESRCH) => Ok(false),
                Err(error) => Err(kernel_error(format!("deleting route {route}"), error)),
            }
        })
        .await
    }

    async fn routes(&self, ns: &NetlinkWorker, link: &str) -> Result<Vec<Route>, KernelError> {
        let link = link.to_owned();
        on_dump(ns, move |handle| async move {
            let index = index_of(&handle, &link).await?;
            Ok(main_routes(&handle)
                .await?
                .iter()
                .filter(|message| output_interface(message) == Some(index))
                .filter_map(|message| to_route(message, &link))
                .collect())
        })
        .await
    }

    async fn all_routes(&self, ns: &NetlinkWorker) -> Result<Vec<Route>, KernelError> {
        on_dump(ns, |handle| async move {
            let names: std::collections::HashMap<u32, String> = all_links(&handle)
                .await?
                .into_iter()
                .map(|link| (link.index, link.name))
                .collect();
            Ok(main_routes(&handle)
                .await?
                .iter()
                .filter_map(|message| {
                    let name = names.get(&output_interface(message)?)?;
                    to_route(message, name)
                })
                .collect())
        })
        .await
    }

    async fn replace_neighbour(
        &self,
        ns: &NetlinkWorker,
        link: &str,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<(), KernelError> {
        let link = link.to_owned();
        on(ns, move |handle| async move {
            let index = index_of(&handle, &link).await?;
            handle
                .neighbours()
                .add(index, ip)
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|error| kernel_error(format!("adding neighbour {ip} on {link}"), error))
        })
        .await
    }

    async fn neighbours(
        &self,
        ns: &NetlinkWorker,
        link: &str,
    ) -> Result<Vec<Neighbour>, KernelError> {
        let link = link.to_owned();
        on_dump(ns, move |handle| async move {
            let index = index_of(&handle, &link).await?;
            let messages: Vec<_> = handle
                .neighbours()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|error| kernel_error(format!("listing neighbours of {link}"), error))?;
            Ok(messages
                .iter()
                .filter(|message| message.header.ifindex == index)
                .filter_map(|message| {
                    let mut ip = None;
                    let mut mac = None;
                    for attribute in &message.attributes {
                        match attribute {
                            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                                ip = Some(IpAddr::V4(*v4))
                            }
                            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                                ip = Some(IpAddr::V6(*v6))
                            }
                            NeighbourAttribute::LinkLayerAddress(bytes) => {
                                mac = <MacAddr>::try_from(bytes.as_slice()).ok()
                            }
                            _ => {}
                        }
                    }
                    Some(Neighbour {
                        ip: ip?,
                        mac,
                        permanent: message.header.state == NeighbourState::Permanent,
                    })
                })
                .collect())
        })
        .await
    }

    async fn write_sysctl(
        &self,
        ns: &NetlinkWorker,
        key: &str,
        value: &str,
    ) -> Result<(), KernelError> {
        let (path, value) = (format!("/proc/sys/{key}"), value.to_owned());
        // The job runs on the worker's thread, which is inside the
        // namespace, so /proc/sys/net shows that namespace's settings.
        on(ns, move |_| async move {
            std::fs::write(&path, value.as_bytes())
                .map_err(|error| KernelError::os(format!("writing {path}"), error))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// The kernel's answer `errno` to a netlink request.
    fn refusal(errno: Errno) -> rtnetlink::Error {
        let mut message = rtnetlink::packet_core::ErrorMessage::default();
        message.code = std::num::NonZeroI32::new(-(errno as i32));
        rtnetlink::Error::NetlinkError(message)
    }

    #[test]
    fn a_refusal_keeps_its_errno_and_the_operation() {
        let error = kernel_error(
            "creating macvlan Bridge hulk1 on eth1",
            refusal(Errno::EEXIST),
        );
        assert!(matches!(error, KernelError::Exists { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            "creating macvlan Bridge hulk1 on eth1: File exists (os error 17)"
        );
        let cause = error.source().expect("a cause");
        assert_eq!(
            cause
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error),
            Some(Errno::EEXIST as i32)
        );

        let error = request_error(
            "looking up eth0",
            NetnsError::Netlink(refusal(Errno::EPERM)),
        );
        assert!(matches!(error, KernelError::Failed { .. }), "{error:?}");
        assert_eq!(error.raw_os_error(), Some(Errno::EPERM as i32));
        assert!(matches!(
            request_error("looking up eth0", NetnsError::WorkerGone),
            KernelError::Worker(NetnsError::WorkerGone)
        ));
    }

    #[test]
    fn a_namespace_that_cannot_be_entered_keeps_the_cause_chain() {
        let path = Path::new("/run/netns/pod");
        let error = namespace_error(path, NetnsError::Enter(Errno::EPERM));
        assert!(
            matches!(&error, KernelError::Namespace { path: found, .. } if found == path),
            "{error:?}"
        );
        assert_eq!(error.raw_os_error(), Some(Errno::EPERM as i32));
        let netns = error.source().expect("the namespace failure");
        assert!(netns.is::<NetnsError>());
        let errno = netns.source().expect("the errno");
        assert_eq!(errno.downcast_ref::<Errno>(), Some(&Errno::EPERM));

        let missing = NetnsError::Open {
            path: path.to_path_buf(),
            source: Errno::ENOENT.into(),
        };
        assert!(matches!(
            namespace_error(path, missing),
            KernelError::NamespaceNotFound(found) if found == path
        ));
    }
}
