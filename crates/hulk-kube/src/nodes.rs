//! [`ClusterNodes`]: the cluster's Node objects, from a reflector.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeStatus};
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use crate::KubeError;
use crate::reflect::Reflection;

/// The cluster's nodes, for the cluster controller: a watch of all Node
/// objects reflected into a local store that keeps only their metadata and
/// `Ready` condition (a node's images and capacity lists are large and not
/// needed).
///
/// The watch runs in a task with kube_runtime's default backoff until the
/// cancellation token fires or this is dropped. RBAC: `list` and `watch` on
/// `nodes`.
pub struct ClusterNodes {
    reflection: Reflection<Node>,
}

impl ClusterNodes {
    /// Starts watching the nodes. Must be called within a tokio runtime.
    pub fn start(client: Client, cancel: CancellationToken) -> Self {
        let events = watcher(Api::<Node>::all(client), watcher::Config::default()).modify(|node| {
            node.metadata.managed_fields = None;
            node.spec = None;
            node.status = node.status.take().map(|status| NodeStatus {
                conditions: status.conditions.map(|conditions| {
                    conditions
                        .into_iter()
                        .filter(|condition| condition.type_ == "Ready")
                        .collect()
                }),
                ..NodeStatus::default()
            });
        });
        Self {
            reflection: Reflection::spawn("nodes".to_owned(), events, cancel),
        }
    }

    /// The names of all nodes; [`KubeError::NotSynced`] before the first
    /// complete list and while the watch fails.
    pub fn names(&self) -> Result<Vec<String>, KubeError> {
        self.reflection.require_synced()?;
        Ok(self
            .reflection
            .store
            .state()
            .iter()
            .filter_map(|node| node.metadata.name.clone())
            .collect())
    }

    /// Whether a node of this name exists; [`KubeError::NotSynced`] before
    /// the first complete list and while the watch fails, so a node is
    /// never judged gone from an empty or stale cache.
    pub fn is_known(&self, name: &str) -> Result<bool, KubeError> {
        self.reflection.require_synced()?;
        Ok(self.reflection.store.get(&ObjectRef::new(name)).is_some())
    }

    /// Whether the node's `Ready` condition is `True`: `None` for an unknown
    /// node or one without the condition; [`KubeError::NotSynced`] before the
    /// first complete list and while the watch fails.
    pub fn is_ready(&self, name: &str) -> Result<Option<bool>, KubeError> {
        self.reflection.require_synced()?;
        Ok(self
            .reflection
            .store
            .get(&ObjectRef::new(name))
            .and_then(|node| {
                node.status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|condition| condition.type_ == "Ready")
                    .map(|condition| condition.status == "True")
            }))
    }

    /// Whether the first complete list has been stored.
    pub fn is_synced(&self) -> bool {
        self.reflection.is_synced()
    }

    /// Waits until the first complete list has been stored;
    /// [`KubeError::NotSynced`] when `timeout` passes first.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), KubeError> {
        self.reflection.wait_synced(timeout).await
    }
}
