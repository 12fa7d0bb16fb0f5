//! Applying releases: paced, bounded, reported in batches, stopping when told, one
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
    /// before its call.
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

/// Releases `releases`, `settings.concurrency` calls at a time, started no
/// faster than `settings.releases_per_second`, with a progress line every
/// `settings.batch_size` releases. Right before each call, after its turn
/// came, the release is dropped when `stop` has fired (leadership lost,
/// shutdown: calls in flight finish, as a release is idempotent and a new
/// leader repeats what was cut off) or `still_wanted` says no more (a node
/// listed again). A `NotFound` counts as done
/// ([`ReleaseTally::already_gone`]).
pub(crate) async fn release_all(
    backend: &dyn IpamBackend,
    releases: Vec<Release>,
    settings: &ReleaseSettings,
    metrics: &ControllerMetrics,
    stop: &CancellationToken,
    still_wanted: impl Fn(&Release) -> bool,
) -> ReleaseTally {
    let mut pace = tokio::time::interval(settings.spacing());
    // After a pause calls resume at the same spacing instead of catching up
    // in a burst.
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let pace = Mutex::new(pace);
    let total = releases.len();
    // The futures are made first: a stream that maps with a borrowing
    // closure is not `Send` for every lifetime, which tokio::spawn needs.
    // None runs before the stream polls it.
    let calls: Vec<_> = releases
        .iter()
        .map(|release| release_one(backend, release, &pace, metrics, stop, &still_wanted))
        .collect();
    let mut outcomes = futures::stream::iter(calls).buffer_unordered(settings.concurrency.max(1));
    let mut tally = ReleaseTally::default();
    let mut done = 0;
    while let Some(outcome) = outcomes.next().await {
        tally.add(outcome);
        done += 1;
        if done % settings.batch_size.max(1) == 0 || done == total {
            tracing::info!(
                done,
                total,
                released = tally.released,
                already_gone = tally.already_gone,
                failed = tally.failed,
                skipped = tally.skipped,
                "releases"
            );
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
    still_wanted: &impl Fn(&Release) -> bool,
) -> ReleaseTally {
    let skipped = ReleaseTally {
        skipped: 1,
        ..ReleaseTally::default()
    };
    tokio::select! {
        () = stop.cancelled() => return skipped,
        _ = async { pace.lock().await.tick().await } => {}
    }
    // Checked after the wait: leadership may have gone meanwhile, or the
    // node come back.
    if stop.is_cancelled() {
        return skipped;
    }
    if !still_wanted(release) {
        tracing::info!(
            lease = %release.lease.id,
            node = %release.lease.node,
            reason = %release.reason,
            "not releasing: the node is listed again"
        );
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
