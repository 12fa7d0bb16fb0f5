//! [`NodePods`]: the pods of one node, from a metadata-only reflector.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use crate::KubeError;
use crate::reflect::Reflection;

/// What hulk-vpc needs to know of a pod: its identity and annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`: tells a pod from a later one of the same name.
    pub uid: String,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl From<&ObjectMeta> for PodMeta {
    fn from(metadata: &ObjectMeta) -> Self {
        Self {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            name: metadata.name.clone().unwrap_or_default(),
            uid: metadata.uid.clone().unwrap_or_default(),
            annotations: metadata.annotations.clone().unwrap_or_default(),
        }
    }
}

/// The live pods of one node: a watch of pod metadata (`Accept:
/// ...;as=PartialObjectMetadata`) with the field selector
/// `spec.nodeName=<node>,status.phase!=Succeeded,status.phase!=Failed`, so a
/// pod leaves the set when it is deleted or finishes (a finished pod holds
/// no address any more), reflected into a local store.
///
/// The watch runs in a task with kube_runtime's default backoff (0.8 s
/// doubling to 30 s) until the cancellation token fires or this is dropped;
/// it lists again after a 410 Gone. RBAC: `list` and `watch` on `pods`
/// cluster-wide, `get` on `pods` for [`NodePods::pod`].
pub struct NodePods {
    client: Client,
    reflection: Reflection<PartialObjectMeta<Pod>>,
}

impl NodePods {
    /// Starts watching the pods of `node`. Must be called within a tokio
    /// runtime.
    pub fn start(client: Client, node: &str, cancel: CancellationToken) -> Self {
        let config = watcher::Config::default().fields(&format!(
            "spec.nodeName={node},status.phase!=Succeeded,status.phase!=Failed"
        ));
        let events = watcher(Api::<PartialObjectMeta<Pod>>::all(client.clone()), config);
        Self {
            client,
            reflection: Reflection::spawn(format!("pods of node {node}"), events, cancel),
        }
    }

    /// The pod `namespace/name`: from the store, or else from one GET of its
    /// metadata. The GET covers a pod the watch has not delivered yet (a CNI
    /// ADD can arrive right after the pod was created) and the time before
    /// the store has synced. `Ok(None)` when the apiserver does not know the
    /// pod either. A pod found by the GET is not checked against this node
    /// or its phase (a metadata answer has neither).
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodMeta>, KubeError> {
        let key = ObjectRef::new(name).within(namespace);
        if let Some(pod) = self.reflection.store.get(&key) {
            return Ok(Some(PodMeta::from(&pod.metadata)));
        }
        let pod = Api::<PartialObjectMeta<Pod>>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(KubeError::request(format!("get pod {namespace}/{name}")))?;
        Ok(pod.map(|pod| PodMeta::from(&pod.metadata)))
    }

    /// Every live pod of the node, in no particular order.
    ///
    /// Errors with [`KubeError::NotSynced`] until the first complete list
    /// has been stored, and while the watch fails (until it delivers an
    /// event again), so a caller never takes pods for gone because the
    /// cache is still empty or stale (a pod created meanwhile is missing).
    pub fn live(&self) -> Result<Vec<PodMeta>, KubeError> {
        self.reflection.require_synced()?;
        Ok(self
            .reflection
            .store
            .state()
            .iter()
            .map(|pod| PodMeta::from(&pod.metadata))
            .collect())
    }

    /// Whether the first complete list has been stored.
    pub fn is_synced(&self) -> bool {
        self.reflection.is_synced()
    }

    /// Waits until the first complete list has been stored;
    /// [`KubeError::NotSynced`] (with the last watch failure, if any) when
    /// `timeout` passes first.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), KubeError> {
        self.reflection.wait_synced(timeout).await
    }
}

/// How many pods one page of [`pod_uids`] asks for: the apiserver's own
/// suggestion for clients that page.
const POD_PAGE: u32 = 500;

/// The UIDs of every pod in the cluster, in any namespace and phase, from
/// paged metadata-only LISTs (`Accept: ...;as=PartialObjectMetadataList`,
/// `limit` 500 with `continue`), for the cluster controller's check that a
/// holder mark names a pod that exists nowhere any more. One call is a
/// consistent snapshot (every page is served from the first page's
/// resource version); a page that expires under it (410) is an error, and
/// the caller lists again on its next pass. RBAC: `list` on `pods`
/// cluster-wide.
pub async fn pod_uids(client: Client) -> Result<HashSet<String>, KubeError> {
    let api = Api::<Pod>::all(client);
    let mut uids = HashSet::new();
    let mut params = ListParams::default().limit(POD_PAGE);
    loop {
        let page = api
            .list_metadata(&params)
            .await
            .map_err(KubeError::request("list pods (metadata) in all namespaces"))?;
        uids.extend(page.items.into_iter().filter_map(|pod| pod.metadata.uid));
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(uids),
        }
    }
}
