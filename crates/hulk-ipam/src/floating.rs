//! Floating IPs: a public (or company-wide) address of an external
//! network, associated with a pod's address for the pod's lifetime
//! ([`FloatingIpProvider`]), and an in-memory provider for tests
//! ([`MemoryFloatingIps`]).
//!
//! A floating IP names the pod it was taken for (`namespace/name`), so that
//! under [`FloatingIpPolicy::Keep`] a pod recreated under the same name (a
//! StatefulSet's) gets the same floating IP back.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{IpamError, ListScope};

/// What happens to a pod's floating IP when its attachment goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FloatingIpPolicy {
    /// Deleted: the address goes back to the external network.
    #[default]
    Release,
    /// Disassociated and kept, still naming the pod: the next pod of the
    /// same `namespace/name` gets it back. Only the cluster's teardown
    /// deletes it.
    Keep,
}

impl FloatingIpPolicy {
    /// `release` or `keep`, as configurations, annotations and tags say it.
    pub fn as_str(self) -> &'static str {
        match self {
            FloatingIpPolicy::Release => "release",
            FloatingIpPolicy::Keep => "keep",
        }
    }
}

impl std::fmt::Display for FloatingIpPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FloatingIpPolicy {
    type Err = String;

    /// `release` or `keep`; anything else is refused with a message naming it.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim() {
            "release" => Ok(FloatingIpPolicy::Release),
            "keep" => Ok(FloatingIpPolicy::Keep),
            other => Err(format!(
                "floating IP policy must be \"release\" or \"keep\", not {other:?}"
            )),
        }
    }
}

/// A floating IP for one pod's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloatingIpRequest {
    /// The external network (Neutron `router:external`), by name or id.
    pub network: String,
    /// The lease ([`crate::Lease::id`], the Neutron port) to associate with.
    pub port: String,
    /// The lease's address, which the floating IP translates to.
    pub fixed_address: IpAddr,
    /// The pod, `namespace/name`.
    pub pod: String,
    /// The node holding the lease.
    pub node: String,
    /// What happens when the pod's attachment goes.
    pub policy: FloatingIpPolicy,
}

/// A floating IP as a provider knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloatingIp {
    /// The provider's id (the Neutron floating IP id).
    pub id: String,
    /// The floating address.
    pub address: IpAddr,
    /// The external network's id.
    pub network: String,
    /// The lease it is associated with, `None` when unassociated.
    pub port: Option<String>,
    /// The pod it was taken for, when it says.
    pub pod: Option<String>,
    /// Its policy, as recorded on it.
    pub policy: FloatingIpPolicy,
}

/// A floating IP an attachment holds, or may hold (an ADD that stopped
/// between asking for it and recording it): what
/// [`FloatingIpProvider::release`] needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloatingIpHold {
    /// The lease it is (or would be) associated with.
    pub port: String,
    /// Its id, once known; `None`: whatever floating IP of this cluster is
    /// associated with [`FloatingIpHold::port`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its address, once known (for logs and operators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// What to do with it.
    pub policy: FloatingIpPolicy,
}

/// Floating IPs for pods' addresses. Object-safe: use it as
/// `Arc<dyn FloatingIpProvider>`. Every floating IP carries the tags of
/// the cluster and node ([`crate::MANAGED_TAG`], [`crate::cluster_tag`],
/// [`crate::node_tag`]) and the pod's name, so scoped calls never touch
/// another cluster's.
#[async_trait::async_trait]
pub trait FloatingIpProvider: Send + Sync {
    /// Associates a floating IP of `request.network` with `request.port`
    /// and returns it. Idempotent: the floating IP already associated with
    /// the port for this pod is returned as it is (a retried ADD), and one
    /// kept for this pod name ([`FloatingIpPolicy::Keep`]) is associated
    /// again before a new one is taken.
    ///
    /// # Errors
    ///
    /// [`IpamError::Conflict`] when the pod asks to keep its floating IP and
    /// its kept one is still associated with another port (the pod's
    /// earlier sandbox, until its DEL; a pod under `release` gets another
    /// one meanwhile); [`IpamError::NotFound`] for an unknown network;
    /// [`IpamError::Exhausted`] / [`IpamError::Quota`] when none is left;
    /// [`IpamError::InvalidRequest`] when the port's subnet cannot reach
    /// the external network (no router); the backend's failures otherwise.
    async fn associate(&self, request: &FloatingIpRequest) -> Result<FloatingIp, IpamError>;

