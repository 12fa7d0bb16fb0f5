//! Floating IPs: associated at ADD once the address is assigned (the
//! intent recorded first, so a crash mid-call leaves something to give
//! up), given up per their policy at teardown before the address goes
//! back to the pool, and swept with the node's orphans.

use hulk_ipam::{FloatingIpHold, FloatingIpRequest, ListScope};

use super::*;

impl<K: Kernel> Node<K> {
    /// The floating IP `request`'s pod asks for (external network and
    /// policy): its annotations (`pod`, [`Node::pod_of`]) over the node's
    /// setting. A pod asking on a node without a provider is refused.
    pub(crate) fn floating_ip_wanted(
        &self,
        request: &PodRequest,
        pod: Option<&PodInfo>,
    ) -> Result<Option<(String, FloatingIpPolicy)>, NodeError> {
        let default = match &self.floating_ips {
            Some(floating_ips) => (floating_ips.network.as_deref(), floating_ips.policy),
            None => (None, FloatingIpPolicy::default()),
        };
        let wanted = match pod {
            Some(pod) => pod
                .floating_ip(default)
                .map_err(NodeError::InvalidRequest)?,
            None => default.0.map(|network| (network.to_owned(), default.1)),
        };
        if wanted.is_some() && self.floating_ips.is_none() {
            return Err(NodeError::InvalidRequest(format!(
                "pod {} asks for a floating IP, but this node's backend has no floating IPs",
                request.owner.pod.as_deref().unwrap_or_default()
            )));
        }
        Ok(wanted)
    }

    /// Associates the floating IP the pod asks for, if any, with `lease`:
    /// the intent goes in the record first (the port, no id yet), then the
    /// floating IP's id once associated. A failure is the caller's to undo
    /// (the teardown gives up whatever the port holds).
    pub(crate) async fn attach_floating_ip(
        &self,
        request: &PodRequest,
        pod: Option<&PodInfo>,
        lease: &Lease,
        record: &mut AttachmentRecord,
    ) -> Result<(), NodeError> {
        let Some((network, policy)) = self.floating_ip_wanted(request, pod)? else {
            return Ok(());
        };
        let Some(floating_ips) = &self.floating_ips else {
            return Ok(());
        };
        record.floating_ip = Some(FloatingIpHold {
            port: lease.id.clone(),
            id: None,
            address: None,
            policy,
        });
        self.attachments.put(record.clone())?;
        // Without a pod name (a runtime other than Kubernetes), the
        // attachment names it: such a floating IP cannot be kept for a
        // next pod of the same name.
        let pod = request
            .owner
            .pod
            .clone()
            .unwrap_or_else(|| request.attachment_id().to_string());
        let floating = floating_ips
            .provider
            .associate(&FloatingIpRequest {
                network,
                port: lease.id.clone(),
                fixed_address: lease.address.addr(),
                pod,
                node: lease.node.clone(),
                policy,
            })
            .await
            .map_err(|source| NodeError::FloatingIp {
                action: "associate",
                source,
            })?;
        tracing::info!(
            attachment = %request.attachment_id(),
            floating_ip = %floating.address,
            %policy,
            "floating IP associated"
        );
        record.floating_ip = Some(FloatingIpHold {
            port: lease.id.clone(),
            id: Some(floating.id),
            address: Some(floating.address),
            policy,
        });
        self.attachments.put(record.clone())?;
        Ok(())
    }

    /// Gives up the record's floating IP per its policy (deleted or
    /// disassociated), before the address goes back to the pool where the
    /// next pod would answer on it. A node that lost its provider
    /// (configuration changed) refuses, so the address is kept until an
    /// operator restores it.
    pub(crate) async fn release_floating_ip(
        &self,
        record: &AttachmentRecord,
    ) -> Result<(), NodeError> {
        let Some(hold) = &record.floating_ip else {
            return Ok(());
        };
        let Some(floating_ips) = &self.floating_ips else {
            return Err(NodeError::FloatingIp {
                action: "give up",
                source: IpamError::InvalidRequest(
                    "the attachment holds a floating IP but the node has no floating IP \
                     provider any more; configure it again"
                        .into(),
                ),
            });
        };
        floating_ips
            .provider
            .release(hold)
            .await
            .map_err(|source| NodeError::FloatingIp {
                action: "give up",
                source,
            })
    }

    /// Deletes this node's floating IPs nobody will use again (released
    /// ones whose port is gone, [`FloatingIpProvider::sweep`]); returns how
    /// many. Nothing without a provider.
    pub async fn sweep_floating_ips(&self) -> Result<usize, NodeError> {
        let Some(floating_ips) = &self.floating_ips else {
            return Ok(0);
        };
        let swept = floating_ips
            .provider
            .sweep(&ListScope::Node(self.pools.node_name().to_owned()))
            .await
            .map_err(|source| NodeError::FloatingIp {
                action: "sweep",
                source,
            })?;
        for floating in &swept {
            tracing::info!(floating_ip = %floating.address, id = %floating.id, "swept a floating IP whose port is gone");
        }
        Ok(swept.len())
    }
}
