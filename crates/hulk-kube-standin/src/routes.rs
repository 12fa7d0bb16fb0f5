//! The HTTP endpoints, under the same paths as the apiserver's.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::channel::mpsc;
use futures::{SinkExt, stream};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::state::{Change, Continuation, Key, Notice};
use crate::wire::{self, ApiError, FieldSelector, Shape};
use crate::{Failure, Resource, Shared, Verb};

type Params = Query<HashMap<String, String>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/pods", get(list_pods))
        .route(
            "/api/v1/namespaces/{namespace}/pods",
            get(list_namespaced_pods),
        )
        .route("/api/v1/namespaces/{namespace}/pods/{name}", get(get_pod))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/nodes/{name}", get(get_node))
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases",
            axum::routing::post(create_lease),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}",
            get(get_lease).put(update_lease),
        )
        .route(
            "/apis/events.k8s.io/v1/namespaces/{namespace}/events",
            axum::routing::post(create_event),
        )
        .route(
            "/apis/events.k8s.io/v1/namespaces/{namespace}/events/{name}",
            axum::routing::patch(patch_event),
        )
        .with_state(shared)
}

/// What every request goes through first, in the apiserver's order:
/// counting (the stand-in's own), injected failures, authentication (401),
/// authorization (403), and barriers that hold requests until their peers
/// arrive.
async fn admit(
    shared: &Shared,
    verb: Verb,
    resource: Resource,
    headers: &HeaderMap,
) -> Result<(), Response> {
    let barrier = {
        let mut inner = shared.lock();
        *inner.requests.entry((verb, resource)).or_default() += 1;
        if let Some(failure) = inner
            .failures
            .get_mut(&(verb, resource))
            .and_then(|queue| queue.pop_front())
        {
            return Err(failure_response(failure));
        }
        if let Some(token) = &shared.config.token {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "));
            if presented != Some(token.as_str()) {
                return Err(ApiError::new(401, "Unauthorized", "Unauthorized").into_response());
            }
        }
        if inner.denied.contains(&(verb, resource)) {
            let mut error = ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\"",
                    resource.qualified(),
                    shared.config.user,
                    verb.as_str(),
                    resource.plural(),
                    resource.group()
                ),
            );
            let mut details = json!({ "kind": resource.plural() });
            if !resource.group().is_empty() {
                details["group"] = json!(resource.group());
            }
            error.details = Some(details);
            return Err(error.into_response());
        }
        match inner.barriers.get_mut(&(verb, resource)) {
            Some((barrier, remaining)) => {
                let barrier = barrier.clone();
                *remaining -= 1;
                if *remaining == 0 {
                    inner.barriers.remove(&(verb, resource));
                }
                Some(barrier)
            }
            None => None,
        }
    };
    if let Some(barrier) = barrier {
        barrier.wait().await;
    }
    Ok(())
}

fn failure_response(failure: Failure) -> Response {
    match failure {
        Failure::Status(code) => {
            let reason = match code {
                429 => "TooManyRequests",
                503 => "ServiceUnavailable",
                504 => "Timeout",
                _ => "InternalError",
            };
            ApiError::new(code, reason, format!("injected failure {code}")).into_response()
        }
        // Headers go out, then the body fails: hyper aborts the connection
        // mid-response, which the client sees as a broken connection.
        Failure::Drop => Response::new(Body::from_stream(stream::once(async {
            Err::<Bytes, _>(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "injected connection drop",
            ))
        }))),
    }
}

fn accept(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
}

async fn list_pods(
    State(shared): State<Arc<Shared>>,
    params: Params,
    headers: HeaderMap,
) -> Response {
    collection(&shared, Resource::Pods, None, &params, &headers).await
}

async fn list_namespaced_pods(
    State(shared): State<Arc<Shared>>,
    Path(namespace): Path<String>,
    params: Params,
    headers: HeaderMap,
) -> Response {
    collection(&shared, Resource::Pods, Some(namespace), &params, &headers).await
}