    /// Gives up what `hold` says per its policy: [`FloatingIpPolicy::Release`]
    /// deletes it, [`FloatingIpPolicy::Keep`] disassociates it. Must be
    /// called before the lease goes back to a pool, or the next pod on the
    /// lease would answer on the floating IP. Something already gone, or
    /// no floating IP on the port, counts as done.
    async fn release(&self, hold: &FloatingIpHold) -> Result<(), IpamError>;

    /// The floating IPs of this node or cluster.
    async fn list(&self, scope: &ListScope) -> Result<Vec<FloatingIp>, IpamError>;

    /// Deletes one floating IP whatever its policy (the cluster's
    /// teardown); an unknown id is [`IpamError::NotFound`].
    async fn delete(&self, id: &str) -> Result<(), IpamError>;

    /// Deletes the floating IPs of `scope` that nobody will use again:
    /// unassociated ones under [`FloatingIpPolicy::Release`] (their port was
    /// deleted under them, or a DEL stopped half-way). Returns them.
    async fn sweep(&self, scope: &ListScope) -> Result<Vec<FloatingIp>, IpamError> {
        let mut swept = Vec::new();
        for floating in self.list(scope).await? {
            if floating.port.is_some() || floating.policy != FloatingIpPolicy::Release {
                continue;
            }
            match self.delete(&floating.id).await {
                Ok(()) | Err(IpamError::NotFound(_)) => swept.push(floating),
                Err(error) => return Err(error),
            }
        }
        Ok(swept)
    }
}

/// Floating IPs from one external network in memory, for tests: every
/// network name is accepted and served from the same range.
#[derive(Debug)]
pub struct MemoryFloatingIps {
    range: IpNet,
    held: Mutex<BTreeMap<String, (FloatingIp, String)>>,
    next_id: Mutex<u64>,
}

