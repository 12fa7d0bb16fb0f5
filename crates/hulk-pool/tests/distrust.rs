//! The pool against a backend that misbehaves ([`hulk_ipam::Faulty`]'s
//! wrong answers): duplicate addresses and ids, short and long answers,
//! addresses outside the subnet, absurd Retry-After, unreadable answers,
//! refused credentials and a panicking client. Each test is one input that
//! used to hand an address to two pods, leak addresses, stop refills for
//! good or take a task down.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hulk_ipam::{
    AllocationRequest, Fault, FaultPlan, Faulty, IpamBackend, IpamError, ListScope, MemoryBackend,
    Owner, PoolKey,
};
use hulk_pool::{
    AUTH_FAILING_AFTER, Clock, MAX_BACKEND_PAUSE, MemoryStore, OrphanSweep, PoolConfig, PoolError,
    PoolManager, PoolStore,
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

fn manual() -> Arc<ManualClock> {
    Arc::default()
}

/// A clock that follows tokio's (paused) time, for back-off tests.
struct TokioClock(tokio::time::Instant);

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        1_000_000 + self.0.elapsed().as_millis() as u64
    }
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
        idle_reclaim_after: None,
        assign_timeout: Duration::from_millis(100),
        ..PoolConfig::default()
    }
}

/// A /24 mock backend with `faults` on those calls (call 1 is the sweep at
/// open).
fn faulty(faults: impl IntoIterator<Item = (u64, Fault)>) -> Faulty<MemoryBackend> {
    Faulty::new(
        MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
        FaultPlan {
            on_call: faults.into_iter().collect(),
            ..FaultPlan::default()
        },
    )
}

struct Setup {
    backend: Arc<Faulty<MemoryBackend>>,
    store: Arc<MemoryStore>,
    pools: Arc<PoolManager>,
    registry: prometheus_client::registry::Registry,
}

async fn open(backend: Faulty<MemoryBackend>, config: PoolConfig, clock: Arc<dyn Clock>) -> Setup {
    let backend = Arc::new(backend);
    let store = Arc::new(MemoryStore::default());
    let pools = PoolManager::open(backend.clone(), store.clone(), clock, "node-1", config)
        .await
        .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    pools.metrics().register(&mut registry);
    Setup {
        backend,
        store,
        pools,
        registry,
    }
}

impl Setup {
    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    fn anomalies(&self, kind: &str) -> u64 {
        let line = format!("hulk_pool_backend_anomalies_total{{kind=\"{kind}\"}} ");
        self.metrics()
            .lines()
            .find_map(|text| text.strip_prefix(&line))
            .map_or(0, |count| count.parse().unwrap())
    }

    /// The backend and the store hold the same leases, and the store no
    /// address twice.
    async fn agree(&self) {
        let backend: HashSet<String> = self
            .backend
            .inner()
            .list(&ListScope::Cluster)
            .await
            .unwrap()
            .into_iter()
            .map(|lease| lease.id)
            .collect();
        let snapshot = self.store.load().unwrap();
        let stored: HashSet<String> = snapshot.addresses.keys().cloned().collect();
        assert_eq!(backend, stored, "backend and store disagree");
        let addresses: HashSet<_> = snapshot
            .addresses
            .values()
            .map(|record| record.lease.address.addr())
            .collect();
        assert_eq!(addresses.len(), stored.len(), "an address held twice");
    }
}

/// Assigns owners `range`, returning the addresses of those that got one.
async fn assign_all(pools: &PoolManager, range: std::ops::Range<usize>) -> Vec<ipnet::IpNet> {
    let mut addresses = Vec::new();
    for n in range {
        match pools.assign(&key(), &owner(n)).await {
            Ok(lease) => addresses.push(lease.address),
            Err(PoolError::Empty { .. }) => {}
            Err(error) => panic!("assign {n}: {error}"),
        }
    }
    addresses
}

#[tokio::test]
async fn an_address_the_node_holds_is_refused_and_its_new_id_returned() {
    // Call 2: the warm-up; call 3: a refill whose last lease repeats the
    // first address.
    let setup = open(faulty([(3, Fault::DuplicateAddress)]), config(), manual()).await;
    let pools = &setup.pools;
    pools.warm_up(&key()).await.unwrap();
    let mut held = assign_all(pools, 1..4).await;
    assert_eq!(held.len(), 3);
    let outcome = pools.refill(&key()).await.unwrap();
    assert_eq!(outcome.allocated, 2, "the duplicate is not adopted");
    held.extend(assign_all(pools, 4..7).await);
    let distinct: HashSet<_> = held.iter().collect();
    assert_eq!(
        distinct.len(),
        held.len(),
        "one address, two pods: {held:?}"
    );
    assert_eq!(held.len(), 5);
    assert_eq!(setup.anomalies("duplicate_address"), 1);
    setup.agree().await;
}

