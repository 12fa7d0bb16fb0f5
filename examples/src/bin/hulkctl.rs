//! hulkctl: inspect and repair a node through the agent's rescue API.
//! Parsing and printing only; the agent does the work.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hulk_agent::rescue::{RescueReply, RescueRequest};
use hulk_agent_api::{DEFAULT_RESCUE_SOCKET, call};
use hulk_pool::{Clock, SystemClock};

/// Inspect and repair a hulk-vpc node.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The agent's rescue socket.
    #[arg(
        long,
        env = "HULK_RESCUE_SOCKET",
        default_value = DEFAULT_RESCUE_SOCKET
    )]
    socket: PathBuf,
    /// Print the agent's answer as JSON.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the agent.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    #[command(subcommand)]
    request: RescueRequest,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let request = args.request;
    let reply = match call(&args.socket, &request, Duration::from_secs(args.timeout)).await {
        Ok(reply) => reply,
        Err(error) => {
            eprintln!(
                "hulkctl: {} (is hulk-agent running? see --socket)",
                hulk_cni::describe(&error)
            );
            return ExitCode::from(2);
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&reply) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("hulkctl: {error}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", reply.render(SystemClock.now_ms()));
    }
    match reply {
        RescueReply::Failed { .. } => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}
