//! The agent's API on a Unix socket: one JSON request line, one JSON reply
//! line per connection. Bounded: requests past `max_in_flight` wait for a
//! slot, each request has a deadline, a request line has a size limit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hulk_cni::{Attachment, CniError, ErrorCode};
use hulk_netns::Kernel;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};

use crate::{Node, PodAttachment, PodRequest};

/// The longest request line the agent reads.
pub const MAX_REQUEST_BYTES: u64 = 1024 * 1024;

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentRequest {
    /// CNI ADD.
    Add(PodRequest),
    /// CNI DEL.
    Del(PodRequest),
    /// CNI CHECK.
    Check(PodRequest),
    /// CNI GC with the runtime's valid attachments.
    Gc {
        /// Attachments to keep.
        valid: Vec<Attachment>,
    },
    /// CNI STATUS.
    Status,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AgentReply {
    /// ADD succeeded.
    Added(PodAttachment),
    /// DEL, CHECK or GC succeeded.
    Done,
    /// The request failed, with its CNI error.
    Failed(CniError),
}

/// Limits of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Requests handled at once; more wait for a slot.
    pub max_in_flight: usize,
    /// Deadline of one request, waiting for a slot included.
    pub request_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_in_flight: 64,
            request_timeout: Duration::from_secs(60),
        }
    }
}

async fn handle<K: Kernel + 'static>(node: &Node<K>, request: AgentRequest) -> AgentReply {
    let outcome = match request {
        AgentRequest::Add(pod) => node.add(&pod).await.map(AgentReply::Added),
        AgentRequest::Del(pod) => node.del(&pod).await.map(|()| AgentReply::Done),
        AgentRequest::Check(pod) => node.check(&pod).await.map(|()| AgentReply::Done),
        AgentRequest::Gc { valid } => node.gc(&valid).await.map(|_| AgentReply::Done),
        AgentRequest::Status => {
            return node
                .status()
                .map_or_else(AgentReply::Failed, |()| AgentReply::Done);
        }
    };
    outcome.unwrap_or_else(|error| AgentReply::Failed(error.to_cni()))
}

async fn serve_connection<K: Kernel + 'static>(
    node: Arc<Node<K>>,
    slots: Arc<Semaphore>,
    limits: ServeLimits,
    stream: UnixStream,
) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    BufReader::new(reader)
        .take(MAX_REQUEST_BYTES)
        .read_line(&mut line)
        .await?;
    let reply = match serde_json::from_str::<AgentRequest>(&line) {
        Err(error) => AgentReply::Failed(CniError::new(
            ErrorCode::DecodingFailure,
            format!("unreadable agent request: {error}"),
        )),
        Ok(request) => {
            let work = async {
                let _slot = slots.acquire().await;
                handle(&node, request).await
            };
            tokio::time::timeout(limits.request_timeout, work)
                .await
                .unwrap_or_else(|_| {
                    AgentReply::Failed(CniError::try_again_later(format!(
                        "the agent did not finish within {:?}",
                        limits.request_timeout
                    )))
                })
        }
    };
    let mut bytes = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    writer.write_all(&bytes).await?;
    writer.shutdown().await
}

/// Serves `node` on `listener` until `shutdown` turns true; requests in
/// progress then finish before this returns.
pub async fn serve<K: Kernel + 'static>(
    node: Arc<Node<K>>,
    listener: UnixListener,
    limits: ServeLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let mut connections = tokio::task::JoinSet::new();
    while !*shutdown.borrow_and_update() {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (node, slots) = (node.clone(), slots.clone());
                    connections.spawn(async move {
                        if let Err(error) = serve_connection(node, slots, limits, stream).await {
                            tracing::warn!(%error, "agent connection failed");
                        }
                    });
                }
                Err(error) => tracing::error!(%error, "cannot accept an agent connection"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Failures to reach the agent (the plugin falls back or reports 103).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, writing or reading failed.
    #[error("agent socket {socket}: {source}")]
    Io {
        /// The socket path.
        socket: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The answer is not an agent reply.
    #[error("unreadable agent reply: {0}")]
    Reply(#[from] serde_json::Error),
}

/// Sends one request to the agent at `socket` and waits up to `timeout`.
pub async fn call(
    socket: &Path,
    request: &AgentRequest,
    timeout: Duration,
) -> Result<AgentReply, ClientError> {
    let io = |source| ClientError::Io {
        socket: socket.display().to_string(),
        source,
    };
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(io)?;
        let mut bytes = serde_json::to_vec(request)?;
        bytes.push(b'\n');
        stream.write_all(&bytes).await.map_err(io)?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .await
            .map_err(io)?;
        Ok(serde_json::from_str(&line)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}
