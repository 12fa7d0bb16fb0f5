//! Applying releases: paced, bounded, in batches, stopping when told, one
//! audit line and one metric per address. Shared by the controller's
//! passes and the cluster teardown.

use futures::StreamExt;
use hulk_ipam::{IpamBackend, IpamError};
use tokio::sync::Mutex;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::ReleaseSettings;
use crate::metrics::{ControllerMetrics, Outcome};
use crate::plan::Release;

/// What applying releases did, per outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReleaseTally {
    /// The backend released the address.
    pub released: usize,
    /// The backend no longer had it (`NotFound`): released before, by us,
    /// a previous leader or an agent.
    pub already_gone: usize,
    /// The backend refused or failed; the next pass tries again.
    pub failed: usize,
    /// Not attempted: leadership lost or shutdown, or the node came back
    /// before its batch.
    pub skipped: usize,
}

impl ReleaseTally {
    fn add(&mut self, other: Self) {
        self.released += other.released;
        self.already_gone += other.already_gone;
        self.failed += other.failed;
        self.skipped += other.skipped;
    }
}

/// Releases `releases` in batches of `settings.batch_size`: before each
/// batch, `still_wanted` drops the releases that no longer hold (a node
/// listed again); within a batch, `settings.concurrency` calls at a time,
/// started no faster than `settings.releases_per_second`. Once `stop`
/// fires no further call starts (calls in flight finish: a release is
/// idempotent, and a new leader repeats what was cut off). A `NotFound`
/// counts as done ([`ReleaseTally::already_gone`]).
pub(crate) async fn release_all(
    backend: &dyn IpamBackend,
    releases: Vec<Release>,
    settings: &ReleaseSettings,
    metrics: &ControllerMetrics,
    stop: &CancellationToken,
    still_wanted: impl Fn(&Release) -> bool,
) -> ReleaseTally {
    let mut pace = tokio::time::interval(settings.spacing());
    // After a pause (a slow batch, a slow check) calls resume at the same
    // spacing instead of catching up in a burst.
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let pace = Mutex::new(pace);
    let mut tally = ReleaseTally::default();
    for batch in releases.chunks(settings.batch_size.max(1)) {
        if stop.is_cancelled() {
            tally.skipped += batch.len();
            continue;
        }
        let (wanted, dropped): (Vec<&Release>, Vec<&Release>) =
            batch.iter().partition(|release| still_wanted(release));
        tally.skipped += dropped.len();
        for release in dropped {
            tracing::info!(
                lease = %release.lease.id,
                node = %release.lease.node,
                reason = %release.reason,
                "not releasing: the node is listed again"
            );
        }
        // The futures are made first: a stream that maps with a borrowing
        // closure is not `Send` for every lifetime, which tokio::spawn needs.
        let calls: Vec<_> = wanted
            .into_iter()
            .map(|release| release_one(backend, release, &pace, metrics, stop))
            .collect();
        let outcomes: Vec<ReleaseTally> = futures::stream::iter(calls)
            .buffer_unordered(settings.concurrency.max(1))
            .collect()
            .await;
        for outcome in outcomes {
            tally.add(outcome);
        }
    }
    tally
}

async fn release_one(
    backend: &dyn IpamBackend,
    release: &Release,
    pace: &Mutex<Interval>,
    metrics: &ControllerMetrics,
    stop: &CancellationToken,
) -> ReleaseTally {
    let skipped = ReleaseTally {
        skipped: 1,
        ..ReleaseTally::default()
    };
    tokio::select! {
        () = stop.cancelled() => return skipped,
        _ = async { pace.lock().await.tick().await } => {}
    }
    // Checked again after the wait: leadership may have gone meanwhile.
    if stop.is_cancelled() {
        return skipped;
    }
    let lease = &release.lease;
    let pod = lease
        .owner
        .as_ref()
        .and_then(|owner| owner.pod.as_deref())
        .unwrap_or("");
    let (outcome, tally) = match backend.release(&lease.id).await {
        Ok(()) => (
            Outcome::Released,
            ReleaseTally {
                released: 1,
                ..ReleaseTally::default()
            },
        ),
        Err(IpamError::NotFound(_)) => (
            Outcome::AlreadyGone,
            ReleaseTally {
                already_gone: 1,
                ..ReleaseTally::default()
            },
        ),
        Err(error) => {
            tracing::warn!(
                lease = %lease.id,
                address = %lease.address.addr(),
                node = %lease.node,
                reason = %release.reason,
                error = &error as &dyn std::error::Error,
                "cannot release the address; the next pass tries again"
            );
            metrics.count_release(Outcome::Failed, release.reason);
            return ReleaseTally {
                failed: 1,
                ..ReleaseTally::default()
            };
        }
    };
    metrics.count_release(outcome, release.reason);
    tracing::info!(
        target: "hulk_audit",
        address = %lease.address.addr(),
        lease = %lease.id,
        node = %lease.node,
        pod,
        pod_uid = lease.owner.as_ref().and_then(|owner| owner.pod_uid.as_deref()).unwrap_or(""),
        reason = %release.reason,
        outcome = outcome.as_str(),
        "address returned to the cloud"
    );
    tally
}
