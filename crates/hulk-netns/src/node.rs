//! Node-level state: the host-side slave that carries Service and
//! host <-> pod traffic, the host routes to local pods, and restoring all
//! of it after a reboot.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::attach::{Datapath, DatapathError, ServicePath};
use crate::kernel::{Kernel, LinkUpdate, Route, SlaveKind};

/// The node's side of the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNetwork {
    /// The VPC-facing parent interface.
    pub parent: String,
    /// The slave kind, the same as the pods' (an ipvlan L2 pod and an
    /// ipvlan L2 host slave switch to each other inside the driver).
    pub kind: SlaveKind,
    /// The host-side slave's name, e.g. `hulk0`.
    pub host_link: String,
    /// The node address on the host-side slave. With the subnet's prefix
    /// the host reaches the whole VPC subnet through it; with /32 only the
    /// local pods (through the per-pod routes).
    pub node_address: IpNet,
    /// Service ranges routed from pods to the node.
    pub service_cidrs: Vec<IpNet>,
}

impl NodeNetwork {
    /// The Service path pods on this node use.
    pub fn service_path(&self) -> ServicePath {
        ServicePath {
            host_link: self.host_link.clone(),
            node_address: self.node_address.addr(),
            service_cidrs: self.service_cidrs.clone(),
        }
    }

    /// The sysctls the node needs: forwarding (a pod's Service traffic is
    /// DNATed and forwarded by the host) and loose reverse-path filtering
    /// on the host-side slave, where pod-sourced packets arrive.
    pub fn sysctls(&self) -> Vec<(String, &'static str)> {
        vec![
            ("net/ipv4/ip_forward".to_owned(), "1"),
            (format!("net/ipv4/conf/{}/rp_filter", self.host_link), "2"),
        ]
    }
}

/// What [`Datapath::restore_node`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreReport {
    /// Host routes (re)installed for live pods.
    pub routes_installed: usize,
    /// Host routes removed because their pod is gone.
    pub stale_routes_removed: Vec<IpNet>,
}

/// The node-level datapath as found, against what it should be: what
/// [`Datapath::restore_node`] would repair.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeState {
    /// The host-side slave exists as the configured kind.
    pub host_link_present: bool,
    /// The host-side slave is up.
    pub host_link_up: bool,
    /// The node address is on the host-side slave.
    pub node_address_present: bool,
    /// Pods holding an address with no host route.
    pub missing_routes: Vec<IpNet>,
    /// Host routes to pods that hold no address any more.
    pub stale_routes: Vec<IpNet>,
}

impl NodeState {
    /// Whether nothing needs repair.
    pub fn is_healthy(&self) -> bool {
        self.host_link_present
            && self.host_link_up
            && self.node_address_present
            && self.missing_routes.is_empty()
            && self.stale_routes.is_empty()
    }
}

fn is_host_prefix(net: &IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// The host routes on the host-side slave to pods not in `wanted`.
fn stale_pod_routes<'a>(
    routes: &'a [Route],
    node: &'a NodeNetwork,
    wanted: &'a BTreeSet<IpNet>,
) -> impl Iterator<Item = &'a Route> {
    routes.iter().filter(move |route| {
        route.gateway.is_none()
            && is_host_prefix(&route.dst)
            && route.dst.addr() != node.node_address.addr()
            && !wanted.contains(&route.dst)
    })
}

