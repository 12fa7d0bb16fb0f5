//! The pool engine against the mock backend (with injected latency and
//! failures), the memory store and the redb store.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hulk_ipam::{
    AllocationRequest, Fault, FaultPlan, Faulty, IpamBackend, IpamError, Latency, ListScope,
    MemoryBackend, Owner, PoolKey,
};
use hulk_pool::{
    AddressRecord, AddressState, Clock, Intent, IntentKind, LostLabels, MemoryStore, OrphanSweep,
    PoolConfig, PoolError, PoolLabels, PoolManager, PoolStore, RedbStore, StoreOp,
};

/// A clock the test moves by hand.
#[derive(Default)]
struct ManualClock(AtomicU64);

impl ManualClock {
    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        1_000_000 + self.0.load(Ordering::SeqCst)
    }
}

/// A pool manager over a /24 mock backend and a memory store, default knobs.
async fn memory_pools() -> (Arc<MemoryBackend>, Arc<PoolManager>) {
    in_memory(MemoryBackend::new("10.0.0.0/24".parse().unwrap())).await
}

/// A pool manager like [`memory_pools`]'s whose backend answers after
/// `latency`.
async fn slow_pools(latency: Duration) -> (Arc<Faulty<MemoryBackend>>, Arc<PoolManager>) {
    in_memory(Faulty::new(
        MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
        FaultPlan {
            latency: Latency::Fixed(latency),
            ..FaultPlan::default()
        },
    ))
    .await
}

/// A pool manager over `backend` and a memory store, default knobs.
async fn in_memory<B: IpamBackend + 'static>(backend: B) -> (Arc<B>, Arc<PoolManager>) {
    let (backend, _, pools) = in_memory_with(backend, config()).await;
    (backend, pools)
}

/// A pool manager over `backend`, a memory store and a manual clock, with
/// `config`.
async fn in_memory_with<B: IpamBackend + 'static>(
    backend: B,
    config: PoolConfig,
) -> (Arc<B>, Arc<ManualClock>, Arc<PoolManager>) {
    let backend = Arc::new(backend);
    let clock = Arc::new(ManualClock::default());
    let pools = manager(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        clock.clone(),
        config,
    )
    .await;
    (backend, clock, pools)
}

fn key() -> PoolKey {
    PoolKey::new("vpc", "subnet-a", ["sg-1"], None)
}

fn owner(n: usize) -> Owner {
    Owner {
        container_id: format!("c{n}"),
        ifname: "eth0".into(),
        pod: Some(format!("default/p{n}")),
        cni_network: None,
        pod_uid: None,
    }
}

fn config() -> PoolConfig {
    PoolConfig {
        min_idle: 2,
        max_idle: 4,
        batch: 3,
        warm_up: 3,
        max_total: 20,
        max_held: Some(20),
        reuse_cooldown: Duration::from_secs(30),
        idle_reclaim_after: None,
        assign_timeout: Duration::from_secs(2),
        backoff: Duration::from_secs(60),
        refill_interval: Duration::from_millis(200),
        ..PoolConfig::default()
    }
}

async fn manager(
    backend: Arc<dyn IpamBackend>,
    store: Arc<dyn PoolStore>,
    clock: Arc<ManualClock>,
    config: PoolConfig,
) -> Arc<PoolManager> {
    PoolManager::open(backend, store, clock, "node-1", config)
        .await
        .unwrap()
}

#[tokio::test]
async fn assignment_is_idempotent_and_exclusive() {
    let (backend, pools) = memory_pools().await;
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 3);
    let a = pools.assign(&key(), &owner(1)).await.unwrap();
    let b = pools.assign(&key(), &owner(2)).await.unwrap();
    assert_ne!(a.address, b.address);
    assert_eq!(
        pools.assign(&key(), &owner(1)).await.unwrap(),
        a,
        "a retried ADD gets the same address"
    );
    assert_eq!(a.owner, Some(owner(1)));
    assert_eq!(pools.lease_of(&owner(2)), Some(b));
    let stats = pools.stats(&key());
    assert_eq!((stats.idle, stats.assigned), (1, 2));
    assert_eq!(backend.allocated(), 3, "assignments never call the backend");
}

#[tokio::test]
async fn an_empty_pool_waits_for_the_refiller_not_the_backend() {
    let (backend, pools) = slow_pools(Duration::from_millis(300)).await;
    let at_open = backend.calls();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(pools.clone().run_refiller(key(), shutdown.clone()));
    let assigns = (0..5).map(|n| {
        let pools = pools.clone();
        tokio::spawn(async move { pools.assign(&key(), &owner(n)).await })
    });
    let leases: Vec<_> = futures_join(assigns).await;
    let addresses: HashSet<_> = leases.iter().map(|lease| lease.address).collect();
    assert_eq!(addresses.len(), 5);
    // Five waiting ADDs were served by batches of three, not five calls.
    let calls = backend.calls() - at_open;
    assert!(calls <= 3, "{calls} backend calls");
    shutdown.cancel();
}

async fn futures_join(
    handles: impl Iterator<Item = tokio::task::JoinHandle<Result<hulk_ipam::Lease, PoolError>>>,
) -> Vec<hulk_ipam::Lease> {
    let mut leases = Vec::new();
    for handle in handles {
        leases.push(handle.await.unwrap().unwrap());
    }
    leases
}

#[tokio::test]
async fn without_a_refill_an_assignment_gives_up_in_time() {
    let mut quick = config();
    quick.assign_timeout = Duration::from_millis(100);
    let (_, _, pools) =
        in_memory_with(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), quick).await;
    let error = pools.assign(&key(), &owner(1)).await.unwrap_err();
    assert!(matches!(error, PoolError::Empty { .. }), "{error}");
}

fn exhausted() -> Fault {
    Fault::Error(IpamError::Exhausted {
        subnet: "subnet-a".into(),
    })
}