#[tokio::test]
async fn a_reused_id_is_quarantined_never_released_and_nothing_panics() {
    let setup = open(faulty([(3, Fault::ReusedId)]), config(), manual()).await;
    let pools = &setup.pools;
    pools.warm_up(&key()).await.unwrap();
    let first = pools.assign(&key(), &owner(1)).await.unwrap();
    assign_all(pools, 2..4).await;
    // The refill's last lease comes back under owner 1's lease id.
    assert_eq!(pools.refill(&key()).await.unwrap().allocated, 2);
    assert_eq!(setup.anomalies("duplicate_id"), 1);
    assert_eq!(pools.lease_of(&owner(1)), Some(first.clone()), "untouched");
    let listed = setup
        .backend
        .inner()
        .list(&ListScope::Node("node-1".into()))
        .await
        .unwrap();
    assert!(
        listed
            .iter()
            .any(|lease| lease.id == first.id && lease.address == first.address),
        "the pod's lease was released"
    );
    // DEL, ADD, STATUS, GC and the refiller's work go on.
    pools.release(&key(), &owner(1)).await.unwrap();
    let others = assign_all(pools, 4..6).await;
    assert_eq!(others.len(), 2);
    assert!(!others.contains(&first.address));
    let stats = pools.stats(&key());
    assert_eq!((stats.assigned, stats.cooldown), (4, 1));
    pools.refill(&key()).await.unwrap();
    // The dead-pod collection judges (the node releases what it finds gone).
    let missing = pools.find_missing(&HashSet::new());
    assert!(missing.gone.is_empty(), "nothing was missing before");
    // The lease the backend created under the id it hid is an orphan the
    // sweep takes in.
    assert_eq!(setup.backend.hidden().len(), 1);
    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep {
            adopted_idle: 1,
            ..OrphanSweep::default()
        }
    );
    setup.agree().await;
}

#[tokio::test]
async fn a_lease_given_twice_in_one_answer_is_adopted_once() {
    let setup = open(faulty([(2, Fault::Repeated)]), config(), manual()).await;
    assert_eq!(setup.pools.warm_up(&key()).await.unwrap(), 3);
    let held = assign_all(&setup.pools, 1..5).await;
    assert_eq!(held.len(), 3, "three addresses, not four: {held:?}");
    assert_eq!(setup.anomalies("duplicate_id"), 1);
    setup.agree().await;
}

#[tokio::test]
async fn a_short_answer_is_adopted_and_an_empty_one_backs_off() {
    let setup = open(
        faulty([(2, Fault::ShortAnswer(1)), (4, Fault::ShortAnswer(3))]),
        config(),
        manual(),
    )
    .await;
    let pools = &setup.pools;
    // Two of three came, and were kept; a second call brought the third.
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 3);
    assert_eq!(setup.backend.calls(), 3);
    assert_eq!(setup.anomalies("short_answer"), 1);
    setup.agree().await;
    // An answer with nothing in it is a failure: refills back off.
    assign_all(pools, 1..3).await;
    let outcome = pools.refill(&key()).await.unwrap();
    assert!(
        matches!(outcome.error, Some(IpamError::Protocol(_))),
        "{outcome:?}"
    );
    let stats = pools.stats(&key());
    assert!(stats.backoff_until_ms.is_some(), "{stats:?}");
    assert_eq!(stats.consecutive_failures, 1);
    assert_eq!(
        pools.refill(&key()).await.unwrap().allocated,
        0,
        "no call while backing off"
    );
    assert_eq!(setup.backend.calls(), 4);
}

#[tokio::test]
async fn a_long_answer_gives_what_was_asked_and_returns_the_rest() {
    let setup = open(faulty([(2, Fault::LongAnswer(2))]), config(), manual()).await;
    assert_eq!(setup.pools.warm_up(&key()).await.unwrap(), 3);
    assert_eq!(setup.pools.stats(&key()).idle, 3);
    assert_eq!(setup.anomalies("long_answer"), 2);
    assert_eq!(setup.backend.inner().allocated(), 3, "the extras went back");
    setup.agree().await;
}

#[tokio::test]
async fn an_address_outside_the_subnet_is_returned() {
    let setup = open(faulty([(3, Fault::OutsideSubnet)]), config(), manual()).await;
    let pools = &setup.pools;
    pools.warm_up(&key()).await.unwrap();
    assign_all(pools, 1..4).await;
    assert_eq!(pools.refill(&key()).await.unwrap().allocated, 2);
    let held = assign_all(pools, 4..7).await;
    assert!(
        held.iter()
            .all(|address| address.to_string().starts_with("10.0.0.")),
        "{held:?}"
    );
    assert_eq!(setup.anomalies("outside_subnet"), 1);
    setup.agree().await;
}