impl<K: Kernel> Datapath<K> {
    /// Creates (or keeps) the host-side slave with the node address, up,
    /// with the node sysctls. Idempotent.
    pub async fn ensure_host_slave(&self, node: &NodeNetwork) -> Result<(), DatapathError> {
        let kernel = self.kernel();
        let host = kernel.host();
        match kernel.link(host, &node.host_link).await? {
            Some(link) if link.slave == Some(node.kind) => {}
            Some(link) => {
                return Err(DatapathError::Invalid(format!(
                    "{} exists but is {}, expected {}; delete it or pick another host link name",
                    node.host_link,
                    link.kind_description(),
                    node.kind
                )));
            }
            None => match kernel
                .create_slave(&node.parent, &node.host_link, node.kind, host)
                .await
            {
                Err(crate::KernelError::LinkNotFound(name)) if name == node.parent => {
                    return Err(DatapathError::ParentNotFound(name));
                }
                other => other?,
            },
        }
        kernel
            .add_address(host, &node.host_link, node.node_address)
            .await?;
        let up = LinkUpdate {
            up: true,
            ..LinkUpdate::default()
        };
        kernel.update_link(host, &node.host_link, &up).await?;
        for (key, value) in node.sysctls() {
            kernel.write_sysctl(host, &key, value).await?;
        }
        Ok(())
    }

    /// Re-applies all node-level state after a reboot or an agent restart:
    /// the host-side slave, its address, the sysctls, and a host route for
    /// each pod in `live_pods`; host routes to pods no longer live are
    /// removed. Idempotent.
    pub async fn restore_node(
        &self,
        node: &NodeNetwork,
        live_pods: &[IpAddr],
    ) -> Result<RestoreReport, DatapathError> {
        self.ensure_host_slave(node).await?;
        let kernel = self.kernel();
        let host = kernel.host();
        let wanted: BTreeSet<IpNet> = live_pods.iter().copied().map(IpNet::from).collect();
        let mut report = RestoreReport::default();
        let routes = kernel.routes(host, &node.host_link).await?;
        for route in stale_pod_routes(&routes, node, &wanted) {
            if kernel.delete_route(host, route).await? {
                report.stale_routes_removed.push(route.dst);
            }
        }
        for pod in &wanted {
            kernel
                .replace_route(host, &Route::direct(*pod, &node.host_link))
                .await?;
            report.routes_installed += 1;
        }
        Ok(report)
    }