#[tokio::test]
async fn exhaustion_for_one_address_degrades_the_pool_until_the_backoff_passes() {
    let plan = FaultPlan {
        // Call 1 is the sweep at open; call 2 asks for a batch of 3, call
        // 3 for 1 (half of 3).
        on_call: BTreeMap::from([(2, exhausted()), (3, exhausted())]),
        ..FaultPlan::default()
    };
    // One idle address wanted: the narrowed retry is one call, not two
    // parallel batches of one.
    let mut one = config();
    one.min_idle = 1;
    let (backend, clock, pools) = in_memory_with(
        Faulty::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), plan),
        one,
    )
    .await;
    let outcome = pools.refill(&key()).await.unwrap();
    assert!(matches!(outcome.error, Some(IpamError::Exhausted { .. })));
    assert!(
        !pools.stats(&key()).degraded,
        "a batch refused whole may still find fewer"
    );
    let outcome = pools.refill(&key()).await.unwrap();
    assert!(matches!(outcome.error, Some(IpamError::Exhausted { .. })));
    assert!(pools.stats(&key()).degraded, "not even one address is left");
    let error = pools.assign(&key(), &owner(1)).await.unwrap_err();
    assert!(
        matches!(
            error,
            PoolError::Degraded {
                exhausted: true,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        pools.refill(&key()).await.unwrap().allocated,
        0,
        "no calls while degraded"
    );
    assert_eq!(backend.calls(), 3, "the sweep and the refused allocations");
    clock.advance(Duration::from_secs(61));
    assert_eq!(
        pools.refill(&key()).await.unwrap().allocated,
        3,
        "one whole batch once the pause is over"
    );
    assert!(!pools.stats(&key()).degraded);
}

#[tokio::test]
async fn an_exhausted_subnet_is_asked_for_fewer_until_what_is_left_is_found() {
    // A /28 (13 addresses besides the gateway) where another node holds
    // 11: 2 are free, and batches of 4 are refused whole.
    let backend = Arc::new(MemoryBackend::new("10.0.0.0/28".parse().unwrap()));
    let others = backend
        .allocate(&AllocationRequest::new(key(), "node-2", 11))
        .await
        .unwrap();
    assert_eq!(others.len(), 11);
    let mut wide = config();
    wide.batch = 4;
    wide.min_idle = 4;
    let stop = tokio_util::sync::CancellationToken::new();
    let pools = manager(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::default()),
        wide,
    )
    .await;
    let refiller = tokio::spawn(pools.clone().run_refiller(key(), stop.clone()));
    let first = pools.assign(&key(), &owner(1)).await.unwrap();
    let second = pools.assign(&key(), &owner(2)).await.unwrap();
    assert_ne!(first.address, second.address);
    assert_eq!(backend.allocated(), 13, "both free addresses taken");
    let third = pools.assign(&key(), &owner(3)).await.unwrap_err();
    assert!(
        matches!(
            third,
            PoolError::Degraded {
                exhausted: true,
                ..
            } | PoolError::Empty { .. }
        ),
        "{third}"
    );
    stop.cancel();
    refiller.await.unwrap();
}

#[tokio::test]
async fn idle_addresses_are_kept_while_the_subnet_is_tight() {
    let plan = FaultPlan {
        // 1: the sweep; 2: the warm-up; 3: a refill for min_idle.
        on_call: BTreeMap::from([(3, exhausted())]),
        ..FaultPlan::default()
    };
    let mut knobs = config();
    knobs.min_idle = 1;
    knobs.max_idle = 1;
    knobs.reuse_cooldown = Duration::ZERO;
    let (backend, clock, pools) = in_memory_with(
        Faulty::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), plan),
        knobs,
    )
    .await;
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 3);
    for n in 1..=3 {
        pools.assign(&key(), &owner(n)).await.unwrap();
    }
    let refused = pools.refill(&key()).await.unwrap();
    assert!(matches!(refused.error, Some(IpamError::Exhausted { .. })));
    for n in 1..=3 {
        pools.release(&key(), &owner(n)).await.unwrap();
    }
    let tight = pools.refill(&key()).await.unwrap();
    assert_eq!(tight.released, 0, "a freed address may be the last one");
    assert_eq!(pools.stats(&key()).idle, 3);
    assert_eq!(backend.inner().allocated(), 3);
    clock.advance(Duration::from_secs(61));
    let eased = pools.refill(&key()).await.unwrap();
    assert_eq!(eased.released, 2, "beyond max_idle once the pause is over");
    assert_eq!(backend.inner().allocated(), 1);
}

#[tokio::test]
async fn cooling_addresses_do_not_count_against_pod_capacity() {
    let mut four_pods = config();
    four_pods.max_total = 4;
    four_pods.max_held = None;
    four_pods.max_idle = 2;
    four_pods.min_idle = 0;
    four_pods.warm_up = 0;
    let stop = tokio_util::sync::CancellationToken::new();
    let pools = manager(
        Arc::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap())),
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::default()),
        four_pods,
    )
    .await;
    let refiller = tokio::spawn(pools.clone().run_refiller(key(), stop.clone()));
    for n in 1..=4 {
        pools.assign(&key(), &owner(n)).await.unwrap();
    }
    let full = pools.assign(&key(), &owner(5)).await.unwrap_err();
    assert!(
        matches!(full, PoolError::Full { max_total: 4, .. }),
        "{full}"
    );
    pools.release(&key(), &owner(1)).await.unwrap();
    pools.release(&key(), &owner(2)).await.unwrap();
    // Two cool down for 30 s; two pods may come meanwhile.
    pools.assign(&key(), &owner(5)).await.unwrap();
    pools.assign(&key(), &owner(6)).await.unwrap();
    let stats = pools.stats(&key());
    assert_eq!((stats.assigned, stats.cooldown), (4, 2));
    let full = pools.assign(&key(), &owner(7)).await.unwrap_err();
    assert!(matches!(full, PoolError::Full { .. }), "{full}");
    stop.cancel();
    refiller.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn returns_never_hold_up_the_allocations_waiting_adds_need() {
    // Releases hang for good (calls 3 to 6 are the first returns); an ADD
    // that needs an allocation must get one all the same.
    let plan = FaultPlan {
        on_call: (3..=6).map(|call| (call, Fault::Hang)).collect(),
        ..FaultPlan::default()
    };
    let mut knobs = config();
    knobs.min_idle = 0;
    knobs.max_idle = 0;
    knobs.warm_up = 10;
    knobs.batch = 10;
    knobs.assign_timeout = Duration::from_secs(10);
    let backend = Arc::new(Faulty::new(
        MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
        plan,
    ));
    let clock = Arc::new(ManualClock::default());
    let pools = manager(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        clock,
        knobs,
    )
    .await;
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 10);
    let stop = tokio_util::sync::CancellationToken::new();
    let refiller = tokio::spawn(pools.clone().run_refiller(key(), stop.clone()));
    // Let the return loop take the surplus out of service.
    while pools.stats(&key()).idle > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lease = pools.assign(&key(), &owner(1)).await;
    assert!(lease.is_ok(), "{lease:?}");
    stop.cancel();
    refiller.abort();
}

