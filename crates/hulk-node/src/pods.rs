//! What the node needs to know about pods, and the seam it learns it
//! through: [`PodDirectory`], implemented over the Kubernetes API by the
//! agent (a watch, not a request per ADD) and by tests in memory.
//!
//! A pod's annotations choose its pool (subnet, network, security groups,
//! QoS policy) and may ask for a fixed address; the pods a directory shows
//! on the node are the ones whose addresses stay.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use hulk_ipam::{FloatingIpPolicy, PoolKey};

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
/// The annotation asking for a floating IP: the external network's name
/// or id, `true` for the node's configured one, `false` for none even
/// where the node gives every pod one.
pub const FLOATING_IP_ANNOTATION: &str = "hulk-vpc.io/floating-ip";
/// The annotation choosing what happens to the pod's floating IP when its
/// attachment goes: `release` (deleted) or `keep` (kept for the next pod
/// of the same name).
pub const FLOATING_IP_POLICY_ANNOTATION: &str = "hulk-vpc.io/floating-ip-policy";

/// Why a [`PodDirectory`] could not answer.
#[derive(Debug, thiserror::Error)]
pub enum PodDirectoryError {
    /// The directory refuses the agent (Kubernetes answered 401 or 403: a
    /// wrong or expired token, missing RBAC). A configuration error: it
    /// does not heal by retrying the same request.
    #[error("the Kubernetes API refuses the agent (check its token and RBAC)")]
    Refused(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No answer, or a transient one (connection refused, timeout, 5xx,
    /// 429): retried later.
    #[error("the Kubernetes API is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The directory has not listed the node's pods yet: nobody may be
    /// judged gone from an empty list.
    #[error("the node's pods are not listed yet")]
    NotSynced,
}

/// Where the node learns about pods. Implemented over the Kubernetes API
/// by the agent (`hulk-agent`, through kube-rs' watch and reflector) and
/// in memory by tests.
#[async_trait::async_trait]
pub trait PodDirectory: Send + Sync + std::fmt::Debug {
    /// The pod `namespace/name`, or `None` when the directory does not
    /// know it (ADD then uses the default pool).
    ///
    /// # Errors
    ///
    /// [`PodDirectoryError`] when the directory cannot say.
    async fn pod(&self, name: &str) -> Result<Option<PodInfo>, PodDirectoryError>;

    /// The pods on this node that may hold addresses.
    ///
    /// # Errors
    ///
    /// [`PodDirectoryError`] when the directory cannot say, including
    /// [`PodDirectoryError::NotSynced`] before its first full list.
    async fn live_pods(&self) -> Result<LivePods, PodDirectoryError>;

    /// Tells the pod's owners what happened to its network (a Kubernetes
    /// Event on the pod, as users of other VPC CNIs expect). Best effort:
    /// a failure to record is the directory's to log, never the caller's.
    async fn record(&self, _pod: &str, _event: PodEvent) {}
}

/// Why an ADD waits or failed, as a pod's Event says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    /// ADD waits for the cloud to allocate an address (the pool is empty).
    AddressWaiting {
        /// The pool's subnet.
        subnet: String,
    },
    /// ADD failed: the subnet or quota has no address left.
    AddressExhausted {
        /// What the failure said.
        message: String,
    },
    /// ADD failed: the cloud refuses calls for now (rate limit) or cannot
    /// be reached; the runtime retries.
    CloudUnavailable {
        /// What the failure said.
        message: String,
    },
}

impl PodEvent {
    /// The Event's `reason`: a short UpperCamelCase word, as Kubernetes
    /// conventions ask.
    pub fn reason(&self) -> &'static str {
        match self {
            PodEvent::AddressWaiting { .. } => "AddressWaiting",
            PodEvent::AddressExhausted { .. } => "AddressExhausted",
            PodEvent::CloudUnavailable { .. } => "CloudUnavailable",
        }
    }

    /// Whether the Event is a `Warning` (otherwise `Normal`).
    pub fn is_warning(&self) -> bool {
        !matches!(self, PodEvent::AddressWaiting { .. })
    }

