//! Logging of the long-running binaries (hulk-agent, hulk-controller):
//! to stderr, colored only on a terminal, at `info` unless `RUST_LOG`
//! says otherwise (e.g. `hulk_pool=debug`).

use std::io::IsTerminal;

/// Installs the subscriber; call once, first thing in `main`.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
