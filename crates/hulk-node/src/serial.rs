//! One operation at a time per attachment: ADD, DEL and CHECK of the same
//! container and interface queue behind each other, and a DEL can cancel
//! the ADD it queues behind (the runtime gave up on that ADD; finishing it
//! would only build a sandbox nobody uses).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use hulk_ipam::AttachmentId;

/// A lock per attachment and the cancellation of the ADD in progress.
#[derive(Debug, Default)]
pub(crate) struct Serializer {
    locks: Mutex<HashMap<AttachmentId, Arc<tokio::sync::Mutex<()>>>>,
    adds: Mutex<HashMap<AttachmentId, (u64, CancellationToken)>>,
    next_add: std::sync::atomic::AtomicU64,
}

/// Holds one attachment's lock; unused locks leave the map when the last
/// holder or waiter is done, so the map stays as small as the work in flight.
pub(crate) struct Turn<'a> {
    serializer: &'a Serializer,
    id: AttachmentId,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = lock(&self.serializer.locks);
        if locks
            .get(&self.id)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            locks.remove(&self.id);
        }
    }
}

/// An ADD registered as cancellable; unregisters itself when dropped.
pub(crate) struct AddTicket<'a> {
    serializer: &'a Serializer,
    id: AttachmentId,
    generation: u64,
    /// Cancelled by a DEL of the same attachment.
    pub(crate) cancelled: CancellationToken,
}

impl Drop for AddTicket<'_> {
    fn drop(&mut self) {
        let mut adds = lock(&self.serializer.adds);
        if adds
            .get(&self.id)
            .is_some_and(|(generation, _)| *generation == self.generation)
        {
            adds.remove(&self.id);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Serializer {
    /// Waits for `id`'s turn.
    pub(crate) async fn turn(&self, id: &AttachmentId) -> Turn<'_> {
        let mutex = lock(&self.locks).entry(id.clone()).or_default().clone();
        let guard = mutex.lock_owned().await;
        Turn {
            serializer: self,
            id: id.clone(),
            guard: Some(guard),
        }
    }

    /// Registers an ADD of `id` that a DEL may cancel.
    pub(crate) fn start_add(&self, id: &AttachmentId) -> AddTicket<'_> {
        let generation = self
            .next_add
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancelled = CancellationToken::new();
        lock(&self.adds).insert(id.clone(), (generation, cancelled.clone()));
        AddTicket {
            serializer: self,
            id: id.clone(),
            generation,
            cancelled,
        }
    }

    /// Cancels the ADD of `id` in progress, if any (a DEL arrived).
    pub(crate) fn cancel_add(&self, id: &AttachmentId) -> bool {
        match lock(&self.adds).get(id) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether an ADD of `id` is in progress: the sandbox is being built,
    /// so a liveness pass must not judge it.
    pub(crate) fn adding(&self, id: &AttachmentId) -> bool {
        lock(&self.adds).contains_key(id)
    }

    /// How many attachments have a lock held or awaited (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        lock(&self.locks).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(container: &str) -> AttachmentId {
        AttachmentId {
            container_id: container.into(),
            ifname: "eth0".into(),
        }
    }

    #[tokio::test]
    async fn one_attachment_is_served_in_order_others_in_parallel() {
        let serializer = Arc::new(Serializer::default());
        let first = serializer.turn(&id("a")).await;
        // Another attachment is not held up.
        drop(serializer.turn(&id("b")).await);
        let waiter = {
            let serializer = serializer.clone();
            tokio::spawn(async move {
                let _turn = serializer.turn(&id("a")).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the second operation ran beside the first"
        );
        drop(first);
        waiter.await.unwrap();
        assert_eq!(serializer.tracked(), 0, "unused locks stay in the map");
    }

    #[test]
    fn a_del_cancels_only_the_add_in_progress() {
        let serializer = Serializer::default();
        assert!(!serializer.cancel_add(&id("a")));
        let add = serializer.start_add(&id("a"));
        assert!(serializer.adding(&id("a")));
        assert!(serializer.cancel_add(&id("a")));
        assert!(add.cancelled.is_cancelled());
        let retried = serializer.start_add(&id("a"));
        // The first ADD's ticket ending does not unregister the retry.
        drop(add);
        assert!(serializer.adding(&id("a")));
        assert!(!retried.cancelled.is_cancelled());
        drop(retried);
        assert!(!serializer.adding(&id("a")));
    }
}
