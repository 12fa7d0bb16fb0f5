//! The node's [`PodDirectory`] over the Kubernetes API (`hulk-kube`): the
//! pods of this node from a metadata watch and reflector, so ADD asks no
//! API server (a pod the watch has not delivered yet costs one GET), GC
//! reads the local store, and deletions are seen within seconds; Events on
//! pods whose ADD waits or fails.

use async_trait::async_trait;
use hulk_kube::{EventKind, KubeError, NodePods, PodEvents, PodMeta};
use hulk_node::pods::{LivePods, PodDirectory, PodDirectoryError, PodEvent, PodInfo};

/// The reporting controller of the Events the agent records.
pub const EVENT_CONTROLLER: &str = "hulk-vpc.io/agent";

/// [`PodDirectory`] over a [`NodePods`] reflector and [`PodEvents`].
pub struct KubePods {
    pods: NodePods,
    events: PodEvents,
}

impl std::fmt::Debug for KubePods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePods")
            .field("synced", &self.pods.is_synced())
            .finish_non_exhaustive()
    }
}

impl KubePods {
    /// The directory over `pods` (this node's reflector), recording Events
    /// through `events`.
    pub fn new(pods: NodePods, events: PodEvents) -> Self {
        KubePods { pods, events }
    }
}

/// 401 and 403 are a configuration to fix (token, RBAC), the rest may pass.
fn classified(error: KubeError) -> PodDirectoryError {
    if error.is_configuration() {
        PodDirectoryError::Refused(Box::new(error))
    } else if matches!(error, KubeError::NotSynced { .. }) {
        PodDirectoryError::NotSynced
    } else {
        PodDirectoryError::Unavailable(Box::new(error))
    }
}

fn info(pod: PodMeta) -> PodInfo {
    PodInfo {
        name: format!("{}/{}", pod.namespace, pod.name),
        uid: Some(pod.uid).filter(|uid| !uid.is_empty()),
        annotations: pod.annotations,
        // The watch's field selector leaves finished pods out.
        phase: None,
    }
}

fn split(name: &str) -> Result<(&str, &str), PodDirectoryError> {
    name.split_once('/').ok_or_else(|| {
        PodDirectoryError::Unavailable(format!("{name:?} is not a namespace/name").into())
    })
}

#[async_trait]
impl PodDirectory for KubePods {
    async fn pod(&self, name: &str) -> Result<Option<PodInfo>, PodDirectoryError> {
        let (namespace, pod) = split(name)?;
        let found = self.pods.pod(namespace, pod).await.map_err(classified)?;
        Ok(found.map(info))
    }

    async fn live_pods(&self) -> Result<LivePods, PodDirectoryError> {
        let live = self.pods.live().map_err(classified)?;
        Ok(LivePods::from_pods(live.into_iter().map(info)))
    }

    async fn record(&self, name: &str, event: PodEvent) {
        let Ok((namespace, pod)) = split(name) else {
            return;
        };
        let meta = match self.pods.pod(namespace, pod).await {
            Ok(Some(meta)) => meta,
            // No pod to attach the Event to: nothing to tell.
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(pod = %name, error = %hulk_cni::describe(&error), "no Event: the pod cannot be read");
                return;
            }
        };
        let recorded = hulk_kube::PodEvent {
            kind: if event.is_warning() {
                EventKind::Warning
            } else {
                EventKind::Normal
            },
            reason: event.reason().to_owned(),
            action: "AllocateAddress".to_owned(),
            note: event.note(),
        };
        self.events.record(&meta, &recorded).await;
    }
}
