//! What returns addresses without a DEL from the runtime: CNI GC, the dead-pod pass (Kubernetes), the liveness pass (the kernel), the DEL notes the plugin left, an operator's release, and the collector that runs them.

use super::*;

impl<K: Kernel> Node<K> {
    /// GC of CNI network `cni_network`: tears down, at once, every attachment
    /// of that network holding an address that is not in `valid` (the
    /// runtime is the authority on its attachments). Attachments of other
    /// networks are not judged: GC is per network (CNI 1.1), and one node
    /// may serve several. Returns the owners released.
    pub async fn gc(
        &self,
        cni_network: Option<&str>,
        valid: &[Attachment],
    ) -> Result<Vec<Owner>, NodeError> {
        // The spec's `cni.dev/attachments` entries, as the node names them.
        let valid: HashSet<AttachmentId> = valid
            .iter()
            .map(|attachment| AttachmentId {
                container_id: attachment.container_id.clone(),
                ifname: attachment.ifname.clone(),
            })
            .collect();
        let gone: Vec<Owner> = self
            .assigned_owners()
            .filter(|owner| {
                owner.cni_network.as_deref() == cni_network
                    && !valid.contains(&owner.attachment_id())
            })
            .collect();
        self.collect_all(gone).await
    }

    /// The owners of every address a pod holds, in every pool.
    pub(crate) fn assigned_owners(&self) -> impl Iterator<Item = Owner> {
        self.assignments().map(|(owner, _)| owner)
    }

    /// Every address a pod holds, in every pool, with its owner.
    fn assignments(&self) -> impl Iterator<Item = (Owner, IpAddr)> {
        self.pools
            .records()
            .into_iter()
            .filter_map(|record| match record.state {
                AddressState::Assigned(owner) => Some((owner, record.lease.address.addr())),
                _ => None,
            })
    }

    /// Whether the pools still assign `address` to `owner` and no
    /// attachment record names it: judged under the attachment's turn
    /// before acting on what a pass found.
    fn held_without_record(&self, owner: &Owner, address: IpAddr) -> bool {
        self.attachments.get(&owner.attachment_id()).is_none()
            && self
                .pools
                .lease_of(owner)
                .is_some_and(|lease| lease.address.addr() == address)
    }

    /// The periodic GC: tears down the attachments of pods the Kubernetes
    /// API no longer shows on this node (or shows finished), once missing
    /// on two passes in a row, since the API may lag behind a pod being
    /// created. Assignments without a pod name are kept: only the
    /// runtime's CNI GC can judge those. Without a Kubernetes client this
    /// does nothing.
    pub async fn collect_dead_pods(&self) -> Result<ReconcileReport, NodeError> {
        let Some(pods) = &self.pods else {
            return Ok(ReconcileReport::default());
        };
        let pods = pods.live_pods().await?;
        let live: HashSet<AttachmentId> = self
            .assigned_owners()
            .filter(|owner| {
                owner
                    .pod
                    .as_ref()
                    .is_none_or(|pod| pods.shows(pod, owner.pod_uid.as_deref()))
            })
            .map(|owner| owner.attachment_id())
            .collect();
        let missing = self.pools.find_missing(&live);
        let gone = missing.gone.into_iter().map(|(_, owner)| owner).collect();
        Ok(ReconcileReport {
            released: self.collect_all(gone).await?,
            suspected: missing.suspected,
        })
    }

