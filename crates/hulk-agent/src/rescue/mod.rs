//! The rescue API: what an operator (through `hulkctl`) uses to inspect
//! and repair a node. It has its own socket, so it answers while the
//! plugin's request slots are all taken, and every request that changes
//! something writes one audit line (target `hulk_audit`) naming the peer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hulk_agent_api::Exchange;
use hulk_ipam::{AttachmentId, Owner, PoolKey};
use hulk_netns::{Kernel, NftFinding, NodeState};
use hulk_pool::{AddressRecord, OrphanSweep, PoolStats};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use hulk_node::attachments::AttachmentRecord;
use hulk_node::{Node, NodeError};

use crate::server::{LineService, Peer};

mod render;

/// What an operator asks. With the `clap` feature it is also the
/// subcommand of a CLI: these comments are its help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Subcommand))]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RescueRequest {
    /// A summary: node, backend, degraded or drained pools, datapath health.
    Status,
    /// Every pool with its counts.
    Pools,
    /// Every address the node holds, or those of one subnet.
    Leases {
        /// Only this subnet's.
        #[cfg_attr(feature = "clap", arg(long))]
        subnet: Option<String>,
    },
    /// Every attachment the agent recorded: container and interface, its
    /// sandbox (netns path), CNI network, pod, phase and address.
    Attachments,
    /// The node-level datapath against what it should be, and nftables
    /// chains that can shadow kube-proxy.
    Node,
    /// Release the address a pod holds (a pod gone without CNI DEL).
    Release {
        /// The address.
        address: IpAddr,
    },
    /// Return a subnet's idle addresses to the cloud and stop refilling it.
    Drain {
        /// The subnet.
        subnet: String,
    },
    /// Resume a drained subnet and refill it now.
    Refill {
        /// The subnet.
        subnet: String,
    },
    /// Re-apply the node-level network configuration.
    Reapply,
    /// Run a GC pass and an orphan sweep now.
    Gc,
}

impl RescueRequest {
    /// Whether the request changes anything (and is audited).
    pub fn changes_state(&self) -> bool {
        matches!(
            self,
            RescueRequest::Release { .. }
                | RescueRequest::Drain { .. }
                | RescueRequest::Refill { .. }
                | RescueRequest::Reapply
                | RescueRequest::Gc
        )
    }
}

/// A summary of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The node's name.
    pub node: String,
    /// The IPAM backend's name.
    pub backend: String,
    /// Addresses held by pods.
    pub assigned: usize,
    /// Subnets whose pool is degraded.
    pub degraded: Vec<String>,
    /// Subnets an operator drained.
    pub draining: Vec<String>,
    /// Whether the node-level datapath needs no repair.
    pub datapath_healthy: bool,
}

/// One pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    /// Its key.
    pub key: PoolKey,
    /// Its counts.
    pub stats: PoolStats,
}

/// The node-level datapath.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// The VPC-facing parent interface.
    pub parent: String,
    /// The host-side slave.
    pub host_link: String,
    /// The node address on it.
    pub node_address: IpNet,
    /// Service ranges routed from pods to the node.
    pub service_cidrs: Vec<IpNet>,
    /// What was found.
    pub state: NodeState,
    /// nftables chains that can shadow kube-proxy's rules; `None` when
    /// `nft` is not installed.
    pub nftables: Option<Vec<NftFinding>>,
    /// Why nftables could not be read, if so.
    pub nftables_error: Option<String>,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RescueReply {
    /// For [`RescueRequest::Status`].
    Status(AgentStatus),
    /// For [`RescueRequest::Pools`].
    Pools {
        /// The pools.
        pools: Vec<PoolView>,
    },
    /// For [`RescueRequest::Leases`].
    Leases {
        /// The addresses, ordered.
        leases: Vec<AddressRecord>,
    },
    /// For [`RescueRequest::Attachments`].
    Attachments {
        /// The records, ordered by container and interface.
        attachments: Vec<AttachmentRecord>,
    },
    /// For [`RescueRequest::Node`].
    Node(NodeView),
    /// For [`RescueRequest::Release`].
    Released {
        /// Who held the address.
        owner: Owner,
    },
    /// For [`RescueRequest::Drain`].
    Drained {
        /// Addresses returned to the backend.
        returned: usize,
    },
    /// For [`RescueRequest::Refill`].
    Refilled {
        /// Addresses allocated.
        allocated: usize,
        /// The backend's refusal, if it refused.
        error: Option<String>,
    },
    /// For [`RescueRequest::Reapply`].
    Reapplied(hulk_node::Reapplied),
    /// For [`RescueRequest::Gc`].
    Collected {
        /// Assignments released (their pod missing on two passes).
        released: Vec<Owner>,
        /// Assignments whose pod is missing now: released on the next
        /// pass if still missing.
        suspected: Vec<Owner>,
        /// What became of backend addresses of this node the agent did not
        /// know.
        orphans: OrphanSweep,
        /// Whether pods were checked (needs the Kubernetes API).
        pods_checked: bool,
        /// Attachments torn down because their sandbox is gone (judged on
        /// two passes in a row).
        #[serde(default)]
        sandboxes_gone: Vec<AttachmentId>,
        /// Holders without an attachment record whose address no
        /// interface in the node's namespaces held on two passes in a
        /// row, released.
        #[serde(default)]
        unheld_released: Vec<Owner>,
        /// DELs the plugin noted while the agent was down, done now.
        #[serde(default)]
        del_notes_replayed: usize,
    },
    /// The request failed.
    Failed {
        /// Why.
        message: String,
    },
}

