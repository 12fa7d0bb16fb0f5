//! The little of the Kubernetes API the agent reads: one pod's annotations
//! at ADD (per-pod subnet, security groups, QoS) and the pods of its node
//! for the periodic GC. Plain HTTPS GETs with the service account's token;
//! a full client library would be most of the agent's size for two calls.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;

use hulk_ipam::PoolKey;
use serde::Deserialize;

/// The annotation naming a pod's subnet.
pub const SUBNET_ANNOTATION: &str = "hulk-vpc.io/subnet";
/// The annotation naming a pod's VPC network.
pub const NETWORK_ANNOTATION: &str = "hulk-vpc.io/network";
/// The annotation listing a pod's security groups, comma-separated.
pub const SECURITY_GROUPS_ANNOTATION: &str = "hulk-vpc.io/security-groups";
/// The annotation naming a pod's QoS policy.
pub const QOS_POLICY_ANNOTATION: &str = "hulk-vpc.io/qos-policy";
/// The annotation asking for one fixed address of the pod's subnet.
pub const IP_ADDRESS_ANNOTATION: &str = "hulk-vpc.io/ip-address";

/// Kubernetes API failures.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The service account token could not be read.
    #[error("service account token {path}: {source}")]
    Token {
        /// The token file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No answer (connection, TLS, timeout).
    #[error("Kubernetes API: {0}")]
    Transport(String),
    /// The API refused.
    #[error("Kubernetes API answered {status} for {path}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The request path.
        path: String,
        /// The body's message.
        message: String,
    },
    /// The answer is not what the API documents.
    #[error("unreadable Kubernetes API answer for {path}: {message}")]
    Decode {
        /// The request path.
        path: String,
        /// What was wrong.
        message: String,
    },
}

/// A pod as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `namespace/name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    pub phase: Option<String>,
}

impl PodInfo {
    /// Whether its sandbox may still hold an address: finished pods'
    /// sandboxes are torn down.
    pub fn may_hold_addresses(&self) -> bool {
        !matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// The fixed address the annotations ask for, if any. A malformed one
    /// is an error naming it.
    pub fn fixed_address(&self) -> Result<Option<IpAddr>, String> {
        let Some(value) = self.annotations.get(IP_ADDRESS_ANNOTATION) else {
            return Ok(None);
        };
        value.trim().parse().map(Some).map_err(|_| {
            format!(
                "pod {}: annotation {IP_ADDRESS_ANNOTATION} is not an IP address: {value:?}",
                self.name
            )
        })
    }

    /// The pool the annotations ask for: `default`'s fields where they say
    /// nothing, `None` when they say nothing at all. A malformed annotation
    /// is an error naming it.
    pub fn pool(&self, default: &PoolKey) -> Result<Option<PoolKey>, String> {
        let annotation = |key: &str| -> Result<Option<&str>, String> {
            match self.annotations.get(key).map(|value| value.trim()) {
                Some("") => Err(format!("pod {}: annotation {key} is empty", self.name)),
                other => Ok(other),
            }
        };
        let subnet = annotation(SUBNET_ANNOTATION)?;
        let network = annotation(NETWORK_ANNOTATION)?;
        let security_groups = annotation(SECURITY_GROUPS_ANNOTATION)?;
        let qos_policy = annotation(QOS_POLICY_ANNOTATION)?;
        if subnet.is_none()
            && network.is_none()
            && security_groups.is_none()
            && qos_policy.is_none()
        {
            return Ok(None);
        }
        let security_groups = match security_groups {
            None => default.security_groups.clone(),
            Some(list) => {
                let groups: Vec<String> = list.split(',').map(|id| id.trim().to_owned()).collect();
                if groups.iter().any(String::is_empty) {
                    return Err(format!(
                        "pod {}: annotation {SECURITY_GROUPS_ANNOTATION} has an empty id in {list:?}",
                        self.name
                    ));
                }
                groups
            }
        };
        Ok(Some(PoolKey::new(
            network.unwrap_or(&default.network),
            subnet.unwrap_or(&default.subnet),
            security_groups,
            qos_policy.map(str::to_owned).or(default.qos_policy.clone()),
        )))
    }
}

#[derive(Deserialize)]
struct WirePod {
    metadata: WireMetadata,
    #[serde(default)]
    status: Option<WireStatus>,
}

#[derive(Deserialize)]
struct WireMetadata {
    name: String,
    namespace: String,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct WireStatus {
    #[serde(default)]
    phase: Option<String>,
}

#[derive(Deserialize)]
struct WirePodList {
    items: Vec<WirePod>,
    #[serde(default)]
    metadata: Option<WireListMetadata>,
}

#[derive(Deserialize)]
struct WireListMetadata {
    #[serde(rename = "continue", default)]
    continue_token: Option<String>,
}

impl From<WirePod> for PodInfo {
    fn from(pod: WirePod) -> Self {
        PodInfo {
            name: format!("{}/{}", pod.metadata.namespace, pod.metadata.name),
            uid: pod.metadata.uid,
            annotations: pod.metadata.annotations.unwrap_or_default(),
            phase: pod.status.and_then(|status| status.phase),
        }
    }
}

/// The pods the API shows on a node that may hold addresses, by
/// `namespace/name`, with their UIDs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LivePods(HashMap<String, Option<String>>);

impl LivePods {
    /// Whether pod `name` is live and, when both UIDs are known, the same
    /// pod: one recreated under the same name (a StatefulSet's) is not.
    pub fn shows(&self, name: &str, uid: Option<&str>) -> bool {
        match (self.0.get(name), uid) {
            (None, _) => false,
            (Some(Some(live_uid)), Some(uid)) => live_uid == uid,
            (Some(_), _) => true,
        }
    }

