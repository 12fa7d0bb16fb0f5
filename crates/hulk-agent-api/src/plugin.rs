//! The plugin API's messages: one [`PluginRequest`] per connection, one
//! JSON object on one line, answered by one [`PluginReply`] line.

use hulk_cni::{Attachment, CniError};
use serde::{Deserialize, Serialize};

use crate::{Exchange, PodAttachment, PodRequest};

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PluginRequest {
    /// CNI ADD.
    Add(PodRequest),
    /// CNI DEL.
    Del(PodRequest),
    /// CNI CHECK.
    Check(PodRequest),
    /// CNI GC of one network with the runtime's valid attachments.
    Gc {
        /// The CNI network (configuration `name`) collected.
        #[serde(default)]
        cni_network: Option<String>,
        /// Attachments to keep.
        valid: Vec<Attachment>,
    },
    /// CNI STATUS.
    Status,
}

impl PluginRequest {
    /// The operation's name in logs and metrics: `add`, `del`, `check`,
    /// `gc` or `status`.
    pub fn operation(&self) -> &'static str {
        match self {
            PluginRequest::Add(_) => "add",
            PluginRequest::Del(_) => "del",
            PluginRequest::Check(_) => "check",
            PluginRequest::Gc { .. } => "gc",
            PluginRequest::Status => "status",
        }
    }
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PluginReply {
    /// ADD succeeded (boxed: the other replies are small).
    Added(Box<PodAttachment>),
    /// CHECK succeeded: the interface is as ADD built it, with this
    /// address (the plugin compares it with the runtime's `prevResult`).
    Checked(Box<PodAttachment>),
    /// DEL or GC succeeded.
    Done,
    /// The request failed, with its CNI error.
    Failed(CniError),
}

impl Exchange for PluginRequest {
    type Reply = PluginReply;
}