/// The rescue API of a node.
#[derive(Debug)]
pub struct RescueService<K> {
    node: Arc<Node<K>>,
}

fn failed(message: impl std::fmt::Display) -> RescueReply {
    RescueReply::Failed {
        message: message.to_string(),
    }
}

/// The failure `error`, with its causes: an operator reads the errno or
/// the refused connection, not only the summary.
fn failed_because(error: &(dyn std::error::Error + 'static)) -> RescueReply {
    failed(hulk_cni::describe(error))
}

impl<K: Kernel + 'static> RescueService<K> {
    /// The rescue API of `node`.
    pub fn new(node: Arc<Node<K>>) -> Self {
        RescueService { node }
    }

    /// The pools of `subnet`, or why there are none (naming the known subnets).
    fn pools_of(&self, subnet: &str) -> Result<Vec<PoolKey>, String> {
        let keys = self.node.pools().keys();
        let matching: Vec<PoolKey> = keys
            .iter()
            .filter(|key| key.subnet == subnet)
            .cloned()
            .collect();
        if matching.is_empty() {
            let mut known: Vec<&str> = keys.iter().map(|key| key.subnet.as_str()).collect();
            known.sort_unstable();
            known.dedup();
            return Err(format!(
                "no pool for subnet {subnet:?}; known: {}",
                known.join(", ")
            ));
        }
        Ok(matching)
    }

    async fn status(&self) -> RescueReply {
        let pools = self.node.pools();
        let (mut degraded, mut draining, mut assigned) = (Vec::new(), Vec::new(), 0);
        for key in pools.keys() {
            let stats = pools.stats(&key);
            assigned += stats.assigned;
            if stats.degraded {
                degraded.push(key.subnet.clone());
            }
            if stats.draining {
                draining.push(key.subnet);
            }
        }
        let datapath_healthy = match self.node.inspect().await {
            Ok(state) => state.is_healthy(),
            Err(error) => return failed_because(&error),
        };
        RescueReply::Status(AgentStatus {
            node: pools.node_name().to_owned(),
            backend: pools.backend_name().to_owned(),
            assigned,
            degraded,
            draining,
            datapath_healthy,
        })
    }

    async fn node_view(&self) -> RescueReply {
        let state = match self.node.inspect().await {
            Ok(state) => state,
            Err(error) => return failed_because(&error),
        };
        let (nftables, nftables_error) = match hulk_node::nftables_shadowing().await {
            Ok(findings) => (findings, None),
            Err(error) => (None, Some(error)),
        };
        let network = self.node.network();
        RescueReply::Node(NodeView {
            parent: network.parent.clone(),
            host_link: network.host_link.clone(),
            node_address: network.node_address,
            service_cidrs: network.service_cidrs.clone(),
            state,
            nftables,
            nftables_error,
        })
    }

    async fn gc(&self) -> Result<RescueReply, NodeError> {
        let del_notes_replayed = self.node.replay_del_notes().await;
        let sandboxes_gone = self.node.collect_gone_sandboxes().await?;
        let unheld_released = self.node.collect_unproven_addresses().await?;
        let report = self.node.collect_dead_pods().await?;
        let orphans = self.node.pools().sweep_orphans().await?;
        Ok(RescueReply::Collected {
            released: report.released,
            suspected: report.suspected,
            orphans,
            pods_checked: self.node.has_pods(),
            sandboxes_gone,
            unheld_released,
            del_notes_replayed,
        })
    }

    async fn answer(&self, request: RescueRequest) -> RescueReply {
        let pools = self.node.pools();
        let outcome: Result<RescueReply, NodeError> = match request {
            RescueRequest::Status => return self.status().await,
            RescueRequest::Pools => {
                let mut views: Vec<PoolView> = pools
                    .keys()
                    .into_iter()
                    .map(|key| PoolView {
                        stats: pools.stats(&key),
                        key,
                    })
                    .collect();
                views.sort_by(|a, b| a.key.subnet.cmp(&b.key.subnet));
                return RescueReply::Pools { pools: views };
            }
            RescueRequest::Leases { subnet } => {
                let leases = pools
                    .records()
                    .into_iter()
                    .filter(|record| subnet.as_ref().is_none_or(|s| record.key.subnet == *s))
                    .collect();
                return RescueReply::Leases { leases };
            }
            RescueRequest::Attachments => {
                return RescueReply::Attachments {
                    attachments: self.node.attachments().all(),
                };
            }
            RescueRequest::Node => return self.node_view().await,
            RescueRequest::Release { address } => match self.node.release_address(address).await {
                Ok(Some(owner)) => Ok(RescueReply::Released { owner }),
                Ok(None) => return failed(format!("no pod holds {address}")),
                Err(error) => Err(error),
            },
            RescueRequest::Drain { subnet } => {
                let keys = match self.pools_of(&subnet) {
                    Ok(keys) => keys,
                    Err(message) => return failed(message),
                };
                let mut returned = 0;
                for key in keys {
                    match pools.drain(&key).await {
                        Ok(count) => returned += count,
                        Err(error) => return failed_because(&error),
                    }
                }
                Ok(RescueReply::Drained { returned })
            }
            RescueRequest::Refill { subnet } => {
                let keys = match self.pools_of(&subnet) {
                    Ok(keys) => keys,
                    Err(message) => return failed(message),
                };
                let (mut allocated, mut refused) = (0, None);
                for key in keys {
                    match pools.resume(&key).await {
                        Ok(outcome) => {
                            allocated += outcome.allocated;
                            refused = refused.or(outcome.error.map(|error| error.to_string()));
                        }
                        Err(error) => return failed_because(&error),
                    }
                }
                Ok(RescueReply::Refilled {
                    allocated,
                    error: refused,
                })
            }
            RescueRequest::Reapply => self.node.reapply().await.map(RescueReply::Reapplied),
            RescueRequest::Gc => self.gc().await,
        };
        outcome.unwrap_or_else(failed)
    }
}

impl<K: Kernel + 'static> LineService for RescueService<K> {
    type Request = RescueRequest;
    type Reply = RescueReply;

    async fn handle(&self, request: RescueRequest, peer: Peer) -> RescueReply {
        let audited = request.changes_state().then(|| request.clone());
        let reply = self.answer(request).await;
        if let Some(request) = audited {
            let outcome = serde_json::to_string(&reply).unwrap_or_default();
            let request = serde_json::to_string(&request).unwrap_or_default();
            tracing::info!(
                target: "hulk_audit",
                %peer,
                %request,
                %outcome,
                "rescue request"
            );
        }
        reply
    }

    fn unreadable(&self, error: serde_json::Error) -> RescueReply {
        failed(format!("unreadable rescue request: {error}"))
    }

    fn timed_out(&self, after: Duration) -> RescueReply {
        failed(format!("the agent did not finish within {after:?}"))
    }

    fn refused(&self, peer: Peer) -> RescueReply {
        failed(format!("the agent does not serve {peer} on this socket"))
    }
}

impl Exchange for RescueRequest {
    type Reply = RescueReply;
}
