//! CHECK: the interface is still as ADD built it.

use super::*;

impl<K: Kernel> Node<K> {
    /// CHECK: the interface is as ADD built it, in the sandbox ADD built
    /// it in. Returns what is there, for a comparison with the runtime's
    /// `prevResult`.
    pub async fn check(&self, request: &PodRequest) -> Result<PodAttachment, NodeError> {
        let netns = request.netns.as_deref().ok_or_else(|| {
            NodeError::InvalidRequest("CHECK needs the pod's network namespace".into())
        })?;
        let id = request.attachment_id();
        let _turn = self.serializer.turn(&id).await;
        if let Some(record) = self.attachments.get(&id) {
            let found = self.sandbox_identity(netns).await?;
            if record.netns_id.is_some_and(|recorded| recorded != found) {
                return Err(DatapathError::Mismatch(vec![format!(
                    "{} is not the sandbox {id} was added to",
                    netns.display()
                )])
                .into());
            }
            if record.phase != Phase::Ready {
                return Err(DatapathError::Mismatch(vec![format!(
                    "the ADD of {id} did not finish"
                )])
                .into());
            }
        }
        let lease = self.pools.lease_of(&request.owner.clone()).ok_or_else(|| {
            NodeError::InvalidRequest(format!(
                "no address is assigned to {}/{}",
                request.owner.container_id, request.owner.ifname
            ))
        })?;
        let mac = self.requested_mac(request).await?;
        let spec = self.pod_network(request, &lease, mac)?;
        let found = self.datapath.check(netns, &spec).await?;
        let mut checked = PodAttachment::of(lease, &found);
        // The routes as ADD chose them (metrics included), when recorded.
        if let Some(created) = self.attachments.get(&id).and_then(|record| record.created) {
            checked.routes = created.routes;
        }
        Ok(checked)
    }
}
