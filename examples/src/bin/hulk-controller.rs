//! The hulk-vpc cluster controller: `run` reconciles the cloud's
//! allocations of this cluster against its Nodes
//! ([`hulk_controller::Daemon`]) until SIGTERM or Ctrl-C; `teardown`
//! returns every allocation of the cluster
//! ([`hulk_controller::teardown_rounds`]) for the base platform's cluster
//! deletion; `check-config` validates the configuration
//! ([`hulk_controller::ControllerFile`]).

#[path = "../daemon_log.rs"]
mod daemon_log;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hulk_controller::{
    ControllerFile, Daemon, DaemonError, Force, TeardownError, TeardownOutcome, teardown_rounds,
};
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
        /// Rounds (list, release, list) to run while allocations remain
        /// (at least 1).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
    },
    /// Validate the configuration and exit.
    CheckConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    daemon_log::init();
    let args = Args::parse();
    let file = match ControllerFile::load(&args.config) {
        Ok(file) => file,
        Err(error) => return failure(&error, 1),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(hulk_agent::cancel_on_signal(shutdown.clone()));
    match args.command {
        Command::CheckConfig => {
            println!("{}: valid", args.config.display());
            ExitCode::SUCCESS
        }
        Command::Run { holder } => match Daemon::from_config(file, &holder).await {
            Ok(daemon) => {
                daemon.run(shutdown).await;
                ExitCode::SUCCESS
            }
            Err(error) => failure(&error, 1),
        },
        Command::Teardown { force, rounds } => {
            let force = if force { Force::Yes } else { Force::No };
            let outcome =
                teardown_rounds(&file, force, rounds, &shutdown, |round| println!("{round}"));
            match outcome.await {
                Ok(TeardownOutcome::Clean) => ExitCode::SUCCESS,
                Ok(TeardownOutcome::Remaining(remaining)) => {
                    eprintln!(
                        "hulk-controller: {remaining} allocation(s) remain after the last round; \
                         run the teardown again"
                    );
                    ExitCode::from(3)
                }
                Err(error @ DaemonError::Teardown(TeardownError::NodesListed { .. })) => {
                    failure(&error, 2)
                }
                Err(error) => failure(&error, 1),
            }
        }
    }
}

/// Prints `error` with its causes and exits with `code`.
fn failure(error: &(dyn std::error::Error + 'static), code: u8) -> ExitCode {
    eprintln!("hulk-controller: {}", hulk_cni::describe(error));
    ExitCode::from(code)
}
