//! One agent per node name, proved by instance marks in the backend
//! (`hulk_pool::Fencing`): a second instance under a live agent's node
//! name refuses to start and adopts nothing; a dead predecessor's marks
//! are taken over once stale; a running agent whose addresses another
//! instance marked is told to stop. Time is tokio's, paused, so the
//! heartbeats and staleness are simulated, not waited for.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use hulk_ipam::{IpamBackend, Lease, ListScope, MemoryBackend, Owner, PoolKey};
use hulk_pool::{Fencing, MemoryStore, PoolConfig, PoolError, PoolManager, PoolStore, TokioClock};
use tokio_util::sync::CancellationToken;

const NODE: &str = "node-1";
/// 2026-12-01, in Unix milliseconds: marks carry wall-clock seconds.
const START_MS: u64 = 1_764_547_200_000;

fn key() -> PoolKey {
    PoolKey::new("vpc", "subnet-a", ["sg-1"], None)
}

fn config() -> PoolConfig {
    PoolConfig {
        min_idle: 0,
        max_idle: 8,
        batch: 4,
        warm_up: 4,
        idle_reclaim_after: None,
        ..PoolConfig::default()
    }
}

fn fencing(instance: &str) -> Fencing {
    Fencing::new(instance)
}

/// The wall clock every agent of a test reads: tokio's time since the
/// test started (paused), from `START_MS`.
fn clock() -> TokioClock {
    thread_local! {
        static CLOCK: TokioClock = TokioClock::starting_at(START_MS);
    }
    CLOCK.with(|clock| *clock)
}

/// The pools of `instance` on `NODE`, over `backend`, with their own store.
async fn open(backend: &Arc<MemoryBackend>, instance: &str) -> Result<Arc<PoolManager>, PoolError> {
    open_with(backend, Arc::new(MemoryStore::default()), instance).await
}

async fn open_with(
    backend: &Arc<MemoryBackend>,
    store: Arc<dyn PoolStore>,
    instance: &str,
) -> Result<Arc<PoolManager>, PoolError> {
    PoolManager::open_fenced(
        backend.clone(),
        store,
        Arc::new(clock()),
        NODE,
        config(),
        Some(fencing(instance)),
    )
    .await
}

async fn listed(backend: &MemoryBackend) -> Vec<Lease> {
    backend.list(&ListScope::Node(NODE.into())).await.unwrap()
}

/// Which instances mark the node's addresses, one entry per address.
async fn marking_instances(backend: &MemoryBackend) -> Vec<Option<String>> {
    listed(backend)
        .await
        .into_iter()
        .map(|lease| lease.marked_by.map(|mark| mark.instance))
        .collect()
}

/// Agent `a` serving the node: warmed up, one pod holding an address, its
/// marks written.
async fn serving(backend: &Arc<MemoryBackend>) -> Arc<PoolManager> {
    let a = open(backend, "host-a/1").await.unwrap();
    a.warm_up(&key()).await.unwrap();
    a.assign(&key(), &Owner::new("sandbox-1", "eth0"))
        .await
        .unwrap();
    a.mark_holders().await.unwrap();
    a
}

