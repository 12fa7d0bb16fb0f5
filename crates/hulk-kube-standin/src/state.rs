//! The stand-in's storage: objects, the global resource version, the change
//! history watches replay from, and the test knobs.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tokio::sync::{Barrier, broadcast};

use crate::wire::ApiError;
use crate::{Failure, Resource, Verb};

/// Namespace and name; cluster-scoped objects have an empty namespace.
pub(crate) type Key = (String, String);

/// One write to a watchable resource, kept for watches that resume from an
/// older resource version.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub revision: u64,
    pub resource: Resource,
    /// The object before the write (none for a creation).
    pub previous: Option<Value>,
    /// The object after the write (none for a deletion).
    pub current: Option<Value>,
}

/// What open watches are told.
#[derive(Debug, Clone)]
pub(crate) enum Notice {
    Change(Arc<Change>),
    /// End every open watch, as an apiserver restart would.
    CloseWatches,
}

/// The rest of a paginated list, served from the snapshot taken at its first
/// page like the apiserver's consistent continuation.
#[derive(Debug, Clone)]
pub(crate) struct Continuation {
    pub revision: u64,
    pub remaining: Vec<Value>,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// The resource version of the last write (etcd's revision: one counter
    /// for every resource).
    pub revision: u64,
    /// Every change after this revision is still in `history`.
    pub compacted: u64,
    pub history: VecDeque<Change>,
    pub objects: HashMap<Resource, BTreeMap<Key, Value>>,
    pub continuations: HashMap<String, Continuation>,
    next_continuation: u64,
    next_uid: u64,
    pub requests: HashMap<(Verb, Resource), u64>,
    pub failures: HashMap<(Verb, Resource), VecDeque<Failure>>,
    pub denied: HashSet<(Verb, Resource)>,
    pub barriers: HashMap<(Verb, Resource), (Arc<Barrier>, usize)>,
}

impl Inner {
    pub fn objects(&self, resource: Resource) -> impl Iterator<Item = (&Key, &Value)> {
        self.objects.get(&resource).into_iter().flatten()
    }

    pub fn object(&self, resource: Resource, key: &Key) -> Option<&Value> {
        self.objects
            .get(&resource)
            .and_then(|objects| objects.get(key))
    }

    /// Stores `object` under a new resource version, filling in what the
    /// apiserver sets on creation (uid, creationTimestamp, kind, apiVersion)
    /// and keeping them on update. Returns the stored object.
    pub fn put(
        &mut self,
        resource: Resource,
        key: Key,
        mut object: Value,
        changes: &broadcast::Sender<Notice>,
        history_window: usize,
    ) -> Value {
        self.revision += 1;
        let previous = self.object(resource, &key).cloned();
        object["kind"] = json!(resource.kind());
        object["apiVersion"] = json!(resource.api_version());
        let metadata = &mut object["metadata"];
        metadata["name"] = json!(key.1);
        if !key.0.is_empty() {
            metadata["namespace"] = json!(key.0);
        }
        metadata["resourceVersion"] = json!(self.revision.to_string());
        match previous.as_ref().map(|p| &p["metadata"]) {
            Some(kept) => {
                metadata["uid"] = kept["uid"].clone();
                metadata["creationTimestamp"] = kept["creationTimestamp"].clone();
            }
            None => {
                self.next_uid += 1;
                metadata["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid));
                metadata["creationTimestamp"] =
                    serde_json::to_value(Time(Timestamp::now())).unwrap_or(Value::Null);
            }
        }
        self.objects
            .entry(resource)
            .or_default()
            .insert(key, object.clone());
        self.record(
            resource,
            previous,
            Some(object.clone()),
            changes,
            history_window,
        );
        object
    }

    /// Deletes an object; the DELETED event carries its last state under the
    /// deletion's resource version.
    pub fn remove(
        &mut self,
        resource: Resource,
        key: &Key,
        changes: &broadcast::Sender<Notice>,
        history_window: usize,
    ) -> Option<Value> {
        let mut removed = self.objects.get_mut(&resource)?.remove(key)?;
        self.revision += 1;
        let previous = removed.clone();
        removed["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.record(resource, Some(previous), None, changes, history_window);
        Some(removed)
    }

    fn record(
        &mut self,
        resource: Resource,
        previous: Option<Value>,
        current: Option<Value>,
        changes: &broadcast::Sender<Notice>,
        history_window: usize,
    ) {
        if !resource.watchable() {
            return;
        }
        let change = Change {
            revision: self.revision,
            resource,
            previous,
            current,
        };
        self.history.push_back(change.clone());
        while self.history.len() > history_window {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.revision;
            }
        }
        // No receiver is no open watch: nothing to tell.
        let _ = changes.send(Notice::Change(Arc::new(change)));
    }

    /// Forgets all history, as etcd's compaction does: a watch from any
    /// earlier resource version gets 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.revision;
        self.continuations
            .retain(|_, continuation| continuation.revision >= self.compacted);
    }

    pub fn save_continuation(&mut self, continuation: Continuation) -> String {
        self.next_continuation += 1;
        let token = format!(
            "standin-{}-{}",
            continuation.revision, self.next_continuation
        );
        self.continuations.insert(token.clone(), continuation);
        token
    }

    pub fn take_continuation(&mut self, token: &str) -> Result<Continuation, ApiError> {
        self.continuations.remove(token).ok_or_else(|| {
            ApiError::expired(
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            )
        })
    }
}