#[tokio::test]
async fn a_burst_keeps_what_waiting_adds_are_about_to_take() {
    let mut burst = config();
    burst.min_idle = 2;
    burst.max_idle = 4;
    burst.batch = 4;
    burst.warm_up = 0;
    burst.assign_timeout = Duration::from_secs(20);
    burst.max_total = 40;
    burst.max_held = Some(60);
    let (backend, pools) = {
        let backend = Arc::new(Faulty::new(
            MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
            FaultPlan::fixed_latency(Duration::from_millis(50)),
        ));
        let pools = manager(
            backend.clone(),
            Arc::new(MemoryStore::default()),
            Arc::new(ManualClock::default()),
            burst,
        )
        .await;
        (backend, pools)
    };
    let mut registry = prometheus_client::registry::Registry::default();
    pools.metrics().register(&mut registry);
    let stop = tokio_util::sync::CancellationToken::new();
    let refiller = tokio::spawn(pools.clone().run_refiller(key(), stop.clone()));
    let adds = (0..24).map(|n| {
        let pools = pools.clone();
        async move { pools.assign(&key(), &owner(n)).await }
    });
    let leases = futures::future::join_all(adds).await;
    assert!(leases.iter().all(Result::is_ok), "{leases:?}");
    stop.cancel();
    refiller.await.unwrap();
    let held = backend.inner().allocated();
    let stats = pools.stats(&key());
    assert_eq!(stats.assigned, 24);
    assert!(
        held <= 24 + 4,
        "{held} held: more than the pods and max_idle"
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        !text.contains(r#"operation="release""#),
        "something went back mid-burst:\n{text}"
    );
}

#[tokio::test]
async fn released_addresses_cool_down_before_reuse_and_extras_go_back() {
    let mut one_idle = config();
    one_idle.min_idle = 0;
    one_idle.max_idle = 1;
    one_idle.warm_up = 1;
    let (backend, clock, pools) =
        in_memory_with(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), one_idle).await;
    pools.warm_up(&key()).await.unwrap();
    let first = pools.assign(&key(), &owner(1)).await.unwrap();
    pools.release(&key(), &owner(1)).await.unwrap();
    pools.release(&key(), &owner(1)).await.unwrap(); // a repeated DEL
    pools.warm_up(&key()).await.unwrap();
    let second = pools.assign(&key(), &owner(2)).await.unwrap();
    assert_ne!(second.address, first.address, "still cooling down");
    clock.advance(Duration::from_secs(31));
    pools.release(&key(), &owner(2)).await.unwrap();
    let third = pools.assign(&key(), &owner(3)).await.unwrap();
    assert_eq!(
        third.address, first.address,
        "cooled down, handed out again"
    );
    clock.advance(Duration::from_secs(31));
    // Owner 2's address is now idle too: one more than max_idle goes back.
    let outcome = pools.refill(&key()).await.unwrap();
    assert_eq!(outcome.released, 0, "one idle is within max_idle");
    pools.release(&key(), &owner(3)).await.unwrap();
    clock.advance(Duration::from_secs(31));
    let outcome = pools.refill(&key()).await.unwrap();
    assert_eq!(outcome.released, 1);
    assert_eq!(backend.allocated(), 1);
}

/// One pass of the node's dead-pod collection as hulk-node runs it: what
/// [`PoolManager::find_missing`] judges gone is released (the node tears
/// down its route first); returns the released and the suspected owners.
async fn collect_gone(
    pools: &PoolManager,
    live: &HashSet<hulk_ipam::AttachmentId>,
) -> (Vec<Owner>, Vec<Owner>) {
    let missing = pools.find_missing(live);
    let mut released = Vec::new();
    for (key, owner) in missing.gone {
        pools.release(&key, &owner).await.unwrap();
        released.push(owner);
    }
    (released, missing.suspected)
}

#[tokio::test]
async fn reconciliation_spares_a_pod_seen_missing_once() {
    let (_, pools) = memory_pools().await;
    pools.warm_up(&key()).await.unwrap();
    pools.assign(&key(), &owner(1)).await.unwrap();
    pools.assign(&key(), &owner(2)).await.unwrap();
    let live: HashSet<hulk_ipam::AttachmentId> = [Owner::new("c1", "eth0").attachment_id()].into();
    let (released, suspected) = collect_gone(&pools, &live).await;
    assert_eq!((released.len(), suspected), (0, vec![owner(2)]));
    assert!(pools.lease_of(&owner(2)).is_some());
    let (released, _) = collect_gone(&pools, &live).await;
    assert_eq!(released, [owner(2)]);
    assert!(pools.lease_of(&owner(2)).is_none());
    assert!(pools.lease_of(&owner(1)).is_some());
}

#[tokio::test]
async fn a_pod_that_reappears_is_no_longer_suspected() {
    let (_, pools) = memory_pools().await;
    pools.warm_up(&key()).await.unwrap();
    pools.assign(&key(), &owner(1)).await.unwrap();
    collect_gone(&pools, &HashSet::new()).await;
    let live: HashSet<hulk_ipam::AttachmentId> = [Owner::new("c1", "eth0").attachment_id()].into();
    collect_gone(&pools, &live).await;
    let (released, _) = collect_gone(&pools, &HashSet::new()).await;
    assert!(
        released.is_empty(),
        "missing, present, missing: not twice in a row"
    );
}

fn temp_store(name: &str) -> (std::path::PathBuf, Arc<RedbStore>) {
    let dir = std::env::temp_dir().join(format!("hulk-pool-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pool.redb");
    let store = Arc::new(RedbStore::open(&path).unwrap());
    (dir, store)
}

#[tokio::test]
async fn assignments_survive_a_restart_on_redb() {
    let backend = Arc::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap()));
    let (dir, store) = temp_store("restart");
    let pools = manager(backend.clone(), store, Arc::default(), config()).await;
    pools.warm_up(&key()).await.unwrap();
    let lease = pools.assign(&key(), &owner(1)).await.unwrap();
    drop(pools);
    let reopened = manager(
        backend.clone(),
        Arc::new(RedbStore::open(&dir.join("pool.redb")).unwrap()),
        Arc::default(),
        config(),
    )
    .await;
    assert_eq!(reopened.assign(&key(), &owner(1)).await.unwrap(), lease);
    assert_eq!(reopened.stats(&key()).idle, 2);
    assert_eq!(backend.allocated(), 3);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_drain_outlives_a_restart_until_resumed() {
    let backend = Arc::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap()));
    let (dir, store) = temp_store("drain");
    let pools = manager(backend.clone(), store, Arc::default(), config()).await;
    pools.warm_up(&key()).await.unwrap();
    pools.assign(&key(), &owner(1)).await.unwrap();
    pools.drain(&key()).await.unwrap();
    drop(pools);

    let reopen = || async {
        manager(
            backend.clone(),
            Arc::new(RedbStore::open(&dir.join("pool.redb")).unwrap()),
            Arc::default(),
            config(),
        )
        .await
    };
    let reopened = reopen().await;
    assert!(reopened.stats(&key()).draining);
    assert_eq!(reopened.warm_up(&key()).await.unwrap(), 0);
    assert_eq!(reopened.refill(&key()).await.unwrap().allocated, 0);
    assert_eq!(backend.allocated(), 1, "only the pod's address");

    reopened.resume(&key()).await.unwrap();
    drop(reopened);
    let resumed = reopen().await;
    assert!(!resumed.stats(&key()).draining);
    assert_eq!(resumed.warm_up(&key()).await.unwrap(), 0, "resume refilled");
    assert_eq!(resumed.stats(&key()).idle, config().batch);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_crash_during_allocation_leaks_nothing() {
    let backend = Arc::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap()));
    let store = Arc::new(MemoryStore::default());
    // The crash: the backend created two addresses, the store only has the intent.
    backend
        .allocate(&AllocationRequest::new(key(), "node-1", 2))
        .await
        .unwrap();
    backend
        .allocate(&AllocationRequest::new(key(), "node-2", 1))
        .await
        .unwrap();
    store
        .apply(&[StoreOp::PutIntent(Intent {
            id: 1,
            kind: IntentKind::Allocate {
                key: key(),
                count: 2,
            },
        })])
        .unwrap();
    let pools = manager(backend.clone(), store.clone(), Arc::default(), config()).await;
    assert_eq!(pools.stats(&key()).idle, 2, "the two are adopted, not lost");
    assert_eq!(
        backend
            .list(&ListScope::Node("node-2".into()))
            .await
            .unwrap()
            .len(),
        1,
        "other nodes untouched"
    );
    assert!(store.load().unwrap().intents.is_empty());
    assert_eq!(store.load().unwrap().addresses.len(), 2);
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 1, "up to warm_up: 3");
}