async fn list_nodes(
    State(shared): State<Arc<Shared>>,
    params: Params,
    headers: HeaderMap,
) -> Response {
    collection(&shared, Resource::Nodes, None, &params, &headers).await
}

async fn get_pod(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    read(&shared, Resource::Pods, (namespace, name), &headers).await
}

async fn get_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    read(&shared, Resource::Nodes, (String::new(), name), &headers).await
}

async fn get_lease(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    read(&shared, Resource::Leases, (namespace, name), &headers).await
}

async fn read(shared: &Shared, resource: Resource, key: Key, headers: &HeaderMap) -> Response {
    if let Err(response) = admit(shared, Verb::Get, resource, headers).await {
        return response;
    }
    let shape = match wire::shape(accept(headers), false) {
        Ok(shape) => shape,
        Err(error) => return error.into_response(),
    };
    let inner = shared.lock();
    match inner.object(resource, &key) {
        Some(object) => wire::json_body(&wire::project(object, shape)).into_response(),
        None => ApiError::not_found(resource, &key.1).into_response(),
    }
}

/// LIST or, with `watch=true`, WATCH.
async fn collection(
    shared: &Arc<Shared>,
    resource: Resource,
    namespace: Option<String>,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let watching = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = if watching { Verb::Watch } else { Verb::List };
    if let Err(response) = admit(shared, verb, resource, headers).await {
        return response;
    }
    let result =
        match FieldSelector::parse(resource, params.get("fieldSelector").map(String::as_str)) {
            Ok(selector) => {
                let filter = Filter {
                    namespace,
                    selector,
                };
                if watching {
                    watch(shared, resource, filter, params, headers)
                } else {
                    list(shared, resource, &filter, params, headers)
                }
            }
            Err(error) => Err(error),
        };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The objects a list or watch asked for.
struct Filter {
    namespace: Option<String>,
    selector: FieldSelector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let in_namespace = self.namespace.as_deref().is_none_or(|namespace| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(namespace)
        });
        in_namespace && self.selector.matches(object)
    }
}

fn list(
    shared: &Shared,
    resource: Resource,
    filter: &Filter,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let shape = wire::shape(accept(headers), true)?;
    if params
        .get("resourceVersionMatch")
        .is_some_and(|m| m == "Exact")
    {
        return Err(ApiError::bad_request(
            "resourceVersionMatch=Exact is not served by the stand-in",
        ));
    }
    let limit = match params.get("limit") {
        Some(limit) => Some(
            limit
                .parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit: {limit}")))?,
        )
        .filter(|limit| *limit > 0),
        None => None,
    };
    let mut inner = shared.lock();
    let mut continuation = match params.get("continue").filter(|token| !token.is_empty()) {
        Some(token) => inner.take_continuation(token)?,
        None => Continuation {
            revision: inner.revision,
            remaining: inner
                .objects(resource)
                .map(|(_, object)| object)
                .filter(|object| filter.matches(object))
                .cloned()
                .collect(),
        },
    };
    let page: Vec<Value> = match limit {
        Some(limit) if limit < continuation.remaining.len() => {
            continuation.remaining.drain(..limit).collect()
        }
        _ => std::mem::take(&mut continuation.remaining),
    };
    let revision = continuation.revision;
    let mut metadata = json!({ "resourceVersion": revision.to_string() });
    if !continuation.remaining.is_empty() {
        metadata["continue"] = json!(inner.save_continuation(continuation));
    }
    let items: Vec<Value> = page
        .iter()
        .map(|object| match shape {
            Shape::Metadata => wire::project(object, shape),
            // Items of a typed list carry no kind/apiVersion of their own.
            Shape::Full => {
                let mut item = object.clone();
                if let Some(item) = item.as_object_mut() {
                    item.remove("kind");
                    item.remove("apiVersion");
                }
                item
            }
        })
        .collect();
    let (kind, api_version) = match shape {
        Shape::Metadata => ("PartialObjectMetadataList".to_owned(), "meta.k8s.io/v1"),
        Shape::Full => (format!("{}List", resource.kind()), resource.api_version()),
    };
    let body = json!({
        "kind": kind,
        "apiVersion": api_version,
        "metadata": metadata,
        "items": items,
    });
    Ok(wire::json_body(&body).into_response())
}

