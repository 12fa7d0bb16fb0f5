//! The kernel operations the datapath needs, behind a trait, so the attach,
//! detach and check logic is tested without root against an in-memory
//! kernel, and runs against the real one through [`crate::NetlinkKernel`].

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use nix::errno::Errno;

use crate::netns::NetnsError;

pub use hulk_ipam::MacAddr;

/// ipvlan modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IpVlanMode {
    /// Switch on L2: slaves answer ARP; the default.
    #[default]
    L2,
    /// Route on L3: no ARP, no multicast.
    L3,
    /// L3 with netfilter hooks (conntrack works in the slave's namespace).
    L3s,
}

/// ipvlan isolation flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IpVlanFlag {
    /// Slaves talk to each other directly; the default.
    #[default]
    Bridge,
    /// Slaves cannot talk to each other.
    Private,
    /// Slave-to-slave traffic goes out to the external switch.
    Vepa,
}

/// macvlan modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MacVlanMode {
    /// Slaves talk to each other directly; the default.
    #[default]
    Bridge,
    /// Slaves cannot talk to each other.
    Private,
    /// Slave-to-slave traffic goes out to the external switch.
    Vepa,
    /// One slave takes over the parent.
    Passthru,
}

/// The kind of slave interface a pod gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlaveKind {
    /// An ipvlan slave: shares the parent's MAC.
    IpVlan {
        /// The mode.
        mode: IpVlanMode,
        /// The isolation flag.
        flag: IpVlanFlag,
    },
    /// A macvlan slave: its own MAC.
    MacVlan {
        /// The mode.
        mode: MacVlanMode,
    },
}

impl Default for SlaveKind {
    fn default() -> Self {
        SlaveKind::IpVlan {
            mode: IpVlanMode::L2,
            flag: IpVlanFlag::Bridge,
        }
    }
}

impl fmt::Display for SlaveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlaveKind::IpVlan { mode, flag } => write!(f, "ipvlan {mode:?} {flag:?}"),
            SlaveKind::MacVlan { mode } => write!(f, "macvlan {mode:?}"),
        }
    }
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// The slave kind, when the link is an ipvlan or macvlan slave.
    pub slave: Option<SlaveKind>,
    /// MTU.
    pub mtu: u32,
    /// Hardware address.
    pub mac: Option<MacAddr>,
    /// Administratively up.
    pub up: bool,
}

impl Link {
    /// The slave kind for messages, or "not a slave".
    pub fn kind_description(&self) -> String {
        self.slave
            .map_or_else(|| "not a slave".to_owned(), |kind| kind.to_string())
    }
}

/// Changes to a link; `None` leaves a property alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkUpdate {
    /// A new name.
    pub rename: Option<String>,
    /// A new MTU.
    pub mtu: Option<u32>,
    /// A new hardware address.
    pub mac: Option<MacAddr>,
    /// Bring the link up.
    pub up: bool,
}

/// The identity of a namespace: the device and inode of its nsfs file.
/// Two paths name the same namespace exactly when their identities are
/// equal, and a path recycled for a new namespace gets a new identity (the
/// kernel does not reuse an inode while the old namespace lives; a record
/// outliving both may in theory meet a reused one, as with any inode).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct NsId {
    /// The device of the nsfs file system.
    pub dev: u64,
    /// The namespace's inode number.
    pub ino: u64,
}

impl fmt::Display for NsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

/// A route in the main table through one link.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Next hop; `None` for a directly connected destination.
    pub gateway: Option<IpAddr>,
    /// Output interface.
    pub link: String,
    /// The next hop is on the link even if no address says so.
    pub onlink: bool,
    /// The route's metric (priority): among routes to the same destination
    /// the lowest wins. 0 asks for the kernel's default (0 for IPv4, 1024
    /// for IPv6).
    #[serde(default)]
    pub metric: u32,
}

impl Route {
    /// A route to a directly reachable destination (scope link).
    pub fn direct(dst: IpNet, link: impl Into<String>) -> Route {
        Route {
            dst,
            gateway: None,
            link: link.into(),
            onlink: false,
            metric: 0,
        }
    }

    /// A route via `gateway`, declared on-link so no connected prefix is needed.
    pub fn via(dst: IpNet, gateway: IpAddr, link: impl Into<String>) -> Route {
        Route {
            dst,
            gateway: Some(gateway),
            link: link.into(),
            onlink: true,
            metric: 0,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        write!(f, " dev {}", self.link)?;
        if self.onlink {
            write!(f, " onlink")?;
        }
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        Ok(())
    }
}

/// A neighbour (ARP/NDP) entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Neighbour {
    /// The neighbour's address.
    pub ip: IpAddr,
    /// Its hardware address, when resolved.
    pub mac: Option<MacAddr>,
    /// Whether the entry is permanent (static).
    pub permanent: bool,
}

