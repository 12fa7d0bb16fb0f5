//! [`IdentityLease`]: fencing through a `coordination.k8s.io/v1` Lease, for
//! one agent per node ([`NodeLease`]) and one active controller replica
//! ([`LeaderLease`]).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::KubeError;

/// How many read-decide-write rounds a lease write tries when other writers
/// keep winning the race (409).
const WRITE_ATTEMPTS: u32 = 5;

/// Which Lease to hold, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the Lease; [`LeaseConfig::DEFAULT_NAMESPACE`] unless set.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// `spec.holderIdentity` written while we hold it: an id unique to this
    /// process instance, so a restarted agent is a new holder.
    pub holder: String,
    /// `spec.leaseDurationSeconds`: how long, in seconds, the lease stays
    /// ours after a renewal. Renewals happen every third of it.
    pub duration_seconds: u32,
}

impl LeaseConfig {
    /// The namespace leases live in unless configured otherwise.
    pub const DEFAULT_NAMESPACE: &str = "kube-system";
    /// The node lease duration, in seconds: the kubelet's own node lease
    /// duration.
    pub const NODE_DURATION_SECONDS: u32 = 40;
    /// The leader lease duration, in seconds: client-go's leader election
    /// default.
    pub const LEADER_DURATION_SECONDS: u32 = 15;

    /// The lease `hulk-vpc-node-<node>` that fences the agent of one node.
    pub fn for_node(node: &str, holder: impl Into<String>) -> Self {
        Self {
            namespace: Self::DEFAULT_NAMESPACE.to_owned(),
            name: format!("hulk-vpc-node-{node}"),
            holder: holder.into(),
            duration_seconds: Self::NODE_DURATION_SECONDS,
        }
    }

    /// The lease `name` that elects the single active replica of a
    /// controller.
    pub fn for_leader(name: impl Into<String>, holder: impl Into<String>) -> Self {
        Self {
            namespace: Self::DEFAULT_NAMESPACE.to_owned(),
            name: name.into(),
            holder: holder.into(),
            duration_seconds: Self::LEADER_DURATION_SECONDS,
        }
    }

    /// The same, in another namespace.
    pub fn in_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The same, with another duration in seconds (at least 1).
    pub fn with_duration_seconds(mut self, seconds: u32) -> Self {
        self.duration_seconds = seconds.max(1);
        self
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.duration_seconds))
    }
}

/// How a held lease was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseLoss {
    /// Another holder (or none: released) is in `spec.holderIdentity`.
    TakenOver {
        /// The holder found in the lease.
        holder: Option<String>,
    },
    /// The Lease object was deleted.
    Deleted,
    /// No renewal succeeded within two thirds of the lease duration: another
    /// holder may take it over once the rest has passed.
    NotRenewed,
}

impl fmt::Display for LeaseLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TakenOver {
                holder: Some(holder),
            } => write!(f, "now held by {holder}"),
            Self::TakenOver { holder: None } => f.write_str("released"),
            Self::Deleted => f.write_str("the lease was deleted"),
            Self::NotRenewed => f.write_str("not renewed within its duration"),
        }
    }
}

/// A Lease held as an identity fence: while we hold it, no other instance
/// with another holder id acts for the same node (or as the same
/// controller).
///
/// Expiry is judged as `spec.renewTime + spec.leaseDurationSeconds` against
/// the local clock, so node clocks must agree to well within a lease
/// duration (NTP). Every write carries the `resourceVersion` read before it;
/// a 409 means another writer got there first, and the decision is made
/// again on a fresh read. RBAC: `get`, `create` and `update` on
/// `leases.coordination.k8s.io` in the lease's namespace.
pub struct IdentityLease {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The lease as we last wrote it, and when that write succeeded.
    held: Mutex<Option<(Lease, Instant)>>,
}

impl fmt::Debug for IdentityLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityLease")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The lease that fences one node's agent ([`LeaseConfig::for_node`]).
pub type NodeLease = IdentityLease;
/// The lease that elects a controller's active replica
/// ([`LeaseConfig::for_leader`]).
pub type LeaderLease = IdentityLease;

/// Whether a lease read from the apiserver may be taken, or who has it.
enum Claim {
    /// Ours already, free, or expired.
    Free { ours: bool },
    /// Another live holder has it.
    Held {
        holder: String,
        expires_at: Timestamp,
    },
}

