//! The backend's record of which pod holds each address ("owner marks":
//! a Neutron port's `device_id` and name, an UltrON address's `owner`),
//! kept in step with the store off the assignment path; the orphan sweep
//! (`sweep`) relies on it to take back what a lost store forgot.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hulk_ipam::IpamError;
use tokio_util::sync::CancellationToken;

use super::{PoolError, PoolManager};
use crate::core::holder_to_mark;
use crate::store::AddressState;

/// Marks written at once: a burst of ADDs is marked in a fraction of the
/// time one at a time would take, without flooding the cloud's API.
pub(super) const MARKS_IN_PARALLEL: usize = 4;
/// How long [`PoolManager::run_owner_marks`] waits after a failed pass.
const MARK_RETRY: Duration = Duration::from_secs(5);
/// How long the last pass at shutdown may take: a cloud outage must not
/// hold the agent's exit for the whole grace period.
const LAST_PASS_LIMIT: Duration = Duration::from_secs(10);

impl PoolManager {
    /// Notes that `lease_id` changed hands, for the next marking pass.
    pub(super) fn holder_changed(&self, lease_id: &str) {
        self.unmarked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(lease_id.to_owned());
        self.holder_changed.notify_one();
    }

    /// The state of the record of `lease_id`, in whichever pool holds it.
    pub(super) fn state_of(&self, lease_id: &str) -> Option<AddressState> {
        self.all_pools()
            .iter()
            .find_map(|pool| pool.lock().state_of(lease_id).cloned())
    }

    /// One marking pass: writes to the backend the current holder (or
    /// none) of every address that changed hands since the last pass, a
    /// few at a time. Returns how many marks it wrote; the addresses whose
    /// mark failed wait for the next pass, and the first error is returned.
    pub async fn mark_holders(&self) -> Result<usize, PoolError> {
        let pending = std::mem::take(
            &mut *self
                .unmarked
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let outcomes: Vec<(String, Result<bool, IpamError>)> = futures::stream::iter(pending)
            .map(|lease_id| async move {
                let outcome = self.mark(&lease_id).await;
                (lease_id, outcome)
            })
            .buffer_unordered(MARKS_IN_PARALLEL)
            .collect()
            .await;
        let mut marked = 0;
        let mut first_error = None;
        for (lease_id, outcome) in outcomes {
            match outcome {
                Ok(wrote) => marked += usize::from(wrote),
                Err(error) => {
                    self.unmarked
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(lease_id);
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error.into()),
            None => Ok(marked),
        }
    }

    /// Writes the current holder of `lease_id`; `false` when there is
    /// nothing to mark (the address is being returned, or gone).
    pub(super) async fn mark(&self, lease_id: &str) -> Result<bool, IpamError> {
        // Read at the time of the call: a mark always says the latest
        // holder, so passes never need ordering among themselves.
        let Some(holder) = self.state_of(lease_id).as_ref().and_then(holder_to_mark) else {
            return Ok(false);
        };
        // Not rate-limited: marks follow pod churn, a few at a time, and
        // taking the limiter's tokens would delay the refills that ADDs
        // wait for.
        match self
            .metered(
                "update_owner",
                self.backend
                    .update_owner(lease_id, holder, self.instance_mark()),
            )
            .await
        {
            Ok(_) | Err(IpamError::NotFound(_)) => Ok(true),
            Err(error) => Err(error),
        }
    }

    /// Runs marking passes whenever an address changes hands (and again
    /// after a failure, every few seconds) until `shutdown` is cancelled,
    /// then one last pass (of at most ten seconds) so that a graceful stop
    /// leaves every mark written. With [`super::Fencing`], also a
    /// heartbeat ([`PoolManager::heartbeat`]) every `heartbeat`.
    pub async fn run_owner_marks(self: Arc<Self>, shutdown: CancellationToken) {
        let heartbeat = self
            .fencing
            .as_ref()
            .map_or(Duration::MAX, |fencing| fencing.heartbeat);
        let mut next_beat = tokio::time::Instant::now();
        // A heartbeat too long to add to a clock reading beats never again.
        let after_beat = |now: tokio::time::Instant| {
            now.checked_add(heartbeat)
                .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
        };
        loop {
            let retry = match self.mark_holders().await {
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!(%error, "cannot mark address holders in the backend");
                    Some(MARK_RETRY)
                }
            };
            if self.fencing.is_some() && tokio::time::Instant::now() >= next_beat {
                next_beat = after_beat(tokio::time::Instant::now());
                if let Err(error) = self.heartbeat().await {
                    // Three missed in a row let another agent take the
                    // node over: said loudly.
                    tracing::warn!(%error, "cannot write the heartbeat mark in the backend");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.holder_changed.notified(), if retry.is_none() => {}
                () = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
                () = tokio::time::sleep_until(next_beat), if self.fencing.is_some() => {}
            }
        }
        match tokio::time::timeout(LAST_PASS_LIMIT, self.mark_holders()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "last marking pass failed"),
            Err(_) => tracing::warn!("last marking pass timed out"),
        }
    }
}
