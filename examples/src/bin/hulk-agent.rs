//! The hulk-vpc node agent: parses its arguments and configuration and
//! runs [`hulk_agent::Agent`] until SIGTERM or Ctrl-C.

#[path = "../daemon_log.rs"]
mod daemon_log;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hulk_agent::Agent;
use hulk_agent::config::AgentConfig;
use tokio_util::sync::CancellationToken;

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

#[tokio::main]
async fn main() -> ExitCode {
    daemon_log::init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hulk-agent: {}", hulk_cni::describe(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), hulk_agent::AgentError> {
    let config = AgentConfig::load(&args.config, std::env::vars())?;
    if args.check_config {
        println!("{}: valid", args.config.display());
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    let agent = Agent::from_config(config).await?;
    tokio::spawn(hulk_agent::cancel_on_signal(shutdown.clone()));
    agent.run(shutdown).await
}