/// Kernel failures, classified for callers that must tell "already gone"
/// from real errors. A refusal keeps the kernel's errno as its
/// [`std::io::Error`] source, and the operation it refused, so a message
/// reads "creating macvlan Bridge hulk1a2b on eth1: File exists (os error 17)".
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The namespace path does not exist (the runtime removed it).
    #[error("network namespace {0} does not exist")]
    NamespaceNotFound(PathBuf),
    /// Something exists at the path, but it is not a network namespace (a
    /// file, a directory, a FIFO, a namespace of another type, ...).
    #[error("{path} is not a network namespace: {reason}")]
    NotANamespace {
        /// The path given.
        path: PathBuf,
        /// What was found there instead.
        reason: String,
    },
    /// The namespace at the path could not be opened or entered for
    /// another reason (permissions, a failing `setns(2)`, ...).
    #[error("cannot open network namespace {path}: {source}")]
    Namespace {
        /// The path given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: NetnsError,
    },
    /// A named link does not exist (the kernel's ENODEV).
    #[error("link {0} does not exist")]
    LinkNotFound(String),
    /// The object already exists: the kernel answered EEXIST.
    #[error("{operation}: {source}")]
    Exists {
        /// What was being done, naming the object.
        operation: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// Any other refusal, with the operation that failed.
    #[error("{operation}: {source}")]
    Failed {
        /// What was being done, naming the object.
        operation: String,
        /// The kernel's (or the system's) answer; its
        /// [`std::io::Error::raw_os_error`] is the errno when there is one.
        #[source]
        source: std::io::Error,
    },
    /// The netlink worker of the namespace could not run the request.
    #[error("the netlink worker failed: {0}")]
    Worker(#[source] NetnsError),
}

impl KernelError {
    /// The answer `source` to `operation`, classified: EEXIST is
    /// [`KernelError::Exists`], anything else [`KernelError::Failed`].
    pub fn os(operation: impl Into<String>, source: std::io::Error) -> KernelError {
        let operation = operation.into();
        if source.raw_os_error() == Some(Errno::EEXIST as i32) {
            KernelError::Exists { operation, source }
        } else {
            KernelError::Failed { operation, source }
        }
    }

    /// The kernel's refusal of `operation` with `errno`, classified as
    /// [`KernelError::os`] does.
    pub fn refused(operation: impl Into<String>, errno: Errno) -> KernelError {
        KernelError::os(operation, std::io::Error::from(errno))
    }

    /// The errno behind the failure, when the kernel or the system gave
    /// one: ENOENT for a missing namespace and ENODEV for a missing link
    /// (what the kernel answers for them), the answer kept in
    /// [`KernelError::Exists`], [`KernelError::Failed`] and
    /// [`KernelError::Namespace`]; `None` for what has no errno (a path
    /// that is not a namespace, a stopped worker, an injected failure).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            KernelError::NamespaceNotFound(_) => Some(Errno::ENOENT as i32),
            KernelError::LinkNotFound(_) => Some(Errno::ENODEV as i32),
            KernelError::Exists { source, .. } | KernelError::Failed { source, .. } => {
                source.raw_os_error()
            }
            KernelError::Namespace { source, .. } => source.raw_os_error(),
            KernelError::NotANamespace { .. } | KernelError::Worker(_) => None,
        }
    }
}

/// The kernel, as the datapath uses it. `Ns` is a handle to one network
/// namespace; [`Kernel::host`] is the namespace holding the parent links.
///
/// Adds are "replace" operations (idempotent); deletes report whether
/// something was there. A route replace matches the main table's route
/// with the same destination and metric, whatever its link, as the kernel
/// does: replacing `0.0.0.0/0 metric 0` through one link takes over
/// another link's default route of that metric.
///
/// A request naming a link that does not exist is
/// [`KernelError::LinkNotFound`] (deletes answer `false` instead); other
/// refusals keep the kernel's errno ([`KernelError::raw_os_error`]).
/// `tests/kernel_contract.rs` checks the in-memory kernel against the real
/// one on every rule stated here.
#[async_trait::async_trait]
pub trait Kernel: Send + Sync {
    /// A handle to one network namespace.
    type Ns: Send + Sync;

