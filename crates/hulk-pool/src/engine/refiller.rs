//! The refiller tasks: one per pool, each an allocating loop and a
//! returning loop, supervised and restarted when one dies.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use hulk_ipam::PoolKey;
use tokio_util::sync::CancellationToken;

use super::refill::MAX_PARALLEL_BATCHES;
use super::{Pool, PoolManager};
use crate::metrics::PoolLabels;

/// How long [`PoolManager::run_refillers`] waits before restarting a
/// refiller that panicked or ended, so that one dying at once does not
/// spin.
pub const REFILLER_RESTART_DELAY: Duration = Duration::from_secs(1);

/// Counts a running refiller of a pool until dropped (also by a panic).
pub(super) struct Running<'a>(&'a Pool);

impl<'a> Running<'a> {
    pub(super) fn new(pool: &'a Pool) -> Self {
        pool.refillers.fetch_add(1, Ordering::SeqCst);
        Running(pool)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.refillers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PoolManager {
    /// Runs a refiller for every pool, those known now and those that
    /// appear later (a pod's annotations can name a pool first seen at its
    /// ADD), until `shutdown` is cancelled. A refiller that panics or ends
    /// before shutdown is restarted after [`REFILLER_RESTART_DELAY`], with
    /// an error logged and `hulk_pool_refiller_restarts_total` counted;
    /// [`PoolStats`](crate::PoolStats) says whether each pool's refiller
    /// runs.
    pub async fn run_refillers(self: Arc<Self>, shutdown: CancellationToken) {
        let mut running = HashSet::new();
        let mut refillers = tokio::task::JoinSet::new();
        while !shutdown.is_cancelled() {
            for key in self.keys() {
                if running.insert(key.clone()) {
                    refillers.spawn(self.clone().supervised_refiller(
                        key,
                        Duration::ZERO,
                        shutdown.clone(),
                    ));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.pool_added.notified() => {}
                Some(Ok((key, death))) = refillers.join_next() => {
                    if shutdown.is_cancelled() {
                        continue;
                    }
                    tracing::error!(
                        pool = %key.subnet,
                        death,
                        "the pool's refiller died; restarting it"
                    );
                    self.metrics
                        .refiller_restarts
                        .get_or_create(&PoolLabels::from(&key))
                        .inc();
                    refillers.spawn(self.clone().supervised_refiller(
                        key,
                        REFILLER_RESTART_DELAY,
                        shutdown.clone(),
                    ));
                }
            }
        }
        while refillers.join_next().await.is_some() {}
    }

    /// Runs `key`'s refiller after `delay`, catching a panic: returns the
    /// key and how the refiller ended, for [`PoolManager::run_refillers`].
    pub(super) async fn supervised_refiller(
        self: Arc<Self>,
        key: PoolKey,
        delay: Duration,
        shutdown: CancellationToken,
    ) -> (PoolKey, String) {
        tokio::time::sleep(delay).await;
        // Unwind safety: pool state sits behind mutexes whose updates are
        // applied whole (a poisoned lock is taken over), and an allocation
        // in flight is ended by its `InFlight` guard while unwinding.
        let refiller = std::panic::AssertUnwindSafe(self.run_refiller(key.clone(), shutdown));
        let death = match refiller.catch_unwind().await {
            Ok(()) => "it ended".to_owned(),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                format!("panicked: {message}")
            }
        };
        (key, death)
    }

    /// Runs the refiller of `key` until `shutdown` is cancelled: two loops
    /// on one task, one allocating (woken by assignments, every `refill_interval`, and when a pause, back-off or
    /// cooldown ends) and one returning surplus (woken by every change of
    /// the pool, and on the same clock), so that neither waits for the
    /// other's backend calls.
    pub async fn run_refiller(self: Arc<Self>, key: PoolKey, shutdown: CancellationToken) {
        let pool = self.pool(&key);
        let _running = Running::new(&pool);
        futures::future::join(
            self.allocation_loop(&pool, shutdown.clone()),
            self.return_loop(&pool, shutdown),
        )
        .await;
    }

    /// How long a refiller loop of `pool` may sleep: until the next pause,
    /// back-off or cooldown ends, at most `refill_interval`.
    pub(super) fn refiller_sleep(&self, pool: &Pool) -> Duration {
        pool.lock()
            .refiller_sleep(&pool.config, self.clock.now_ms())
    }

    /// The allocating half of [`PoolManager::run_refiller`].
    ///
    /// Batches run side by side (up to four), and the plan is made again
    /// whenever one answers or an ADD wakes the refiller: an ADD arriving
    /// while batches are out gets its own at once, instead of waiting for
    /// the slowest of them and then a whole allocation more. Shutdown lets
    /// the batches out finish, so their answers are recorded.
    pub(super) async fn allocation_loop(&self, pool: &Pool, shutdown: CancellationToken) {
        let mut batches = futures::stream::FuturesUnordered::new();
        // False after the store failed: no new batch until the next wake
        // or tick, so a broken disk is not hammered in a loop.
        let mut plan = false;
        while !shutdown.is_cancelled() {
            if plan {
                if let Err(error) = self.promote_cooled(pool) {
                    tracing::error!(pool = %pool.key.subnet, %error, "refill pass failed");
                }
                while batches.len() < MAX_PARALLEL_BATCHES {
                    let want = pool.lock().plan_refill(&pool.config, self.clock.now_ms());
                    if want == 0 {
                        break;
                    }
                    batches.push(self.allocate_into(pool, want));
                }
            }
            plan = true;
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(answered) = batches.next(), if !batches.is_empty() => {
                    // A backend failure is in the pool's state already (a
                    // pause, a back-off, or a narrower next batch).
                    if let Err(error) = answered {
                        tracing::error!(pool = %pool.key.subnet, %error, "refill pass failed");
                        plan = false;
                    }
                }
                () = pool.wake_refiller.notified() => {}
                () = tokio::time::sleep(self.refiller_sleep(pool)), if batches.is_empty() => {}
            }
        }
        while batches.next().await.is_some() {}
    }

    /// The returning half of [`PoolManager::run_refiller`].
    pub(super) async fn return_loop(&self, pool: &Pool, shutdown: CancellationToken) {
        let mut changes = pool.changed.subscribe();
        while !shutdown.is_cancelled() {
            let pass = match self.promote_cooled(pool) {
                Ok(()) => self.return_surplus(pool).await,
                Err(error) => Err(error),
            };
            if let Err(error) = pass {
                tracing::error!(pool = %pool.key.subnet, %error, "return pass failed");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(self.refiller_sleep(pool)) => {}
            }
        }
    }
}