#[tokio::test]
async fn a_crash_during_release_is_finished_at_start() {
    let backend = Arc::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap()));
    let store = Arc::new(MemoryStore::default());
    let pools = manager(backend.clone(), store.clone(), Arc::default(), config()).await;
    pools.warm_up(&key()).await.unwrap();
    let snapshot = store.load().unwrap();
    let victim = snapshot.addresses.keys().next().unwrap().clone();
    store
        .apply(&[StoreOp::PutIntent(Intent {
            id: 99,
            kind: IntentKind::Release {
                lease_id: victim.clone(),
            },
        })])
        .unwrap();
    drop(pools);
    let pools = manager(backend.clone(), store.clone(), Arc::default(), config()).await;
    assert_eq!(backend.allocated(), 2);
    assert!(!store.load().unwrap().addresses.contains_key(&victim));
    assert_eq!(pools.stats(&key()).idle, 2);
}

/// The backend's mark of who holds `lease_id`.
async fn marked_holder(backend: &MemoryBackend, lease_id: &str) -> Option<Owner> {
    let listed = backend
        .list(&ListScope::Node("node-1".into()))
        .await
        .unwrap();
    listed
        .into_iter()
        .find(|lease| lease.id == lease_id)
        .and_then(|lease| lease.owner)
}

#[tokio::test]
async fn the_backend_marks_who_holds_each_address() {
    let (backend, pools) = memory_pools().await;
    pools.warm_up(&key()).await.unwrap();
    let held = pools.assign(&key(), &owner(1)).await.unwrap();
    let passing = pools.assign(&key(), &owner(2)).await.unwrap();
    assert_eq!(marked_holder(&backend, &held.id).await, None, "not yet");

    assert_eq!(pools.mark_holders().await.unwrap(), 2);
    assert_eq!(marked_holder(&backend, &held.id).await, Some(owner(1)));
    assert_eq!(marked_holder(&backend, &passing.id).await, Some(owner(2)));
    assert_eq!(pools.mark_holders().await.unwrap(), 0, "nothing changed");

    pools.release(&key(), &owner(2)).await.unwrap();
    assert_eq!(pools.mark_holders().await.unwrap(), 1);
    assert_eq!(marked_holder(&backend, &passing.id).await, None);

    // A mark set behind the pool's back is put right by the next sweep.
    backend.update_owner(&held.id, None, None).await.unwrap();
    pools.sweep_orphans().await.unwrap();
    assert_eq!(pools.mark_holders().await.unwrap(), 1);
    assert_eq!(marked_holder(&backend, &held.id).await, Some(owner(1)));
}

#[tokio::test(start_paused = true)]
async fn marks_are_written_four_at_a_time() {
    let mut eight = config();
    (eight.warm_up, eight.batch, eight.max_idle) = (8, 8, 8);
    let (_, _, pools) = in_memory_with(
        Faulty::new(
            MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
            FaultPlan {
                latency: Latency::Fixed(Duration::from_secs(1)),
                ..FaultPlan::default()
            },
        ),
        eight,
    )
    .await;
    pools.warm_up(&key()).await.unwrap();
    for n in 0..8 {
        pools.assign(&key(), &owner(n)).await.unwrap();
    }
    let started = tokio::time::Instant::now();
    assert_eq!(pools.mark_holders().await.unwrap(), 8);
    // Eight one-second calls, four at once.
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

#[tokio::test]
async fn a_failed_mark_is_written_on_a_later_pass() {
    let mut on_call = BTreeMap::new();
    // Call 1 (the sweep at open) and 2 (the warm-up) go through.
    on_call.insert(3, Fault::Error(IpamError::Transient("down".into())));
    let (backend, pools) = in_memory(Faulty::new(
        MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
        FaultPlan {
            on_call,
            ..FaultPlan::default()
        },
    ))
    .await;
    pools.warm_up(&key()).await.unwrap();
    let held = pools.assign(&key(), &owner(1)).await.unwrap();
    assert!(pools.mark_holders().await.is_err());
    assert_eq!(pools.mark_holders().await.unwrap(), 1);
    assert_eq!(
        marked_holder(backend.inner(), &held.id).await,
        Some(owner(1))
    );
}

#[tokio::test]
async fn a_lost_store_takes_pods_addresses_back_from_the_backend_marks() {
    let (backend, pools) = memory_pools().await;
    pools.warm_up(&key()).await.unwrap();
    let held = pools.assign(&key(), &owner(1)).await.unwrap();
    pools.assign(&key(), &owner(2)).await.unwrap();
    pools.release(&key(), &owner(2)).await.unwrap();
    pools.mark_holders().await.unwrap();
    drop(pools);

    // The store is gone (a new, empty one); the backend's marks remain.
    let reopened = manager(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        Arc::default(),
        config(),
    )
    .await;
    assert_eq!(reopened.lease_of(&owner(1)).unwrap().id, held.id);
    let stats = reopened.stats(&key());
    assert_eq!((stats.assigned, stats.idle), (1, 2), "the others are idle");
    assert_eq!(backend.allocated(), 3, "none lost, none new");
    let other = reopened.assign(&key(), &owner(3)).await.unwrap();
    assert_ne!(other.address, held.address, "never handed out twice");
    reopened.release(&key(), &owner(1)).await.unwrap();
    assert_eq!(reopened.stats(&key()).cooldown, 1);
}

#[tokio::test]
async fn orphans_are_adopted_and_extras_returned() {
    let (backend, pools) = memory_pools().await;
    pools.warm_up(&key()).await.unwrap();
    backend
        .allocate(&AllocationRequest::new(key(), "node-1", 2))
        .await
        .unwrap();
    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep {
            adopted_idle: 2,
            ..OrphanSweep::default()
        }
    );
    assert_eq!(pools.stats(&key()).idle, 5);
    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep::default(),
        "known now"
    );
    assert_eq!(
        pools.refill(&key()).await.unwrap().released,
        1,
        "max_idle 4"
    );
    assert_eq!(backend.allocated(), 4);
}

/// Two leases of node-1, `idle` unmarked and `held` marked as owner 1's,
/// from a backend that does not name their network and subnet.
async fn unnamed_leases() -> Vec<hulk_ipam::Lease> {
    let mut leases = MemoryBackend::new("10.0.0.0/24".parse().unwrap())
        .allocate(&AllocationRequest::new(key(), "node-1", 2))
        .await
        .unwrap();
    for (lease, (id, holder)) in leases
        .iter_mut()
        .zip([("idle", None), ("held", Some(owner(1)))])
    {
        lease.id = id.into();
        lease.network.clear();
        lease.subnet.clear();
        lease.owner = holder;
    }
    leases
}

#[tokio::test]
async fn without_a_named_pool_the_sweep_releases_unmarked_and_spares_marked_addresses() {
    let mut backend = hulk_ipam::MockIpamBackend::new();
    backend.expect_name().return_const("unnamed".to_owned());
    let leases = unnamed_leases().await;
    backend.expect_list().returning(move |_| Ok(leases.clone()));
    backend.expect_reconcile_node().returning(|_, _| Ok(()));
    // Only the unmarked one goes back; the one a pod holds is never released.
    backend
        .expect_release()
        .withf(|id| id == "idle")
        .times(1)
        .returning(|_| Ok(()));
    let (_, pools) = in_memory(backend).await;
    assert_eq!(
        pools.lease_of(&owner(1)),
        None,
        "not adopted without a pool"
    );
    assert!(pools.keys().is_empty());
}

