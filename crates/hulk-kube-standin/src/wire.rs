//! The Kubernetes wire formats the stand-in speaks: `Status` error objects,
//! field selectors, metadata-only projections and watch event lines.

use std::fmt;

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Resource;

/// A failed request, answered as a `meta.k8s.io/v1` `Status` object
/// (kind `Status`, `status: Failure`), the shape every apiserver error takes.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    /// The machine-readable `StatusReason` (`NotFound`, `Conflict`, ...).
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, resource: Resource, name: &str) -> Self {
        let mut details = json!({ "name": name, "kind": resource.plural() });
        if !resource.group().is_empty() {
            details["group"] = json!(resource.group());
        }
        self.details = Some(details);
        self
    }

    pub fn not_found(resource: Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", resource.qualified()),
        )
        .with_details(resource, name)
    }

    pub fn already_exists(resource: Resource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", resource.qualified()),
        )
        .with_details(resource, name)
    }

    pub fn conflict(resource: Resource, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                resource.qualified()
            ),
        )
        .with_details(resource, name)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// The apiserver's answer to a watch or continue token from before its
    /// retained history.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `Status` object itself.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (code, json_body(&self.to_status())).into_response();
        if self.code == 429 {
            // The apiserver's priority-and-fairness rejections say when to retry.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A JSON body with `Content-Type: application/json`.
pub(crate) fn json_body(value: &Value) -> impl IntoResponse + use<> {
    (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from(value.to_string()),
    )
}

/// What the client asked for in `Accept`: the resource itself, or its
/// metadata only (`application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Full,
    Metadata,
}

/// Reads the `Accept` header. `list` tells whether the endpoint answers a
/// list (which takes `as=PartialObjectMetadataList`) or a single object or
/// watch event (`as=PartialObjectMetadata`); the other form is refused with
/// 406 like the apiserver does.
pub(crate) fn shape(accept: Option<&str>, list: bool) -> Result<Shape, ApiError> {
    let Some(accept) = accept else {
        return Ok(Shape::Full);
    };
    let mut as_kind = None;
    let mut group = None;
    let mut version = None;
    for parameter in accept.split(';').skip(1) {
        match parameter.trim().split_once('=') {
            Some(("as", value)) => as_kind = Some(value),
            Some(("g", value)) => group = Some(value),
            Some(("v", value)) => version = Some(value),
            _ => {}
        }
    }
    let Some(as_kind) = as_kind else {
        return Ok(Shape::Full);
    };
    let wanted = if list {
        "PartialObjectMetadataList"
    } else {
        "PartialObjectMetadata"
    };
    if as_kind == wanted && group == Some("meta.k8s.io") && version == Some("v1") {
        Ok(Shape::Metadata)
    } else {
        Err(ApiError::new(
            406,
            "NotAcceptable",
            format!(
                "only the following media types are accepted: application/json, application/json;as={wanted};g=meta.k8s.io;v=v1"
            ),
        ))
    }
}

/// The object as the client asked for it: whole, or as a
/// `PartialObjectMetadata` carrying only its `metadata`.
pub(crate) fn project(object: &Value, shape: Shape) -> Value {
    match shape {
        Shape::Full => object.clone(),
        Shape::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
        }),
    }
}

/// One term of a field selector: `field=value`, `field==value` or `field!=value`.
#[derive(Debug, Clone)]
struct Requirement {
    pointer: &'static str,
    value: String,
    equal: bool,
}

/// A parsed `fieldSelector`, limited to the fields the apiserver indexes for
/// the resources the stand-in serves.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector(Vec<Requirement>);

impl FieldSelector {
    pub fn parse(resource: Resource, selector: Option<&str>) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in selector.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (field, value, equal) = if let Some((field, value)) = term.split_once("!=") {
                (field, value, false)
            } else if let Some((field, value)) = term.split_once("==") {
                (field, value, true)
            } else if let Some((field, value)) = term.split_once('=') {
                (field, value, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                )));
            };
            let pointer = resource.field_pointer(field).ok_or_else(|| {
                ApiError::bad_request(format!("field label not supported: {field}"))
            })?;
            requirements.push(Requirement {
                pointer,
                value: value.to_owned(),
                equal,
            });
        }
        Ok(Self(requirements))
    }

    /// Whether the object passes every term; an absent field counts as the
    /// empty string, as it does for an unscheduled pod's `spec.nodeName`.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|requirement| {
            let actual = object
                .pointer(requirement.pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == requirement.value) == requirement.equal
        })
    }
}

/// One line of a watch stream: `{"type":..,"object":..}` and a newline.
pub(crate) fn watch_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": event_type, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// The object of a BOOKMARK event: the resource's kind with nothing but
/// `metadata.resourceVersion`.
pub(crate) fn bookmark(resource: Resource, shape: Shape, revision: u64) -> Value {
    let (kind, api_version) = match shape {
        Shape::Full => (resource.kind(), resource.api_version()),
        Shape::Metadata => ("PartialObjectMetadata", "meta.k8s.io/v1"),
    };
    json!({
        "kind": kind,
        "apiVersion": api_version,
        "metadata": { "resourceVersion": revision.to_string() },
    })
}

/// Applies an RFC 7386 JSON merge patch (`application/merge-patch+json`).
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_selector_follows_terms() {
        let selector = FieldSelector::parse(
            Resource::Pods,
            Some("spec.nodeName=n1,status.phase!=Succeeded,status.phase!=Failed"),
        )
        .unwrap_or_default();
        let pod = |node: &str, phase: &str| json!({"spec": {"nodeName": node}, "status": {"phase": phase}});
        assert!(selector.matches(&pod("n1", "Running")));
        assert!(!selector.matches(&pod("n2", "Running")));
        assert!(!selector.matches(&pod("n1", "Succeeded")));
        assert!(!selector.matches(&pod("n1", "Failed")));
        assert!(FieldSelector::parse(Resource::Pods, Some("spec.hostname=x")).is_err());
    }

    #[test]
    fn accept_negotiation() {
        let meta = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
        assert_eq!(shape(Some(meta), true).ok(), Some(Shape::Metadata));
        assert!(shape(Some(meta), false).is_err());
        assert_eq!(
            shape(Some("application/json"), false).ok(),
            Some(Shape::Full)
        );
    }

    #[test]
    fn merge_patch_replaces_and_removes() {
        let mut target = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut target, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        assert_eq!(target, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
    }
}