#[tokio::test(start_paused = true)]
async fn a_second_instance_under_a_live_agents_node_name_refuses_and_adopts_nothing() {
    let backend = Arc::new(MemoryBackend::new("10.30.0.0/24".parse().unwrap()));
    let a = serving(&backend).await;
    let before = listed(&backend).await;
    assert!(
        before
            .iter()
            .all(|lease| lease.marked_by.as_ref().unwrap().instance == "host-a/1"),
        "every address carries a's mark, from its allocation on: {before:?}"
    );

    // b starts under the same node name a minute later: a is alive.
    tokio::time::advance(Duration::from_secs(60)).await;
    let store = Arc::new(MemoryStore::default());
    let refused = open_with(&backend, store.clone(), "host-b/2").await;
    let Err(PoolError::HeldElsewhere(found)) = refused else {
        panic!("a duplicate must refuse to start: {refused:?}");
    };
    assert_eq!(
        found.instance, "host-a/1",
        "the error names the other holder"
    );
    let message = PoolError::HeldElsewhere(found).to_string();
    assert!(message.contains("host-a/1"), "{message}");
    assert!(
        store.load().unwrap().addresses.is_empty(),
        "nothing was adopted into b's store"
    );
    assert_eq!(
        listed(&backend).await,
        before,
        "nothing changed in the backend"
    );
    // a keeps serving its addresses.
    assert_eq!(a.assigned_addresses().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_faster_heartbeat_does_not_outwait_a_slow_live_agent() {
    let backend = Arc::new(MemoryBackend::new("10.30.0.0/24".parse().unwrap()));
    let _a = serving(&backend).await; // a beats every minute
    tokio::time::advance(Duration::from_secs(5)).await;
    // b beats every second: by its own measure, a's 5 s old marks would
    // be stale; a's marks say a counts as alive for 180 s.
    let b = PoolManager::open_fenced(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        Arc::new(clock()),
        NODE,
        config(),
        Some(Fencing {
            instance: "host-b/2".into(),
            heartbeat: Duration::from_secs(1),
        }),
    )
    .await;
    assert!(
        matches!(&b, Err(PoolError::HeldElsewhere(found)) if found.instance == "host-a/1"),
        "{b:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_predecessors_marks_are_taken_over_once_stale() {
    let backend = Arc::new(MemoryBackend::new("10.30.0.0/24".parse().unwrap()));
    let a = serving(&backend).await;
    let held = listed(&backend).await.len();
    drop(a); // killed: no more heartbeats

    // Within three heartbeats, a replacement still refuses.
    tokio::time::advance(Duration::from_secs(179)).await;
    assert!(matches!(
        open(&backend, "host-b/2").await,
        Err(PoolError::HeldElsewhere(_))
    ));
    tokio::time::advance(Duration::from_secs(2)).await;
    let b = open(&backend, "host-b/2").await.unwrap();
    let stats = b.stats(&key());
    assert_eq!(
        stats.idle + stats.assigned,
        held,
        "every address of the node taken over"
    );
    b.mark_holders().await.unwrap();
    assert!(
        marking_instances(&backend)
            .await
            .iter()
            .all(|instance| instance.as_deref() == Some("host-b/2")),
        "and marked as b's, so a third instance sees b alive"
    );
    assert!(matches!(
        open(&backend, "host-c/3").await,
        Err(PoolError::HeldElsewhere(found)) if found.instance == "host-b/2"
    ));
}

#[tokio::test(start_paused = true)]
async fn the_same_instance_restarting_is_not_a_second_agent() {
    let backend = Arc::new(MemoryBackend::new("10.30.0.0/24".parse().unwrap()));
    let store: Arc<dyn PoolStore> = Arc::new(MemoryStore::default());
    let a = open_with(&backend, store.clone(), "host-a/1")
        .await
        .unwrap();
    a.warm_up(&key()).await.unwrap();
    drop(a);
    tokio::time::advance(Duration::from_secs(5)).await;
    let again = open_with(&backend, store, "host-a/1").await.unwrap();
    assert_eq!(again.stats(&key()).idle, 4);
    // A lost store on the same machine: still the same instance.
    let lost = open(&backend, "host-a/1").await.unwrap();
    assert_eq!(lost.stats(&key()).idle, 4, "adopted back at once");
}

#[tokio::test(start_paused = true)]
async fn a_running_agent_whose_addresses_another_instance_marked_is_told_to_stop() {
    let backend = Arc::new(MemoryBackend::new("10.30.0.0/24".parse().unwrap()));
    let a = serving(&backend).await;
    // a's heartbeats stop reaching the backend (a partition) for longer
    // than three heartbeats; b starts and takes the node over.
    tokio::time::advance(Duration::from_secs(200)).await;
    let b = open(&backend, "host-b/2").await.unwrap();
    b.mark_holders().await.unwrap();
    // a's next sweep sees b's fresh marks: refused, and a is displaced.
    let swept = a.sweep_orphans().await;
    assert!(
        matches!(&swept, Err(PoolError::HeldElsewhere(found)) if found.instance == "host-b/2"),
        "{swept:?}"
    );
    let displaced = tokio::time::timeout(Duration::from_secs(1), a.displaced())
        .await
        .expect("displaced() resolves once a sweep saw another instance");
    assert_eq!(displaced.instance, "host-b/2");
    assert!(
        b.sweep_orphans().await.is_ok(),
        "b's marks are its own and a's are stale: b serves on"
    );
}

#[tokio::test(start_paused = true)]
async fn the_heartbeat_keeps_a_live_agents_marks_fresh() {
    let backend = Arc::new(MemoryBackend::new("10.30.0.0/24".parse().unwrap()));
    let a = serving(&backend).await;
    let shutdown = CancellationToken::new();
    let marks = tokio::spawn(a.clone().run_owner_marks(shutdown.clone()));
    // Ten minutes of an idle node: only the heartbeat writes marks.
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(60)).await;
        tokio::task::yield_now().await;
    }
    let newest = listed(&backend)
        .await
        .into_iter()
        .filter_map(|lease| lease.marked_by)
        .map(|mark| mark.at_unix)
        .max()
        .unwrap();
    assert!(
        newest >= START_MS / 1000 + 540,
        "a mark was rewritten within the last minute: {newest}"
    );
    assert!(
        matches!(
            open(&backend, "host-b/2").await,
            Err(PoolError::HeldElsewhere(_))
        ),
        "ten minutes on, a second instance still sees a live agent"
    );
    shutdown.cancel();
    marks.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn marks_without_an_instance_are_adopted_as_before() {
    let backend = Arc::new(MemoryBackend::new("10.30.0.0/24".parse().unwrap()));
    // An agent older than instance marks (or an embedder without fencing).
    let old = PoolManager::open(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        Arc::new(clock()),
        NODE,
        config(),
    )
    .await
    .unwrap();
    old.warm_up(&key()).await.unwrap();
    assert!(
        marking_instances(&backend)
            .await
            .iter()
            .all(Option::is_none)
    );
    drop(old);
    let upgraded = open(&backend, "host-a/1").await.unwrap();
    assert_eq!(upgraded.stats(&key()).idle, 4);
    upgraded.mark_holders().await.unwrap();
    assert!(
        marking_instances(&backend)
            .await
            .iter()
            .all(|instance| instance.as_deref() == Some("host-a/1")),
        "and marked with the new instance"
    );
}