#[tokio::test]
async fn nonsense_configuration_is_refused() {
    let backend = Arc::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap()));
    let mut bad = config();
    bad.min_idle = 9;
    let error = PoolManager::open(
        backend,
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::default()),
        "n",
        bad,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, PoolError::InvalidConfig(ref message) if message.contains("min_idle (9)")),
        "{error}"
    );
    let mut nonsense = config();
    nonsense.max_idle = 100;
    let error = PoolManager::open(
        Arc::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap())),
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::default()),
        "n",
        nonsense,
    )
    .await
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("max_idle (100) is above max_total (20)"),
        "{error}"
    );
}

#[tokio::test]
async fn metrics_count_pools_calls_and_errors() {
    let plan = FaultPlan {
        // Call 1 is the sweep at open, 2 the warm-up.
        on_call: (3..=4)
            .map(|call| (call, Fault::Error(IpamError::Quota("ports".into()))))
            .collect(),
        ..FaultPlan::default()
    };
    let (_, pools) = in_memory(Faulty::new(
        MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
        plan,
    ))
    .await;
    let mut registry = prometheus_client::registry::Registry::default();
    pools.metrics().register(&mut registry);
    pools.warm_up(&key()).await.unwrap();
    pools.assign(&key(), &owner(1)).await.unwrap();
    pools.assign(&key(), &owner(2)).await.unwrap();
    // One idle, below min_idle: the refill's call is refused (quota),
    // and so is the next one, for fewer.
    pools.refill(&key()).await.unwrap();
    pools.refill(&key()).await.unwrap();
    pools.refresh_metrics();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let labels = r#"subnet="subnet-a",security_groups="sg-1",qos_policy="""#;
    for line in [
        format!("hulk_pool_idle_addresses{{{labels}}} 1"),
        format!("hulk_pool_assigned_addresses{{{labels}}} 2"),
        format!("hulk_pool_addresses{{{labels}}} 3"),
        format!("hulk_pool_degraded{{{labels}}} 1"),
        format!("hulk_pool_refills_total{{{labels}}} 1"),
        r#"hulk_pool_backend_errors_total{operation="allocate",kind="quota"} 2"#.to_owned(),
        r#"hulk_pool_backend_call_seconds_count{operation="allocate"} 3"#.to_owned(),
        format!("hulk_pool_assign_seconds_count{{{labels}}} 2"),
    ] {
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn backend_calls_are_rate_limited() {
    let mut limited = config();
    limited.backend_calls_per_second = 2.0;
    limited.backend_burst = 1;
    limited.batch = 1;
    limited.warm_up = 5;
    let (_, _, pools) =
        in_memory_with(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), limited).await;
    let started = tokio::time::Instant::now();
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 5);
    // The sweep at open took the one saved call: one every half second.
    assert_eq!(started.elapsed(), Duration::from_millis(2500));
}

#[tokio::test]
async fn long_idle_addresses_beyond_min_idle_are_reclaimed() {
    let mut reclaim = config();
    reclaim.idle_reclaim_after = Some(Duration::from_secs(600));
    reclaim.warm_up = 4;
    reclaim.batch = 4;
    let (backend, clock, pools) =
        in_memory_with(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), reclaim).await;
    pools.warm_up(&key()).await.unwrap();
    assert_eq!(pools.refill(&key()).await.unwrap().released, 0);
    clock.advance(Duration::from_secs(601));
    let outcome = pools.refill(&key()).await.unwrap();
    assert_eq!(outcome.released, 2, "down to min_idle");
    assert_eq!(backend.allocated(), 2);
}

#[tokio::test]
async fn a_drained_pool_gives_back_its_idle_addresses_until_resumed() {
    let (backend, pools) = memory_pools().await;
    pools.warm_up(&key()).await.unwrap();
    let held = pools.assign(&key(), &owner(1)).await.unwrap();
    assert_eq!(backend.allocated(), 3);

    let returned = pools.drain(&key()).await.unwrap();
    assert_eq!(returned, 2, "the two idle addresses go back");
    assert_eq!(backend.allocated(), 1, "the pod's address stays");
    let stats = pools.stats(&key());
    assert!(stats.draining);
    assert_eq!((stats.idle, stats.assigned), (0, 1));
    assert_eq!(pools.refill(&key()).await.unwrap().allocated, 0);
    assert!(matches!(
        pools.assign(&key(), &owner(2)).await,
        Err(PoolError::Degraded {
            exhausted: false,
            ..
        })
    ));
    assert_eq!(pools.assign(&key(), &owner(1)).await.unwrap(), held);

    let resumed = pools.resume(&key()).await.unwrap();
    assert_eq!(resumed.allocated, config().batch);
    assert!(!pools.stats(&key()).draining);
    pools.assign(&key(), &owner(2)).await.unwrap();
}

#[tokio::test]
async fn an_address_names_its_holder() {
    let (_, pools) = memory_pools().await;
    pools.warm_up(&key()).await.unwrap();
    let lease = pools.assign(&key(), &owner(7)).await.unwrap();
    assert_eq!(
        pools.holder_of(lease.address.addr()),
        Some((key(), owner(7)))
    );
    let idle = pools
        .records()
        .into_iter()
        .find(|record| record.lease.id != lease.id)
        .unwrap();
    assert_eq!(pools.holder_of(idle.lease.address.addr()), None);
    assert_eq!(pools.records().len(), 3);
}

fn address(text: &str) -> std::net::IpAddr {
    text.parse().unwrap()
}

#[tokio::test]
async fn a_fixed_address_comes_from_the_backend_once_then_from_the_pool() {
    let (backend, pools) = memory_pools().await;
    pools.warm_up(&key()).await.unwrap();
    let fixed = address("10.0.0.50");
    let lease = pools
        .assign_address(&key(), &owner(1), fixed)
        .await
        .unwrap();
    assert_eq!(lease.address.addr(), fixed);
    assert_eq!(lease.owner, Some(owner(1)));
    assert_eq!(backend.allocated(), 4, "one call for the fixed address");
    assert_eq!(
        pools
            .assign_address(&key(), &owner(1), fixed)
            .await
            .unwrap(),
        lease,
        "a retried ADD gets the same address"
    );
    for (who, wanted) in [(owner(2), fixed), (owner(1), address("10.0.0.51"))] {
        let refused = pools.assign_address(&key(), &who, wanted).await;
        assert!(
            matches!(refused, Err(PoolError::AddressUnavailable { address, .. }) if address == wanted),
            "{refused:?}"
        );
    }
    // An idle address of the pool is taken without a backend call.
    let idle = pools.records()[0].lease.address.addr();
    pools.assign_address(&key(), &owner(2), idle).await.unwrap();
    assert_eq!(pools.stats(&key()).idle, 2);
    // The pod comes back (a new sandbox): its address is still cooling
    // down, which protects strangers, not the pod that asks for it.
    pools.release(&key(), &owner(1)).await.unwrap();
    let again = pools
        .assign_address(&key(), &owner(3), fixed)
        .await
        .unwrap();
    assert_eq!(again.address.addr(), fixed);
    assert_eq!(backend.allocated(), 4);
    assert_eq!(pools.stats(&key()).assigned, 2);
}

