//! A stand-in for the Kubernetes API server, serving over plain HTTP on
//! loopback the few endpoints `hulk-kube` uses, in the apiserver's wire
//! formats, so `kube` clients can be tested without a cluster.
//!
//! # What it covers
//!
//! - **Pods** (`/api/v1/pods`, `/api/v1/namespaces/{ns}/pods`,
//!   `/api/v1/namespaces/{ns}/pods/{name}`): GET, LIST and WATCH.
//! - **Nodes** (`/api/v1/nodes`, `/api/v1/nodes/{name}`): GET, LIST and WATCH.
//! - **Leases** (`coordination.k8s.io/v1`): GET, create (POST; 409
//!   `AlreadyExists`) and update (PUT; 409 `Conflict` when the body's
//!   `metadata.resourceVersion` is not the stored one, unconditional when it
//!   has none, 404 when the lease does not exist).
//! - **Events** (`events.k8s.io/v1`): create, and JSON merge patch
//!   (`application/merge-patch+json`, how `kube_runtime`'s recorder counts a
//!   repeated event).
//! - **LIST**: `fieldSelector` over `metadata.name`, `metadata.namespace`,
//!   `spec.nodeName` and `status.phase` for pods and `metadata.name` for
//!   nodes (`=`, `==`, `!=`, comma-joined; other fields are 400 `field label
//!   not supported` as on the apiserver); `resourceVersion` (`0`, empty, or a
//!   version: all served from the current state, i.e. `NotOlderThan`);
//!   `limit`/`continue` pagination served from a snapshot of the first page's
//!   state, with 410 `Expired` for a token older than the retained history.
//! - **WATCH** (`watch=true`): newline-delimited JSON events `ADDED`,
//!   `MODIFIED`, `DELETED`, `BOOKMARK` (with `allowWatchBookmarks=true`, at
//!   [`StandInConfig::bookmark_interval`] and when the watch ends) and
//!   `ERROR`. From a `resourceVersion` the watch replays the retained history
//!   after it; without one (or `0`) it starts with a synthetic `ADDED` per
//!   object. An object that stops matching the field selector is sent as
//!   `DELETED` carrying its previous content, one that starts matching as
//!   `ADDED`, like the apiserver's watch cache. A `resourceVersion` older than
//!   the retained history ([`StandInConfig::history_window`],
//!   [`StandIn::expire_history`]) is answered 200 with one `ERROR` event whose
//!   object is a `Status` with code 410, reason `Expired`. `timeoutSeconds` ends
//!   the watch.
//! - **Metadata-only responses** when `Accept` asks for
//!   `application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`
//!   (LIST) or `as=PartialObjectMetadata` (GET, WATCH); the other form is 406.
//! - **Errors** as `Status` objects (`kind: Status`, `status: Failure`,
//!   `reason`, `code`, `details`); 401 when [`StandInConfig::token`] is set
//!   and the request's bearer token is missing or different; 403 for a
//!   verb/resource on the deny list ([`StandIn::deny`]).
//! - **Test knobs** on [`StandIn`]: write pods and nodes, read leases and
//!   events, count requests per verb and resource, inject a status code or a
//!   dropped connection, end open watches, hold requests at a barrier.
//!
//! # What it does not cover
//!
//! No admission, defaulting or server-side validation beyond the name and
//! namespace checks above (bodies are stored as sent); no RBAC beyond the
//! deny list; no protobuf, YAML, CBOR, server-side apply, strategic merge or
//! JSON patch; no label selectors; no `resourceVersionMatch=Exact` (400); no
//! `sendInitialEvents` streaming lists; no deletion API, finalizers, owner
//! references or garbage collection; no watch of leases or events; no
//! `generateName`; no TLS (plain HTTP on loopback); no API discovery
//! endpoints. Other paths are 404 without a `Status` body.

mod routes;
mod state;
mod wire;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, PodStatus};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Barrier, broadcast};
use tokio::task::JoinHandle;

use crate::state::{Inner, Key, Notice};

/// A pod in namespace `default` scheduled to `node` in `phase` (`Pending`,
/// `Running`, `Succeeded`, `Failed`), for tests to hand to
/// [`StandIn::apply_pod`].
pub fn pod_on(name: &str, node: &str, phase: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("default".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.to_owned()),
            ..PodStatus::default()
        }),
    }
}

/// The resources the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// `pods` (core/v1, namespaced).
    Pods,
    /// `nodes` (core/v1, cluster-scoped).
    Nodes,
    /// `leases.coordination.k8s.io` (v1, namespaced).
    Leases,
    /// `events.events.k8s.io` (v1, namespaced).
    Events,
}