    /// The Event's human-readable `note`.
    pub fn note(&self) -> String {
        match self {
            PodEvent::AddressWaiting { subnet } => format!(
                "waiting for the cloud to allocate an address in subnet {subnet} (the node's warm pool is empty)"
            ),
            PodEvent::AddressExhausted { message } => {
                format!("no address left for the pod: {message}")
            }
            PodEvent::CloudUnavailable { message } => {
                format!("the cloud cannot allocate an address now: {message}")
            }
        }
    }
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

    /// The floating IP the annotations ask for, given the node's
    /// `default` (its configured external network, if any, and policy):
    /// the network and policy, or `None` for no floating IP. Without the
    /// annotation, the node's network when it has one. A malformed
    /// annotation, or `true` on a node without a network, is an error
    /// naming it.
    pub fn floating_ip(
        &self,
        default: (Option<&str>, FloatingIpPolicy),
    ) -> Result<Option<(String, FloatingIpPolicy)>, String> {
        let (default_network, default_policy) = default;
        let policy = match self.annotations.get(FLOATING_IP_POLICY_ANNOTATION) {
            Some(value) => value.parse().map_err(|error| {
                format!(
                    "pod {}: annotation {FLOATING_IP_POLICY_ANNOTATION}: {error}",
                    self.name
                )
            })?,
            None => default_policy,
        };
        let network = match self
            .annotations
            .get(FLOATING_IP_ANNOTATION)
            .map(|value| value.trim())
        {
            None => default_network,
            Some("false") => None,
            Some("true") => Some(default_network.ok_or_else(|| {
                format!(
                    "pod {}: annotation {FLOATING_IP_ANNOTATION} is \"true\" but the node has no \
                     floating_network; name the external network",
                    self.name
                )
            })?),
            Some("") => {
                return Err(format!(
                    "pod {}: annotation {FLOATING_IP_ANNOTATION} is empty",
                    self.name
                ));
            }
            Some(network) => Some(network),
        };
        Ok(network.map(|network| (network.to_owned(), policy)))
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

/// The pods the API shows on a node that may hold addresses, by
/// `namespace/name`, with their UIDs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LivePods(HashMap<String, Option<String>>);

impl LivePods {
    /// The pods of `pods` that may hold addresses
    /// ([`PodInfo::may_hold_addresses`]).
    pub fn from_pods(pods: impl IntoIterator<Item = PodInfo>) -> Self {
        LivePods(
            pods.into_iter()
                .filter(PodInfo::may_hold_addresses)
                .map(|pod| (pod.name, pod.uid))
                .collect(),
        )
    }

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
    fn floating_ip_annotations_override_the_nodes_setting() {
        use FloatingIpPolicy::{Keep, Release};
        let none = (None, Release);
        let public = (Some("public"), Release);
        assert_eq!(pod(&[]).floating_ip(none), Ok(None));
        assert_eq!(
            pod(&[]).floating_ip(public),
            Ok(Some(("public".into(), Release)))
        );
        assert_eq!(
            pod(&[(FLOATING_IP_ANNOTATION, "false")]).floating_ip(public),
            Ok(None)
        );
        assert_eq!(
            pod(&[(FLOATING_IP_ANNOTATION, "true")]).floating_ip(public),
            Ok(Some(("public".into(), Release)))
        );
        assert_eq!(
            pod(&[
                (FLOATING_IP_ANNOTATION, " corp-net "),
                (FLOATING_IP_POLICY_ANNOTATION, "keep")
            ])
            .floating_ip(none),
            Ok(Some(("corp-net".into(), Keep)))
        );
        for (annotations, named) in [
            (
                vec![(FLOATING_IP_ANNOTATION, "true")],
                FLOATING_IP_ANNOTATION,
            ),
            (vec![(FLOATING_IP_ANNOTATION, "")], FLOATING_IP_ANNOTATION),
            (
                vec![
                    (FLOATING_IP_ANNOTATION, "public"),
                    (FLOATING_IP_POLICY_ANNOTATION, "forever"),
                ],
                FLOATING_IP_POLICY_ANNOTATION,
            ),
        ] {
            let error = pod(&annotations).floating_ip(none).unwrap_err();
            assert!(error.contains(named), "{error}");
        }
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