#[tokio::test]
async fn a_fixed_address_another_pod_released_from_the_pool_cools_down_first() {
    let (backend, clock, pools) =
        in_memory_with(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), config()).await;
    pools.warm_up(&key()).await.unwrap();
    let pooled = pools.assign(&key(), &owner(1)).await.unwrap();
    pools.release(&key(), &owner(1)).await.unwrap();
    // A pod whose annotation names that address: Service endpoints may
    // still point at the pod that released it, so not before its cooldown.
    let wanted = pooled.address.addr();
    let refused = pools.assign_address(&key(), &owner(2), wanted).await;
    assert!(
        matches!(refused, Err(PoolError::AddressUnavailable { address, .. }) if address == wanted),
        "{refused:?}"
    );
    assert_eq!(pools.stats(&key()).cooldown, 1, "it keeps cooling down");
    let allocated = backend.allocated();
    clock.advance(Duration::from_secs(31));
    let lease = pools
        .assign_address(&key(), &owner(2), wanted)
        .await
        .unwrap();
    assert_eq!(lease.address, pooled.address);
    assert_eq!(backend.allocated(), allocated, "the pool's own record");
}

#[tokio::test]
async fn two_pods_racing_for_one_fixed_address_get_it_once() {
    let (backend, pools) = slow_pools(Duration::from_millis(200)).await;
    let fixed = address("10.0.0.60");
    let racing = (1..=2).map(|n| {
        let pools = pools.clone();
        tokio::spawn(async move { pools.assign_address(&key(), &owner(n), fixed).await })
    });
    let mut outcomes = Vec::new();
    for handle in racing {
        outcomes.push(handle.await.unwrap());
    }
    let won = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
    assert_eq!(won, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .any(|outcome| matches!(outcome, Err(PoolError::AddressUnavailable { .. }))),
        "{outcomes:?}"
    );
    assert_eq!(backend.inner().allocated(), 1);
}

#[tokio::test]
async fn a_fixed_address_asked_for_by_a_cancelled_add_can_be_asked_for_again() {
    let (_, pools) = slow_pools(Duration::from_millis(300)).await;
    let fixed = address("10.0.0.70");
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        pools.assign_address(&key(), &owner(1), fixed),
    )
    .await;
    assert!(cancelled.is_err(), "the ADD gave up first");
    let lease = pools
        .assign_address(&key(), &owner(1), fixed)
        .await
        .unwrap();
    assert_eq!(lease.address.addr(), fixed);
}

#[tokio::test]
async fn a_released_fixed_address_goes_back_to_the_backend_after_its_cooldown() {
    let (backend, clock, pools) =
        in_memory_with(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), config()).await;
    let fixed = address("10.0.0.50");
    pools
        .assign_address(&key(), &owner(1), fixed)
        .await
        .unwrap();
    pools.release(&key(), &owner(1)).await.unwrap();
    pools.refill(&key()).await.unwrap();
    assert_eq!(
        pools.stats(&key()).cooldown,
        1,
        "kept for the pod's return while cooling down"
    );
    clock.advance(Duration::from_secs(31));
    let outcome = pools.refill(&key()).await.unwrap();
    assert_eq!(outcome.released, 1);
    let addresses: Vec<_> = pools
        .records()
        .iter()
        .map(|record| record.lease.address.addr())
        .collect();
    assert!(!addresses.contains(&fixed), "{addresses:?}");
    assert_eq!(backend.allocated(), addresses.len());
}

#[tokio::test]
async fn in_a_full_subnet_an_add_waits_for_an_address_leaving_cooldown() {
    // A /29: 5 addresses besides the gateway. This node holds one, another
    // node the other four.
    let backend = Arc::new(MemoryBackend::new("10.0.0.0/29".parse().unwrap()));
    let mut knobs = config();
    knobs.min_idle = 0;
    knobs.max_idle = 1;
    knobs.warm_up = 1;
    knobs.reuse_cooldown = Duration::from_millis(500);
    knobs.assign_timeout = Duration::from_secs(10);
    let pools = PoolManager::open(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        Arc::new(hulk_pool::SystemClock),
        "node-1",
        knobs,
    )
    .await
    .unwrap();
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 1);
    let first = pools.assign(&key(), &owner(1)).await.unwrap();
    backend
        .allocate(&AllocationRequest::new(key(), "node-2", 4))
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let refiller = tokio::spawn(pools.clone().run_refiller(key(), stop.clone()));
    pools.release(&key(), &owner(1)).await.unwrap();
    // The cloud says exhausted; the address coming out of cooldown serves.
    let second = pools.assign(&key(), &owner(2)).await.unwrap();
    assert_eq!(second.address, first.address);
    assert!(pools.stats(&key()).degraded, "the subnet is full");
    // With nothing cooling, a full subnet answers at once.
    let refused = pools.assign(&key(), &owner(3)).await.unwrap_err();
    assert!(
        matches!(
            refused,
            PoolError::Degraded {
                exhausted: true,
                ..
            }
        ),
        "{refused}"
    );
    stop.cancel();
    refiller.await.unwrap();
}

/// The record `store` holds for an address of `lease`, in `state`.
fn stored(lease: hulk_ipam::Lease, state: AddressState) -> AddressRecord {
    AddressRecord {
        key: key(),
        lease,
        state,
        since_ms: 0,
        fixed: false,
        lost: false,
    }
}

/// How many addresses of `key()`'s pool the sweeps found gone from the
/// backend while in `state`.
fn lost_count(pools: &PoolManager, state: &str) -> u64 {
    let labels = PoolLabels::from(&key());
    pools
        .metrics()
        .leases_lost
        .get_or_create(&LostLabels {
            subnet: labels.subnet,
            security_groups: labels.security_groups,
            qos_policy: labels.qos_policy,
            state: state.into(),
        })
        .get()
}

#[tokio::test]
async fn idle_addresses_the_cloud_took_back_are_never_handed_out_again() {
    // The issue's input: a warm pool of 4, two of its idle addresses
    // deleted in the cloud, a sweep, another node allocating them.
    let (backend, clock, pools) = in_memory_with(
        MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
        PoolConfig {
            warm_up: 4,
            batch: 4,
            ..config()
        },
    )
    .await;
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 4);
    let records = pools.records();
    let taken: Vec<&AddressRecord> = records.iter().take(2).collect();
    for record in &taken {
        backend.release(&record.lease.id).await.unwrap();
    }
    let taken_addresses: HashSet<_> = taken.iter().map(|record| record.lease.address).collect();
    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep {
            dropped_idle: 2,
            ..OrphanSweep::default()
        }
    );
    assert_eq!(lost_count(&pools, "idle"), 2);
    assert_eq!(pools.stats(&key()).idle, 2);
    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep::default(),
        "dropped once"
    );
    let theirs: HashSet<_> = backend
        .allocate(&AllocationRequest::new(key(), "node-2", 2))
        .await
        .unwrap()
        .into_iter()
        .map(|lease| lease.address)
        .collect();
    assert_eq!(theirs, taken_addresses, "the other node got the same two");

    // Our next ADDs: the two left, then what refills bring.
    let mut ours = HashSet::new();
    for n in 0..2 {
        ours.insert(pools.assign(&key(), &owner(n)).await.unwrap().address);
    }
    pools.refill(&key()).await.unwrap();
    for n in 2..4 {
        ours.insert(pools.assign(&key(), &owner(n)).await.unwrap().address);
    }
    // Released and cooled down, the pool's addresses serve again: still
    // never the other node's.
    for n in 0..4 {
        pools.release(&key(), &owner(n)).await.unwrap();
    }
    clock.advance(Duration::from_secs(31));
    for n in 4..8 {
        ours.insert(pools.assign(&key(), &owner(n)).await.unwrap().address);
    }
    assert!(
        ours.is_disjoint(&theirs),
        "{ours:?} shares an address with the other node's {theirs:?}"
    );
}

