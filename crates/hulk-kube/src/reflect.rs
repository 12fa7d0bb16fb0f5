//! The watch task behind [`crate::NodePods`] and [`crate::ClusterNodes`]:
//! a kube_runtime watcher with its default backoff, applied to a reflector
//! store, with a synced flag the first complete list sets, and the watch
//! failure since the last event the store received.
//!
//! A store whose watch fails is not trusted to tell what is gone: an object
//! created meanwhile is missing from it (a pod ADDed through the GET
//! fallback would be collected while it runs). It is trusted again with the
//! next event the watch delivers (the resumed watch replays what it missed,
//! or a relist ends in `InitDone`); anything gone while the watch failed
//! arrives as such an event, so nothing that needs collecting waits for a
//! quiet watch.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::KubeError;

type LastError = Arc<Mutex<Option<Arc<watcher::Error>>>>;

pub(crate) struct Reflection<K: Resource<DynamicType = ()> + Clone + 'static> {
    pub store: Store<K>,
    what: String,
    synced: watch::Receiver<bool>,
    last_error: LastError,
    task: JoinHandle<()>,
}

impl<K> Reflection<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
{
    /// Runs `events` into a new store until `cancel` fires.
    pub fn spawn<S>(what: String, events: S, cancel: CancellationToken) -> Self
    where
        S: Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    {
        let (store, writer) = reflector::store();
        let (synced_sender, synced) = watch::channel(false);
        let last_error = LastError::default();
        let errors = last_error.clone();
        let task_what = what.clone();
        let task = tokio::spawn(async move {
            let events = reflector::reflector(writer, events.default_backoff());
            let mut events = std::pin::pin!(events);
            loop {
                let event = tokio::select! {
                    () = cancel.cancelled() => break,
                    event = events.next() => event,
                };
                match event {
                    // The reflector has applied the whole list to the store
                    // before it passes InitDone on.
                    Some(Ok(watcher::Event::InitDone)) => {
                        // The failure goes first: whoever the flag wakes
                        // finds the store trusted.
                        *errors.lock().unwrap_or_else(PoisonError::into_inner) = None;
                        synced_sender.send_replace(true);
                    }
                    // The watch delivers again: the store is current.
                    Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {
                        *errors.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    }
                    // A relist in progress: the store keeps the old state
                    // until InitDone.
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                    Some(Err(error)) => {
                        // The watcher retries by itself, after the backoff;
                        // a 410 Gone makes it list again.
                        tracing::warn!(what = %task_what, %error, "watch failed, retrying");
                        *errors.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(Arc::new(error));
                    }
                    None => break,
                }
            }
        });
        Self {
            store,
            what,
            synced,
            last_error,
            task,
        }
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// `NotSynced`, with the last watch failure.
    fn not_synced(&self) -> KubeError {
        KubeError::NotSynced {
            what: self.what.clone(),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Ok when the first list has been stored and the watch has not failed
    /// since the last event it delivered; otherwise `NotSynced`.
    pub fn require_synced(&self) -> Result<(), KubeError> {
        let failing = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if self.is_synced() && !failing {
            Ok(())
        } else {
            Err(self.not_synced())
        }
    }

    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), KubeError> {
        let mut synced = self.synced.clone();
        match tokio::time::timeout(timeout, synced.wait_for(|synced| *synced)).await {
            Ok(Ok(_)) => Ok(()),
            // Timed out, or the task ended (cancelled) before syncing.
            Ok(Err(_)) | Err(_) => Err(self.not_synced()),
        }
    }
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Drop for Reflection<K> {
    fn drop(&mut self) {
        // Nobody can read the store any more.
        self.task.abort();
    }
}