impl MemoryFloatingIps {
    /// A provider handing out `range`'s host addresses in order.
    pub fn new(range: IpNet) -> Self {
        MemoryFloatingIps {
            range,
            held: Mutex::default(),
            next_id: Mutex::new(0),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (FloatingIp, String)>> {
        // Each change below is one insert, remove or field update.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every floating IP held now, whatever its node.
    pub fn all(&self) -> Vec<FloatingIp> {
        self.held()
            .values()
            .map(|(floating, _)| floating.clone())
            .collect()
    }

    /// The port `id` is deleted under its floating IPs: as Neutron does,
    /// they are disassociated.
    pub fn port_deleted(&self, id: &str) {
        for (floating, _) in self.held().values_mut() {
            if floating.port.as_deref() == Some(id) {
                floating.port = None;
            }
        }
    }
}

#[async_trait::async_trait]
impl FloatingIpProvider for MemoryFloatingIps {
    async fn associate(&self, request: &FloatingIpRequest) -> Result<FloatingIp, IpamError> {
        let mut held = self.held();
        let mine = held
            .values_mut()
            .filter(|(floating, _)| floating.pod.as_deref() == Some(request.pod.as_str()));
        let mut kept = None;
        for (floating, node) in mine {
            let keeps = floating.policy == FloatingIpPolicy::Keep;
            match &floating.port {
                Some(port) if *port == request.port => return Ok(floating.clone()),
                Some(port) if keeps && request.policy == FloatingIpPolicy::Keep => {
                    return Err(IpamError::Conflict(format!(
                        "floating IP {} of pod {} is associated with port {port}",
                        floating.address, request.pod
                    )));
                }
                None if keeps => kept = Some((floating, node)),
                _ => {}
            }
        }
        if let Some((floating, node)) = kept {
            floating.port = Some(request.port.clone());
            floating.policy = request.policy;
            node.clone_from(&request.node);
            return Ok(floating.clone());
        }
        let used: Vec<IpAddr> = held
            .values()
            .map(|(floating, _)| floating.address)
            .collect();
        let address = self
            .range
            .hosts()
            .find(|address| !used.contains(address))
            .ok_or_else(|| IpamError::Exhausted {
                subnet: self.range.to_string(),
            })?;
        let id = {
            let mut next = self
                .next_id
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *next += 1;
            format!("fip-{next}")
        };
        let floating = FloatingIp {
            id: id.clone(),
            address,
            network: request.network.clone(),
            port: Some(request.port.clone()),
            pod: Some(request.pod.clone()),
            policy: request.policy,
        };
        held.insert(id, (floating.clone(), request.node.clone()));
        Ok(floating)
    }

    async fn release(&self, hold: &FloatingIpHold) -> Result<(), IpamError> {
        let mut held = self.held();
        let ids: Vec<String> = held
            .values()
            .filter(|(floating, _)| match &hold.id {
                Some(id) => floating.id == *id,
                None => floating.port.as_deref() == Some(hold.port.as_str()),
            })
            .map(|(floating, _)| floating.id.clone())
            .collect();
        for id in ids {
            match hold.policy {
                FloatingIpPolicy::Release => {
                    held.remove(&id);
                }
                FloatingIpPolicy::Keep => {
                    if let Some((floating, _)) = held.get_mut(&id) {
                        floating.port = None;
                    }
                }
            }
        }
        Ok(())
    }

    async fn list(&self, scope: &ListScope) -> Result<Vec<FloatingIp>, IpamError> {
        Ok(self
            .held()
            .values()
            .filter(|(_, node)| match scope {
                ListScope::Node(wanted) => node == wanted,
                ListScope::Cluster => true,
            })
            .map(|(floating, _)| floating.clone())
            .collect())
    }

    async fn delete(&self, id: &str) -> Result<(), IpamError> {
        self.held()
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| IpamError::NotFound(format!("floating IP {id}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pod: &str, port: &str, policy: FloatingIpPolicy) -> FloatingIpRequest {
        FloatingIpRequest {
            network: "public".into(),
            port: port.into(),
            fixed_address: "10.0.0.5".parse().unwrap(),
            pod: pod.into(),
            node: "node-1".into(),
            policy,
        }
    }

    #[tokio::test]
    async fn a_retry_reuses_keep_comes_back_and_release_deletes() {
        let provider = MemoryFloatingIps::new("203.0.113.0/29".parse().unwrap());
        let first = provider
            .associate(&request("default/web-0", "p1", FloatingIpPolicy::Keep))
            .await
            .unwrap();
        let again = provider
            .associate(&request("default/web-0", "p1", FloatingIpPolicy::Keep))
            .await
            .unwrap();
        assert_eq!(first, again, "a retried ADD gets the same floating IP");
        let busy = provider
            .associate(&request("default/web-0", "p2", FloatingIpPolicy::Keep))
            .await;
        assert!(matches!(busy, Err(IpamError::Conflict(_))), "{busy:?}");

        let hold = FloatingIpHold {
            port: "p1".into(),
            id: Some(first.id.clone()),
            address: Some(first.address),
            policy: FloatingIpPolicy::Keep,
        };
        provider.release(&hold).await.unwrap();
        assert_eq!(provider.all()[0].port, None, "kept, disassociated");
        let back = provider
            .associate(&request("default/web-0", "p2", FloatingIpPolicy::Keep))
            .await
            .unwrap();
        assert_eq!(
            (back.id.as_str(), back.address, back.port.as_deref()),
            (first.id.as_str(), first.address, Some("p2"))
        );

        let other = provider
            .associate(&request("default/api", "p3", FloatingIpPolicy::Release))
            .await
            .unwrap();
        assert_ne!(other.address, first.address);
        // A pod that releases its floating IP does not wait for its earlier
        // sandbox's: it gets another.
        let next = provider
            .associate(&request("default/api", "p4", FloatingIpPolicy::Release))
            .await
            .unwrap();
        assert_ne!(next.id, other.id);
        provider
            .release(&FloatingIpHold {
                port: "p4".into(),
                id: Some(next.id),
                address: None,
                policy: FloatingIpPolicy::Release,
            })
            .await
            .unwrap();
        provider
            .release(&FloatingIpHold {
                port: "p3".into(),
                id: None,
                address: None,
                policy: FloatingIpPolicy::Release,
            })
            .await
            .unwrap();
        assert_eq!(provider.all().len(), 1, "found by its port and deleted");
    }

    #[tokio::test]
    async fn the_sweep_deletes_only_unassociated_released_ones() {
        let provider = MemoryFloatingIps::new("203.0.113.0/29".parse().unwrap());
        let released = provider
            .associate(&request("default/a", "p1", FloatingIpPolicy::Release))
            .await
            .unwrap();
        provider
            .associate(&request("default/b", "p2", FloatingIpPolicy::Keep))
            .await
            .unwrap();
        provider
            .associate(&request("default/c", "p3", FloatingIpPolicy::Release))
            .await
            .unwrap();
        provider.port_deleted("p1");
        provider.port_deleted("p2");
        let swept = provider.sweep(&ListScope::Cluster).await.unwrap();
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].id, released.id);
        assert_eq!(provider.all().len(), 2, "kept and associated ones stay");
        assert_eq!(
            "keep".parse::<FloatingIpPolicy>(),
            Ok(FloatingIpPolicy::Keep)
        );
        assert!("forever".parse::<FloatingIpPolicy>().is_err());
    }
}
