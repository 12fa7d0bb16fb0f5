//! What the pools say when something fails, and how the backend
//! answered lately (the node's health check and STATUS).

use std::net::IpAddr;
use std::time::Duration;

use hulk_ipam::IpamError;

use super::PoolManager;
use crate::core::BackendFailure;
use crate::metrics::error_kind;
use crate::store::StoreError;

/// How many backend calls in a row must be refused for authentication or
/// authorization (401/403, [`IpamError::Auth`]) before
/// [`BackendHealth::auth_failing`] says so: one refusal can be a token
/// expiring between two calls.
pub const AUTH_FAILING_AFTER: u32 = 3;

/// Pool failures.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The configuration is inconsistent.
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(String),
    /// No address became free in time; the caller should retry later.
    #[error("no idle address in pool {subnet} within {waited:?}; try again later")]
    Empty {
        /// The pool's subnet.
        subnet: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// The backend refuses to give more addresses for now, or the pool is
    /// drained.
    #[error("pool {subnet} is degraded: {reason}")]
    Degraded {
        /// The pool's subnet.
        subnet: String,
        /// The backend's last error, or why the pool is drained.
        reason: String,
        /// The subnet or quota is used up: retrying soon will not help.
        exhausted: bool,
    },
    /// The pool's pods hold `max_total` addresses, the node's pod capacity;
    /// one must go before another comes.
    #[error(
        "pool {subnet} is full: pods hold max_total ({max_total}) addresses; one must go first"
    )]
    Full {
        /// The pool's subnet.
        subnet: String,
        /// The pod capacity that is reached.
        max_total: usize,
    },
    /// A specific address cannot be assigned now: another pod holds it, it
    /// is being released or allocated, or another pool has it.
    #[error("address {address} is unavailable: {reason}")]
    AddressUnavailable {
        /// The address asked for.
        address: IpAddr,
        /// Why, for people.
        reason: String,
    },
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A backend call failed.
    #[error(transparent)]
    Backend(#[from] IpamError),
    /// Another agent instance marked this node's addresses within a few
    /// heartbeats: it serves this node name too (see
    /// [`super::Fencing`]). Nothing was adopted.
    #[error(
        "{0}: two agents under one node name would hand out the same addresses; \
         if that agent is gone, its marks count as a dead agent's after three heartbeats"
    )]
    HeldElsewhere(super::Displaced),
}

/// How the backend answered lately, over every call of the manager
/// (allocations, releases, holder marks, lists), for a node's STATUS and
/// health check: credentials are per backend, not per pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendHealth {
    /// The last failed call, kept after later successes.
    pub last_error: Option<BackendFailure>,
    /// Calls that failed in a row until now (0 after a call that got an
    /// answer: a success, or `NotFound`).
    pub consecutive_failures: u32,
    /// Calls refused in a row for authentication or authorization (HTTP
    /// 401 or 403: [`IpamError::Auth`]); any other answer resets it.
    pub consecutive_auth_failures: u32,
    /// At least [`AUTH_FAILING_AFTER`] calls in a row were refused for
    /// authentication or authorization: the backend refuses this node's
    /// credentials, and no refill can succeed until they are fixed.
    pub auth_failing: bool,
}

impl PoolManager {
    /// A backend call counted in the metrics and the backend's health but
    /// not rate-limited.
    pub(super) async fn metered<T>(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = Result<T, IpamError>>,
    ) -> Result<T, IpamError> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.metrics.backend_call(operation, started, &result);
        let mut health = self
            .health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &result {
            Ok(_) | Err(IpamError::NotFound(_)) => {
                health.consecutive_failures = 0;
                health.consecutive_auth_failures = 0;
            }
            Err(error) => {
                health.consecutive_failures = health.consecutive_failures.saturating_add(1);
                health.consecutive_auth_failures = if matches!(error, IpamError::Auth(_)) {
                    health.consecutive_auth_failures.saturating_add(1)
                } else {
                    0
                };
                health.last_error = Some(self.failure(operation, error));
            }
        }
        health.auth_failing = health.consecutive_auth_failures >= AUTH_FAILING_AFTER;
        result
    }

    /// `error` of an `operation` now, as the pool remembers it.
    pub(super) fn failure(&self, operation: &str, error: &IpamError) -> BackendFailure {
        BackendFailure {
            operation: operation.to_owned(),
            kind: error_kind(error).to_owned(),
            message: error.to_string(),
            at_ms: self.clock.now_ms(),
        }
    }

    /// How the backend answered lately, over every call of this manager.
    pub fn backend_health(&self) -> BackendHealth {
        self.health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