/// The event a watch with `filter` sends for `change`, if any: an object
/// that starts matching is ADDED, one that stops matching is DELETED with
/// its previous content under the change's resource version (as the
/// apiserver's watch cache does).
fn event_for(change: &Change, filter: &Filter) -> Option<(&'static str, Value)> {
    let now = change
        .current
        .as_ref()
        .filter(|object| filter.matches(object));
    let before = change
        .previous
        .as_ref()
        .filter(|object| filter.matches(object));
    match (before, now) {
        (None, Some(now)) => Some(("ADDED", now.clone())),
        (Some(_), Some(now)) => Some(("MODIFIED", now.clone())),
        (Some(before), None) => {
            let mut gone = before.clone();
            gone["metadata"]["resourceVersion"] = json!(change.revision.to_string());
            Some(("DELETED", gone))
        }
        (None, None) => None,
    }
}

fn watch(
    shared: &Arc<Shared>,
    resource: Resource,
    filter: Filter,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let shape = wire::shape(accept(headers), false)?;
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout =
        match params.get("timeoutSeconds") {
            Some(seconds) => Duration::from_secs(seconds.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid timeoutSeconds: {seconds}"))
            })?),
            None => shared.config.watch_timeout,
        };
    let from =
        match params.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(version) => Some(version.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid resource version: {version}"))
            })?),
        };

    // Under the lock: the replay and the subscription see the same moment,
    // so no change falls between them.
    let inner = shared.lock();
    let mut lines = Vec::new();
    let start = match from {
        Some(from) if from < inner.compacted => {
            // The apiserver answers 200 and sends the 410 as an ERROR event.
            let error = ApiError::expired(format!(
                "too old resource version: {from} ({})",
                inner.compacted + 1
            ));
            let line = wire::watch_line("ERROR", &error.to_status());
            return Ok(watch_response(Body::from(line)));
        }
        Some(from) => {
            for change in inner
                .history
                .iter()
                .filter(|c| c.revision > from && c.resource == resource)
            {
                if let Some((event_type, object)) = event_for(change, &filter) {
                    lines.push(wire::watch_line(event_type, &wire::project(&object, shape)));
                }
            }
            from.max(inner.revision)
        }
        // No resource version: "start at most recent", beginning with a
        // synthetic ADDED for every matching object.
        None => {
            for (_, object) in inner.objects(resource).filter(|(_, o)| filter.matches(o)) {
                lines.push(wire::watch_line("ADDED", &wire::project(object, shape)));
            }
            inner.revision
        }
    };
    let mut notices = shared.changes.subscribe();
    drop(inner);

    let (mut sender, body) = mpsc::channel::<Result<Bytes, io::Error>>(64);
    let bookmark_interval = shared.config.bookmark_interval;
    tokio::spawn(async move {
        let mut last = start;
        for line in lines {
            if sender.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.reset();
        loop {
            let line = tokio::select! {
                () = &mut deadline => break,
                _ = ticker.tick(), if bookmarks => {
                    wire::watch_line("BOOKMARK", &wire::bookmark(resource, shape, last))
                }
                notice = notices.recv() => match notice {
                    Ok(Notice::Change(change)) => {
                        last = change.revision;
                        if change.resource != resource {
                            continue;
                        }
                        match event_for(&change, &filter) {
                            Some((event_type, object)) => {
                                wire::watch_line(event_type, &wire::project(&object, shape))
                            }
                            None => continue,
                        }
                    }
                    // A watcher too slow to keep up is dropped; the client
                    // resumes from its last resource version.
                    Ok(Notice::CloseWatches) | Err(RecvError::Closed | RecvError::Lagged(_)) => break,
                },
            };
            if sender.send(Ok(line)).await.is_err() {
                // The client went away.
                return;
            }
        }
        // The apiserver ends a watch on timeout with a last bookmark.
        if bookmarks {
            let _ = sender
                .send(Ok(wire::watch_line(
                    "BOOKMARK",
                    &wire::bookmark(resource, shape, last),
                )))
                .await;
        }
    });
    Ok(watch_response(Body::from_stream(body)))
}

