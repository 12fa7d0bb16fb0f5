//! The hulk-vpc node agent: holds the pools and the datapath and serves the
//! CNI plugin on a Unix socket. Wiring only; the work is in hulk-node.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hulk_ipam::{FaultPlan, Faulty, IpamBackend, MockBackend};
use hulk_netns::{Datapath, NetlinkKernel, Netns};
use hulk_node::Node;
use hulk_node::agent::{AgentMetrics, PluginApi, ServeLimits, serve};
use hulk_node::config::{AgentConfig, BackendSection, KubernetesSection};
use hulk_node::del_notes::DelNotes;
use hulk_node::kube::KubeClient;
use hulk_node::lines::bind;
use hulk_node::metrics::HttpLimits;
use hulk_node::rescue::{self, RescueApi};
use hulk_openstack::keystone::{Credentials, Keystone, KeystoneConfig};
use hulk_openstack::neutron::{NeutronAuth, NeutronClient};
use hulk_openstack::ultron::UltronBackend;
use hulk_openstack::{HttpClient, HttpSettings, NeutronBackend, NeutronBackendConfig};
use hulk_pool::{MemoryStore, PoolManager, PoolStore, RedbStore, SystemClock};
use prometheus_client::registry::Registry;

/// Run the hulk-vpc node agent.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The configuration file (TOML).
    #[arg(
        long,
        env = "HULK_AGENT_CONFIG",
        default_value = "/etc/hulk-vpc/agent.toml"
    )]
    config: PathBuf,
    /// Only validate the configuration (environment overrides applied)
    /// and exit.
    #[arg(long)]
    check_config: bool,
}

type Failure = Box<dyn std::error::Error>;

fn read_secret(path: &std::path::Path) -> Result<String, Failure> {
    let text =
        std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
    Ok(text.trim().to_owned())
}

fn http(ca_file: &Option<PathBuf>) -> Result<HttpClient, Failure> {
    Ok(HttpClient::new(&HttpSettings {
        ca_file: ca_file.clone(),
        ..HttpSettings::default()
    })?)
}