#[tokio::test]
async fn a_pod_s_fixed_address_answered_with_another_is_refused_and_returned() {
    let setup = open(faulty([(2, Fault::OutsideSubnet)]), config(), manual()).await;
    let wanted = "10.0.0.50".parse().unwrap();
    let error = setup
        .pools
        .assign_address(&key(), &owner(1), wanted)
        .await
        .unwrap_err();
    assert!(
        matches!(error, PoolError::Backend(IpamError::Protocol(_))),
        "{error}"
    );
    assert_eq!(setup.backend.inner().allocated(), 0, "returned, not leaked");
    assert!(setup.store.load().unwrap().intents.is_empty());
    let lease = setup
        .pools
        .assign_address(&key(), &owner(1), wanted)
        .await
        .unwrap();
    assert_eq!(lease.address.addr(), wanted);
}

#[tokio::test]
async fn retry_after_is_capped_and_never_overflows() {
    let hundred_years = Duration::from_secs(100 * 365 * 24 * 3600);
    for retry_after in [hundred_years, Duration::from_secs(u64::MAX), Duration::MAX] {
        let clock = Arc::new(ManualClock::default());
        let throttled = Fault::Error(IpamError::Throttled {
            retry_after: Some(retry_after),
        });
        let setup = open(faulty([(2, throttled)]), config(), clock.clone()).await;
        let pools = &setup.pools;
        let outcome = pools.refill(&key()).await.unwrap();
        assert!(matches!(outcome.error, Some(IpamError::Throttled { .. })));
        assert!(pools.stats(&key()).degraded);
        clock.advance(MAX_BACKEND_PAUSE - Duration::from_secs(1));
        assert_eq!(pools.refill(&key()).await.unwrap().allocated, 0);
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            pools.refill(&key()).await.unwrap().allocated,
            3,
            "{retry_after:?} is cut to {MAX_BACKEND_PAUSE:?}"
        );
        assert!(!pools.stats(&key()).degraded);
    }
}

