//! The node-level state: inspection, STATUS, restore after a reboot or restart, an operator's reapply, gateway re-pinning.

use super::*;

impl<K: Kernel> Node<K> {
    /// The node-level datapath compared with what the pods holding
    /// addresses need.
    pub async fn inspect(&self) -> Result<NodeState, NodeError> {
        let live: Vec<IpAddr> = self.routed_addresses();
        Ok(self.datapath.inspect_node(&self.network, &live).await?)
    }

    /// STATUS: error 51 when the node-level datapath is broken (host-side
    /// slave missing or down, node address gone: existing pods lose node
    /// and Service traffic), else 50 while a pool cannot serve ADDs
    /// (degraded after the backend refused to give addresses). Per-pod
    /// host routes are left out: they are in flux while ADDs run, and a
    /// flapping STATUS would mark the node's network not ready.
    pub async fn status(&self) -> Result<(), CniError> {
        let degraded: Vec<String> = self
            .pools
            .keys()
            .into_iter()
            .filter(|key| self.pools.stats(key).degraded)
            .map(|key| key.subnet)
            .collect();
        let mut unavailable: Vec<String> = (!degraded.is_empty())
            .then(|| format!("address pools degraded: {}", degraded.join(", ")))
            .into_iter()
            .collect();
        unavailable.extend(agent_problems(&self.pools));
        let pools_degraded = (!unavailable.is_empty()).then(|| unavailable.join("; "));
        let broken = match self.inspect().await {
            Ok(state) if !state.host_link_present => {
                Some(format!("{} is missing", self.network.host_link))
            }
            Ok(state) if !state.host_link_up => Some(format!("{} is down", self.network.host_link)),
            Ok(state) if !state.node_address_present => Some(format!(
                "the node address {} is not on {}",
                self.network.node_address, self.network.host_link
            )),
            Ok(_) => None,
            Err(error) => Some(format!("cannot inspect it: {error}")),
        };
        match (broken, pools_degraded) {
            (Some(problem), degraded) => {
                let mut message = format!(
                    "the node's datapath is broken ({problem}); `hulkctl reapply` repairs it"
                );
                if let Some(degraded) = degraded {
                    message = format!("{message}; {degraded}");
                }
                Err(CniError::new(
                    ErrorCode::PluginNotAvailableLimitedConnectivity,
                    message,
                ))
            }
            (None, Some(degraded)) => Err(CniError::new(ErrorCode::PluginNotAvailable, degraded)),
            (None, None) => Ok(()),
        }
    }

    /// Re-applies the node-level datapath (host slave, sysctls, a host
    /// route per pod holding an address) after a reboot or restart, and
    /// re-pins running pods' gateway entries to what the pools now know
    /// ([`Node::repin_gateways`]). An address held without an attachment
    /// record is routed only once a live interface was found holding it
    /// ([`Node::collect_unproven_addresses`], which the agent runs just
    /// before): the node never routes to a dead predecessor's pods, and a
    /// route to an unproven address is removed as a stale one.
    pub async fn restore(&self) -> Result<Reapplied, NodeError> {
        let live: Vec<IpAddr> = self.routed_addresses();
        let node = self.datapath.restore_node(&self.network, &live).await?;
        Ok(Reapplied {
            node,
            gateways_repinned: self.repin_gateways().await,
        })
    }

    /// An operator's re-apply (`hulkctl reapply`): first what the cloud
    /// now says of this node's addresses (the orphan sweep, which
    /// refreshes lease facts such as the gateway's MAC; a cloud that does
    /// not answer is logged and what is known is applied), then
    /// [`Node::restore`].
    pub async fn reapply(&self) -> Result<Reapplied, NodeError> {
        if let Err(error) = self.pools.sweep_orphans().await {
            tracing::warn!(%error, "cannot refresh what the backend says of this node's addresses");
        }
        self.restore().await
    }

    /// Re-pins the gateway's permanent neighbour entry in every ready
    /// attachment whose pinned MAC is not the one its lease now carries
    /// (the orphan sweep refreshes lease facts from the cloud: at start,
    /// every tenth collector pass, and on `hulkctl reapply`). Each under
    /// its attachment's turn, so it never races the attachment's DEL, and
    /// only on the recorded link in the recorded sandbox; the record is
    /// updated to what is pinned. Returns how many pods were re-pinned;
    /// failures are logged and retried on the next call.
    pub async fn repin_gateways(&self) -> usize {
        let mut repinned = 0;
        for record in self.attachments.all() {
            if self.gateway_to_pin(&record).is_none() {
                continue;
            }
            let id = record.id();
            let _turn = self.serializer.turn(&id).await;
            // Judged again under the turn: a DEL or a new ADD may have
            // changed the record meanwhile.
            let Some(mut record) = self.attachments.get(&id) else {
                continue;
            };
            let Some((gateway, mac)) = self.gateway_to_pin(&record) else {
                continue;
            };
            let Some(created) = record.created.as_mut() else {
                continue;
            };
            match self
                .datapath
                .repin_gateway(&record.netns, &record.owner.ifname, created, gateway, mac)
                .await
            {
                Ok(Some(entry)) => {
                    created.neighbours.retain(|known| known.ip != gateway);
                    created.neighbours.push(entry);
                    if let Err(error) = self.attachments.put(record) {
                        tracing::warn!(attachment = %id, %error, "cannot record the re-pinned gateway");
                    }
                    tracing::info!(attachment = %id, %gateway, "gateway entry re-pinned to the MAC the cloud reports");
                    repinned += 1;
                }
                // The sandbox or its interface is gone: the liveness pass
                // and DEL take it from here.
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(attachment = %id, %error, "cannot re-pin the pod's gateway entry");
                }
            }
        }
        repinned
    }

    /// The gateway and MAC a ready attachment should have pinned, when it
    /// has another (or none) pinned: its lease's, as the pools know it.
    pub(crate) fn gateway_to_pin(&self, record: &AttachmentRecord) -> Option<(IpAddr, MacAddr)> {
        if record.phase != Phase::Ready {
            return None;
        }
        let created = record.created.as_ref()?;
        let lease = self.pools.lease_of(&record.owner)?;
        let gateway = lease.gateway?;
        let mac = lease.gateway_mac?;
        let pinned = created
            .neighbours
            .iter()
            .find(|entry| entry.ip == gateway)
            .and_then(|entry| entry.mac);
        (pinned != Some(mac)).then_some((gateway, mac))
    }
}