    /// Tears down each owner's attachment as a DEL would (host route
    /// first, then the address, so the address is never reused while its
    /// old route stands). One failure does not stop the others; the first
    /// is returned after all were tried, and the next GC retries it.
    pub(crate) async fn collect_all(&self, owners: Vec<Owner>) -> Result<Vec<Owner>, NodeError> {
        let mut released = Vec::with_capacity(owners.len());
        let mut first_error = None;
        for owner in owners {
            match self.del(&PodRequest::new(owner.clone())).await {
                Ok(()) => {
                    self.pools.metrics().gc_releases.inc();
                    tracing::info!(
                        container = %owner.container_id,
                        ifname = %owner.ifname,
                        "garbage-collected a gone pod's attachment"
                    );
                    released.push(owner);
                }
                Err(error) => {
                    tracing::warn!(container = %owner.container_id, %error, "GC cannot tear down an attachment");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(released),
        }
    }

    /// The liveness pass: an attachment whose sandbox is gone (its netns
    /// path removed, no namespace, or another namespace now) on
    /// two passes in a row is torn down and its address goes
    /// back, with or without Kubernetes: a runtime that lost its DEL
    /// (agent down, runtime crashed) never strands an address, and a pod's
    /// old sandbox does not keep one because the pod lives on in a newer
    /// sandbox. Attachments with an ADD in progress are not judged.
    /// Returns the attachments torn down; one failure does not stop the
    /// others (the first is returned after all were tried).
    pub async fn collect_gone_sandboxes(&self) -> Result<Vec<AttachmentId>, NodeError> {
        let mut gone_now = std::collections::HashMap::new();
        let mut due = Vec::new();
        for record in self.attachments.all() {
            let id = record.id();
            if self.serializer.adding(&id) {
                continue;
            }
            match self.same_sandbox(&record).await {
                Ok(true) => {}
                Ok(false) => {
                    let passes = self.gone_passes(&id) + 1;
                    if passes >= GONE_PASSES {
                        due.push(id);
                    } else {
                        gone_now.insert(id, passes);
                    }
                }
                Err(error) => {
                    // Cannot tell: keep the address, judge again next pass.
                    tracing::warn!(attachment = %id, %error, "cannot inspect the sandbox");
                }
            }
        }
        *lock(&self.gone) = gone_now;
        let mut collected = Vec::with_capacity(due.len());
        let mut first_error = None;
        for id in due {
            let _turn = self.serializer.turn(&id).await;
            // Judged again under the lock: a retried ADD may have replaced
            // the record in a new sandbox since.
            let Some(record) = self.attachments.get(&id) else {
                continue;
            };
            let result = match self.same_sandbox(&record).await {
                Ok(false) => self.teardown(&record, PodSide::Recorded).await,
                Ok(true) => continue,
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => {
                    self.pools.metrics().gc_releases.inc();
                    tracing::info!(attachment = %id, netns = %record.netns.display(), "sandbox gone: attachment torn down");
                    collected.push(id);
                }
                Err(error) => {
                    tracing::warn!(attachment = %id, %error, "cannot tear down a gone sandbox's attachment");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(collected),
        }
    }

    /// The liveness pass for addresses the pools assign to a holder with
    /// no attachment record (none with an ADD in progress): the ones the
    /// orphan sweep adopted from the cloud's holder marks after a lost
    /// state file, or on a replacement node with the same name, and ones
    /// whose record could not be read. Nothing on this node says which
    /// sandbox they were in, and a pod's name in Kubernetes proves
    /// nothing (the kubelet recreates a dead node's pods in new sandboxes
    /// under new container ids), so the kernel judges: an address an
    /// interface holds in some sandbox namespace
    /// ([`Datapath::sandbox_holders`]) is proven live and kept, and the
    /// host routes to it from then on (the route is installed when it is
    /// first proven); one no interface holds on two passes in a row is
    /// released as a DEL would (its host route first), the same grace as
    /// for a gone sandbox. A failed scan judges nothing: it is returned,
    /// and the counts stay as they were. Returns the holders released; one
    /// failure does not stop the others (the first is returned after all
    /// were tried).
    pub async fn collect_unproven_addresses(&self) -> Result<Vec<Owner>, NodeError> {
        let candidates: Vec<(Owner, IpAddr)> = self
            .assignments()
            .filter(|(owner, _)| {
                let id = owner.attachment_id();
                self.attachments.get(&id).is_none() && !self.serializer.adding(&id)
            })
            .collect();
        let addresses: Vec<IpAddr> = candidates.iter().map(|(_, address)| *address).collect();
        let holders = self.datapath.sandbox_holders(&addresses).await?;
        let mut unheld_now = std::collections::HashMap::new();
        let mut proven_now = std::collections::HashMap::new();
        let mut due = Vec::new();
        for (owner, address) in candidates {
            let id = owner.attachment_id();
            let Some(netns) = holders.get(&address) else {
                let passes = lock(&self.unheld).get(&id).copied().unwrap_or(0) + 1;
                if passes >= GONE_PASSES {
                    due.push((owner, address));
                } else {
                    unheld_now.insert(id, passes);
                }
                continue;
            };
            let first_proof = lock(&self.proven).get(&address) != Some(&id);
            if first_proof {
                tracing::info!(attachment = %id, %address, netns = %netns.display(), "an address without a record is held by a live interface: kept");
                // Under the turn: a DEL releasing it meanwhile must not be
                // followed by a route to an address no longer ours.
                let _turn = self.serializer.turn(&id).await;
                if self.held_without_record(&owner, address) {
                    self.route_proven(address).await;
                }
            } else {
                tracing::debug!(attachment = %id, %address, netns = %netns.display(), "an address without a record is still held");
            }
            proven_now.insert(address, id);
        }
        *lock(&self.unheld) = unheld_now;
        *lock(&self.proven) = proven_now;
        let mut released = Vec::with_capacity(due.len());
        let mut first_error = None;
        for (owner, address) in due {
            let id = owner.attachment_id();
            let _turn = self.serializer.turn(&id).await;
            // Judged again under the turn: an ADD of the same attachment
            // may have recorded it since, or a DEL released it.
            if !self.held_without_record(&owner, address) {
                continue;
            }
            match self.del_unrecorded(&PodRequest::new(owner.clone())).await {
                Ok(()) => {
                    self.pools.metrics().gc_releases.inc();
                    tracing::info!(attachment = %id, %address, "no interface holds an address without a record: released");
                    released.push(owner);
                }
                Err(error) => {
                    tracing::warn!(attachment = %id, %address, %error, "cannot release an address no interface holds");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(released),
        }
    }

    /// Installs the host route to a record-less address just proven live.
    /// A failure is logged: [`Node::restore`] and [`Node::reapply`] route
    /// every proven address.
    async fn route_proven(&self, address: IpAddr) {
        let kernel = self.datapath.kernel();
        match kernel
            .replace_route(kernel.host(), &self.host_route(address))
            .await
        {
            Ok(()) => {}
            // No host link yet (the pass before the restore after a
            // reboot): the restore routes it.
            Err(hulk_netns::KernelError::LinkNotFound(_)) => {}
            Err(error) => {
                tracing::warn!(%address, %error, "cannot install the host route to a proven address");
            }
        }
    }

    /// The addresses the host routes to: every address the pools assign
    /// to a holder with an attachment record, and those of holders without
    /// one that a live interface was last found holding.
    pub(crate) fn routed_addresses(&self) -> Vec<IpAddr> {
        let proven = lock(&self.proven).clone();
        self.assignments()
            .filter(|(owner, address)| {
                let id = owner.attachment_id();
                self.attachments.get(&id).is_some() || proven.get(address) == Some(&id)
            })
            .map(|(_, address)| address)
            .collect()
    }

    pub(crate) fn gone_passes(&self, id: &AttachmentId) -> u32 {
        lock(&self.gone).get(id).copied().unwrap_or(0)
    }

    /// Replays the DELs the plugin noted while the agent was unreachable
    /// ([`Node::with_del_notes`]): each is done as a DEL would be, and its
    /// note removed. A note older than the attachment's latest ADD is
    /// stale (the container was added again since) and only removed.
    /// Returns how many DELs were replayed; a failed one keeps its note
    /// for the next pass.
    pub async fn replay_del_notes(&self) -> usize {
        let Some(notes) = &self.del_notes else {
            return 0;
        };
        let listed = match notes.list() {
            Ok(listed) => listed,
            Err(error) => {
                tracing::warn!(%error, dir = %notes.dir().display(), "cannot read the DEL notes");
                return 0;
            }
        };
        let mut replayed = 0;
        for note in listed {
            let id = note.request.attachment_id();
            let stale = self
                .attachments
                .get(&id)
                .is_some_and(|record| record.since_ms > note.written_ms);
            if !stale {
                if let Err(error) = self.del(&note.request).await {
                    tracing::warn!(attachment = %id, %error, "replaying a DEL note failed; retried next pass");
                    continue;
                }
                replayed += 1;
                tracing::info!(attachment = %id, "replayed a DEL made while the agent was down");
            }
            if let Err(error) = notes.remove(&note) {
                tracing::warn!(attachment = %id, %error, "cannot remove a replayed DEL note");
            }
        }
        replayed
    }

    /// Runs the periodic GC until `shutdown` is cancelled: every `interval`
    /// the DEL notes ([`Node::replay_del_notes`]), a liveness pass
    /// ([`Node::collect_gone_sandboxes`]) and one of the addresses without
    /// a record ([`Node::collect_unproven_addresses`]), a pass of
    /// [`Node::collect_dead_pods`], and every tenth pass an
    /// orphan sweep of the backend and of the node's floating IPs
    /// ([`Node::sweep_floating_ips`]; list calls, kept rare for large
    /// clusters); every pass while the pools have intents a start could
    /// not settle without the backend
    /// ([`PoolManager::unsettled_intents`]).
    pub async fn run_collector(
        self: Arc<Self>,
        interval: std::time::Duration,
        shutdown: CancellationToken,
    ) {
        let mut passes: u64 = 0;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            passes += 1;
            self.replay_del_notes().await;
            match self.collect_gone_sandboxes().await {
                Ok(collected) if !collected.is_empty() => {
                    tracing::info!(collected = collected.len(), "liveness pass");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "liveness pass failed"),
            }
            match self.collect_unproven_addresses().await {
                Ok(released) if !released.is_empty() => {
                    tracing::info!(
                        released = released.len(),
                        "liveness pass of addresses without a record"
                    );
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "liveness pass of addresses without a record failed")
                }
            }
            match self.collect_dead_pods().await {
                Ok(report) if !report.released.is_empty() || !report.suspected.is_empty() => {
                    tracing::info!(
                        released = report.released.len(),
                        suspected = report.suspected.len(),
                        "GC pass"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "GC pass failed"),
            }
            // Intents a start could not settle without the backend are
            // settled by a sweep: sweep every pass until they are.
            if passes.is_multiple_of(10) || self.pools.unsettled_intents() > 0 {
                match self.pools.sweep_orphans().await {
                    Ok(sweep) if sweep == OrphanSweep::default() => {}
                    Ok(sweep) => tracing::warn!(?sweep, "the store and the backend disagreed"),
                    Err(error) => tracing::warn!(%error, "orphan sweep failed"),
                }
                if let Err(error) = self.sweep_floating_ips().await {
                    tracing::warn!(%error, "floating IP sweep failed");
                }
                self.repin_gateways().await;
            }
        }
    }

    /// Releases the address `address` whatever pod holds it, and removes
    /// its host route: for a pod that vanished without DEL. Returns the
    /// owner, or `None` when no pod holds it.
    pub async fn release_address(&self, address: IpAddr) -> Result<Option<Owner>, NodeError> {
        let Some((_, owner)) = self.pools.holder_of(address) else {
            return Ok(None);
        };
        self.del(&PodRequest::new(owner.clone())).await?;
        Ok(Some(owner))
    }
}
