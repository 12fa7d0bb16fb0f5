//! DEL: cancels an ADD in progress, then tears down exactly what the record says, in the recorded sandbox only, and returns the address.

use super::*;

impl<K: Kernel> Node<K> {
    /// DEL: cancels an ADD of the same attachment still in progress, waits
    /// for it, then undoes exactly what ADD recorded: the host route, the
    /// interface in the recorded sandbox (only if that namespace is still
    /// there and still the same one, and only the link ADD built), the
    /// address and the record. The request's own `CNI_NETNS` is not
    /// trusted over the record. Without a record, only an address the pool
    /// still assigns to this attachment (from before records existed) is
    /// torn down, and only an ipvlan or macvlan slave is removed; with
    /// neither, nothing here is ours and nothing is touched. Whatever is
    /// already gone counts as done, so DEL can be repeated.
    pub async fn del(&self, request: &PodRequest) -> Result<(), NodeError> {
        let id = request.attachment_id();
        if self.serializer.cancel_add(&id) {
            tracing::info!(attachment = %id, "DEL during ADD: the ADD is cancelled and undone");
        }
        let _turn = self.serializer.turn(&id).await;
        match self.attachments.get(&id) {
            Some(record) => self.teardown(&record, PodSide::Recorded).await,
            None => self.del_unrecorded(request).await,
        }
    }

    pub(crate) async fn del_unrecorded(&self, request: &PodRequest) -> Result<(), NodeError> {
        let owner = request.owner.clone();
        let Some(held) = self.pools.lease_of(&owner) else {
            return Ok(());
        };
        let host_route = self.host_route(held.address.addr());
        self.datapath
            .detach_owned(
                request.netns.as_deref(),
                &request.owner.ifname,
                Ownership::Unrecorded,
                Some(&host_route),
            )
            .await?;
        self.release_everywhere(&owner).await
    }

    /// The host's route to a pod address through the host-side slave.
    pub(crate) fn host_route(&self, address: IpAddr) -> hulk_netns::Route {
        hulk_netns::Route::direct(ipnet::IpNet::from(address), &self.network.host_link)
    }

    pub(crate) async fn release_everywhere(&self, owner: &Owner) -> Result<(), NodeError> {
        for key in self.pools.keys() {
            self.pools.release(&key, owner).await?;
        }
        Ok(())
    }

    /// Tears one recorded attachment down: the host route first (the
    /// address must not be reused while its old route stands), then the
    /// interface in the recorded sandbox if that namespace still exists as
    /// recorded (a removed or recycled path means the interface died with
    /// the sandbox), then the address, then the record. A sandbox that
    /// cannot be inspected keeps its address: an address is never
    /// released while a live interface may hold it. The pod's floating IP
    /// is given up (per its policy) before the address goes back, so that
    /// the pool's next pod does not answer on it.
    pub(crate) async fn teardown(
        &self,
        record: &AttachmentRecord,
        pod_side: PodSide,
    ) -> Result<(), NodeError> {
        let host_route = record
            .created
            .as_ref()
            .and_then(|created| created.host_route.clone())
            .or_else(|| record.ip().map(|address| self.host_route(address)))
            .or_else(|| {
                self.pools
                    .lease_of(&record.owner)
                    .map(|lease| self.host_route(lease.address.addr()))
            });
        let netns = match pod_side {
            PodSide::Recorded => self
                .same_sandbox(record)
                .await?
                .then_some(record.netns.as_path()),
            PodSide::Untouched => None,
        };
        let ownership = match &record.created {
            Some(created) => Ownership::Recorded(created),
            None => Ownership::Unrecorded,
        };
        let detached = self
            .datapath
            .detach_owned(netns, &record.owner.ifname, ownership, host_route.as_ref())
            .await?;
        if let Some(foreign) = &detached.foreign_link_kept {
            tracing::warn!(attachment = %record.id(), link = %foreign, "left a link that is not ours in place");
        }
        self.release_floating_ip(record).await?;
        self.release_everywhere(&record.owner).await?;
        self.attachments.remove(&record.id())?;
        lock(&self.answered).remove(&record.id());
        Ok(())
    }

    /// Whether the namespace at the record's path is still the recorded
    /// sandbox: `false` when the path is gone, is no namespace, or names
    /// another namespace now; an error when it cannot be told.
    pub(crate) async fn same_sandbox(&self, record: &AttachmentRecord) -> Result<bool, NodeError> {
        match self.datapath.identify(&record.netns).await {
            Ok(Some(found)) => Ok(record.netns_id.is_none_or(|recorded| recorded == found)),
            Ok(None) | Err(DatapathError::NotANamespace(..)) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }
}