fn backend(section: &BackendSection) -> Result<Arc<dyn IpamBackend>, Failure> {
    Ok(match section {
        BackendSection::Mock {
            subnet,
            gateway,
            gateway_mac,
            latency_ms,
        } => {
            let mut mock = match gateway {
                Some(gateway) => MockBackend::with_gateway(*subnet, *gateway),
                None => MockBackend::new(*subnet),
            };
            if let Some(mac) = gateway_mac {
                mock = mock.with_gateway_mac(*mac);
            }
            let latency = Duration::from_millis(*latency_ms);
            Arc::new(Faulty::new(mock, FaultPlan::fixed_latency(latency)))
        }
        BackendSection::Ultron {
            url,
            token_file,
            cluster,
            ca_file,
        } => Arc::new(UltronBackend::new(
            http(ca_file)?,
            url.clone(),
            read_secret(token_file)?,
            cluster.clone(),
        )),
        BackendSection::Neutron {
            auth_url,
            application_credential_id,
            application_credential_secret_file,
            cluster,
            endpoint,
            region,
            ca_file,
        } => {
            let credentials = Credentials::ApplicationCredential {
                id: application_credential_id.clone(),
                secret: read_secret(application_credential_secret_file)?,
            };
            let mut keystone = KeystoneConfig::new(auth_url.clone(), credentials);
            keystone.region = region.clone();
            let http = http(ca_file)?;
            let keystone = Keystone::new(keystone, http.clone());
            let client = NeutronClient::new(
                http,
                NeutronAuth::Keystone(Box::new(keystone)),
                endpoint.clone(),
            )?;
            Arc::new(NeutronBackend::new(
                client,
                NeutronBackendConfig::new(cluster.clone()),
            ))
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    // RUST_LOG (e.g. `hulk_pool=debug`) overrides the default level, info.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .map_err(|error| format!("{}: {error}", args.config.display()))?;
    let config = AgentConfig::parse_with_overrides(&text, std::env::vars())
        .map_err(|error| format!("{}: {error}", args.config.display()))?;
    if args.check_config {
        println!("{}: valid", args.config.display());
        return Ok(());
    }
    // First, before anything touches the node: a second agent started on
    // the same paths stops here instead of restoring and replaying DELs
    // under the running one. Bound with their modes from the start (see
    // `hulk_node::lines::bind`); until serving starts, callers wait in the
    // backlog. Each file is removed when its `SocketFile` drops, on an
    // error return too, if still ours.
    let (listener, socket_file) = bind(&config.socket, 0o660).await?;
    let (rescue_listener, rescue_file) = bind(&config.rescue_socket, 0o600).await?;

    let backend = backend(&config.backend)?;
    let store: Arc<dyn PoolStore> = match &config.state_file {
        Some(path) => {
            if let Some(directory) = path.parent() {
                std::fs::create_dir_all(directory)?;
            }
            Arc::new(RedbStore::open(path)?)
        }
        None => Arc::new(MemoryStore::default()),
    };
    let pools = PoolManager::open(
        backend,
        store,
        Arc::new(SystemClock),
        &config.node_name,
        config.pool_config()?,
    )
    .await?;
    let kernel = match &config.node_netns {
        Some(path) => NetlinkKernel::with_host(Netns::open(path)?)?,
        None => NetlinkKernel::new()?,
    };
    let key = config.default_pool_key();
    let mut node = Node::new(
        pools.clone(),
        Datapath::new(kernel),
        config.node_network()?,
        key.clone(),
    );
    if let Some(section) = &config.kubernetes {
        node = node.with_kubernetes(kubernetes(section)?);
    }
    let node = Arc::new(node.with_del_notes(DelNotes::new(&config.pending_del_dir)));
    // After a reboot or restart: node-level state back first, then the
    // DELs the plugin did while the agent was down, then serve.
    let restored = node.restore().await?;
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

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut background = tokio::task::JoinSet::new();
    // Serving does not wait for the warm-up: after a restart the pool may
    // hold idle addresses already, and a cloud outage must not keep the
    // node from releasing addresses or answering STATUS.
    let warming = pools.clone();
    background.spawn(async move {
        match warming.warm_up(&key).await {
            Ok(allocated) => tracing::info!(pool = %key.subnet, allocated, "pool warmed up"),
            Err(error) => {
                tracing::warn!(pool = %key.subnet, %error, "warm-up failed; the refiller retries")
            }
        }
    });
    // The pool's loops stop on a cancellation token; the node's servers on
    // the watch channel: the signal handler stops both.
    let stop_refillers = tokio_util::sync::CancellationToken::new();
    background.spawn(pools.clone().run_refillers(stop_refillers.clone()));
    // Marks stop after serving does, so the last pass covers the ADDs and
    // DELs that were finishing during the shutdown.
    let stop_marks = tokio_util::sync::CancellationToken::new();
    background.spawn(pools.clone().run_owner_marks(stop_marks.clone()));
    let gc_interval = Duration::from_secs(config.gc_interval_seconds);
    background.spawn(node.clone().run_collector(gc_interval, stopped.clone()));
    let metrics = AgentMetrics::default();
    if let Some(address) = config.metrics_address {
        let mut registry = Registry::default();
        pools.metrics().register(&mut registry);
        metrics.register(&mut registry);
        let listener = tokio::net::TcpListener::bind(address).await?;
        tracing::info!(%address, "serving /metrics and /healthz");
        background.spawn(hulk_node::metrics::serve(
            listener,
            HttpLimits::default(),
            pools.clone(),
            registry,
            stopped.clone(),
        ));
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down: finishing requests in progress");
        let _ = stop.send(true);
        stop_refillers.cancel();
    });
    tracing::info!(socket = %config.socket.display(), node = %config.node_name, "agent ready");
    // Both sockets serve root only (`ServeLimits::default()`): the runtime
    // runs the plugin as root and hulkctl is an operator's tool. The file
    // modes keep others from connecting; the uid check also covers a group
    // member (agent.sock is 0660) and a mode changed by hand.
    let limits = ServeLimits {
        max_in_flight: config.max_in_flight,
        request_timeout: Duration::from_secs(config.request_timeout_seconds),
        ..ServeLimits::default()
    };
    // Its own small bound: an operator's few calls still get through when
    // the plugin's socket is flooded.
    let rescue_limits = ServeLimits {
        max_in_flight: 4,
        max_connections: 16,
        ..limits.clone()
    };
    background.spawn(rescue::serve(
        Arc::new(RescueApi::new(node.clone())),
        rescue_listener,
        rescue_limits,
        stopped.clone(),
    ));
    serve(
        Arc::new(PluginApi::new(node, metrics)),
        listener,
        limits,
        stopped,
    )
    .await;
    stop_marks.cancel();
    while background.join_next().await.transpose()?.is_some() {}
    // Removed only if still ours (see `SocketFile`).
    drop((socket_file, rescue_file));
    Ok(())
}

fn kubernetes(section: &KubernetesSection) -> Result<KubeClient, Failure> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    let port = std::env::var("KUBERNETES_SERVICE_PORT").ok();
    let api_server = section.api_server(host.as_deref(), port.as_deref())?;
    let ca_file = section.ca_file.exists().then(|| section.ca_file.clone());
    let http = http(&ca_file)?;
    let token_file = section
        .token_file
        .exists()
        .then(|| section.token_file.clone());
    Ok(KubeClient::new(
        http.client().clone(),
        &api_server,
        token_file,
    ))
}