#[tokio::test]
async fn an_address_the_cloud_took_back_during_its_cooldown_comes_back_cooling() {
    // Released by its pod and then deleted in the cloud (dropped while
    // cooling), or deleted while the pod used it (dropped at its DEL):
    // either way the cloud may give it out again at once, and a refill of
    // this node must not hand it to another pod before the cooldown of
    // the pod that used it ends.
    for dropped_while_cooling in [true, false] {
        let (backend, clock, pools) =
            in_memory_with(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), config()).await;
        pools.warm_up(&key()).await.unwrap();
        let used = pools.assign(&key(), &owner(1)).await.unwrap();
        let released_at = clock.now_ms();
        if dropped_while_cooling {
            pools.release(&key(), &owner(1)).await.unwrap();
        }
        backend.release(&used.id).await.unwrap();
        pools.sweep_orphans().await.unwrap();
        if !dropped_while_cooling {
            pools.release(&key(), &owner(1)).await.unwrap();
        }
        clock.advance(Duration::from_secs(10));
        let mut handed = Vec::new();
        for n in 2..8 {
            pools.refill(&key()).await.unwrap();
            handed.push(pools.assign(&key(), &owner(n)).await.unwrap().address);
        }
        let back: Vec<_> = pools
            .records()
            .into_iter()
            .filter(|record| record.lease.address == used.address)
            .collect();
        assert_eq!(back.len(), 1, "the cloud gave it back to this node");
        assert_eq!(
            back[0].state,
            AddressState::Cooldown {
                until_ms: released_at + 30_000
            },
            "cooling until the end of its pod's cooldown"
        );
        assert!(!handed.contains(&used.address), "{handed:?}");
        let refused = pools
            .assign_address(&key(), &owner(9), used.address.addr())
            .await;
        assert!(
            matches!(refused, Err(PoolError::AddressUnavailable { .. })),
            "{refused:?}"
        );
        clock.advance(Duration::from_secs(21));
        pools.refill(&key()).await.unwrap();
        let lease = pools
            .assign_address(&key(), &owner(9), used.address.addr())
            .await
            .unwrap();
        assert_eq!(lease.address, used.address, "cooled down, it serves");
    }
}

#[tokio::test]
async fn a_pods_address_the_cloud_took_back_is_flagged_lost_and_dropped_at_its_del() {
    let backend = Arc::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap()));
    let store = Arc::new(MemoryStore::default());
    let clock = Arc::new(ManualClock::default());
    let pools = manager(backend.clone(), store.clone(), clock.clone(), config()).await;
    pools.warm_up(&key()).await.unwrap();
    let held = pools.assign(&key(), &owner(1)).await.unwrap();
    let kept = pools.assign(&key(), &owner(2)).await.unwrap();
    backend.release(&held.id).await.unwrap();

    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep {
            lost_assigned: 1,
            ..OrphanSweep::default()
        }
    );
    assert!(store.load().unwrap().addresses[&held.id].lost, "durable");
    assert!(!store.load().unwrap().addresses[&kept.id].lost);
    let stats = pools.stats(&key());
    assert_eq!((stats.assigned, stats.lost), (2, 1));
    assert_eq!(lost_count(&pools, "assigned"), 1);
    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep::default(),
        "reported once; the flag stays"
    );
    assert_eq!(lost_count(&pools, "assigned"), 1);
    assert_eq!(
        pools.lease_of(&owner(1)).unwrap().address,
        held.address,
        "the pod keeps what it uses until its DEL"
    );

    // Another node gets the address; our pod's DEL must not free it here.
    let theirs = backend
        .allocate(&AllocationRequest::new(key(), "node-2", 1))
        .await
        .unwrap();
    assert_eq!(theirs[0].address, held.address);
    pools.release(&key(), &owner(1)).await.unwrap();
    assert!(!store.load().unwrap().addresses.contains_key(&held.id));
    let stats = pools.stats(&key());
    assert_eq!((stats.assigned, stats.cooldown, stats.lost), (1, 0, 0));
    assert_eq!(
        backend
            .list(&ListScope::Node("node-2".into()))
            .await
            .unwrap()
            .len(),
        1,
        "the other node's lease is untouched"
    );
    clock.advance(Duration::from_secs(31));
    pools.refill(&key()).await.unwrap();
    for n in 3..6 {
        let lease = pools.assign(&key(), &owner(n)).await.unwrap();
        assert_ne!(lease.address, held.address, "handed out twice");
    }
}

