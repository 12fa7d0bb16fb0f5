//! The plugin API's server side ([`hulk_agent_api`] has the messages):
//! ADD, DEL, CHECK, GC and STATUS handed to the [`Node`], each counted and
//! timed in [`PluginMetrics`]; framing and limits are [`crate::server`]'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hulk_agent_api::{PluginReply, PluginRequest, codes};
use hulk_cni::{CniError, ErrorCode};
use hulk_netns::Kernel;
use hulk_node::Node;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::server::{LineService, Peer};

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
pub struct PluginMetrics {
    /// Requests by operation and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds per request by operation.
    pub seconds: Family<OperationLabels, Histogram>,
}

impl Default for PluginMetrics {
    fn default() -> Self {
        PluginMetrics {
            requests: Family::default(),
            // 1 ms to about 65 s.
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
        }
    }
}

impl PluginMetrics {
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

    fn record(&self, operation: &str, started: Instant, reply: &PluginReply) {
        let outcome = match reply {
            PluginReply::Failed(error) => error.code.as_u32().to_string(),
            PluginReply::Added(_) | PluginReply::Checked(_) | PluginReply::Done => "ok".to_owned(),
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
pub struct PluginService<K> {
    node: Arc<Node<K>>,
    metrics: PluginMetrics,
}

impl<K: Kernel + 'static> PluginService<K> {
    /// The API of `node`, recording into `metrics`.
    pub fn new(node: Arc<Node<K>>, metrics: PluginMetrics) -> Self {
        PluginService { node, metrics }
    }

    async fn answer(&self, request: PluginRequest) -> PluginReply {
        // The work runs in its own task: the server drops this future when
        // its request timeout passes or the caller hangs up, and an ADD or
        // DEL cut off half-way would leave a half-built interface. The node
        // bounds an ADD by the caller's own timeout and undoes it then.
        let node = self.node.clone();
        match tokio::spawn(async move { Self::work(&node, request).await }).await {
            Ok(reply) => reply,
            Err(error) => PluginReply::Failed(
                CniError::new(codes::INTERNAL, "the agent's request task failed")
                    .with_causes(&error),
            ),
        }
    }

    async fn work(node: &Node<K>, request: PluginRequest) -> PluginReply {
        let outcome = match request {
            PluginRequest::Add(pod) => node
                .add(&pod)
                .await
                .map(|added| PluginReply::Added(Box::new(added))),
            PluginRequest::Del(pod) => node.del(&pod).await.map(|()| PluginReply::Done),
            PluginRequest::Check(pod) => node
                .check(&pod)
                .await
                .map(|found| PluginReply::Checked(Box::new(found))),
            PluginRequest::Gc { cni_network, valid } => node
                .gc(cni_network.as_deref(), &valid)
                .await
                .map(|_| PluginReply::Done),
            PluginRequest::Status => {
                return node
                    .status()
                    .await
                    .map_or_else(PluginReply::Failed, |()| PluginReply::Done);
            }
        };
        outcome.unwrap_or_else(|error| PluginReply::Failed(error.to_cni()))
    }
}

impl<K: Kernel + 'static> LineService for PluginService<K> {
    type Request = PluginRequest;
    type Reply = PluginReply;

    async fn handle(&self, request: PluginRequest, _peer: Peer) -> PluginReply {
        let started = Instant::now();
        let operation = request.operation();
        let reply = self.answer(request).await;
        self.metrics.record(operation, started, &reply);
        reply
    }

    fn unreadable(&self, error: serde_json::Error) -> PluginReply {
        PluginReply::Failed(CniError::new(
            ErrorCode::DecodingFailure,
            format!("unreadable agent request: {error}"),
        ))
    }

    fn timed_out(&self, after: Duration) -> PluginReply {
        PluginReply::Failed(CniError::try_again_later(format!(
            "the agent did not finish within {after:?}"
        )))
    }

    fn refused(&self, peer: Peer) -> PluginReply {
        // 103, as when the socket's mode keeps the caller out.
        PluginReply::Failed(CniError::new(
            codes::AGENT_UNAVAILABLE,
            format!("the agent does not serve {peer} on this socket"),
        ))
    }
}