    /// The namespace holding the parent (VPC-facing) links.
    fn host(&self) -> &Self::Ns;

    /// Opens a namespace by path; a missing path is
    /// [`KernelError::NamespaceNotFound`], anything else that is not a
    /// network namespace [`KernelError::NotANamespace`]. Never blocks on
    /// what it finds (a FIFO is not opened).
    async fn open(&self, path: &Path) -> Result<Self::Ns, KernelError>;

    /// The identity of the network namespace at `path`, `None` when the
    /// path does not exist; classified as [`Kernel::open`] does, without
    /// keeping anything open.
    async fn identify(&self, path: &Path) -> Result<Option<NsId>, KernelError>;

    /// The identity of an open namespace, when the kernel can tell.
    fn identity(&self, ns: &Self::Ns) -> Option<NsId>;

    /// The identity of [`Kernel::host`].
    fn host_identity(&self) -> Option<NsId> {
        self.identity(self.host())
    }

    /// Every network namespace a sandbox may live in on this node, one
    /// path each: the bind mounts in `/run/netns` and `/var/run/netns`
    /// (where runtimes and `ip netns` name them), then `/proc/PID/ns/net`
    /// of every process (a sandbox no runtime named). Each namespace is
    /// listed once, under the first of its paths in that order; the node's
    /// own namespaces ([`Kernel::host`] and the process's
    /// [`crate::PROCESS_NETNS`]) are left out, and so is whatever is not
    /// a network namespace. A process that exits while it is read, or a
    /// bind mount removed meanwhile, is skipped, and so is a process whose
    /// namespace the caller may not read (EACCES, EPERM: ptrace rules),
    /// since every CNI runtime also names its sandboxes' namespaces in
    /// those directories; any other failure to read a directory or a
    /// namespace file is an error, since a namespace left out could be
    /// the one holding a pod's address.
    async fn sandbox_namespaces(&self) -> Result<Vec<PathBuf>, KernelError>;

    /// Every link of a namespace.
    async fn links(&self, ns: &Self::Ns) -> Result<Vec<Link>, KernelError>;

    /// The link called `name`, if any.
    async fn link(&self, ns: &Self::Ns, name: &str) -> Result<Option<Link>, KernelError>;

    /// Creates a slave of the host link `parent`, called `name`, directly
    /// inside `into`, down, with the parent's MTU. A name taken in `into`
    /// is [`KernelError::Exists`]; one longer than 15 bytes ERANGE. The
    /// slave dies with its parent.
    async fn create_slave(
        &self,
        parent: &str,
        name: &str,
        kind: SlaveKind,
        into: &Self::Ns,
    ) -> Result<(), KernelError>;

    /// Deletes a link; `false` when there was none.
    async fn delete_link(&self, ns: &Self::Ns, name: &str) -> Result<bool, KernelError>;

    /// Changes a link's MAC, MTU, name and state, in that order, as the
    /// kernel does: a refused step keeps the earlier ones. A slave's MTU
    /// above its parent's is EINVAL; a taken name [`KernelError::Exists`];
    /// a macvlan MAC that is not unicast EADDRNOTAVAIL, one its parent or
    /// an up sibling has EADDRINUSE. A parent's lower MTU lowers its
    /// slaves above it.
    async fn update_link(
        &self,
        ns: &Self::Ns,
        name: &str,
        update: &LinkUpdate,
    ) -> Result<(), KernelError>;

    /// Adds an address to a link (replacing an equal one). An address on
    /// an up link brings the main-table route to its prefix (metric 256
    /// for IPv6).
    async fn add_address(
        &self,
        ns: &Self::Ns,
        link: &str,
        address: IpNet,
    ) -> Result<(), KernelError>;

    /// The addresses of a link.
    async fn addresses(&self, ns: &Self::Ns, link: &str) -> Result<Vec<IpNet>, KernelError>;

    /// Adds or replaces a route of the main table. The link must be up
    /// (ENETDOWN), and an IPv4 next hop needs an IPv4 address somewhere in
    /// the namespace (EINVAL; `lo` has 127.0.0.1 once up). An IPv6 route
    /// asked with metric 0 gets 1024. Routes follow a renamed link and die
    /// with a deleted one.
    async fn replace_route(&self, ns: &Self::Ns, route: &Route) -> Result<(), KernelError>;

    /// Deletes a route through `route.link` with its destination and next
    /// hop; `false` when there was none. A metric of 0 matches any metric.
    async fn delete_route(&self, ns: &Self::Ns, route: &Route) -> Result<bool, KernelError>;

