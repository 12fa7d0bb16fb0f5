//! A property test of the pool as a state machine: random sequences of
//! assign, release, refill, clock steps, reconciliation and restarts,
//! against a backend that now and then answers wrongly (an address given
//! before, a lease twice, short and long answers, an address outside the
//! subnet), checked after every step against a reference model of who
//! holds what.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hulk_ipam::{Fault, FaultPlan, Faulty, IpamError, MockBackend, Owner, PoolKey};
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

/// Wrong answers whose leases all carry ids the backend really holds, so
/// that backend and store must still agree. (A reused id hides a lease
/// from the pool by design; tests/distrust.rs covers it.)
fn arb_wrong_answer() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::DuplicateAddress),
        Just(Fault::Repeated),
        (1usize..4).prop_map(Fault::ShortAnswer),
        (1usize..4).prop_map(Fault::LongAnswer),
        Just(Fault::OutsideSubnet),
    ]
}

/// Wrong answers on some of the first 40 backend calls.
fn arb_faults() -> impl Strategy<Value = BTreeMap<u64, Fault>> {
    proptest::collection::btree_map(1u64..40, arb_wrong_answer(), 0..8)
}
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
        // Below the holding cap, so both limits are met.
        max_total: 4,
        max_held: Some(6),
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
    backend: Arc<Faulty<MockBackend>>,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    pools: Arc<PoolManager>,
}

impl System {
    async fn open(
        backend: Arc<Faulty<MockBackend>>,
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

async fn run(faults: BTreeMap<u64, Fault>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let backend = Arc::new(Faulty::new(
        MockBackend::new("10.0.0.0/24".parse().unwrap()),
        FaultPlan {
            on_call: faults,
            ..FaultPlan::default()
        },
    ));
    let mut system = System::open(
        backend,
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::default()),
    )
    .await;
    match system.pools.warm_up(&key()).await {
        Ok(_) | Err(PoolError::Backend(IpamError::Protocol(_))) => {}
        Err(error) => return Err(TestCaseError::fail(format!("warm-up: {error}"))),
    }
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
                    Err(PoolError::Full { .. }) => {
                        prop_assert!(!model.held.contains_key(&n));
                        prop_assert!(
                            model.held.len() >= config().max_total,
                            "refused as full with {} pods",
                            model.held.len()
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
                // Only an answer without a usable address fails.
                prop_assert!(
                    matches!(outcome.error, None | Some(IpamError::Protocol(_))),
                    "{:?}",
                    outcome.error
                );
            }
            Op::Advance(ms) => {
                system.clock.0.fetch_add(ms, Ordering::SeqCst);
            }
            Op::Reconcile(alive) => {
                let live: HashSet<(String, String)> = (0..OWNERS)
                    .filter(|n| alive[*n])
                    .map(|n| (owner(n).container_id, owner(n).ifname))
                    .collect();
                // As hulk-node's dead-pod collection does: judge, then
                // release what is gone (after its route is torn down).
                let judged = system.pools.find_missing(&live);
                for (key, owner) in &judged.gone {
                    system.pools.release(key, owner).await.unwrap();
                }
                let missing: HashSet<usize> =
                    model.held.keys().copied().filter(|n| !alive[*n]).collect();
                let expect_released: HashSet<usize> =
                    missing.intersection(&model.missing_once).copied().collect();
                let number = |owner: &Owner| -> usize { owner.container_id[1..].parse().unwrap() };
                let released: HashSet<usize> =
                    judged.gone.iter().map(|(_, owner)| number(owner)).collect();
                let suspected: HashSet<usize> = judged.suspected.iter().map(number).collect();
                prop_assert_eq!(
                    &suspected,
                    &missing
                        .difference(&expect_released)
                        .copied()
                        .collect::<HashSet<usize>>(),
                    "owners missing for the first time are suspected, not released"
                );
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
        let stored = system.store.load().unwrap().addresses;
        let records = stored.len();
        prop_assert_eq!(
            system.backend.inner().allocated(),
            records,
            "backend and store disagree: leak or double"
        );
        prop_assert!(records <= config().held_cap());
        prop_assert!(stats.assigned <= config().max_total);
        let addresses: HashSet<_> = stored
            .values()
            .map(|record| record.lease.address.addr())
            .collect();
        prop_assert_eq!(addresses.len(), records, "an address recorded twice");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn the_pool_matches_the_model(
        faults in arb_faults(),
        ops in proptest::collection::vec(arb_op(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(faults, ops))?;
    }
}
