//! One agent per node name, proved in the backend itself: every mark this
//! manager writes carries its instance ([`hulk_ipam::InstanceMark`]), one
//! mark is rewritten every heartbeat, and a listing of the node's
//! addresses that shows another instance's mark younger than a few
//! heartbeats means a second agent serves this node name. Nothing is
//! adopted then: a start refuses, a running agent is told to stop
//! ([`PoolManager::displaced`]). Marks older than that are a dead
//! predecessor's, taken over by the orphan sweep. Works without
//! Kubernetes (podman, plain CNI), next to the node Lease with it.

use std::time::Duration;

use hulk_ipam::{InstanceMark, Lease};

use super::{PoolError, PoolManager};

/// Heartbeats a mark may miss before its instance counts as gone.
const MISSED_HEARTBEATS: u32 = 3;

/// This agent's identity in the backend's marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fencing {
    /// The instance id written in every mark: the host name and random
    /// bits, kept across restarts of one machine, so a restart is not
    /// taken for a second agent.
    pub instance: String,
    /// How often one of the node's marks is rewritten while the manager
    /// runs ([`PoolManager::run_owner_marks`]); a backend call each time.
    /// Another instance's marks count as alive for three heartbeats.
    pub heartbeat: Duration,
}

impl Fencing {
    /// `instance` with a heartbeat of a minute: one backend call per node
    /// per minute, and a dead agent's marks are taken over after three.
    pub fn new(instance: impl Into<String>) -> Self {
        Fencing {
            instance: instance.into(),
            heartbeat: Duration::from_secs(60),
        }
    }

    /// How old another instance's mark must be before it is a dead
    /// predecessor's.
    pub fn stale_after(&self) -> Duration {
        self.heartbeat.saturating_mul(MISSED_HEARTBEATS)
    }

    /// Whether `lease` carries another instance's mark younger than
    /// [`Fencing::stale_after`] at `now_unix`. Leases without a mark
    /// (written by agents older than instance marks) are nobody's proof.
    fn held_elsewhere(&self, lease: &Lease, now_unix: u64) -> Option<Displaced> {
        let mark = lease.marked_by.as_ref()?;
        let age = mark.age(now_unix);
        // The writer's horizon when it said one, and never shorter than
        // ours: a fast-beating agent must not outwait a slow live one.
        let alive_for = self
            .stale_after()
            .max(Duration::from_secs(mark.alive_for_secs));
        (mark.instance != self.instance && age < alive_for).then(|| Displaced {
            instance: mark.instance.clone(),
            lease: lease.id.clone(),
            address: lease.address.addr().to_string(),
            age,
        })
    }
}

/// Another agent's fresh mark on this node's addresses: what
/// [`PoolError::HeldElsewhere`] and [`PoolManager::displaced`] report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Displaced {
    /// The other agent's instance id.
    pub instance: String,
    /// The lease its mark is on.
    pub lease: String,
    /// That lease's address.
    pub address: String,
    /// How old the mark was when seen.
    pub age: Duration,
}

impl std::fmt::Display for Displaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "another agent ({}) marked this node's address {} (lease {}) {} s ago",
            self.instance,
            self.address,
            self.lease,
            self.age.as_secs()
        )
    }
}

impl PoolManager {
    /// The mark this manager writes now: its instance and the time, or
    /// `None` without [`Fencing`].
    pub(super) fn instance_mark(&self) -> Option<InstanceMark> {
        self.fencing.as_ref().map(|fencing| {
            InstanceMark::new(fencing.instance.clone(), self.now_unix())
                .alive_for(fencing.stale_after())
        })
    }

    /// Whether the backend's mark of an address this manager holds names
    /// another instance (or none): it is rewritten, so that this
    /// manager's heartbeat and takeover are visible on every address.
    pub(super) fn instance_mark_is_stale(&self, lease: &Lease) -> bool {
        self.fencing.as_ref().is_some_and(|fencing| {
            lease
                .marked_by
                .as_ref()
                .is_none_or(|mark| mark.instance != fencing.instance)
        })
    }

    /// Refuses a listing of this node's addresses in which another
    /// instance's mark is fresh; remembers it for
    /// [`PoolManager::displaced`].
    pub(super) fn check_sole_holder(&self, listed: &[Lease]) -> Result<(), PoolError> {
        let Some(fencing) = &self.fencing else {
            return Ok(());
        };
        let now = self.now_unix();
        let Some(found) = listed
            .iter()
            .find_map(|lease| fencing.held_elsewhere(lease, now))
        else {
            return Ok(());
        };
        self.metrics.held_elsewhere.inc();
        // The first finding is kept: it is what the agent reports.
        self.displaced.send_if_modified(|seen| {
            let first = seen.is_none();
            seen.get_or_insert_with(|| found.clone());
            first
        });
        Err(PoolError::HeldElsewhere(found))
    }

    /// Waits until a listing of this node's addresses showed another
    /// agent's fresh marks (see the module docs), and says whose. An
    /// agent stops serving then: two agents under one node name would
    /// hand out the same addresses and collect each other's pods.
    pub async fn displaced(&self) -> Displaced {
        let mut seen = self.displaced.subscribe();
        if let Ok(found) = seen.wait_for(Option::is_some).await
            && let Some(found) = found.clone()
        {
            return found;
        }
        // The sender lives as long as `self`: never reached.
        std::future::pending().await
    }

    /// One heartbeat: rewrites the mark of the lowest lease id this
    /// manager holds (any state but being returned), so that another
    /// instance listing the node sees a fresh mark. Returns whether a mark
    /// was written (nothing without [`Fencing`] or without an address).
    pub async fn heartbeat(&self) -> Result<bool, PoolError> {
        if self.fencing.is_none() {
            return Ok(false);
        }
        // Each pool judged under its own lock, once: the beacon is any
        // address with a mark to write.
        let beacon = self
            .all_pools()
            .iter()
            .filter_map(|pool| {
                let core = pool.lock();
                core.lease_ids()
                    .into_iter()
                    .filter(|lease_id| {
                        core.state_of(lease_id)
                            .and_then(crate::core::holder_to_mark)
                            .is_some()
                    })
                    .min()
            })
            .min();
        match beacon {
            Some(lease_id) => Ok(self.mark(&lease_id).await?),
            None => Ok(false),
        }
    }

    fn now_unix(&self) -> u64 {
        self.clock.now_ms() / 1000
    }
}