impl Resource {
    fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::Nodes => "Node",
            Self::Leases => "Lease",
            Self::Events => "Event",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Pods | Self::Nodes => "v1",
            Self::Leases => "coordination.k8s.io/v1",
            Self::Events => "events.k8s.io/v1",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Self::Pods | Self::Nodes => "",
            Self::Leases => "coordination.k8s.io",
            Self::Events => "events.k8s.io",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Nodes => "nodes",
            Self::Leases => "leases",
            Self::Events => "events",
        }
    }

    /// `plural.group`, as the apiserver names a resource in messages.
    fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    /// Whether changes are kept for WATCH.
    fn watchable(self) -> bool {
        matches!(self, Self::Pods | Self::Nodes)
    }

    /// The JSON pointer of a field a field selector may name.
    fn field_pointer(self, field: &str) -> Option<&'static str> {
        match (self, field) {
            (_, "metadata.name") => Some("/metadata/name"),
            (Self::Pods, "metadata.namespace") => Some("/metadata/namespace"),
            (Self::Pods, "spec.nodeName") => Some("/spec/nodeName"),
            (Self::Pods, "status.phase") => Some("/status/phase"),
            _ => None,
        }
    }
}

/// Request verbs, as RBAC names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// GET of one object.
    Get,
    /// GET of a collection.
    List,
    /// GET of a collection with `watch=true`.
    Watch,
    /// POST.
    Create,
    /// PUT.
    Update,
    /// PATCH.
    Patch,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::List => "list",
            Self::Watch => "watch",
            Self::Create => "create",
            Self::Update => "update",
            Self::Patch => "patch",
        }
    }
}

/// An injected failure for one request ([`StandIn::fail_next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Answer with this HTTP status and a matching `Status` body (429 also
    /// carries `Retry-After: 1`).
    Status(u16),
    /// Send the response headers, then break the connection.
    Drop,
}

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct StandInConfig {
    /// The bearer token every request must carry; `None` accepts all.
    pub token: Option<String>,
    /// The user named in 403 messages.
    pub user: String,
    /// How many changes (to pods and nodes together) are kept for watches
    /// to resume from; a watch from before them gets 410 Gone.
    pub history_window: usize,
    /// How often an open watch with `allowWatchBookmarks=true` gets a
    /// BOOKMARK (the apiserver sends one about every minute).
    pub bookmark_interval: Duration,
    /// How long a watch without `timeoutSeconds` stays open.
    pub watch_timeout: Duration,
}

impl Default for StandInConfig {
    fn default() -> Self {
        Self {
            token: None,
            user: "system:serviceaccount:kube-system:hulk-vpc".to_owned(),
            history_window: 1000,
            bookmark_interval: Duration::from_secs(1),
            watch_timeout: Duration::from_secs(1800),
        }
    }
}

