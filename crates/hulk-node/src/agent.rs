//! The agent's API for the CNI plugin on a Unix socket (framing in
//! [`crate::lines`]): ADD, DEL, CHECK, GC and STATUS, each counted and
//! timed in [`AgentMetrics`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hulk_cni::{Attachment, CniError, ErrorCode};
use hulk_netns::Kernel;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::watch;

pub use crate::lines::{AllowedPeers, ClientError, ServeLimits};
use crate::lines::{LineService, Peer};
use crate::{Node, PodAttachment, PodRequest};

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

impl AgentRequest {
    fn operation(&self) -> &'static str {
        match self {
            AgentRequest::Add(_) => "add",
            AgentRequest::Del(_) => "del",
            AgentRequest::Check(_) => "check",
            AgentRequest::Gc { .. } => "gc",
            AgentRequest::Status => "status",
        }
    }
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AgentReply {
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

/// Labels of a plugin request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `add`, `del`, `check`, `gc` or `status`.
    pub op: String,
    /// `ok`, or the CNI error code.
    pub outcome: String,
}

/// Labels of a plugin request's duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `add`, `del`, `check`, `gc` or `status`.
    pub op: String,
}

/// Metrics of the plugin API. Handles are shared: clone freely.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Requests by operation and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds per request by operation.
    pub seconds: Family<OperationLabels, Histogram>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            requests: Family::default(),
            // 1 ms to about 65 s.
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
        }
    }
}

impl AgentMetrics {
    /// Registers the metrics under the prefix `hulk_agent`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("hulk_agent");
        registry.register(
            "requests",
            "Plugin requests by operation and outcome (ok or the CNI error code)",
            self.requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Time to serve a plugin request",
            self.seconds.clone(),
        );
    }

    fn record(&self, operation: &str, started: Instant, reply: &AgentReply) {
        let outcome = match reply {
            AgentReply::Failed(error) => error.code.as_u32().to_string(),
            AgentReply::Added(_) | AgentReply::Checked(_) | AgentReply::Done => "ok".to_owned(),
        };
        self.requests
            .get_or_create(&RequestLabels {
                op: operation.to_owned(),
                outcome,
            })
            .inc();
        self.seconds
            .get_or_create(&OperationLabels {
                op: operation.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The plugin API of a node.
#[derive(Debug)]
pub struct PluginApi<K> {
    node: Arc<Node<K>>,
    metrics: AgentMetrics,
}

impl<K: Kernel + 'static> PluginApi<K> {
    /// The API of `node`, recording into `metrics`.
    pub fn new(node: Arc<Node<K>>, metrics: AgentMetrics) -> Self {
        PluginApi { node, metrics }
    }

    async fn answer(&self, request: AgentRequest) -> AgentReply {
        // The work runs in its own task: the server drops this future when
        // its request timeout passes or the caller hangs up, and an ADD or
        // DEL cut off half-way would leave a half-built interface. The node
        // bounds an ADD by the caller's own timeout and undoes it then.
        let node = self.node.clone();
        match tokio::spawn(async move { Self::work(&node, request).await }).await {
            Ok(reply) => reply,
            Err(error) => AgentReply::Failed(CniError::internal(format!(
                "the agent's request task failed: {error}"
            ))),
        }
    }

    async fn work(node: &Node<K>, request: AgentRequest) -> AgentReply {
        let outcome = match request {
            AgentRequest::Add(pod) => node
                .add(&pod)
                .await
                .map(|added| AgentReply::Added(Box::new(added))),
            AgentRequest::Del(pod) => node.del(&pod).await.map(|()| AgentReply::Done),
            AgentRequest::Check(pod) => node
                .check(&pod)
                .await
                .map(|found| AgentReply::Checked(Box::new(found))),
            AgentRequest::Gc { cni_network, valid } => node
                .gc(cni_network.as_deref(), &valid)
                .await
                .map(|_| AgentReply::Done),
            AgentRequest::Status => {
                return node
                    .status()
                    .await
                    .map_or_else(AgentReply::Failed, |()| AgentReply::Done);
            }
        };
        outcome.unwrap_or_else(|error| AgentReply::Failed(error.to_cni()))
    }
}

impl<K: Kernel + 'static> LineService for PluginApi<K> {
    type Request = AgentRequest;
    type Reply = AgentReply;

    async fn handle(&self, request: AgentRequest, _peer: Peer) -> AgentReply {
        let started = Instant::now();
        let operation = request.operation();
        let reply = self.answer(request).await;
        self.metrics.record(operation, started, &reply);
        reply
    }

    fn unreadable(&self, error: serde_json::Error) -> AgentReply {
        AgentReply::Failed(CniError::new(
            ErrorCode::DecodingFailure,
            format!("unreadable agent request: {error}"),
        ))
    }

    fn timed_out(&self, after: Duration) -> AgentReply {
        AgentReply::Failed(CniError::try_again_later(format!(
            "the agent did not finish within {after:?}"
        )))
    }

    fn refused(&self, peer: Peer) -> AgentReply {
        // 103, as when the socket's mode keeps the caller out.
        AgentReply::Failed(CniError::new(
            ErrorCode::AgentUnavailable,
            format!("the agent does not serve {peer} on this socket"),
        ))
    }
}

/// Serves `api` on `listener` until `shutdown` turns true; requests in
/// progress then finish before this returns.
pub async fn serve<K: Kernel + 'static>(
    api: Arc<PluginApi<K>>,
    listener: UnixListener,
    limits: ServeLimits,
    shutdown: watch::Receiver<bool>,
) {
    crate::lines::serve(api, listener, limits, shutdown).await;
}

/// Sends one request to the agent at `socket` and waits up to `timeout`.
pub async fn call(
    socket: &Path,
    request: &AgentRequest,
    timeout: Duration,
) -> Result<AgentReply, ClientError> {
    crate::lines::call(socket, request, timeout).await
}
