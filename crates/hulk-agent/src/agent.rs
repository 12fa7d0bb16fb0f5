//! The agent's assembly: what is built from a configuration, and in which
//! order it starts and stops. The order matters for correctness:
//!
//! 1. The sockets are bound first, before anything touches the node: a
//!    second agent started on the same paths stops there instead of
//!    restoring and replaying DELs under the running one. Until serving
//!    starts, callers wait in the listen backlog.
//! 2. The backend, the store, the pools and the node are built.
//! 3. [`Agent::run`]: node-level state back first ([`Node::restore`], after
//!    a first [`Node::collect_unproven_addresses`] tells which addresses
//!    held without a record a live interface holds), then
//!    the DELs the plugin noted while the agent was down, then serving.
//!    Serving does not wait for the warm-up: after a restart the pool may
//!    hold idle addresses already, and a cloud outage must not keep the
//!    node from releasing addresses or answering STATUS.
//! 4. On shutdown: the sockets stop accepting and the requests in progress
//!    finish; only then do the owner marks stop, so their last pass covers
//!    the ADDs and DELs that finished during the shutdown; the socket files
//!    are removed last, and only if still ours.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hulk_agent_api::del_notes::DelNotes;
use hulk_ipam::PoolKey;
use hulk_netns::{Datapath, Kernel, NetlinkKernel, Netns, NetnsError};
use hulk_node::pods::PodDirectory;
use hulk_node::{FloatingIps, Node, NodeError};
use hulk_pool::{
    Fencing, MemoryStore, PoolError, PoolManager, PoolStore, RedbStore, StoreError, SystemClock,
};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::backend::{self, BackendError};
use crate::config::{AgentConfig, ConfigError, KubernetesSection};
use crate::http::HttpLimits;
use crate::kubernetes::{EVENT_CONTROLLER, KubePods};
use crate::plugin_service::{PluginMetrics, PluginService};
use crate::rescue::RescueService;
use crate::server::{self, BindError, ServeLimits, SocketFile};

