//! A server of the v1 contract over any [`IpamBackend`]: with
//! [`hulk_ipam::MemoryBackend`] it is the conformant fake other teams run
//! against their clients; over another backend it is an adapter.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use hulk_ipam::{AllocationRequest, IpamBackend, IpamError, ListScope, PoolKey};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::{
    AddressPage, AllocationBody, ErrorBody, ErrorDetail, MAX_ALLOCATION, OwnerBody, WireAddress,
    error_code,
};

struct ServerState {
    backend: Arc<dyn IpamBackend>,
    token: String,
    /// Tags by address id: the contract's tags live in the service.
    tags: Mutex<HashMap<String, Vec<String>>>,
}

type Shared = Arc<ServerState>;

/// The router serving `/v1`, accepting only `Authorization: Bearer <token>`.
pub fn router(backend: Arc<dyn IpamBackend>, token: impl Into<String>) -> Router {
    let state = Arc::new(ServerState {
        backend,
        token: token.into(),
        tags: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/v1/allocations", post(allocate))
        .route("/v1/addresses", get(list))
        .route("/v1/addresses/{id}", delete(release))
        .route("/v1/addresses/{id}/owner", put(update_owner))
        .route("/v1/health", get(health))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

/// An error's own words, without the prefix its `Display` adds.
fn bare_message(error: &IpamError) -> String {
    match error {
        IpamError::NotFound(message)
        | IpamError::Conflict(message)
        | IpamError::Auth(message)
        | IpamError::Transient(message)
        | IpamError::InvalidRequest(message)
        | IpamError::Protocol(message)
        | IpamError::Quota(message) => message.clone(),
        IpamError::Exhausted { subnet } => subnet.clone(),
        other => other.to_string(),
    }
}

fn failure(error: &IpamError) -> Response {
    let (status, code) = error_code(error);
    let body = Json(ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            // The bare message: the client adds its own "authentication
            // failed:" (or the like) when it turns the code back into an
            // error, and saying it twice reads as two failures.
            message: bare_message(error),
        },
    });
    match error {
        IpamError::Throttled {
            retry_after: Some(wait),
        } => (
            status,
            [(header::RETRY_AFTER, wait.as_secs().to_string())],
            body,
        )
            .into_response(),
        _ => (status, body).into_response(),
    }
}

/// Every route needs the bearer token.
async fn require_token(
    State(state): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let expected = format!("Bearer {}", state.token);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if given == Some(expected.as_str()) {
        next.run(request).await
    } else {
        failure(&IpamError::Auth("missing or wrong bearer token".into()))
    }
}

async fn allocate(
    State(state): State<Shared>,
    body: Result<Json<AllocationBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return failure(&IpamError::InvalidRequest(rejection.body_text())),
    };
    let request = AllocationRequest {
        key: PoolKey::new(
            body.network,
            body.subnet,
            body.security_groups,
            body.qos_policy,
        ),
        node: body.node,
        tags: Vec::new(),
        count: body.count,
        address: body.address,
        marked_by: body.marked_by.map(Into::into),
    };
    if let Err(error) = request.validate(MAX_ALLOCATION) {
        return failure(&error);
    }
    match state.backend.allocate(&request).await {
        Ok(leases) => {
            let mut tags = state.tags.lock().await;
            let addresses = leases
                .into_iter()
                .map(|lease| {
                    tags.insert(lease.id.clone(), body.tags.clone());
                    WireAddress::from_lease(lease, body.tags.clone())
                })
                .collect();
            (
                StatusCode::CREATED,
                Json(AddressPage {
                    addresses,
                    next_cursor: None,
                }),
            )
                .into_response()
        }
        Err(error) => failure(&error),
    }
}

async fn release(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match state.backend.release(&id).await {
        Ok(()) => {
            state.tags.lock().await.remove(&id);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(error) => failure(&error),
    }
}

async fn update_owner(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Result<Json<OwnerBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return failure(&IpamError::InvalidRequest(rejection.body_text())),
    };
    match state
        .backend
        .update_owner(
            &id,
            body.owner.map(Into::into),
            body.marked_by.map(Into::into),
        )
        .await
    {
        Ok(lease) => {
            let tags = state
                .tags
                .lock()
                .await
                .get(&id)
                .cloned()
                .unwrap_or_default();
            Json(WireAddress::from_lease(lease, tags)).into_response()
        }
        Err(error) => failure(&error),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    tags: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
}

async fn list(State(state): State<Shared>, Query(query): Query<ListQuery>) -> Response {
    let wanted: Vec<String> = query
        .tags
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect();
    let leases = match state.backend.list(&ListScope::Cluster).await {
        Ok(leases) => leases,
        Err(error) => return failure(&error),
    };
    let tags = state.tags.lock().await;
    // Pages in id order; the cursor is the last id of the previous page.
    let matching: BTreeMap<String, WireAddress> = leases
        .into_iter()
        .filter_map(|lease| {
            let own = tags.get(&lease.id).cloned().unwrap_or_default();
            wanted
                .iter()
                .all(|tag| own.contains(tag))
                .then(|| (lease.id.clone(), WireAddress::from_lease(lease, own)))
        })
        .collect();
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let after = query.cursor.unwrap_or_default();
    let page: Vec<WireAddress> = matching
        .range::<String, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
        .map(|(_, address)| address.clone())
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    let addresses: Vec<WireAddress> = page.into_iter().take(limit).collect();
    let next_cursor = more
        .then(|| addresses.last().map(|address| address.id.clone()))
        .flatten();
    Json(AddressPage {
        addresses,
        next_cursor,
    })
    .into_response()
}

async fn health(State(state): State<Shared>) -> Response {
    match state.backend.health().await {
        Ok(()) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(error) => failure(&error),
    }
}
