//! [`KubeError`] and its classification.

use std::sync::Arc;

use jiff::Timestamp;
use kube::runtime::watcher;

use crate::lease::LeaseLoss;

/// A failure talking to the Kubernetes API, or a lease held by someone else.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// A request to the apiserver failed (connection, HTTP status, or body).
    #[error("cannot {action}")]
    Request {
        /// What was asked, e.g. `get lease kube-system/hulk-vpc-node-n1`.
        action: String,
        /// kube's error; an `Api` status carries the HTTP code and reason.
        /// (Boxed: kube's error is large, and every result carries the size.)
        #[source]
        source: Box<kube::Error>,
    },
    /// The reflector has not finished its first full list yet, or its
    /// watch has failed since the last event it delivered, so its store
    /// cannot tell which objects exist.
    #[error("the {what} reflector is not in sync (not listed yet, or its watch is failing)")]
    NotSynced {
        /// Which reflector (`pods of node n1`, `nodes`).
        what: String,
        /// The last watch failure, if the list or watch is failing.
        #[source]
        last_error: Option<Arc<watcher::Error>>,
    },
    /// Another live holder has the lease.
    #[error("lease {lease} is held by {holder} until {expires_at}")]
    LeaseHeld {
        /// `namespace/name` of the lease.
        lease: String,
        /// The other holder's identity.
        holder: String,
        /// When its claim lapses unless renewed: `renewTime +
        /// leaseDurationSeconds`.
        expires_at: Timestamp,
    },
    /// Every attempt to write the lease lost a race (409) to another writer.
    #[error("lease {lease} kept changing under {attempts} attempts to write it")]
    LeaseContended {
        /// `namespace/name` of the lease.
        lease: String,
        /// How many read-decide-write rounds were tried.
        attempts: u32,
    },
    /// The lease is no longer ours: whoever relies on it must stop.
    #[error("lease {lease} lost: {loss}")]
    LeaseLost {
        /// `namespace/name` of the lease.
        lease: String,
        /// How it was lost.
        loss: LeaseLoss,
    },
    /// The in-cluster environment or kubeconfig could not be read.
    #[error("cannot find a Kubernetes client configuration (in-cluster or kubeconfig)")]
    InferConfig(#[source] Box<kube::config::InferConfigError>),
    /// The given API server, CA file or token file do not make a
    /// configuration.
    #[error("invalid Kubernetes client configuration")]
    Config(#[source] Box<kube::config::KubeconfigError>),
    /// The token file holds whitespace around the token (typically the
    /// trailing newline an editor or `echo` adds). kube-rs sends the file's
    /// content verbatim (client-go trims it), and no HTTP header may hold a
    /// newline: every request would fail.
    #[error(
        "token file {} has whitespace around the token (a trailing newline?); write the token alone",
        path.display()
    )]
    TokenFileWhitespace {
        /// The token file.
        path: std::path::PathBuf,
    },
    /// The HTTP client could not be built from the configuration (e.g. a CA
    /// certificate rustls rejects).
    #[error("cannot build the Kubernetes client")]
    Client(#[source] Box<kube::Error>),
}

impl KubeError {
    pub(crate) fn request(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Request {
            action,
            source: Box::new(source),
        }
    }

    /// The HTTP status code the apiserver answered, if the failure is one.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            Self::Request { source, .. } | Self::Client(source) => kube_status(source),
            Self::NotSynced { last_error, .. } => last_error.as_deref().and_then(watcher_status),
            _ => None,
        }
    }

    /// A configuration error, not a transient one: 401 Unauthorized (bad or
    /// expired token) or 403 Forbidden (missing RBAC), or a client
    /// configuration that cannot be read. Retrying does not help; an
    /// operator has to act.
    pub fn is_configuration(&self) -> bool {
        matches!(self.status_code(), Some(401 | 403))
            || matches!(
                self,
                Self::InferConfig(_)
                    | Self::Config(_)
                    | Self::TokenFileWhitespace { .. }
                    | Self::Client(_)
            )
    }

    /// A failure that may pass by itself: no connection or a broken one,
    /// 5xx, 429 Too Many Requests, 409 races on a lease, or a reflector that
    /// is still syncing without a failure. (kube's client already retries
    /// 429, 503 and 504 answers itself, honouring `Retry-After`, before they
    /// surface here.)
    pub fn is_transient(&self) -> bool {
        if let Some(code) = self.status_code() {
            return code == 429 || code >= 500;
        }
        match self {
            Self::Request { source, .. } => is_connection(source),
            Self::NotSynced { last_error, .. } => match last_error.as_deref() {
                None => true,
                Some(
                    watcher::Error::InitialListFailed(source)
                    | watcher::Error::WatchStartFailed(source)
                    | watcher::Error::WatchFailed(source),
                ) => is_connection(source),
                Some(_) => false,
            },
            Self::LeaseContended { .. } => true,
            _ => false,
        }
    }
}

fn kube_status(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn watcher_status(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(source)
        | watcher::Error::WatchStartFailed(source)
        | watcher::Error::WatchFailed(source) => kube_status(source),
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::NoResourceVersion => None,
    }
}

/// Errors of the connection rather than of the answer.
fn is_connection(error: &kube::Error) -> bool {
    matches!(
        error,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(code: u16) -> KubeError {
        let status = kube::core::Status {
            code,
            ..kube::core::Status::default()
        };
        KubeError::request("get pod default/p")(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn classification_by_status_code() {
        for code in [401, 403] {
            assert!(answered(code).is_configuration(), "{code}");
            assert!(!answered(code).is_transient(), "{code}");
        }
        for code in [429, 500, 503, 504] {
            assert!(answered(code).is_transient(), "{code}");
            assert!(!answered(code).is_configuration(), "{code}");
        }
        for code in [404, 409, 422] {
            assert!(!answered(code).is_transient(), "{code}");
            assert!(!answered(code).is_configuration(), "{code}");
        }
        let watch_forbidden = KubeError::NotSynced {
            what: "nodes".to_owned(),
            last_error: Some(Arc::new(watcher::Error::WatchError(Box::new(
                kube::core::Status {
                    code: 403,
                    ..kube::core::Status::default()
                },
            )))),
        };
        assert!(watch_forbidden.is_configuration());
        let still_listing = KubeError::NotSynced {
            what: "nodes".to_owned(),
            last_error: None,
        };
        assert!(still_listing.is_transient());
        assert!(!still_listing.is_configuration());
    }
}
