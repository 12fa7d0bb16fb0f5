//! [`PodEvents`]: Kubernetes Events on pods, for `kubectl describe pod`.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::PodMeta;

/// Whether an event is routine or needs attention (`type` of an
/// `events.k8s.io/v1` Event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Routine progress.
    Normal,
    /// Something is wrong or delayed.
    Warning,
}

/// One event to record on a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    /// Normal or Warning.
    pub kind: EventKind,
    /// A short UpperCamelCase machine-readable reason, e.g. `AddressWaiting`.
    pub reason: String,
    /// What hulk-vpc was doing (the event's `action`), e.g. `AllocateAddress`.
    pub action: String,
    /// A human-readable note (at most 1 kB on the apiserver).
    pub note: String,
}

impl PodEvent {
    /// The action of the address events below.
    pub const ALLOCATE_ADDRESS: &str = "AllocateAddress";

    /// `AddressWaiting` (Normal): the pod waits for the cloud to allocate
    /// an address.
    pub fn address_waiting() -> Self {
        Self {
            kind: EventKind::Normal,
            reason: "AddressWaiting".to_owned(),
            action: Self::ALLOCATE_ADDRESS.to_owned(),
            note: "waiting for the cloud to allocate an address".to_owned(),
        }
    }

    /// `AddressExhausted` (Warning): the subnet or quota has no address left.
    pub fn address_exhausted(note: impl Into<String>) -> Self {
        Self {
            kind: EventKind::Warning,
            reason: "AddressExhausted".to_owned(),
            action: Self::ALLOCATE_ADDRESS.to_owned(),
            note: note.into(),
        }
    }

    /// `Throttled` (Warning): the cloud API rate-limits the allocation.
    pub fn throttled(note: impl Into<String>) -> Self {
        Self {
            kind: EventKind::Warning,
            reason: "Throttled".to_owned(),
            action: Self::ALLOCATE_ADDRESS.to_owned(),
            note: note.into(),
        }
    }
}

/// Records `events.k8s.io/v1` Events on pods through kube_runtime's
/// [`Recorder`] (a repeat of the same event within its cache time becomes a
/// count on the first one, by merge patch). RBAC: `create` and `patch` on
/// `events.events.k8s.io` in the pods' namespaces.
#[derive(Clone)]
pub struct PodEvents {
    recorder: Recorder,
}

impl PodEvents {
    /// Events reported by `controller` (e.g. `hulk-vpc-node`) from
    /// `instance` (e.g. the node name).
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        let reporter = Reporter {
            controller: controller.to_owned(),
            instance: Some(instance.to_owned()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// Records `event` on `pod`. A failure is logged, never returned: events
    /// are for people and must not stop the work they describe.
    pub async fn record(&self, pod: &PodMeta, event: &PodEvent) {
        let regarding = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            uid: Some(pod.uid.clone()).filter(|uid| !uid.is_empty()),
            ..ObjectReference::default()
        };
        let recorded = Event {
            type_: match event.kind {
                EventKind::Normal => EventType::Normal,
                EventKind::Warning => EventType::Warning,
            },
            reason: event.reason.clone(),
            note: Some(event.note.clone()),
            action: event.action.clone(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&recorded, &regarding).await {
            tracing::warn!(
                pod = %format_args!("{}/{}", pod.namespace, pod.name),
                reason = %event.reason,
                error = &error as &dyn std::error::Error,
                "cannot record the event"
            );
        }
    }
}
