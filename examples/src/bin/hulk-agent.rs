//! The hulk-vpc node agent: holds the pools and the datapath and serves the
//! CNI plugin on a Unix socket. Wiring only; the work is in hulk-node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hulk_ipam::{FaultPlan, Faulty, IpamBackend, MockBackend};
use hulk_netns::{Datapath, NetlinkKernel, Netns};
use hulk_node::Node;
use hulk_node::agent::{ServeLimits, serve};
use hulk_node::config::{AgentConfig, BackendSection};
use hulk_openstack::keystone::{Credentials, Keystone, KeystoneConfig};
use hulk_openstack::neutron::{NeutronAuth, NeutronClient};
use hulk_openstack::ultron::UltronBackend;
use hulk_openstack::{HttpClient, HttpSettings, NeutronBackend, NeutronBackendConfig};
use hulk_pool::{MemoryStore, PoolManager, PoolStore, RedbStore, SystemClock};

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
            latency_ms,
        } => {
            let mock = match gateway {
                Some(gateway) => MockBackend::with_gateway(*subnet, *gateway),
                None => MockBackend::new(*subnet),
            };
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .map_err(|error| format!("{}: {error}", args.config.display()))?;
    let config =
        AgentConfig::parse(&text).map_err(|error| format!("{}: {error}", args.config.display()))?;

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
    let node = Arc::new(Node::new(
        pools.clone(),
        Datapath::new(kernel),
        config.node_network()?,
        key.clone(),
    ));
    // After a reboot or restart: node-level state back first, then serve.
    let restored = node.restore().await?;
    tracing::info!(
        routes = restored.routes_installed,
        stale = restored.stale_routes_removed.len(),
        "node state restored"
    );
    pools.warm_up(&key).await?;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let refiller = tokio::spawn(pools.clone().run_refiller(key, stopped.clone()));
    if let Some(directory) = config.socket.parent() {
        std::fs::create_dir_all(directory)?;
    }
    let _ = std::fs::remove_file(&config.socket);
    let listener = tokio::net::UnixListener::bind(&config.socket)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down: finishing requests in progress");
        let _ = stop.send(true);
    });
    tracing::info!(socket = %config.socket.display(), node = %config.node_name, "agent ready");
    let limits = ServeLimits {
        max_in_flight: config.max_in_flight,
        request_timeout: Duration::from_secs(config.request_timeout_seconds),
    };
    serve(node, listener, limits, stopped).await;
    refiller.await?;
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}
