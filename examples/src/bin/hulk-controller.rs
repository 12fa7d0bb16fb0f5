//! The hulk-vpc cluster controller: `run` reconciles the cloud's
//! allocations of this cluster against its Nodes
//! ([`hulk_controller::Controller`]) until SIGTERM or Ctrl-C; `teardown`
//! returns every allocation and floating IP of the cluster
//! ([`hulk_controller::teardown`], [`hulk_controller::teardown_floating_ips`])
//! for the base platform's cluster deletion; `check-config` validates the
//! configuration.

#[path = "../daemon_log.rs"]
mod daemon_log;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use hulk_agent::config::BackendSection;
use hulk_controller::{
    Controller, ControllerConfig, Force, LEADER_LEASE, TeardownError, TeardownReport, teardown,
    teardown_floating_ips,
};
use hulk_kube::{ClientOptions, ClusterNodes, LeaseConfig};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The hulk-vpc cluster controller and cluster teardown.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The configuration file (TOML).
    #[arg(
        long,
        env = "HULK_CONTROLLER_CONFIG",
        default_value = "/etc/hulk-vpc/controller.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile the cluster's allocations against its Nodes while this
    /// replica holds the leader lease, until SIGTERM.
    Run {
        /// This replica's name in the leader lease (a process-unique suffix
        /// is added); the Deployment passes the pod's name.
        #[arg(long, env = "POD_NAME", default_value = "hulk-controller")]
        holder: String,
    },
    /// Return every allocation of the cluster to the cloud. Exit 0 when
    /// none remains, 3 when some remain (run again), 2 when refused
    /// because the cluster's API still lists nodes, 1 on any other failure.
    Teardown {
        /// Tear down even though the cluster's API lists nodes, or cannot
        /// be reached (the cluster is already gone).
        #[arg(long)]
        force: bool,
        /// Rounds (list, release, list) to run while allocations remain.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Validate the configuration and exit.
    CheckConfig,
}

/// The configuration file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Serves `/metrics` and `/healthz` here; none without it.
    #[serde(default)]
    metrics_address: Option<SocketAddr>,
    #[serde(default)]
    leader: LeaderSection,
    #[serde(default)]
    controller: ControllerConfig,
    /// Without it: in-cluster settings, else the kubeconfig.
    #[serde(default)]
    kubernetes: Option<KubernetesSection>,
    /// The agent's `[backend]`, with the same cluster name.
    backend: BackendSection,
}

/// `[leader]`: the lease that elects the active replica.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LeaderSection {
    /// Default: `POD_NAMESPACE` from the environment, else `kube-system`.
    namespace: Option<String>,
    name: String,
    duration_seconds: u32,
}

impl Default for LeaderSection {
    fn default() -> Self {
        Self {
            namespace: None,
            name: LEADER_LEASE.to_owned(),
            duration_seconds: LeaseConfig::LEADER_DURATION_SECONDS,
        }
    }
}

/// `[kubernetes]`: an explicit API server (tests, out-of-cluster runs).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesSection {
    api_server: String,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    token_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("cannot read the configuration file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration file does not fit the controller's schema")]
    Schema(#[source] toml::de::Error),
    #[error("invalid configuration")]
    Invalid(#[source] hulk_controller::ConfigError),
    #[error("cannot build the backend")]
    Backend(#[source] hulk_agent::backend::BackendError),
    #[error("cannot reach the Kubernetes API")]
    Kubernetes(#[source] hulk_kube::KubeError),
    #[error(
        "cannot tell whether the cluster's API still lists nodes; if the cluster is gone, \
         run the teardown with --force"
    )]
    Nodes(#[source] hulk_kube::KubeError),
    #[error("cannot serve metrics on {address}")]
    Metrics {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("teardown")]
    Teardown(#[source] TeardownError),
    #[error(
        "{0} allocation(s) or floating IP(s) remain after the last round; run the teardown again"
    )]
    Remaining(usize),
}

#[tokio::main]
async fn main() -> ExitCode {
    daemon_log::init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hulk-controller: {}", hulk_cni::describe(&error));
            ExitCode::from(match error {
                Failure::Teardown(TeardownError::NodesListed { .. }) => 2,
                Failure::Remaining(_) => 3,
                _ => 1,
            })
        }
    }
}