    /// How many pods.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Pods listed per page, so a node with many pods is read in bounded pieces.
const PAGE: usize = 250;

/// A Kubernetes API reader for one node's agent.
#[derive(Debug, Clone)]
pub struct KubeClient {
    http: reqwest::Client,
    api_server: String,
    token_file: Option<PathBuf>,
}

impl KubeClient {
    /// A reader of `api_server` (e.g. `https://10.96.0.1:443`) over `http`
    /// (configured with the cluster's CA), sending the token read from
    /// `token_file` on each call (projected tokens rotate).
    pub fn new(http: reqwest::Client, api_server: &str, token_file: Option<PathBuf>) -> Self {
        KubeClient {
            http,
            api_server: api_server.trim_end_matches('/').to_owned(),
            token_file,
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<T>, KubeError> {
        let mut request = self
            .http
            .get(format!("{}{path}", self.api_server))
            .query(query);
        if let Some(file) = &self.token_file {
            let token =
                tokio::fs::read_to_string(file)
                    .await
                    .map_err(|source| KubeError::Token {
                        path: file.display().to_string(),
                        source,
                    })?;
            request = request.bearer_auth(token.trim());
        }
        let response = request
            .send()
            .await
            .map_err(|error| KubeError::Transport(error.to_string()))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = response
            .bytes()
            .await
            .map_err(|error| KubeError::Transport(error.to_string()))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|value| value["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(KubeError::Status {
                status: status.as_u16(),
                path: path.to_owned(),
                message,
            });
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|error| KubeError::Decode {
                path: path.to_owned(),
                message: error.to_string(),
            })
    }

    /// The pod `namespace/name`, or `None` when the API does not know it.
    pub async fn pod(&self, name: &str) -> Result<Option<PodInfo>, KubeError> {
        let (namespace, pod) = name.split_once('/').ok_or_else(|| KubeError::Decode {
            path: name.to_owned(),
            message: "a pod is named namespace/name".into(),
        })?;
        let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}");
        Ok(self.get::<WirePod>(&path, &[]).await?.map(PodInfo::from))
    }

    /// The names (`namespace/name`) of the pods scheduled on `node` that
    /// may still hold addresses.
    pub async fn live_pods_on(&self, node: &str) -> Result<LivePods, KubeError> {
        let selector = format!("spec.nodeName={node}");
        let limit = PAGE.to_string();
        let mut live = LivePods::default();
        let mut continue_token: Option<String> = None;
        loop {
            let mut query = vec![("fieldSelector", selector.as_str()), ("limit", &limit)];
            if let Some(token) = &continue_token {
                query.push(("continue", token));
            }
            let path = "/api/v1/pods";
            let page: WirePodList =
                self.get(path, &query)
                    .await?
                    .ok_or_else(|| KubeError::Decode {
                        path: path.to_owned(),
                        message: "the pod list is not found".into(),
                    })?;
            live.0.extend(
                page.items
                    .into_iter()
                    .map(PodInfo::from)
                    .filter(PodInfo::may_hold_addresses)
                    .map(|pod| (pod.name, pod.uid)),
            );
            continue_token = page
                .metadata
                .and_then(|metadata| metadata.continue_token)
                .filter(|token| !token.is_empty());
            if continue_token.is_none() {
                return Ok(live);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            name: "default/web-0".into(),
            uid: Some("uid-web-0".into()),
            annotations: annotations
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            phase: Some("Pending".into()),
        }
    }

    fn default_key() -> PoolKey {
        PoolKey::new("vpc", "subnet-a", ["sg-default"], Some("qos-gold".into()))
    }

    #[test]
    fn without_annotations_the_default_pool_serves() {
        assert_eq!(pod(&[("app", "web")]).pool(&default_key()), Ok(None));
    }

    #[test]
    fn annotations_override_field_by_field() {
        let key = pod(&[(SUBNET_ANNOTATION, "subnet-b")])
            .pool(&default_key())
            .unwrap()
            .unwrap();
        assert_eq!(
            key,
            PoolKey::new("vpc", "subnet-b", ["sg-default"], Some("qos-gold".into()))
        );
        let key = pod(&[
            (SECURITY_GROUPS_ANNOTATION, "sg-web, sg-db,sg-web"),
            (QOS_POLICY_ANNOTATION, "qos-bronze"),
            (NETWORK_ANNOTATION, "vpc-2"),
        ])
        .pool(&default_key())
        .unwrap()
        .unwrap();
        assert_eq!(
            key,
            PoolKey::new(
                "vpc-2",
                "subnet-a",
                ["sg-db", "sg-web"],
                Some("qos-bronze".into())
            )
        );
    }

    #[test]
    fn malformed_annotations_are_named() {
        for (annotations, named) in [
            (vec![(SUBNET_ANNOTATION, " ")], SUBNET_ANNOTATION),
            (
                vec![(SECURITY_GROUPS_ANNOTATION, "sg-a,,sg-b")],
                SECURITY_GROUPS_ANNOTATION,
            ),
        ] {
            let error = pod(&annotations).pool(&default_key()).unwrap_err();
            assert!(
                error.contains(named) && error.contains("default/web-0"),
                "{error}"
            );
        }
    }

    #[test]
    fn finished_pods_hold_no_addresses() {
        let mut finished = pod(&[]);
        for (phase, holds) in [("Running", true), ("Succeeded", false), ("Failed", false)] {
            finished.phase = Some(phase.into());
            assert_eq!(finished.may_hold_addresses(), holds, "{phase}");
        }
    }
}
