//! The hulk-vpc node agent's plugin API: what the CNI plugin (or any other
//! caller of the agent's plugin socket) needs, and nothing else.
//!
//! - [`PluginRequest`] / [`PluginReply`]: the messages, one JSON object
//!   per line on the agent's Unix socket ([`DEFAULT_SOCKET`]).
//! - [`PodRequest`] / [`PodAttachment`]: one pod interface as a CNI request
//!   names it, and what ADD built (with [`PodAttachment::to_cni_result`]).
//! - [`call`]: one request over the socket with a deadline.
//! - [`del_notes`]: durable notes of DELs the agent did not answer, written
//!   by the plugin and replayed by the agent.
//! - [`codes`]: hulk-vpc's own CNI error codes (100-106).
//!
//! The agent's side is in the `hulk-node` (what a request does) and
//! `hulk-agent` (the servers) crates.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use hulk_agent_api::{DEFAULT_SOCKET, PluginReply, PluginRequest, call};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let reply: PluginReply = call(
//!     DEFAULT_SOCKET.as_ref(),
//!     &PluginRequest::Status,
//!     Duration::from_secs(5),
//! )
//! .await?;
//! println!("{reply:?}");
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

mod client;
pub mod codes;
pub mod del_notes;
mod plugin;
mod pod;

pub use client::{ClientError, Exchange, call};
pub use plugin::{PluginReply, PluginRequest};
pub use pod::{PodAttachment, PodRequest};

/// The agent's plugin socket, where the plugin finds it unless its
/// configuration says `agentSocket`.
pub const DEFAULT_SOCKET: &str = "/run/hulk-vpc/agent.sock";

/// The agent's rescue socket (hulkctl), root only.
pub const DEFAULT_RESCUE_SOCKET: &str = "/run/hulk-vpc/rescue.sock";

/// How long a caller that does not say waits for an answer: the plugin's
/// default `agentTimeoutSeconds`, and the agent's bound on an ADD whose
/// caller sent no `timeout_ms`.
pub const DEFAULT_CALLER_TIMEOUT: Duration = Duration::from_secs(60);