fn load(path: &Path) -> Result<File, Failure> {
    let text = std::fs::read_to_string(path).map_err(|source| Failure::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: File = toml::from_str(&text).map_err(Failure::Schema)?;
    file.controller.validate().map_err(Failure::Invalid)?;
    Ok(file)
}

async fn kube_client(file: &File) -> Result<kube::Client, Failure> {
    let options = match &file.kubernetes {
        None => ClientOptions::default(),
        Some(section) => ClientOptions {
            api_server: Some(section.api_server.clone()),
            ca_file: section.ca_file.clone(),
            token_file: section.token_file.clone(),
        },
    };
    hulk_kube::client(&options)
        .await
        .map_err(Failure::Kubernetes)
}

async fn run(args: Args) -> Result<(), Failure> {
    let file = load(&args.config)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(hulk_agent::cancel_on_signal(shutdown.clone()));
    match args.command {
        Command::CheckConfig => {
            println!("{}: valid", args.config.display());
            Ok(())
        }
        Command::Run { holder } => serve(file, &holder, shutdown).await,
        Command::Teardown { force, rounds } => tear_down(file, force, rounds, shutdown).await,
    }
}

async fn serve(file: File, holder: &str, shutdown: CancellationToken) -> Result<(), Failure> {
    let backends =
        hulk_agent::backend::backends_from_section(&file.backend).map_err(Failure::Backend)?;
    let client = kube_client(&file).await?;
    // Unique to this process: a restarted replica is a new holder.
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let namespace = file
        .leader
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| LeaseConfig::DEFAULT_NAMESPACE.to_owned());
    let leader = LeaseConfig::for_leader(file.leader.name.clone(), format!("{holder}_{started:x}"))
        .in_namespace(namespace)
        .with_duration_seconds(file.leader.duration_seconds);
    let mut controller = Controller::new(backends.ipam, client, file.controller.clone(), leader);
    if let Some(provider) = backends.floating_ips {
        controller = controller.with_floating_ips(provider);
    }
    if let Some(address) = file.metrics_address {
        let mut registry = Registry::default();
        controller.metrics().register(&mut registry);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| Failure::Metrics { address, source })?;
        tokio::spawn(hulk_agent::http::serve(
            listener,
            hulk_agent::http::HttpLimits::default(),
            std::sync::Arc::new(hulk_agent::http::AlwaysHealthy),
            registry,
            shutdown.clone(),
        ));
    }
    controller.run(shutdown).await;
    Ok(())
}

/// How long the teardown waits for the Node list before it gives up.
const NODE_LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause between two teardown rounds.
const ROUND_PAUSE: Duration = Duration::from_secs(5);

async fn tear_down(
    file: File,
    force: bool,
    rounds: u32,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    let backends =
        hulk_agent::backend::backends_from_section(&file.backend).map_err(Failure::Backend)?;
    let backend = backends.ipam;
    let (nodes_listed, force) = if force {
        // The cluster's API may be gone already: do not ask it.
        (0, Force::Yes)
    } else {
        let client = kube_client(&file).await?;
        let nodes = ClusterNodes::start(client, shutdown.child_token());
        nodes
            .wait_synced(NODE_LIST_TIMEOUT)
            .await
            .map_err(Failure::Nodes)?;
        (nodes.names().map_err(Failure::Nodes)?.len(), Force::No)
    };
    let mut remaining = 0;
    for round in 1..=rounds.max(1) {
        // Floating IPs first: each one deleted is one fewer to point at a
        // port about to go.
        let floating_remaining = match &backends.floating_ips {
            Some(provider) => {
                let report =
                    teardown_floating_ips(provider.as_ref(), nodes_listed, force, &shutdown)
                        .await
                        .map_err(Failure::Teardown)?;
                println!(
                    "round {round}: floating IPs listed {}, deleted {}, already gone {}, failed {}, remaining {}",
                    report.listed,
                    report.deleted,
                    report.already_gone,
                    report.failed,
                    report.remaining
                );
                report.remaining
            }
            None => 0,
        };
        let report = teardown(
            backend.as_ref(),
            nodes_listed,
            force,
            &file.controller.release,
            &shutdown,
        )
        .await
        .map_err(Failure::Teardown)?;
        print_round(round, &report);
        remaining = report.remaining + floating_remaining;
        if remaining == 0 || shutdown.is_cancelled() {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(ROUND_PAUSE) => {}
        }
    }
    match remaining {
        0 => Ok(()),
        remaining => Err(Failure::Remaining(remaining)),
    }
}

fn print_round(round: u32, report: &TeardownReport) {
    let tally = &report.tally;
    println!(
        "round {round}: listed {}, released {}, already gone {}, failed {}, not attempted {}, remaining {}",
        report.listed,
        tally.released,
        tally.already_gone,
        tally.failed,
        tally.skipped,
        report.remaining
    );
}