impl IdentityLease {
    /// A lease not yet acquired.
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            held: Mutex::new(None),
        }
    }

    /// Which lease, as whom.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    /// The lease as the apiserver has it now.
    async fn read(&self) -> Result<Option<Lease>, KubeError> {
        self.api
            .get_opt(&self.config.name)
            .await
            .map_err(KubeError::request(format!(
                "get lease {}",
                self.lease_name()
            )))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<(Lease, Instant)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claim(&self, lease: &Lease, now: Timestamp) -> Claim {
        let spec = lease.spec.as_ref();
        let holder = spec
            .and_then(|spec| spec.holder_identity.as_deref())
            .filter(|holder| !holder.is_empty());
        let Some(holder) = holder else {
            return Claim::Free { ours: false };
        };
        if holder == self.config.holder {
            return Claim::Free { ours: true };
        }
        let renewed = spec.and_then(|spec| spec.renew_time.as_ref().or(spec.acquire_time.as_ref()));
        let duration = spec.and_then(|spec| spec.lease_duration_seconds);
        match (renewed, duration) {
            (Some(MicroTime(renewed)), Some(seconds)) => {
                // Past the end of time: held for good.
                let expires_at = renewed
                    .checked_add(SignedDuration::from_secs(i64::from(seconds)))
                    .unwrap_or(Timestamp::MAX);
                if expires_at > now {
                    Claim::Held {
                        holder: holder.to_owned(),
                        expires_at,
                    }
                } else {
                    Claim::Free { ours: false }
                }
            }
            // A claim without a time or duration cannot be live.
            _ => Claim::Free { ours: false },
        }
    }

    fn spec_for(&self, previous: Option<&LeaseSpec>, ours: bool, now: Timestamp) -> LeaseSpec {
        let transitions = previous
            .and_then(|spec| spec.lease_transitions)
            .unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.config.holder.clone()),
            lease_duration_seconds: i32::try_from(self.config.duration_seconds).ok(),
            acquire_time: match previous {
                Some(spec) if ours => spec.acquire_time.clone(),
                _ => Some(MicroTime(now)),
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if ours || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// Takes the lease: creates it, or takes it over when it is ours
    /// already (a restart with the same holder id), free, or expired.
    /// [`KubeError::LeaseHeld`] names the other holder and when its claim
    /// lapses if another live holder has it; [`KubeError::LeaseContended`]
    /// if other writers won every race.
    pub async fn acquire(&self) -> Result<(), KubeError> {
        let name = &self.config.name;
        for _ in 0..WRITE_ATTEMPTS {
            let existing = self.read().await?;
            let now = Timestamp::now();
            let written = match existing {
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            namespace: Some(self.config.namespace.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(self.spec_for(None, false, now)),
                    };
                    self.api.create(&PostParams::default(), &lease).await
                }
                Some(mut lease) => match self.claim(&lease, now) {
                    Claim::Held { holder, expires_at } => {
                        return Err(KubeError::LeaseHeld {
                            lease: self.lease_name(),
                            holder,
                            expires_at,
                        });
                    }
                    Claim::Free { ours } => {
                        // The read's resourceVersion stays in the metadata:
                        // the update applies only to the lease we judged.
                        lease.spec = Some(self.spec_for(lease.spec.as_ref(), ours, now));
                        self.api.replace(name, &PostParams::default(), &lease).await
                    }
                },
            };
            match written {
                Ok(lease) => {
                    *self.held() = Some((lease, Instant::now()));
                    tracing::info!(lease = %self.lease_name(), holder = %self.config.holder, "lease acquired");
                    return Ok(());
                }
                // AlreadyExists or Conflict: someone else wrote first.
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(error) => {
                    return Err(KubeError::request(format!(
                        "write lease {}",
                        self.lease_name()
                    ))(error));
                }
            }
        }
        Err(KubeError::LeaseContended {
            lease: self.lease_name(),
            attempts: WRITE_ATTEMPTS,
        })
    }

    /// Renews the lease once (`spec.renewTime` = now).
    /// [`KubeError::LeaseLost`] when it is no longer ours (another holder or
    /// none in it, or deleted); other errors leave it ours until it expires.
    pub async fn renew(&self) -> Result<(), KubeError> {
        let name = &self.config.name;
        let lost = |loss| KubeError::LeaseLost {
            lease: self.lease_name(),
            loss,
        };
        let mut known = self.held().as_ref().map(|(lease, _)| lease.clone());
        for _ in 0..WRITE_ATTEMPTS {
            let mut lease = match known.take() {
                Some(lease) => lease,
                None => self.read().await?.ok_or_else(|| lost(LeaseLoss::Deleted))?,
            };
            let holder = lease
                .spec
                .as_ref()
                .and_then(|spec| spec.holder_identity.clone());
            if holder.as_deref() != Some(self.config.holder.as_str()) {
                *self.held() = None;
                return Err(lost(LeaseLoss::TakenOver { holder }));
            }
            let now = Timestamp::now();
            lease.spec = Some(self.spec_for(lease.spec.as_ref(), true, now));
            match self.api.replace(name, &PostParams::default(), &lease).await {
                Ok(lease) => {
                    *self.held() = Some((lease, Instant::now()));
                    return Ok(());
                }
                // Written by someone else since our last write: read again
                // and see whose it is.
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    *self.held() = None;
                    return Err(lost(LeaseLoss::Deleted));
                }
                Err(error) => {
                    return Err(KubeError::request(format!(
                        "renew lease {}",
                        self.lease_name()
                    ))(error));
                }
            }
        }
        Err(KubeError::LeaseContended {
            lease: self.lease_name(),
            attempts: WRITE_ATTEMPTS,
        })
    }

    /// Gives the lease up (empties `spec.holderIdentity`) so the next holder
    /// need not wait for it to expire. Nothing to do if we do not hold it or
    /// someone else wrote it since.
    pub async fn release(&self) -> Result<(), KubeError> {
        let Some((mut lease, _)) = self.held().take() else {
            return Ok(());
        };
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => Ok(()),
            Err(error) => Err(KubeError::request(format!(
                "release lease {}",
                self.lease_name()
            ))(error)),
        }
    }

    /// Renews the lease every third of its duration in a task until `cancel`
    /// fires. The returned [`LeaseKeeper`] reports a loss: the lease taken
    /// over, deleted, or not renewed within two thirds of its duration since
    /// the last successful write (a failed or hung renewal is retried at the
    /// next tick until then). Reporting at two thirds leaves the holder a
    /// third of the duration to stop before another instance may judge the
    /// lease expired and take it over. Call after [`IdentityLease::acquire`].
    pub fn keep_renewed(self: Arc<Self>, cancel: CancellationToken) -> LeaseKeeper {
        let (sender, lost) = watch::channel(None);
        let interval = self.config.duration() / 3;
        let deadline = interval * 2;
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                // kube's read timeout is minutes: a renewal that hangs must
                // not hold the loop past the deadline.
                let renewed = tokio::time::timeout(interval, self.renew()).await;
                let loss = match renewed {
                    Ok(Ok(())) => continue,
                    Ok(Err(KubeError::LeaseLost { loss, .. })) => loss,
                    failed => {
                        let written = self.held().as_ref().map(|(_, at)| *at);
                        if written.is_some_and(|at| at.elapsed() < deadline) {
                            match &failed {
                                Ok(Err(error)) => tracing::warn!(
                                    lease = %self.lease_name(),
                                    error = error as &dyn std::error::Error,
                                    "lease renewal failed, retrying"
                                ),
                                _ => tracing::warn!(
                                    lease = %self.lease_name(),
                                    timeout = ?interval,
                                    "lease renewal timed out, retrying"
                                ),
                            }
                            continue;
                        }
                        LeaseLoss::NotRenewed
                    }
                };
                tracing::error!(lease = %self.lease_name(), %loss, "lease lost");
                sender.send_replace(Some(loss));
                return;
            }
        });
        LeaseKeeper { lost, task }
    }
}

/// The renewal task of [`IdentityLease::keep_renewed`]; dropping it stops
/// the renewals.
pub struct LeaseKeeper {
    lost: watch::Receiver<Option<LeaseLoss>>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Waits until the lease is lost and says how; `None` when the renewals
    /// stopped because they were cancelled.
    pub async fn lost(&mut self) -> Option<LeaseLoss> {
        // An error is the task ending without a loss: cancelled.
        let _ = self.lost.wait_for(Option::is_some).await;
        self.lost.borrow().clone()
    }

    /// The loss, if the lease has been lost.
    pub fn loss(&self) -> Option<LeaseLoss> {
        self.lost.borrow().clone()
    }

    /// A receiver that changes to `Some` when the lease is lost, for callers
    /// that select on it.
    pub fn subscribe(&self) -> watch::Receiver<Option<LeaseLoss>> {
        self.lost.clone()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