#[tokio::test]
async fn absurd_timeouts_in_the_configuration_do_not_overflow() {
    let mut absurd = config();
    absurd.assign_timeout = Duration::MAX;
    absurd.reuse_cooldown = Duration::MAX;
    absurd.idle_reclaim_after = Some(Duration::MAX);
    absurd.backend_calls_per_second = f64::MIN_POSITIVE;
    absurd.backend_burst = 5;
    let setup = open(faulty([]), absurd, manual()).await;
    let pools = &setup.pools;
    pools.warm_up(&key()).await.unwrap();
    pools.assign(&key(), &owner(1)).await.unwrap();
    pools.release(&key(), &owner(1)).await.unwrap();
    assert_eq!(pools.stats(&key()).cooldown, 1);
    pools.refill(&key()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_refiller_that_panics_is_restarted() {
    let mut waiting = config();
    waiting.assign_timeout = Duration::from_secs(30);
    // Call 2, the refill an ADD waits for, panics in the backend client.
    let setup = open(faulty([(2, Fault::Panic)]), waiting, manual()).await;
    let pools = setup.pools.clone();
    pools.stats(&key());
    assert!(!pools.stats(&key()).refiller_running);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let supervisor = tokio::spawn(pools.clone().run_refillers(shutdown.clone()));
    let lease = pools.assign(&key(), &owner(1)).await.unwrap();
    assert_eq!(lease.owner, Some(owner(1)));
    let stats = pools.stats(&key());
    assert!(stats.refiller_running);
    assert_eq!(stats.in_flight, 0, "the panicked allocation is not counted");
    assert!(
        setup
            .metrics()
            .contains("hulk_pool_refiller_restarts_total{subnet=\"subnet-a\",security_groups=\"sg-1\",qos_policy=\"\"} 1"),
        "{}",
        setup.metrics()
    );
    shutdown.cancel();
    supervisor.await.unwrap();
    assert!(!pools.stats(&key()).refiller_running);
}

/// A backend whose allocations from call 2 to `last` fail with `error`.
fn failing_until(last: u64, error: IpamError) -> Faulty<MemoryBackend> {
    faulty((2..=last).map(|call| (call, Fault::Error(error.clone()))))
}

#[tokio::test(start_paused = true)]
async fn unreadable_answers_are_retried_with_exponential_back_off() {
    let mut waiting = config();
    waiting.assign_timeout = Duration::from_secs(60);
    let clock = Arc::new(TokioClock(tokio::time::Instant::now()));
    let setup = open(
        failing_until(10_000, IpamError::Protocol("not JSON".into())),
        waiting,
        clock,
    )
    .await;
    let pools = setup.pools.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refiller = tokio::spawn(pools.clone().run_refiller(key(), shutdown.clone()));
    let error = pools.assign(&key(), &owner(1)).await.unwrap_err();
    assert!(matches!(error, PoolError::Empty { .. }), "{error}");
    // Windows of 1, 2, 4, 8, 16 and 32 s, each retry in its second half:
    // the sixth retry comes after 31.5 s at the earliest, the seventh after
    // 61.5 s. The limiter alone would allow 600 calls.
    let allocations = setup.backend.calls() - 1;
    assert!((6..=7).contains(&allocations), "{allocations} calls");
    let stats = pools.stats(&key());
    assert_eq!(
        stats.last_error.map(|failure| failure.kind).as_deref(),
        Some("protocol")
    );
    assert!(stats.backoff_until_ms.is_some());
    shutdown.cancel();
    refiller.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_and_a_success_resets_the_back_off() {
    let mut waiting = config();
    waiting.assign_timeout = Duration::from_secs(60);
    let clock = Arc::new(TokioClock(tokio::time::Instant::now()));
    let setup = open(
        failing_until(5, IpamError::Transient("connection reset".into())),
        waiting,
        clock,
    )
    .await;
    let pools = setup.pools.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refiller = tokio::spawn(pools.clone().run_refiller(key(), shutdown.clone()));
    let started = tokio::time::Instant::now();
    pools.assign(&key(), &owner(1)).await.unwrap();
    let waited = started.elapsed();
    // Four failures: 0.5 + 1 + 2 + 4 s at least, 1 + 2 + 4 + 8 at most.
    assert!(
        waited >= Duration::from_millis(7500) && waited <= Duration::from_secs(16),
        "{waited:?}"
    );
    let stats = pools.stats(&key());
    assert_eq!(
        (stats.consecutive_failures, stats.backoff_until_ms),
        (0, None)
    );
    assert_eq!(
        stats.last_error.map(|failure| failure.kind).as_deref(),
        Some("transient"),
        "the last failure is kept"
    );
    shutdown.cancel();
    refiller.await.unwrap();
}

#[tokio::test]
async fn refused_credentials_show_in_the_backend_health() {
    let auth = IpamError::Auth("401 Unauthorized".into());
    let setup = open(
        failing_until(1 + u64::from(AUTH_FAILING_AFTER), auth),
        config(),
        manual(),
    )
    .await;
    let pools = &setup.pools;
    for attempt in 1..=AUTH_FAILING_AFTER {
        assert!(pools.warm_up(&key()).await.is_err());
        let health = pools.backend_health();
        assert_eq!(health.consecutive_auth_failures, attempt);
        assert_eq!(health.auth_failing, attempt >= AUTH_FAILING_AFTER);
    }
    let health = pools.backend_health();
    let last = health.last_error.unwrap();
    assert_eq!(
        (last.operation.as_str(), last.kind.as_str()),
        ("allocate", "auth")
    );
    let stats = pools.stats(&key());
    assert_eq!(stats.consecutive_failures, AUTH_FAILING_AFTER);
    assert_eq!(stats.last_error.unwrap().kind, "auth");
    // The credentials are fixed: the next call succeeds.
    pools.warm_up(&key()).await.unwrap();
    let health = pools.backend_health();
    assert!(!health.auth_failing);
    assert_eq!(health.consecutive_failures, 0);
}

#[tokio::test]
async fn the_holding_cap_bounds_warm_up_fixed_addresses_and_adoption() {
    let mut small = config();
    small.max_total = 5;
    small.max_held = Some(5);
    small.max_idle = 4;
    small.warm_up = 4;
    small.batch = 4;
    let setup = open(faulty([]), small, manual()).await;
    let pools = &setup.pools;
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 4);
    assign_all(pools, 1..5).await;
    assert_eq!(pools.warm_up(&key()).await.unwrap(), 1, "room for one");
    assert_eq!(pools.records().len(), 5);
    let refused = pools
        .assign_address(&key(), &owner(9), "10.0.0.99".parse().unwrap())
        .await;
    assert!(
        matches!(refused, Err(PoolError::AddressUnavailable { .. })),
        "{refused:?}"
    );
    // Orphans of this node: three unmarked, one marked as a pod's.
    let inner = setup.backend.inner();
    let orphans = inner
        .allocate(&AllocationRequest::new(key(), "node-1", 4))
        .await
        .unwrap();
    inner
        .update_owner(&orphans[3].id, Some(owner(7)), None)
        .await
        .unwrap();
    assert_eq!(
        pools.sweep_orphans().await.unwrap(),
        OrphanSweep {
            released: 3,
            adopted_assigned: 1,
            ..OrphanSweep::default()
        }
    );
    assert_eq!(pools.lease_of(&owner(7)).unwrap().id, orphans[3].id);
    assert_eq!(setup.anomalies("over_cap"), 4);
    assert_eq!(
        pools.records().len(),
        6,
        "only the pod's one beyond the cap"
    );
    setup.agree().await;
}
