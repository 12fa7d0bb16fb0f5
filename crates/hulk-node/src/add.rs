//! ADD: the record first, an address from the pod's pool, then the interface; everything undone if it cannot be built or the caller gave up.

use super::*;

impl<K: Kernel> Node<K> {
    /// The MAC the pod's interface gets: the one the runtime asked for on
    /// macvlan; on ipvlan, where every slave shares the parent's MAC, a
    /// request for the parent's MAC is met by itself and any other is
    /// refused (7) rather than silently ignored.
    pub(crate) async fn requested_mac(
        &self,
        request: &PodRequest,
    ) -> Result<Option<MacAddr>, NodeError> {
        let Some(asked) = request.mac else {
            return Ok(None);
        };
        if matches!(self.network.kind, hulk_netns::SlaveKind::MacVlan { .. }) {
            return Ok(Some(asked));
        }
        let kernel = self.datapath.kernel();
        let parent = kernel
            .link(kernel.host(), &self.network.parent)
            .await
            .map_err(DatapathError::from)?
            .and_then(|link| link.mac);
        if parent == Some(asked) {
            return Ok(None);
        }
        Err(NodeError::InvalidRequest(format!(
            "MAC {} cannot be given: an ipvlan interface shares its parent's MAC ({}); use kind = \"macvlan\" for pod MACs",
            asked,
            parent
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), MacAddr::to_string)
        )))
    }

    pub(crate) fn pod_network(
        &self,
        request: &PodRequest,
        lease: &Lease,
        mac: Option<MacAddr>,
    ) -> Result<PodNetwork, NodeError> {
        let gateway = lease.gateway.ok_or_else(|| {
            NodeError::InvalidRequest(format!("lease {} has no gateway", lease.id))
        })?;
        Ok(PodNetwork {
            parent: self.network.parent.clone(),
            kind: self.network.kind,
            ifname: request.owner.ifname.clone(),
            address: lease.address,
            gateway,
            gateway_mac: lease.gateway_mac,
            mac,
            mtu: lease.mtu,
            service_path: Some(self.network.service_path()),
        })
    }

    /// ADD: records the attachment (its sandbox first, so every crash
    /// point leaves a record the next start can judge), takes an address,
    /// builds the interface and records what it built.
    ///
    /// - One operation at a time per attachment; a DEL of the same
    ///   attachment cancels an ADD still waiting for its address.
    /// - An ADD whose caller gave up ([`PodRequest::timeout_ms`] passed, or
    ///   the DEL) is undone, not completed into a sandbox nobody uses
    ///   ([`NodeError::Abandoned`], code 11).
    /// - A retried ADD after a crash or cancellation mid-ADD (record still
    ///   [`Phase::Adding`]) clears the half-built interface and builds it
    ///   again with the same address; an ADD of an attachment an earlier
    ///   ADD completed in the same sandbox is [`NodeError::AlreadyAttached`],
    ///   as the CNI spec requires.
    pub async fn add(&self, request: &PodRequest) -> Result<PodAttachment, NodeError> {
        let deadline = deadline(request, Instant::now());
        let netns = request.netns.as_deref().ok_or_else(|| {
            NodeError::InvalidRequest("ADD needs the pod's network namespace".into())
        })?;
        let id = request.attachment_id();
        let ticket = self.serializer.start_add(&id);
        let abandoned = |reason| NodeError::Abandoned {
            id: id.clone(),
            reason,
        };
        let _turn = tokio::select! {
            turn = self.serializer.turn(&id) => turn,
            () = ticket.cancelled.cancelled() => return Err(abandoned("a DEL of it arrived")),
            () = tokio::time::sleep_until(deadline.into()) => {
                return Err(abandoned("the caller's timeout passed while an earlier operation on it ran"));
            }
        };
        let netns_id = self.sandbox_identity(netns).await?;
        if let Some(done) = self.clear_earlier(request, netns, netns_id).await? {
            return Ok(done);
        }
        let mut record = AttachmentRecord {
            owner: request.owner.clone(),
            netns: netns.to_path_buf(),
            netns_id: Some(netns_id),
            phase: Phase::Adding,
            pool: None,
            address: None,
            created: None,
            since_ms: now_ms(),
            floating_ip: None,
        };
        self.attachments.put(record.clone())?;
        let assigned = tokio::select! {
            assigned = async {
                let pod = self.pod_of(request).await?;
                let (key, lease) = self.assign(request, pod.as_ref()).await?;
                Ok((key, lease, pod))
            } => assigned,
            () = ticket.cancelled.cancelled() => Err(abandoned("a DEL of it arrived")),
            () = tokio::time::sleep_until(deadline.into()) => {
                Err(abandoned("the caller's timeout passed before an address was free"))
            }
        };
        let (key, lease, pod) = match assigned {
            Ok(assigned) => assigned,
            Err(error) => {
                self.undo(&record).await;
                return Err(error);
            }
        };
        record.pool = Some(key.clone());
        record.address = Some(lease.address);
        if let Err(error) = self.attachments.put(record.clone()) {
            self.undo(&record).await;
            return Err(error.into());
        }
        if let Err(error) = self
            .attach_floating_ip(request, pod.as_ref(), &lease, &mut record)
            .await
        {
            self.undo(&record).await;
            return Err(error);
        }
        let spec = match self
            .requested_mac(request)
            .await
            .and_then(|mac| self.pod_network(request, &lease, mac))
        {
            Ok(spec) => spec,
            Err(error) => {
                self.undo(&record).await;
                return Err(error);
            }
        };
        // Building the interface is not cancelled half-way (it takes
        // milliseconds, and a half-built interface is what a crash leaves):
        // the caller's giving up is checked once it is done.
        let attached = match self.datapath.attach(netns, &spec).await {
            Ok(attached) => attached,
            Err(error) => {
                // The datapath rolled its own steps back.
                self.undo(&record).await;
                return Err(error.into());
            }
        };
        record.created = Some(attached.clone());
        let gave_up = if ticket.cancelled.is_cancelled() {
            Some("a DEL of it arrived")
        } else if Instant::now() >= deadline {
            Some("the caller's timeout passed while the interface was built")
        } else {
            None
        };
        if let Some(reason) = gave_up {
            self.undo(&record).await;
            return Err(abandoned(reason));
        }
        record.phase = Phase::Ready;
        record.since_ms = now_ms();
        if let Err(error) = self.attachments.put(record.clone()) {
            self.undo(&record).await;
            return Err(error.into());
        }
        lock(&self.answered).insert(id.clone());
        Ok(PodAttachment::of(lease, &attached))
    }

    /// The pool and the address for `request`.
    /// The runtime's requested address (`IP=`, `ips`) and the pod's
    /// annotation must agree when both are given.
    pub(crate) async fn assign(
        &self,
        request: &PodRequest,
        pod: Option<&PodInfo>,
    ) -> Result<(PoolKey, Lease), NodeError> {
        let (key, annotated) = self.placement_of(request, pod)?;
        let fixed_address = match (request.address, annotated) {
            (Some(asked), Some(annotated)) if asked != annotated => {
                return Err(NodeError::InvalidRequest(format!(
                    "the runtime asks for {asked}, the pod's annotation for {annotated}"
                )));
            }
            (asked, annotated) => asked.or(annotated),
        };
        let owner = request.owner.clone();
        if fixed_address.is_none() && self.pools.stats(&key).idle == 0 {
            self.tell(
                request,
                PodEvent::AddressWaiting {
                    subnet: key.subnet.clone(),
                },
            );
        }
        let assigned = match fixed_address {
            Some(address) => self.pools.assign_address(&key, &owner, address).await,
            None => self.pools.assign(&key, &owner).await,
        };
        let lease = assigned.inspect_err(|error| {
            let message = hulk_cni::describe(error);
            let event = match NodeError::code_of_pool_error(error) {
                code if code == codes::ADDRESS_EXHAUSTED => {
                    Some(PodEvent::AddressExhausted { message })
                }
                ErrorCode::TryAgainLater => Some(PodEvent::CloudUnavailable { message }),
                _ => None,
            };
            if let Some(event) = event {
                self.tell(request, event);
            }
        })?;
        Ok((key, lease))
    }

    /// Tells the pod's owners `event` (a Kubernetes Event), in the
    /// background: an ADD never waits for it.
    pub(crate) fn tell(&self, request: &PodRequest, event: PodEvent) {
        let (Some(pods), Some(pod)) = (&self.pods, &request.owner.pod) else {
            return;
        };
        let (pods, pod) = (pods.clone(), pod.clone());
        tokio::spawn(async move { pods.record(&pod, event).await });
    }

    /// The identity of the sandbox at `netns`, refusing what is not one.
    pub(crate) async fn sandbox_identity(&self, netns: &Path) -> Result<NsId, NodeError> {
        match self.datapath.identify(netns).await? {
            Some(id) => Ok(id),
            None => Err(DatapathError::NamespaceNotFound(netns.to_path_buf()).into()),
        }
    }

    /// Before an ADD: what an earlier ADD of the same attachment left.
    /// - Of another sandbox: torn down as a DEL would.
    /// - Half-built in this sandbox (a crash or cancellation mid-ADD): the
    ///   interface is cleared (the address stays assigned and is reused).
    /// - Completed in this sandbox by this agent process, which answered
    ///   it: the spec's error for a second ADD.
    /// - Completed by an earlier agent process: that agent may have been
    ///   killed between recording the ADD and answering it, so the
    ///   runtime may never have seen the success. If the interface is
    ///   still as built, the recorded result is the answer (returned as
    ///   `Some`); if not, it is cleared and built again.
    pub(crate) async fn clear_earlier(
        &self,
        request: &PodRequest,
        netns: &Path,
        netns_id: NsId,
    ) -> Result<Option<PodAttachment>, NodeError> {
        let id = request.attachment_id();
        let Some(earlier) = self.attachments.get(&id) else {
            return Ok(None);
        };
        if earlier.netns_id != Some(netns_id) {
            tracing::info!(attachment = %id, "ADD in a new sandbox: tearing down the earlier one's");
            self.teardown(&earlier, PodSide::Recorded).await?;
            return Ok(None);
        }
        let ownership = match (&earlier.phase, &earlier.created) {
            (Phase::Ready, _) if lock(&self.answered).contains(&id) => {
                return Err(NodeError::AlreadyAttached(id));
            }
            (Phase::Ready, Some(created)) => {
                if let Some(done) = self.still_built(request, netns, created).await? {
                    tracing::info!(attachment = %id, "ADD repeated after an agent restart: answering what the earlier agent built");
                    lock(&self.answered).insert(id);
                    return Ok(Some(done));
                }
                Ownership::Recorded(created)
            }
            _ => Ownership::Unrecorded,
        };
        let cleared = self
            .datapath
            .detach_owned(Some(netns), &id.ifname, ownership, None)
            .await?;
        tracing::info!(attachment = %id, ?cleared, "rebuilding an interface an earlier ADD left half-built");
        Ok(None)
    }

    /// What an earlier ADD built, if the interface is still as it was.
    pub(crate) async fn still_built(
        &self,
        request: &PodRequest,
        netns: &Path,
        created: &Attached,
    ) -> Result<Option<PodAttachment>, NodeError> {
        let Some(lease) = self.pools.lease_of(&request.owner.clone()) else {
            return Ok(None);
        };
        let mac = self.requested_mac(request).await?;
        let spec = self.pod_network(request, &lease, mac)?;
        Ok(match self.datapath.check(netns, &spec).await {
            Ok(_) => Some(PodAttachment::of(lease, created)),
            Err(_) => None,
        })
    }

    /// Undoes a failed or abandoned ADD: the interface if ADD built it
    /// (a failed build rolled itself back, and whatever else is in the pod
    /// under that name is not ours), the address and the record. Logged on
    /// failure: the record stays, so a DEL, the liveness pass or the GC
    /// finishes it.
    pub(crate) async fn undo(&self, record: &AttachmentRecord) {
        let pod_side = if record.created.is_some() {
            PodSide::Recorded
        } else {
            PodSide::Untouched
        };
        if let Err(error) = self.teardown(record, pod_side).await {
            tracing::error!(attachment = %record.id(), %error, "cannot undo an ADD; DEL or GC will finish it");
        }
    }

    /// The pod of an ADD from the directory, read once for the ADD: when
    /// its annotations may choose the pool, or floating IPs are configured.
    /// `None` without a directory or a pod name, or when the directory does
    /// not know the pod.
    pub(crate) async fn pod_of(&self, request: &PodRequest) -> Result<Option<PodInfo>, NodeError> {
        if request.pool.is_some() && self.floating_ips.is_none() {
            return Ok(None);
        }
        let (Some(pods), Some(name)) = (&self.pods, &request.owner.pod) else {
            return Ok(None);
        };
        let pod = pods.pod(name).await?;
        if pod.is_none() {
            tracing::warn!(pod = %name, "the Kubernetes API does not know the pod; default pool, and the node's floating IP setting");
        }
        Ok(pod)
    }

    /// The pool a pod's address comes from (the request's, its
    /// annotations' ([`Node::pod_of`]), or the default) and the fixed
    /// address its annotations ask for, if any.
    pub(crate) fn placement_of(
        &self,
        request: &PodRequest,
        pod: Option<&PodInfo>,
    ) -> Result<(PoolKey, Option<IpAddr>), NodeError> {
        if let Some(key) = &request.pool {
            return Ok((key.clone(), None));
        }
        let Some(pod) = pod else {
            return Ok((self.default_pool.clone(), None));
        };
        let key = pod
            .pool(&self.default_pool)
            .map_err(NodeError::InvalidRequest)?
            .unwrap_or_else(|| self.default_pool.clone());
        let fixed_address = pod.fixed_address().map_err(NodeError::InvalidRequest)?;
        Ok((key, fixed_address))
    }
}
