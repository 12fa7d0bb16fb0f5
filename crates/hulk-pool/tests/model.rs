//! A property test of the pool as a state machine: random sequences of
//! assign, release, refill, clock steps, reconciliation and restarts,
//! checked after every step against a reference model of who holds what.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hulk_ipam::{MockBackend, Owner, PoolKey};
use hulk_pool::{Clock, MemoryStore, PoolConfig, PoolError, PoolManager, PoolStore};
use ipnet::IpNet;
use proptest::prelude::*;

#[derive(Default)]
struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Assign(usize),
    Release(usize),
    Refill,
    Advance(u64),
    Reconcile(Vec<bool>),
    Restart,
}

const OWNERS: usize = 6;
const COOLDOWN_MS: u64 = 30_000;

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..OWNERS).prop_map(Op::Assign),
        3 => (0..OWNERS).prop_map(Op::Release),
        2 => Just(Op::Refill),
        2 => (0u64..40).prop_map(|seconds| Op::Advance(seconds * 1000)),
        1 => proptest::collection::vec(any::<bool>(), OWNERS).prop_map(Op::Reconcile),
        1 => Just(Op::Restart),
    ]
}

fn owner(n: usize) -> Owner {
    Owner {
        container_id: format!("c{n}"),
        ifname: "eth0".into(),
        pod: None,
        cni_network: None,
        pod_uid: None,
    }
}

fn key() -> PoolKey {
    PoolKey::new("vpc", "subnet-a", ["sg"], None)
}

fn config() -> PoolConfig {
    PoolConfig {
        min_idle: 1,
        max_idle: 3,
        batch: 2,
        warm_up: 2,
        max_total: 5,
        reuse_cooldown: Duration::from_millis(COOLDOWN_MS),
        idle_reclaim_after: Some(Duration::from_secs(60)),
        assign_timeout: Duration::from_millis(10),
        backoff: Duration::from_secs(10),
        refill_interval: Duration::from_secs(1),
        ..PoolConfig::default()
    }
}

/// Who holds what, and which addresses are cooling down until when.
#[derive(Default, Debug)]
struct Model {
    held: HashMap<usize, IpNet>,
    cooling: HashMap<IpNet, u64>,
    missing_once: HashSet<usize>,
}

struct System {
    backend: Arc<MockBackend>,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    pools: Arc<PoolManager>,
}

impl System {
    async fn open(
        backend: Arc<MockBackend>,
        store: Arc<MemoryStore>,
        clock: Arc<ManualClock>,
    ) -> System {
        let pools = PoolManager::open(
            backend.clone(),
            store.clone(),
            clock.clone(),
            "node-1",
            config(),
        )
        .await
        .unwrap();
        System {
            backend,
            store,
            clock,
            pools,
        }
    }
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let backend = Arc::new(MockBackend::new("10.0.0.0/24".parse().unwrap()));
    let mut system = System::open(
        backend,
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::default()),
    )
    .await;
    system.pools.warm_up(&key()).await.unwrap();
    let mut model = Model::default();
    for op in ops {
        let now = system.clock.now_ms();
        match op {
            Op::Assign(n) => {
                let idle_before = system.pools.stats(&key()).idle;
                match system.pools.assign(&key(), &owner(n)).await {
                    Ok(lease) => {
                        if let Some(held) = model.held.get(&n) {
                            prop_assert_eq!(
                                *held,
                                lease.address,
                                "a retried assign must give the same address"
                            );
                        } else {
                            prop_assert!(
                                !model.held.values().any(|address| *address == lease.address),
                                "{} handed out twice",
                                lease.address
                            );
                            if let Some(until) = model.cooling.get(&lease.address) {
                                prop_assert!(
                                    *until <= now,
                                    "{} reused during its cooldown",
                                    lease.address
                                );
                            }
                            model.held.insert(n, lease.address);
                        }
                    }
                    Err(PoolError::Empty { .. }) => {
                        prop_assert!(!model.held.contains_key(&n));
                        prop_assert_eq!(
                            idle_before,
                            0,
                            "refused although idle addresses were ready"
                        );
                    }
                    Err(error) => return Err(TestCaseError::fail(format!("assign: {error}"))),
                }
            }
            Op::Release(n) => {
                system.pools.release(&key(), &owner(n)).await.unwrap();
                if let Some(address) = model.held.remove(&n) {
                    model.cooling.insert(address, now + COOLDOWN_MS);
                }
            }
            Op::Refill => {
                let outcome = system.pools.refill(&key()).await.unwrap();
                prop_assert!(outcome.error.is_none());
            }
            Op::Advance(ms) => {
                system.clock.0.fetch_add(ms, Ordering::SeqCst);
            }
            Op::Reconcile(alive) => {
                let live: HashSet<(String, String)> = (0..OWNERS)
                    .filter(|n| alive[*n])
                    .map(|n| (owner(n).container_id, owner(n).ifname))
                    .collect();
                let report = system.pools.reconcile(&live).await.unwrap();
                let missing: HashSet<usize> =
                    model.held.keys().copied().filter(|n| !alive[*n]).collect();
                let expect_released: HashSet<usize> =
                    missing.intersection(&model.missing_once).copied().collect();
                let released: HashSet<usize> = report
                    .released
                    .iter()
                    .map(|owner| owner.container_id[1..].parse().unwrap())
                    .collect();
                prop_assert_eq!(
                    &released,
                    &expect_released,
                    "only owners missing twice in a row are released"
                );
                for n in &released {
                    let address = model.held.remove(n).unwrap();
                    model.cooling.insert(address, now + COOLDOWN_MS);
                }
                model.missing_once = missing.difference(&released).copied().collect();
            }
            Op::Restart => {
                let (backend, store, clock) = (
                    system.backend.clone(),
                    system.store.clone(),
                    system.clock.clone(),
                );
                drop(system);
                system = System::open(backend, store, clock).await;
                model.missing_once.clear();
            }
        }
        // Invariants after every step.
        for (n, address) in &model.held {
            let lease = system.pools.lease_of(&owner(*n));
            prop_assert_eq!(lease.map(|lease| lease.address), Some(*address));
        }
        let stats = system.pools.stats(&key());
        prop_assert_eq!(stats.assigned, model.held.len());
        let records = system.store.load().unwrap().addresses.len();
        prop_assert_eq!(
            system.backend.allocated(),
            records,
            "backend and store disagree: leak or double"
        );
        prop_assert!(records <= config().max_total);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn the_pool_matches_the_model(ops in proptest::collection::vec(arb_op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(ops))?;
    }
}
