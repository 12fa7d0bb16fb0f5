//! A conformant fake of the UltrON-style IPAM contract
//! (docs/ultron-ipam-v1.md), handing out one subnet from memory. Teams run
//! it to test their clients or adapters.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hulk_ipam::{FaultPlan, Faulty, MacAddr, MemoryBackend};
use ipnet::IpNet;

/// Serve the UltrON-style IPAM contract v1 from memory.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: SocketAddr,
    /// The bearer token clients must send.
    #[arg(long, env = "HULK_ULTRON_TOKEN")]
    token: String,
    /// The subnet to hand out (its first host is the gateway).
    #[arg(long, default_value = "10.20.0.0/24")]
    subnet: IpNet,
    /// The gateway's MAC, reported with every address (pods then get a
    /// permanent neighbour entry for it).
    #[arg(long)]
    gateway_mac: Option<MacAddr>,
    /// Added to every call, to behave like a slow cloud.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let latency = Duration::from_millis(args.latency_ms);
    let mut mock = MemoryBackend::new(args.subnet);
    if let Some(mac) = args.gateway_mac {
        mock = mock.with_gateway_mac(mac);
    }
    let backend = Faulty::new(mock, FaultPlan::fixed_latency(latency));
    let app = hulk_openstack::ultron::server::router(Arc::new(backend), args.token);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %args.listen, subnet = %args.subnet, "serving the UltrON-style IPAM contract v1");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
