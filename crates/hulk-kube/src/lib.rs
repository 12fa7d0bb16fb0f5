//! The Kubernetes side of hulk-vpc, through kube-rs.
//!
//! - [`NodePods`]: the live pods of one node, from a metadata-only
//!   reflector, with a GET fallback for a pod the watch has not delivered.
//! - [`NodeLease`] / [`LeaderLease`] ([`IdentityLease`]): fencing through a
//!   `coordination.k8s.io/v1` Lease: one agent instance per node, one active
//!   controller replica.
//! - [`PodEvents`]: `events.k8s.io/v1` Events on pods.
//! - [`ClusterNodes`]: the cluster's Node objects, for the controller.
//! - [`pod_uids`]: the UIDs of every pod in the cluster (paged metadata
//!   LISTs), for the controller's check of holder marks.
//! - [`KubeError`], which tells configuration errors (401/403) from
//!   transient ones.
//! - [`client`]: a [`kube::Client`] from in-cluster settings, kubeconfig,
//!   or an explicit API server, CA file and token file.
//!
//! Everything that watches runs in a tokio task until its
//! [`CancellationToken`](tokio_util::sync::CancellationToken) fires.

mod error;
mod events;
mod lease;
mod nodes;
mod pods;
mod reflect;

use std::path::PathBuf;

use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};
use kube::{Client, Config};

pub use error::KubeError;
pub use events::{EventKind, PodEvent, PodEvents};
pub use lease::{IdentityLease, LeaderLease, LeaseConfig, LeaseKeeper, LeaseLoss, NodeLease};
pub use nodes::ClusterNodes;
pub use pods::{NodePods, PodMeta, pod_uids};

/// Where the API server is and how to authenticate to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// The API server's URL (`https://...`, or `http://` for a local
    /// stand-in). `None`: in-cluster settings (service account token and
    /// `KUBERNETES_SERVICE_HOST`), else the kubeconfig (`$KUBECONFIG` or
    /// `~/.kube/config`); the two fields below are then ignored.
    pub api_server: Option<String>,
    /// A PEM file with the CA certificates that sign the API server's
    /// certificate; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A file holding the bearer token, and nothing else (no trailing
    /// newline: [`KubeError::TokenFileWhitespace`]). kube-rs reads it again
    /// once its copy is 50 s old, so rotated (projected service account)
    /// tokens keep working; a file that has gone keeps the last token.
    pub token_file: Option<PathBuf>,
}

const CONTEXT: &str = "hulk-vpc";

/// A client for the API server `options` describe.
pub async fn client(options: &ClientOptions) -> Result<Client, KubeError> {
    let config = match &options.api_server {
        None => Config::infer()
            .await
            .map_err(|error| KubeError::InferConfig(Box::new(error)))?,
        Some(api_server) => {
            if let Some(path) = &options.token_file {
                check_token_file(path)?;
            }
            // An in-memory kubeconfig: kube then reads the CA file and
            // reloads the token file as it does for a kubeconfig on disk.
            let kubeconfig = Kubeconfig {
                clusters: vec![NamedCluster {
                    name: CONTEXT.to_owned(),
                    cluster: Some(Cluster {
                        server: Some(api_server.clone()),
                        certificate_authority: options
                            .ca_file
                            .as_ref()
                            .map(|path| path.display().to_string()),
                        ..Cluster::default()
                    }),
                    ..NamedCluster::default()
                }],
                auth_infos: vec![NamedAuthInfo {
                    name: CONTEXT.to_owned(),
                    auth_info: Some(AuthInfo {
                        token_file: options
                            .token_file
                            .as_ref()
                            .map(|path| path.display().to_string()),
                        ..AuthInfo::default()
                    }),
                    ..NamedAuthInfo::default()
                }],
                contexts: vec![NamedContext {
                    name: CONTEXT.to_owned(),
                    context: Some(Context {
                        cluster: CONTEXT.to_owned(),
                        user: Some(CONTEXT.to_owned()),
                        ..Context::default()
                    }),
                    ..NamedContext::default()
                }],
                current_context: Some(CONTEXT.to_owned()),
                ..Kubeconfig::default()
            };
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|error| KubeError::Config(Box::new(error)))?
        }
    };
    Client::try_from(config).map_err(|error| KubeError::Client(Box::new(error)))
}

/// Refuses a token file kube-rs would send as an invalid header. A file
/// that cannot be read is left to kube, whose error names it.
fn check_token_file(path: &std::path::Path) -> Result<(), KubeError> {
    match std::fs::read_to_string(path) {
        Ok(token) if token.trim() != token => Err(KubeError::TokenFileWhitespace {
            path: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}