/// Failures of the stand-in's test handle.
#[derive(Debug, thiserror::Error)]
pub enum StandInError {
    /// The listener could not be bound on loopback.
    #[error("cannot listen on loopback")]
    Listen(#[source] std::io::Error),
    /// An object given to the handle does not serialize, or a stored one
    /// does not deserialize to its type.
    #[error("object does not convert to or from JSON")]
    Json(#[source] serde_json::Error),
    /// An object given to the handle has no `metadata.name`.
    #[error("the object has no metadata.name")]
    MissingName,
}

pub(crate) struct Shared {
    config: StandInConfig,
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Notice>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere leaves the maps consistent (every write is one
        // insert or remove): keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn put(&self, inner: &mut Inner, resource: Resource, key: Key, object: Value) -> Value {
        inner.put(
            resource,
            key,
            object,
            &self.changes,
            self.config.history_window,
        )
    }
}

/// A running stand-in and the handle tests drive it with. Dropping it stops
/// the server.
pub struct StandIn {
    address: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl StandIn {
    /// Starts serving on an ephemeral port of 127.0.0.1, in a task of the
    /// current tokio runtime.
    pub async fn start(config: StandInConfig) -> Result<Self, StandInError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(StandInError::Listen)?;
        let address = listener.local_addr().map_err(StandInError::Listen)?;
        // Enough for bursts of writes; a watch that falls further behind is
        // closed and resumes.
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            config,
            inner: Mutex::new(Inner::default()),
            changes,
        });
        let app = routes::router(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "the stand-in stopped serving");
            }
        });
        Ok(Self {
            address,
            shared,
            server,
        })
    }

    /// The base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Creates or replaces a pod (namespace `default` when it has none),
    /// as a kubelet or the scheduler would; returns it as stored, with its
    /// new `resourceVersion`.
    pub fn apply_pod(&self, pod: &Pod) -> Result<Pod, StandInError> {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        self.apply(Resource::Pods, namespace, pod)
    }

    /// Deletes a pod; whether it existed.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        self.remove(Resource::Pods, (namespace.to_owned(), name.to_owned()))
    }

    /// Creates or replaces a node.
    pub fn apply_node(&self, node: &Node) -> Result<Node, StandInError> {
        self.apply(Resource::Nodes, "", node)
    }

    /// Deletes a node; whether it existed.
    pub fn delete_node(&self, name: &str) -> bool {
        self.remove(Resource::Nodes, (String::new(), name.to_owned()))
    }

    /// Creates or replaces a lease, e.g. one held by another holder.
    pub fn apply_lease(&self, lease: &Lease) -> Result<Lease, StandInError> {
        let namespace = lease.metadata.namespace.as_deref().unwrap_or("default");
        self.apply(Resource::Leases, namespace, lease)
    }

    /// The stored lease.
    pub fn lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>, StandInError> {
        let inner = self.shared.lock();
        inner
            .object(Resource::Leases, &(namespace.to_owned(), name.to_owned()))
            .map(|lease| serde_json::from_value(lease.clone()).map_err(StandInError::Json))
            .transpose()
    }

    /// The events recorded in a namespace, in name order.
    pub fn events(&self, namespace: &str) -> Result<Vec<Event>, StandInError> {
        let inner = self.shared.lock();
        inner
            .objects(Resource::Events)
            .filter(|((event_namespace, _), _)| event_namespace == namespace)
            .map(|(_, event)| serde_json::from_value(event.clone()).map_err(StandInError::Json))
            .collect()
    }

    /// The current resource version (of the last write to anything).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().revision
    }

    /// Forgets the change history: watches resuming from any earlier
    /// resource version, and list continuations, get 410 Gone.
    pub fn expire_history(&self) {
        self.shared.lock().compact();
    }

    /// Ends every open watch (the client sees a clean end of stream and
    /// resumes from its last resource version).
    pub fn close_watches(&self) {
        let _ = self.shared.changes.send(Notice::CloseWatches);
    }

    /// How many requests of this verb and resource arrived, including
    /// refused ones.
    pub fn requests(&self, verb: Verb, resource: Resource) -> u64 {
        self.shared
            .lock()
            .requests
            .get(&(verb, resource))
            .copied()
            .unwrap_or(0)
    }

    /// Makes the next request of this verb and resource fail; calls queue.
    pub fn fail_next(&self, verb: Verb, resource: Resource, failure: Failure) {
        self.shared
            .lock()
            .failures
            .entry((verb, resource))
            .or_default()
            .push_back(failure);
    }

    /// Refuses this verb on this resource with 403 Forbidden from now on.
    pub fn deny(&self, verb: Verb, resource: Resource) {
        self.shared.lock().denied.insert((verb, resource));
    }

    /// Stops refusing this verb and resource ([`StandIn::deny`]).
    pub fn allow(&self, verb: Verb, resource: Resource) {
        self.shared.lock().denied.remove(&(verb, resource));
    }

    /// Holds the next `count` requests of this verb and resource until all
    /// `count` have arrived, then lets them go together (e.g. two updates
    /// that both read the same resourceVersion).
    pub fn barrier(&self, verb: Verb, resource: Resource, count: usize) {
        if count > 0 {
            self.shared
                .lock()
                .barriers
                .insert((verb, resource), (Arc::new(Barrier::new(count)), count));
        }
    }

    fn apply<T: Serialize + DeserializeOwned>(
        &self,
        resource: Resource,
        namespace: &str,
        object: &T,
    ) -> Result<T, StandInError> {
        let value = serde_json::to_value(object).map_err(StandInError::Json)?;
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .ok_or(StandInError::MissingName)?
            .to_owned();
        let mut inner = self.shared.lock();
        let stored = self
            .shared
            .put(&mut inner, resource, (namespace.to_owned(), name), value);
        serde_json::from_value(stored).map_err(StandInError::Json)
    }

    fn remove(&self, resource: Resource, key: Key) -> bool {
        let mut inner = self.shared.lock();
        inner
            .remove(
                resource,
                &key,
                &self.shared.changes,
                self.shared.config.history_window,
            )
            .is_some()
    }
}