    /// Observes the node-level datapath and compares it with what `node`
    /// and the pods holding `live_pods` need. Changes nothing.
    pub async fn inspect_node(
        &self,
        node: &NodeNetwork,
        live_pods: &[IpAddr],
    ) -> Result<NodeState, DatapathError> {
        let kernel = self.kernel();
        let host = kernel.host();
        let Some(link) = kernel.link(host, &node.host_link).await? else {
            return Ok(NodeState {
                missing_routes: live_pods.iter().copied().map(IpNet::from).collect(),
                ..NodeState::default()
            });
        };
        let wanted: BTreeSet<IpNet> = live_pods.iter().copied().map(IpNet::from).collect();
        let routes = kernel.routes(host, &node.host_link).await?;
        let routed: BTreeSet<IpNet> = routes
            .iter()
            .filter(|route| route.gateway.is_none())
            .map(|route| route.dst)
            .collect();
        let addresses = kernel.addresses(host, &node.host_link).await?;
        Ok(NodeState {
            host_link_present: link.slave == Some(node.kind),
            host_link_up: link.up,
            node_address_present: addresses.contains(&node.node_address),
            missing_routes: wanted.difference(&routed).copied().collect(),
            stale_routes: stale_pod_routes(&routes, node, &wanted)
                .map(|route| route.dst)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeKernel;
    use crate::kernel::{MacVlanMode, SlaveKind};

    fn node() -> NodeNetwork {
        NodeNetwork {
            parent: "eth1".into(),
            kind: SlaveKind::default(),
            host_link: "hulk0".into(),
            node_address: "10.20.0.250/24".parse().unwrap(),
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        }
    }

    fn datapath() -> Datapath<FakeKernel> {
        let kernel = FakeKernel::new();
        kernel.add_parent("eth1", 1500);
        Datapath::new(kernel)
    }

    #[tokio::test]
    async fn the_host_slave_is_created_once_with_address_and_sysctls() {
        let datapath = datapath();
        for _ in 0..2 {
            datapath.ensure_host_slave(&node()).await.unwrap();
        }
        let host = datapath.kernel().host_namespace();
        let hulk0 = &host.links["hulk0"];
        assert_eq!(hulk0.link.slave, Some(SlaveKind::default()));
        assert!(hulk0.link.up);
        assert_eq!(hulk0.addresses, [node().node_address]);
        assert_eq!(host.sysctls["net/ipv4/ip_forward"], "1");
        assert_eq!(host.sysctls["net/ipv4/conf/hulk0/rp_filter"], "2");
    }

    #[tokio::test]
    async fn a_foreign_link_under_the_host_name_is_reported_not_replaced() {
        let datapath = datapath();
        let mut macvlan = node();
        macvlan.kind = SlaveKind::MacVlan {
            mode: MacVlanMode::Bridge,
        };
        datapath.ensure_host_slave(&macvlan).await.unwrap();
        let error = datapath.ensure_host_slave(&node()).await.unwrap_err();
        assert!(
            error.to_string().contains("hulk0 exists but is macvlan"),
            "{error}"
        );
        let mut no_parent = node();
        no_parent.parent = "eth7".into();
        no_parent.host_link = "hulk1".into();
        assert!(matches!(
            datapath.ensure_host_slave(&no_parent).await,
            Err(DatapathError::ParentNotFound(_))
        ));
    }

    #[tokio::test]
    async fn inspection_sees_what_a_reboot_lost_and_restore_repairs_it() {
        let datapath = datapath();
        let node = node();
        let pods: Vec<IpAddr> = vec!["10.20.0.5".parse().unwrap()];
        let lost = datapath.inspect_node(&node, &pods).await.unwrap();
        assert!(!lost.is_healthy());
        assert!(!lost.host_link_present);
        assert_eq!(
            lost.missing_routes,
            ["10.20.0.5/32".parse::<IpNet>().unwrap()]
        );

        datapath.restore_node(&node, &pods).await.unwrap();
        let restored = datapath.inspect_node(&node, &pods).await.unwrap();
        assert!(restored.is_healthy(), "{restored:?}");

        let stale = datapath.inspect_node(&node, &[]).await.unwrap();
        assert_eq!(
            stale.stale_routes,
            ["10.20.0.5/32".parse::<IpNet>().unwrap()]
        );
        assert!(stale.missing_routes.is_empty());
    }

    #[tokio::test]
    async fn restore_reinstalls_live_pods_and_drops_the_dead() {
        let datapath = datapath();
        let node = node();
        datapath.ensure_host_slave(&node).await.unwrap();
        let kernel = datapath.kernel();
        let dead: IpAddr = "10.20.0.9".parse().unwrap();
        kernel
            .replace_route(kernel.host(), &Route::direct(IpNet::from(dead), "hulk0"))
            .await
            .unwrap();
        let live: Vec<IpAddr> = vec!["10.20.0.5".parse().unwrap(), "10.20.0.6".parse().unwrap()];
        let report = datapath.restore_node(&node, &live).await.unwrap();
        assert_eq!(report.routes_installed, 2);
        assert_eq!(report.stale_routes_removed, [IpNet::from(dead)]);
        assert_eq!(
            kernel.host_namespace().route_lines(),
            ["10.20.0.5/32 dev hulk0", "10.20.0.6/32 dev hulk0"]
        );

        let again = datapath.restore_node(&node, &live).await.unwrap();
        assert!(again.stale_routes_removed.is_empty());
    }

    #[tokio::test]
    async fn restore_after_a_reboot_rebuilds_everything() {
        let datapath = datapath();
        let node = node();
        let live: Vec<IpAddr> = vec!["10.20.0.5".parse().unwrap()];
        datapath.restore_node(&node, &live).await.unwrap();
        let before = datapath.kernel().host_namespace();
        // A reboot loses the host slave, its routes and the sysctls.
        let rebooted = super::tests::datapath();
        rebooted.restore_node(&node, &live).await.unwrap();
        let after = rebooted.kernel().host_namespace();
        assert_eq!(after.routes, before.routes);
        assert_eq!(after.sysctls, before.sysctls);
        assert_eq!(
            after.links["hulk0"].addresses,
            before.links["hulk0"].addresses
        );
    }
}