/// Why the agent could not start or stopped with an error. Each names
/// what it was doing; the cause is kept.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration cannot be read or used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A socket could not be bound (another agent serves it, or the
    /// directory cannot be created).
    #[error("cannot bind the {which} socket")]
    Bind {
        /// `plugin` or `rescue`.
        which: &'static str,
        /// The cause.
        #[source]
        source: BindError,
    },
    /// The backend could not be built.
    #[error("cannot set up the IPAM backend")]
    Backend(#[from] BackendError),
    /// The state file's directory could not be created.
    #[error("cannot create the state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file could not be opened.
    #[error("cannot open the state file")]
    Store(#[source] StoreError),
    /// The pools could not be opened from the store.
    #[error("cannot open the pools")]
    Pools(#[source] PoolError),
    /// The netlink socket or the node's network namespace could not be
    /// opened.
    #[error("cannot open the node's network")]
    Kernel(#[source] NetnsError),
    /// The node-level datapath could not be restored.
    #[error("cannot restore the node's datapath")]
    Restore(#[source] NodeError),
    /// The Kubernetes client could not be set up, or the node's Lease not
    /// read or written.
    #[error("cannot set up the Kubernetes client or the node's Lease")]
    Kubernetes(#[source] hulk_kube::KubeError),
    /// Another agent holds this node's name: two nodes with one name would
    /// hand out the same addresses and collect each other's pods.
    #[error(
        "another agent ({holder}) holds node {node}'s Lease until {until}; \
         refusing to start: two agents under one node name would hand out the same addresses"
    )]
    NodeHeld {
        /// The node name.
        node: String,
        /// The other agent's instance id (host name and random bits).
        holder: String,
        /// When its Lease expires unless renewed (RFC 3339).
        until: String,
    },
    /// The node's Lease was taken by another agent (or not renewed in
    /// time) while serving: the agent stopped serving.
    #[error("node {node}'s Lease was lost ({loss}); stopped serving")]
    LeaseLost {
        /// The node name.
        node: String,
        /// How it was lost.
        loss: hulk_kube::LeaseLoss,
    },
    /// Another agent instance marked this node's addresses in the backend
    /// within three heartbeats: it serves this node name (in any mode,
    /// with or without Kubernetes). At start nothing was adopted; while
    /// serving, the agent stopped.
    #[error("another agent serves node {node}: refusing to serve it too")]
    HeldElsewhere {
        /// The node name.
        node: String,
        /// Whose marks, on which address, how old.
        #[source]
        source: PoolError,
    },
    /// The instance id could not be kept.
    #[error(transparent)]
    InstanceId(#[from] crate::identity::InstanceIdError),
    /// The HTTP status endpoint could not listen.
    #[error("cannot listen on {address} for the HTTP status endpoint")]
    Http {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A node agent built from its configuration, ready to [`Agent::run`].
#[derive(Debug)]
pub struct Agent<K> {
    config: AgentConfig,
    node: Node<K>,
    default_pool: PoolKey,
    plugin_socket: (UnixListener, SocketFile),
    rescue_socket: (UnixListener, SocketFile),
    http: Option<TcpListener>,
    /// Stops what runs from construction on (the pod watch) once serving
    /// has stopped.
    watches: CancellationToken,
    /// The node's Lease, held from construction on (Kubernetes mode).
    lease: Option<Arc<hulk_kube::NodeLease>>,
}

impl Agent<NetlinkKernel> {
    /// Builds the agent `config` describes on this host's kernel (in
    /// `node_netns` when set): binds its sockets, builds the backend, the
    /// store, the pools and the node. Touches nothing on the node yet.
    ///
    /// # Errors
    ///
    /// [`AgentError`] naming the step that failed.
    pub async fn from_config(config: AgentConfig) -> Result<Self, AgentError> {
        let kernel = match &config.node_netns {
            Some(path) => NetlinkKernel::with_host(Netns::open(path).map_err(AgentError::Kernel)?),
            None => NetlinkKernel::new(),
        }
        .map_err(AgentError::Kernel)?;
        Self::with_kernel(config, kernel).await
    }
}

impl<K: Kernel + 'static> Agent<K> {
    /// [`Agent::from_config`] on `kernel` (tests use the fake kernel).
    ///
    /// # Errors
    ///
    /// [`AgentError`] naming the step that failed.
    pub async fn with_kernel(config: AgentConfig, kernel: K) -> Result<Self, AgentError> {
        // Bound with their modes from the start (see `server::bind`); each
        // file is removed when its `SocketFile` drops, on an error return
        // too, if still ours.
        let plugin_socket = server::bind(&config.socket, 0o660)
            .await
            .map_err(|source| AgentError::Bind {
                which: "plugin",
                source,
            })?;
        let rescue_socket = server::bind(&config.rescue_socket, 0o600)
            .await
            .map_err(|source| AgentError::Bind {
                which: "rescue",
                source,
            })?;
        // Before anything is adopted from the cloud or the store: prove
        // this agent is the only one under its node name.
        let watches = CancellationToken::new();
        let instance = crate::identity::instance_id(&config.instance_file)?;
        let kubernetes = match &config.kubernetes {
            Some(section) => {
                Some(Kubernetes::connect(section, &config, &instance, &watches).await?)
            }
            None => None,
        };
        let node_facts = backend::NodeFacts {
            parent_mac: parent_mac(&kernel, &config).await,
            node_address: config.network.node_address.addr(),
        };
        let backends = backend::for_node(&config.backend, &node_facts)?;
        let store: Arc<dyn PoolStore> = match &config.state_file {
            Some(path) => {
                if let Some(directory) = path.parent() {
                    std::fs::create_dir_all(directory).map_err(|source| AgentError::StateDir {
                        path: directory.to_path_buf(),
                        source,
                    })?;
                }
                Arc::new(RedbStore::open(path).map_err(AgentError::Store)?)
            }
            None => Arc::new(MemoryStore::default()),
        };
        // Without Kubernetes, the backend's marks are the only proof that
        // no other agent serves this node name; with it, a second proof.
        let fencing = Fencing {
            instance,
            heartbeat: Duration::from_secs(config.holder_heartbeat_seconds),
        };
        let pools = PoolManager::open_fenced(
            backends.ipam,
            store,
            Arc::new(SystemClock),
            &config.node_name,
            config
                .pool_config()
                .map_err(|message| AgentError::Config(ConfigError::Invalid(message)))?,
            Some(fencing),
        )
        .await
        .map_err(|error| match error {
            PoolError::HeldElsewhere(_) => AgentError::HeldElsewhere {
                node: config.node_name.clone(),
                source: error,
            },
            error => AgentError::Pools(error),
        })?;
        let default_pool = config.default_pool_key();
        let node = Node::new(
            pools,
            Datapath::new(kernel),
            config
                .node_network()
                .map_err(|message| AgentError::Config(ConfigError::Invalid(message)))?,
            default_pool.clone(),
        )
        .with_del_notes(DelNotes::new(&config.pending_del_dir));
        let node = match backends.floating_ips {
            Some(provider) => {
                let (network, policy) = config.backend.floating_ip_setting();
                node.with_floating_ips(FloatingIps {
                    provider,
                    network,
                    policy,
                })
            }
            None => node,
        };
        let (node, lease) = match kubernetes {
            Some(kubernetes) => (node.with_pods(kubernetes.pods), Some(kubernetes.lease)),
            None => (node, None),
        };
        let http = match config.metrics_address {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|source| AgentError::Http { address, source })?,
            ),
            None => None,
        };
        Ok(Agent {
            config,
            node,
            default_pool,
            plugin_socket,
            rescue_socket,
            http,
            watches,
            lease,
        })
    }

    /// Reads pods from `pods` (the Kubernetes API) for the pool
    /// annotations at ADD and the GC of dead pods.
    pub fn with_pods(mut self, pods: Arc<dyn PodDirectory>) -> Self {
        self.node = self.node.with_pods(pods);
        self
    }

    /// The node the agent serves.
    pub fn node(&self) -> &Node<K> {
        &self.node
    }

    /// The HTTP status endpoint's address, when it listens (a configured
    /// port 0 becomes a real one).
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.http
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    /// Restores the node, replays noted DELs, and serves until `shutdown`
    /// is cancelled, then stops in order (see the module docs).
    ///
    /// # Errors
    ///
    /// [`AgentError::Restore`] when the node-level datapath cannot be
    /// restored (nothing is served then).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let Agent {
            config,
            node,
            default_pool,
            plugin_socket: (listener, socket_file),
            rescue_socket: (rescue_listener, rescue_file),
            http,
            watches,
            lease,
        } = self;
        let node = Arc::new(node);
        let pools = node.pools().clone();
        // The first pass over the addresses held without a record, before
        // the restore: the ones a live interface holds (a state file lost
        // on this machine, records from before they existed) keep their
        // host routes; a dead predecessor's get none, and go back after
        // the next pass.
        match node.collect_unproven_addresses().await {
            Ok(released) if !released.is_empty() => {
                tracing::info!(
                    released = released.len(),
                    "addresses without a record released"
                );
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot judge the addresses held without a record yet; their pods get no host route until a pass can")
            }
        }
        let restored = node.restore().await.map_err(AgentError::Restore)?;
        tracing::info!(
            routes = restored.node.routes_installed,
            stale = restored.node.stale_routes_removed.len(),
            gateways_repinned = restored.gateways_repinned,
            "node state restored"
        );
        let replayed = node.replay_del_notes().await;
        if replayed > 0 {
            tracing::info!(replayed, "DELs made while the agent was down are done");
        }
        // Said once at start: Service traffic can fail silently otherwise.
        match hulk_node::nftables_shadowing().await {
            Ok(findings) => {
                for finding in findings.unwrap_or_default() {
                    tracing::warn!(%finding, "nftables can take precedence over kube-proxy's iptables rules");
                }
            }
            Err(error) => tracing::warn!(%error, "could not read the nftables ruleset"),
        }

        let mut background = tokio::task::JoinSet::new();
        // Losing the node's Lease (another agent took it, or the API was
        // unreachable for most of its duration) stops serving: two agents
        // must never serve one node name.
        let lost = Arc::new(std::sync::Mutex::new(None));
        if let Some(lease) = &lease {
            let mut keeper = lease.clone().keep_renewed(watches.child_token());
            let (stop, lost) = (shutdown.clone(), lost.clone());
            background.spawn(async move {
                if let Some(loss) = keeper.lost().await {
                    tracing::error!(%loss, "the node's Lease is lost: stopping");
                    *lost
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(loss);
                    stop.cancel();
                }
            });
        }
        // Another agent's fresh marks seen by a periodic sweep stop
        // serving too, whichever agent came first: both stop, and the one
        // that starts once the other's marks are stale serves alone.
        let displaced = Arc::new(std::sync::Mutex::new(None));
        {
            let (watched, stop, displaced) = (pools.clone(), shutdown.clone(), displaced.clone());
            background.spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    found = watched.displaced() => {
                        tracing::error!(%found, "another agent serves this node name: stopping");
                        *displaced
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(found);
                        stop.cancel();
                    }
                }
            });
        }
        let warming = pools.clone();
        background.spawn(async move {
            match warming.warm_up(&default_pool).await {
                Ok(allocated) => {
                    tracing::info!(pool = %default_pool.subnet, allocated, "pool warmed up");
                }
                Err(error) => {
                    tracing::warn!(pool = %default_pool.subnet, %error, "warm-up failed; the refiller retries");
                }
            }
        });
        background.spawn(pools.clone().run_refillers(shutdown.clone()));
        // Not a child of `shutdown`: cancelled after serving stopped.
        let marks = CancellationToken::new();
        background.spawn(pools.clone().run_owner_marks(marks.clone()));
        let gc_interval = Duration::from_secs(config.gc_interval_seconds);
        background.spawn(node.clone().run_collector(gc_interval, shutdown.clone()));
        let metrics = PluginMetrics::default();
        if let Some(listener) = http {
            let mut registry = Registry::default();
            pools.metrics().register(&mut registry);
            metrics.register(&mut registry);
            tracing::info!(address = ?listener.local_addr().ok(), "serving /metrics and /healthz");
            background.spawn(crate::http::serve(
                listener,
                HttpLimits::default(),
                pools.clone(),
                registry,
                shutdown.clone(),
            ));
        }
        tracing::info!(socket = %config.socket.display(), node = %config.node_name, "agent ready");
        // Both sockets serve root only (`ServeLimits::default()`): the
        // runtime runs the plugin as root and hulkctl is an operator's
        // tool. The file modes keep others from connecting; the uid check
        // also covers a group member (agent.sock is 0660) and a mode
        // changed by hand.
        let limits = ServeLimits {
            max_in_flight: config.max_in_flight,
            request_timeout: Duration::from_secs(config.request_timeout_seconds),
            ..ServeLimits::default()
        };
        // Its own small bound: an operator's few calls still get through
        // when the plugin's socket is flooded.
        let rescue_limits = ServeLimits {
            max_in_flight: 4,
            max_connections: 16,
            ..limits.clone()
        };
        background.spawn(server::serve(
            Arc::new(RescueService::new(node.clone())),
            rescue_listener,
            rescue_limits,
            shutdown.clone(),
        ));
        server::serve(
            Arc::new(PluginService::new(node, metrics)),
            listener,
            limits,
            shutdown,
        )
        .await;
        tracing::info!("plugin socket closed; finishing background work");
        marks.cancel();
        watches.cancel();
        while let Some(joined) = background.join_next().await {
            if let Err(error) = joined {
                tracing::error!(%error, "a background task of the agent failed");
            }
        }
        // Removed only if still ours (see `SocketFile`).
        drop((socket_file, rescue_file));
        let loss = lost
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(loss) = loss {
            return Err(AgentError::LeaseLost {
                node: config.node_name,
                loss,
            });
        }
        let found = displaced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(found) = found {
            return Err(AgentError::HeldElsewhere {
                node: config.node_name,
                source: PoolError::HeldElsewhere(found),
            });
        }
        // Given back, so that a replacement machine need not wait for it
        // to expire (this machine takes it back at once anyway).
        if let Some(lease) = lease
            && let Err(error) = lease.release().await
        {
            tracing::warn!(error = %hulk_cni::describe(&error), "cannot release the node's Lease; it expires");
        }
        Ok(())
    }
}

