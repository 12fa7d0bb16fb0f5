//! The hulk-vpc node agent as a library: what the `hulk-agent` binary runs,
//! testable without running the binary.
//!
//! - [`config`]: the TOML configuration and its environment overrides.
//! - [`Agent`]: [`Agent::from_config`] builds the backend, the store, the
//!   pools, the datapath and the [`Node`](hulk_node::Node);
//!   [`Agent::run`] restores the node, replays DELs the plugin noted while
//!   the agent was down, serves, and shuts down in order when its
//!   [`CancellationToken`](tokio_util::sync::CancellationToken) is
//!   cancelled.
//! - [`server`]: the framing and limits both Unix sockets share.
//! - [`plugin_service`]: the plugin API's server side (messages in
//!   [`hulk_agent_api`]).
//! - [`rescue`]: the rescue API for `hulkctl`: messages, server, client.
//! - [`http`]: the HTTP status endpoint (`/metrics`, `/healthz`).
//! - [`backend`]: the IPAM backend a configuration names.
//! - [`kubernetes`]: the node's pod directory over the Kubernetes API.
//! - [`identity`]: the instance id that holds the node's Lease.

mod agent;
pub mod backend;
pub mod config;
pub mod http;
pub mod identity;
pub mod kubernetes;
pub mod plugin_service;
pub mod rescue;
pub mod server;

pub use agent::{Agent, AgentError, cancel_on_signal};