    /// The main-table routes through `link`.
    async fn routes(&self, ns: &Self::Ns, link: &str) -> Result<Vec<Route>, KernelError>;

    /// Every main-table route of a namespace that goes through one link
    /// (multipath, blackhole and unreachable routes name no single link and
    /// are left out).
    async fn all_routes(&self, ns: &Self::Ns) -> Result<Vec<Route>, KernelError>;

    /// Adds or replaces a permanent neighbour entry.
    async fn replace_neighbour(
        &self,
        ns: &Self::Ns,
        link: &str,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<(), KernelError>;

    /// The neighbour entries of a link.
    async fn neighbours(&self, ns: &Self::Ns, link: &str) -> Result<Vec<Neighbour>, KernelError>;

    /// Writes `/proc/sys/{key}` inside the namespace; `key` is a path such as
    /// `net/ipv4/conf/eth0/arp_notify` (slashes, so interface names may hold dots).
    async fn write_sysctl(&self, ns: &Self::Ns, key: &str, value: &str) -> Result<(), KernelError>;
}

/// A shared kernel is the kernel: a node and an embedder (or a test that
/// restarts a node over the same in-memory kernel) can hold one each.
#[async_trait::async_trait]
impl<K: Kernel + ?Sized> Kernel for std::sync::Arc<K> {
    type Ns = K::Ns;

    fn host(&self) -> &Self::Ns {
        (**self).host()
    }

    async fn open(&self, path: &Path) -> Result<Self::Ns, KernelError> {
        (**self).open(path).await
    }

    async fn identify(&self, path: &Path) -> Result<Option<NsId>, KernelError> {
        (**self).identify(path).await
    }

    fn identity(&self, ns: &Self::Ns) -> Option<NsId> {
        (**self).identity(ns)
    }

    fn host_identity(&self) -> Option<NsId> {
        (**self).host_identity()
    }

    async fn sandbox_namespaces(&self) -> Result<Vec<PathBuf>, KernelError> {
        (**self).sandbox_namespaces().await
    }

    async fn links(&self, ns: &Self::Ns) -> Result<Vec<Link>, KernelError> {
        (**self).links(ns).await
    }

    async fn link(&self, ns: &Self::Ns, name: &str) -> Result<Option<Link>, KernelError> {
        (**self).link(ns, name).await
    }

    async fn create_slave(
        &self,
        parent: &str,
        name: &str,
        kind: SlaveKind,
        into: &Self::Ns,
    ) -> Result<(), KernelError> {
        (**self).create_slave(parent, name, kind, into).await
    }

    async fn delete_link(&self, ns: &Self::Ns, name: &str) -> Result<bool, KernelError> {
        (**self).delete_link(ns, name).await
    }

    async fn update_link(
        &self,
        ns: &Self::Ns,
        name: &str,
        update: &LinkUpdate,
    ) -> Result<(), KernelError> {
        (**self).update_link(ns, name, update).await
    }

    async fn add_address(
        &self,
        ns: &Self::Ns,
        link: &str,
        address: IpNet,
    ) -> Result<(), KernelError> {
        (**self).add_address(ns, link, address).await
    }

    async fn addresses(&self, ns: &Self::Ns, link: &str) -> Result<Vec<IpNet>, KernelError> {
        (**self).addresses(ns, link).await
    }

    async fn replace_route(&self, ns: &Self::Ns, route: &Route) -> Result<(), KernelError> {
        (**self).replace_route(ns, route).await
    }

    async fn delete_route(&self, ns: &Self::Ns, route: &Route) -> Result<bool, KernelError> {
        (**self).delete_route(ns, route).await
    }

    async fn routes(&self, ns: &Self::Ns, link: &str) -> Result<Vec<Route>, KernelError> {
        (**self).routes(ns, link).await
    }

    async fn all_routes(&self, ns: &Self::Ns) -> Result<Vec<Route>, KernelError> {
        (**self).all_routes(ns).await
    }

    async fn replace_neighbour(
        &self,
        ns: &Self::Ns,
        link: &str,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<(), KernelError> {
        (**self).replace_neighbour(ns, link, ip, mac).await
    }

    async fn neighbours(&self, ns: &Self::Ns, link: &str) -> Result<Vec<Neighbour>, KernelError> {
        (**self).neighbours(ns, link).await
    }

    async fn write_sysctl(&self, ns: &Self::Ns, key: &str, value: &str) -> Result<(), KernelError> {
        (**self).write_sysctl(ns, key, value).await
    }
}