#[tokio::test]
async fn a_start_while_the_backend_is_down_serves_and_a_later_sweep_settles_the_intents() {
    let mock = MemoryBackend::new("10.0.0.0/24".parse().unwrap());
    let store = Arc::new(MemoryStore::default());
    // What the last run left: an idle address, one being returned (shrink
    // crashed mid-call), and one its crashed allocation created that the
    // store never recorded.
    let mut leases = mock
        .allocate(&AllocationRequest::new(key(), "node-1", 3))
        .await
        .unwrap()
        .into_iter();
    let (idle, returning, orphan) = (
        leases.next().unwrap(),
        leases.next().unwrap(),
        leases.next().unwrap(),
    );
    store
        .apply(&[
            StoreOp::put(stored(idle.clone(), AddressState::Idle)),
            StoreOp::put(stored(returning.clone(), AddressState::Releasing)),
            StoreOp::PutIntent(Intent {
                id: 1,
                kind: IntentKind::Allocate {
                    key: key(),
                    count: 1,
                },
            }),
            StoreOp::PutIntent(Intent {
                id: 2,
                kind: IntentKind::Release {
                    lease_id: returning.id.clone(),
                },
            }),
        ])
        .unwrap();
    // Down for the start: its release (1), the sweep's retry of it (2) and
    // its list (3); up from then on.
    let down = IpamError::Transient("cloud unreachable".into());
    let backend = Arc::new(Faulty::new(
        mock,
        FaultPlan {
            on_call: (1..=3)
                .map(|call| (call, Fault::Error(down.clone())))
                .collect(),
            ..FaultPlan::default()
        },
    ));
    let pools = manager(backend.clone(), store.clone(), Arc::default(), config()).await;
    assert_eq!(backend.calls(), 3);
    assert_eq!(pools.unsettled_intents(), 2);
    assert_eq!(store.load().unwrap().intents.len(), 2, "kept for later");
    let stats = pools.stats(&key());
    assert_eq!((stats.idle, stats.releasing), (1, 1));

    // Serving and DEL work from the store meanwhile, never with the
    // address being returned.
    let lease = pools.assign(&key(), &owner(1)).await.unwrap();
    assert_eq!(lease.id, idle.id);
    pools.release(&key(), &owner(1)).await.unwrap();
    assert_eq!(pools.stats(&key()).cooldown, 1);

    // An allocation of this run in flight: its intent is not the sweep's.
    let in_flight = Intent {
        id: 50,
        kind: IntentKind::Allocate {
            key: key(),
            count: 1,
        },
    };
    store
        .apply(&[StoreOp::PutIntent(in_flight.clone())])
        .unwrap();

    // The backend is back: the next sweep finishes the release, adopts the
    // interrupted allocation's address, and removes exactly those intents.
    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep {
            adopted_idle: 1,
            ..OrphanSweep::default()
        }
    );
    assert_eq!(pools.unsettled_intents(), 0);
    let snapshot = store.load().unwrap();
    assert_eq!(
        snapshot.intents.into_values().collect::<Vec<_>>(),
        [in_flight]
    );
    assert!(!snapshot.addresses.contains_key(&returning.id));
    assert!(snapshot.addresses.contains_key(&orphan.id));
    let listed: HashSet<String> = backend
        .list(&ListScope::Node("node-1".into()))
        .await
        .unwrap()
        .into_iter()
        .map(|lease| lease.id)
        .collect();
    assert_eq!(listed, HashSet::from([idle.id, orphan.id]));
    let stats = pools.stats(&key());
    assert_eq!(
        (stats.idle, stats.cooldown, stats.releasing),
        (1, 1, 0),
        "the orphan idle, the released one cooling down"
    );
}

/// A backend whose listing of a node misses some of its leases (as a
/// Neutron port whose binding is not visible yet), the rest as the mock.
/// It also records each `reconcile_node` call: the node and the lease ids.
struct PartialListing {
    inner: MemoryBackend,
    unlisted: std::sync::Mutex<HashSet<String>>,
    reconciled: std::sync::Mutex<Vec<(String, HashSet<String>)>>,
}

#[async_trait::async_trait]
impl IpamBackend for PartialListing {
    fn name(&self) -> &str {
        "partial-listing"
    }
    async fn allocate(
        &self,
        request: &AllocationRequest,
    ) -> Result<Vec<hulk_ipam::Lease>, IpamError> {
        self.inner.allocate(request).await
    }
    async fn release(&self, id: &str) -> Result<(), IpamError> {
        self.inner.release(id).await
    }
    async fn update_owner(
        &self,
        id: &str,
        owner: Option<Owner>,
        marked_by: Option<hulk_ipam::InstanceMark>,
    ) -> Result<hulk_ipam::Lease, IpamError> {
        self.inner.update_owner(id, owner, marked_by).await
    }
    async fn list(&self, scope: &ListScope) -> Result<Vec<hulk_ipam::Lease>, IpamError> {
        let unlisted = self.unlisted.lock().unwrap().clone();
        let listed = self.inner.list(scope).await?;
        Ok(listed
            .into_iter()
            .filter(|lease| !unlisted.contains(&lease.id))
            .collect())
    }
    async fn health(&self) -> Result<(), IpamError> {
        self.inner.health().await
    }
    async fn reconcile_node(&self, node: &str, held: &[hulk_ipam::Lease]) -> Result<(), IpamError> {
        let ids = held.iter().map(|lease| lease.id.clone()).collect();
        self.reconciled.lock().unwrap().push((node.to_owned(), ids));
        Ok(())
    }
}

fn partial_listing() -> PartialListing {
    PartialListing {
        inner: MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
        unlisted: std::sync::Mutex::new(HashSet::new()),
        reconciled: std::sync::Mutex::new(Vec::new()),
    }
}

#[tokio::test]
async fn each_sweep_reconciles_the_node_with_what_it_holds() {
    let (backend, _clock, pools) = in_memory_with(partial_listing(), config()).await;
    assert_eq!(
        backend.reconciled.lock().unwrap().clone(),
        [("node-1".to_owned(), HashSet::new())],
        "at start, after the first sweep"
    );
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 3);
    let held = pools.assign(&key(), &owner(1)).await.unwrap();
    pools.sweep_orphans().await.unwrap();
    let all: HashSet<String> = pools
        .records()
        .into_iter()
        .map(|record| record.lease.id)
        .collect();
    assert_eq!(all.len(), 3);
    assert_eq!(
        backend.reconciled.lock().unwrap().last().unwrap().1,
        all,
        "idle and assigned addresses alike"
    );
    // The cloud takes the pod's address back: no longer the node's.
    backend.inner.release(&held.id).await.unwrap();
    pools.sweep_orphans().await.unwrap();
    let mut expected = all.clone();
    expected.remove(&held.id);
    assert_eq!(
        backend.reconciled.lock().unwrap().last().unwrap().1,
        expected
    );
}

#[tokio::test]
async fn an_address_a_listing_misses_but_the_backend_has_is_kept() {
    let (backend, _clock, pools) = in_memory_with(partial_listing(), config()).await;
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 3);
    let held = pools.assign(&key(), &owner(1)).await.unwrap();
    let idle = pools
        .records()
        .into_iter()
        .find(|record| record.lease.id != held.id)
        .unwrap();
    backend
        .unlisted
        .lock()
        .unwrap()
        .extend([held.id.clone(), idle.lease.id.clone()]);
    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep::default(),
        "asked by id, the backend still has both"
    );
    assert_eq!(pools.records().len(), 3);
    assert_eq!(pools.lease_of(&owner(1)).unwrap().id, held.id);
    // Gone for real: dropped.
    backend.inner.release(&idle.lease.id).await.unwrap();
    let sweep = pools.sweep_orphans().await.unwrap();
    assert_eq!(sweep.dropped_idle, 1);
    assert_eq!(sweep.lost_assigned, 0);
}

#[tokio::test(start_paused = true)]
async fn an_add_cancelled_while_waiting_leaves_no_demand_behind() {
    let mut none_idle = config();
    none_idle.min_idle = 0;
    none_idle.max_idle = 0;
    none_idle.warm_up = 0;
    let backend = Arc::new(Faulty::new(
        MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
        FaultPlan::fixed_latency(Duration::from_secs(10)),
    ));
    let pools = manager(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::default()),
        none_idle,
    )
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let refiller = tokio::spawn(pools.clone().run_refiller(key(), stop.clone()));
    // Five ADDs whose callers give up (their DEL, or their deadline).
    let adds = (0..5).map(|n| {
        let pools = pools.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(1), pools.assign(&key(), &owner(n))).await
        }
    });
    for outcome in futures::future::join_all(adds).await {
        assert!(outcome.is_err(), "cancelled while waiting");
    }
    // What the refiller allocated for them serves nobody: it goes back.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let stats = pools.stats(&key());
    assert_eq!((stats.idle, stats.assigned), (0, 0), "{stats:?}");
    assert_eq!(backend.inner().allocated(), 0);
    stop.cancel();
    refiller.abort();
}