/// The parent interface's MAC, by which nested mode finds the node's
/// Neutron port; only looked up in nested mode. Unreadable: `None`
/// (logged), and the node port is found by the node's address alone.
async fn parent_mac<K: Kernel>(kernel: &K, config: &AgentConfig) -> Option<hulk_ipam::MacAddr> {
    if !matches!(
        &config.backend,
        crate::config::BackendSection::Neutron {
            node_port: Some(_),
            ..
        }
    ) {
        return None;
    }
    let parent = &config.network.parent;
    match kernel.link(kernel.host(), parent).await {
        Ok(Some(link)) if link.mac.is_some() => link.mac,
        Ok(_) => {
            tracing::warn!(%parent, "the parent interface has no MAC; the node port is found by the node's address");
            None
        }
        Err(error) => {
            tracing::warn!(%parent, %error, "cannot read the parent interface's MAC; the node port is found by the node's address");
            None
        }
    }
}

/// What the agent holds in Kubernetes mode.
struct Kubernetes {
    /// The node's pods: a watch and an Event recorder.
    pods: Arc<dyn PodDirectory>,
    /// The node's Lease, acquired.
    lease: Arc<hulk_kube::NodeLease>,
}

impl Kubernetes {
    /// Connects to the API server `section` names, acquires the node's
    /// Lease as this agent's instance (refusing to go on when another
    /// agent holds it), and starts the watch of the node's pods (running
    /// until `watches` is cancelled; until it has listed, ADD asks with one
    /// GET and GC judges nobody).
    async fn connect(
        section: &KubernetesSection,
        config: &AgentConfig,
        instance: &str,
        watches: &CancellationToken,
    ) -> Result<Self, AgentError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
        let port = std::env::var("KUBERNETES_SERVICE_PORT").ok();
        let api_server = section
            .api_server(host.as_deref(), port.as_deref())
            .map_err(|message| AgentError::Config(ConfigError::Invalid(message)))?;
        let options = hulk_kube::ClientOptions {
            api_server: Some(api_server),
            ca_file: section.ca_file.exists().then(|| section.ca_file.clone()),
            token_file: section
                .token_file
                .exists()
                .then(|| section.token_file.clone()),
        };
        let client = hulk_kube::client(&options)
            .await
            .map_err(AgentError::Kubernetes)?;
        let holder = instance.to_owned();
        let node = &config.node_name;
        let lease = hulk_kube::NodeLease::new(
            client.clone(),
            hulk_kube::LeaseConfig::for_node(node, holder.clone())
                .in_namespace(section.lease_namespace.clone()),
        );
        match lease.acquire().await {
            Ok(()) => tracing::info!(%holder, "holding the node's Lease"),
            Err(hulk_kube::KubeError::LeaseHeld {
                holder, expires_at, ..
            }) => {
                return Err(AgentError::NodeHeld {
                    node: node.clone(),
                    holder,
                    until: expires_at.to_string(),
                });
            }
            Err(error) => return Err(AgentError::Kubernetes(error)),
        }
        let pods = hulk_kube::NodePods::start(client.clone(), node, watches.child_token());
        let events = hulk_kube::PodEvents::new(client, EVENT_CONTROLLER, node);
        Ok(Kubernetes {
            pods: Arc::new(KubePods::new(pods, events)),
            lease: Arc::new(lease),
        })
    }
}

/// Cancels `shutdown` on SIGTERM (what Kubernetes sends a stopping pod)
/// or SIGINT (Ctrl-C); an agent that cannot watch SIGTERM logs it and
/// stops on SIGINT only.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            tracing::error!(%error, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down: finishing requests in progress");
    shutdown.cancel();
}