fn watch_response(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The stored object with `success`, or the error's `Status`.
fn respond(result: Result<Value, ApiError>, success: StatusCode) -> Response {
    match result {
        Ok(object) => (success, wire::json_body(&object)).into_response(),
        Err(error) => error.into_response(),
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::bad_request("the body is not a JSON object"))
    }
}

/// The name a create or update body gives, checked against the request's
/// namespace (and name, for an update) as the apiserver does.
fn body_name(object: &Value, namespace: &str, path_name: Option<&str>) -> Result<String, ApiError> {
    if let Some(body_namespace) = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        && body_namespace != namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                422,
                "Invalid",
                "metadata.name: Required value: name is required",
            )
        })?;
    if path_name.is_some_and(|path_name| path_name != name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    Ok(name.to_owned())
}

async fn create_lease(
    State(shared): State<Arc<Shared>>,
    Path(namespace): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create(&shared, Resource::Leases, namespace, &headers, &body).await
}

async fn create_event(
    State(shared): State<Arc<Shared>>,
    Path(namespace): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create(&shared, Resource::Events, namespace, &headers, &body).await
}

async fn create(
    shared: &Shared,
    resource: Resource,
    namespace: String,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    if let Err(response) = admit(shared, Verb::Create, resource, headers).await {
        return response;
    }
    let result = parse_body(body).and_then(|object| {
        let name = body_name(&object, &namespace, None)?;
        let key = (namespace, name);
        let mut inner = shared.lock();
        if inner.object(resource, &key).is_some() {
            return Err(ApiError::already_exists(resource, &key.1));
        }
        let mut object = object;
        if let Some(metadata) = object["metadata"].as_object_mut() {
            // The server owns these on creation.
            metadata.remove("resourceVersion");
            metadata.remove("uid");
        }
        Ok(shared.put(&mut inner, resource, key, object))
    });
    respond(result, StatusCode::CREATED)
}

async fn update_lease(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let resource = Resource::Leases;
    if let Err(response) = admit(&shared, Verb::Update, resource, &headers).await {
        return response;
    }
    let result = parse_body(&body).and_then(|object| {
        body_name(&object, &namespace, Some(&name))?;
        let key = (namespace, name);
        let mut inner = shared.lock();
        let stored = inner
            .object(resource, &key)
            .ok_or_else(|| ApiError::not_found(resource, &key.1))?;
        // Optimistic concurrency: an update naming a resourceVersion
        // applies only to that version. Leases allow unconditional updates
        // (no resourceVersion) like the apiserver's lease strategy does.
        let given = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str);
        let current = stored
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str);
        if given.is_some_and(|given| !given.is_empty() && Some(given) != current) {
            return Err(ApiError::conflict(resource, &key.1));
        }
        Ok(shared.put(&mut inner, resource, key, object))
    });
    respond(result, StatusCode::OK)
}

async fn patch_event(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let resource = Resource::Events;
    if let Err(response) = admit(&shared, Verb::Patch, resource, &headers).await {
        return response;
    }
    let merge = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/merge-patch+json"));
    if !merge {
        return ApiError::new(
            415,
            "UnsupportedMediaType",
            "the stand-in serves only application/merge-patch+json patches",
        )
        .into_response();
    }
    let result = parse_body(&body).and_then(|patch| {
        let key = (namespace, name);
        let mut inner = shared.lock();
        let mut object = inner
            .object(resource, &key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, &key.1))?;
        wire::merge_patch(&mut object, &patch);
        Ok(shared.put(&mut inner, resource, key, object))
    });
    respond(result, StatusCode::OK)
}
