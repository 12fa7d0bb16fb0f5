//! Property tests of the pool as a state machine.
//!
//! The manager, as production drives it: random sequences of assign,
//! release, refill, warm-up, drain and resume, clock steps, the node's
//! dead-pod collection (find_missing, then release, as hulk-node does),
//! orphan sweeps and restarts, against a backend that now and then answers
//! wrongly (an address given before, a lease twice, short and long
//! answers, an address outside the subnet), checked after every step
//! against a reference model of who holds what.
//!
//! The core, as the engine drives it, with a store that refuses writes at
//! random: every decision the engine leaves to the core, checked against
//! the store and the core's own indexes after every step.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hulk_ipam::{Fault, FaultPlan, Faulty, IpamError, MemoryBackend, Owner, PoolKey};
use hulk_pool::core::{AddressStep, AssignStep, Gone, Held, PoolCore, RefillEnd, Release, millis};
use hulk_pool::{
    AddressRecord, AddressState, Clock, MemoryStore, PoolConfig, PoolError, PoolManager, PoolStore,
};
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
    WarmUp,
    Drain,
    Resume,
    Sweep,
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
        1 => Just(Op::WarmUp),
        1 => Just(Op::Drain),
        1 => Just(Op::Resume),
        1 => Just(Op::Sweep),
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
    /// An operator drained the pool (stored: a restart keeps it).
    drained: bool,
}

struct System {
    backend: Arc<Faulty<MemoryBackend>>,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    pools: Arc<PoolManager>,
}

impl System {
    async fn open(
        backend: Arc<Faulty<MemoryBackend>>,
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
        MemoryBackend::new("10.0.0.0/24".parse().unwrap()),
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
                    Err(PoolError::Degraded { .. }) if model.drained => {
                        prop_assert!(!model.held.contains_key(&n));
                        prop_assert_eq!(idle_before, 0, "drained, yet idle addresses were ready");
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
                let live: HashSet<hulk_ipam::AttachmentId> = (0..OWNERS)
                    .filter(|n| alive[*n])
                    .map(|n| owner(n).attachment_id())
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
            Op::WarmUp => match system.pools.warm_up(&key()).await {
                Ok(allocated) => {
                    prop_assert!(!model.drained || allocated == 0, "a drained pool warmed up");
                }
                Err(PoolError::Backend(IpamError::Protocol(_))) => {}
                Err(error) => return Err(TestCaseError::fail(format!("warm-up: {error}"))),
            },
            Op::Drain => {
                system.pools.drain(&key()).await.unwrap();
                model.drained = true;
            }
            Op::Resume => {
                let outcome = system.pools.resume(&key()).await.unwrap();
                prop_assert!(
                    matches!(outcome.error, None | Some(IpamError::Protocol(_))),
                    "{:?}",
                    outcome.error
                );
                model.drained = false;
            }
            Op::Sweep => {
                // What the agent runs periodically; the backend and the
                // store agree after every step, so it finds nothing lost.
                let sweep = system.pools.sweep_orphans().await.unwrap();
                prop_assert_eq!((sweep.dropped_idle, sweep.lost_assigned), (0, 0));
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
        prop_assert_eq!(stats.draining, model.drained);
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

// The core driven directly, step by step as the engine drives it, with a
// store that refuses writes at random and a cloud that hands out and
// takes back addresses: the decisions the engine leaves to the core
// (which idle address an ADD gets, what a release does with a lost
// address, which idle addresses a shrink gives back, undoing a promotion
// or a return the store refused, pending fixed addresses, addresses the
// cloud took back) keep memory equal to the store and the indexes true.

/// One step of the core model. `refused`: the store refuses the step's
/// writes (those the engine undoes on failure).
#[derive(Debug, Clone)]
enum CoreOp {
    Assign {
        owner: usize,
        refused: bool,
    },
    AssignAddress {
        owner: usize,
        address: u32,
        refused: bool,
    },
    Release {
        owner: usize,
        refused: bool,
    },
    Promote {
        refused: bool,
    },
    Return {
        refused: bool,
        answers: Vec<bool>,
    },
    Refill,
    Gone {
        pick: usize,
        refused: bool,
    },
    Relisted {
        pick: usize,
        refused: bool,
    },
    Drain(bool),
    Advance(u64),
}

fn arb_core_op() -> impl Strategy<Value = CoreOp> {
    let refused = proptest::bool::weighted(0.25);
    prop_oneof![
        4 => (0..OWNERS, refused).prop_map(|(owner, refused)| CoreOp::Assign { owner, refused }),
        2 => (0..OWNERS, 0u32..12, refused)
            .prop_map(|(owner, address, refused)| CoreOp::AssignAddress { owner, address, refused }),
        3 => (0..OWNERS, refused).prop_map(|(owner, refused)| CoreOp::Release { owner, refused }),
        2 => refused.prop_map(|refused| CoreOp::Promote { refused }),
        2 => (refused, proptest::collection::vec(proptest::bool::weighted(0.8), 8))
            .prop_map(|(refused, answers)| CoreOp::Return { refused, answers }),
        3 => Just(CoreOp::Refill),
        1 => (any::<usize>(), refused).prop_map(|(pick, refused)| CoreOp::Gone { pick, refused }),
        1 => (any::<usize>(), refused).prop_map(|(pick, refused)| CoreOp::Relisted { pick, refused }),
        1 => any::<bool>().prop_map(CoreOp::Drain),
        2 => (0u64..40).prop_map(|seconds| CoreOp::Advance(seconds * 1000)),
    ]
}

/// A lease of address number `n` (10.0.0.n+2), as the cloud gives it.
fn cloud_lease(n: u32) -> hulk_ipam::Lease {
    hulk_ipam::Lease {
        id: format!("lease-{n}"),
        address: format!("10.0.0.{}/24", n + 2).parse().unwrap(),
        network: "vpc".into(),
        subnet: "subnet-a".into(),
        gateway: Some("10.0.0.1".parse().unwrap()),
        mac: None,
        mtu: None,
        gateway_mac: None,
        security_groups: vec!["sg".into()],
        qos_policy: None,
        node: "node-1".into(),
        owner: None,
        marked_by: None,
    }
}

/// A record's state as the store and memory must agree on it: a cooling
/// address by whether it is due at `now` (undoing a promotion the store
/// refused makes it due at once in memory, where the store still has
/// its due time, also past).
fn comparable(record: &AddressRecord, now: u64) -> (String, String, bool, bool) {
    let state = match &record.state {
        AddressState::Cooldown { until_ms } => format!("cooldown, due {}", *until_ms <= now),
        other => format!("{other:?}"),
    };
    (
        record.lease.address.to_string(),
        state,
        record.fixed,
        record.lost,
    )
}

/// The core, its store, the cloud and who holds what.
#[derive(Default)]
struct CoreModel {
    core: PoolCore,
    store: BTreeMap<String, AddressRecord>,
    /// Address numbers the cloud has given out.
    cloud: BTreeSet<u32>,
    /// Who holds which address.
    held: HashMap<usize, IpNet>,
    /// When each released address may serve a stranger again.
    cooling: HashMap<IpNet, u64>,
    /// Addresses the pool holds as a pod's fixed address: released, they
    /// stay reserved to that pod (its annotation) through their cooldown.
    fixed: HashSet<IpNet>,
    now: u64,
    /// Allocations made, for new lease ids.
    serial: u64,
}

impl CoreModel {
    /// Stores `record` unless the store refuses.
    fn put(&mut self, record: &AddressRecord, refused: bool) -> bool {
        if !refused {
            self.store.insert(record.lease.id.clone(), record.clone());
        }
        !refused
    }

    /// Allocates `count` addresses from the cloud (or exactly `wanted`)
    /// as the engine does: counted in flight, the answer screened, the
    /// adopted ones stored (allocations' writes are not modelled as
    /// refused: the engine keeps serving what it could not store, behind
    /// the allocation's intent, which the next start settles) and added.
    fn allocate(&mut self, count: usize, wanted: Option<(u32, Owner)>) -> Vec<AddressRecord> {
        let numbers: Vec<u32> = match &wanted {
            Some((n, _)) if self.cloud.contains(n) => {
                // The cloud refuses (a conflict): the reservation ends.
                self.core
                    .finish_refill(count, RefillEnd::Abandoned, self.now);
                return Vec::new();
            }
            Some((n, _)) => vec![*n],
            None => (0..250)
                .filter(|n| !self.cloud.contains(n))
                .take(count)
                .collect(),
        };
        // Every allocation makes new lease ids, as clouds do.
        let leases: Vec<_> = numbers
            .iter()
            .map(|n| {
                self.serial += 1;
                hulk_ipam::Lease {
                    id: format!("lease-{n}-{}", self.serial),
                    ..cloud_lease(*n)
                }
            })
            .collect();
        self.cloud.extend(numbers.iter().copied());
        let wanted_address = wanted.as_ref().map(|(n, _)| cloud_lease(*n).address.addr());
        let screened = self.core.screen_answer(
            &key(),
            &config(),
            count,
            wanted_address,
            leases,
            &Held::default(),
        );
        let state = match wanted {
            Some((_, owner)) => AddressState::Assigned(owner),
            None => AddressState::Idle,
        };
        let records: Vec<AddressRecord> = screened
            .adopt
            .into_iter()
            .map(|lease| AddressRecord {
                key: key(),
                state: self
                    .core
                    .arrival_state(lease.address.addr(), state.clone(), self.now),
                lease,
                since_ms: self.now,
                fixed: wanted_address.is_some(),
                lost: false,
            })
            .collect();
        for record in &records {
            self.put(record, false);
        }
        // What the screen refused goes back to the cloud.
        for (lease, _) in screened.release {
            self.cloud.remove(&lease_number(&lease));
        }
        let end = if records.is_empty() {
            RefillEnd::Abandoned
        } else {
            RefillEnd::Allocated(records.clone())
        };
        self.core.finish_refill(count, end, self.now);
        records
    }

    /// Undoes-or-stores cooled addresses turning idle, as the engine does
    /// before an assignment and in every refiller pass.
    fn promote(&mut self, refused: bool) -> bool {
        let promoted = self.core.promote_cooled(self.now);
        if promoted.is_empty() {
            return true;
        }
        if refused {
            self.core.undo_promotion(&promoted, self.now);
            return false;
        }
        for record in &promoted {
            self.put(record, false);
        }
        true
    }

    fn step(&mut self, op: CoreOp) -> Result<(), TestCaseError> {
        let config = config();
        match op {
            CoreOp::Assign { owner: n, refused } => {
                let who = owner(n);
                match self.core.admit(&config, &who, self.now, true) {
                    Some(AssignStep::Held(lease)) => {
                        prop_assert_eq!(self.held.get(&n), Some(&lease.address));
                        return Ok(());
                    }
                    Some(AssignStep::Full) => {
                        prop_assert!(
                            self.held.len() >= config.max_total,
                            "full with {:?}",
                            self.held
                        );
                        return Ok(());
                    }
                    Some(other) => return Err(TestCaseError::fail(format!("admit: {other:?}"))),
                    None => prop_assert!(!self.held.contains_key(&n)),
                }
                if !self.promote(refused) {
                    return Ok(());
                }
                match self.core.take_or_wait(&config, &who, self.now, false) {
                    AssignStep::Take(record) => {
                        prop_assert!(!record.lost && !record.fixed);
                        let address = record.lease.address;
                        if let Some(until) = self.cooling.get(&address) {
                            prop_assert!(
                                *until <= self.now,
                                "{} reused during its cooldown",
                                address
                            );
                        }
                        prop_assert!(
                            !self.held.values().any(|held| *held == address),
                            "{} twice",
                            address
                        );
                        if self.put(&record, refused) {
                            self.core.insert(*record);
                            self.held.insert(n, address);
                        } else {
                            self.core.untake(&record);
                        }
                    }
                    AssignStep::Wait => {
                        // The ADD waits, then gives up.
                        self.core.add_waiter();
                        self.core.remove_waiter();
                    }
                    AssignStep::Drained | AssignStep::Refused(_) => {}
                    other => return Err(TestCaseError::fail(format!("take_or_wait: {other:?}"))),
                }
            }
            CoreOp::AssignAddress {
                owner: n,
                address,
                refused,
            } => {
                let who = owner(n);
                let wanted = cloud_lease(address).address;
                match self
                    .core
                    .take_address_for(&config, &who, wanted.addr(), self.now)
                {
                    AddressStep::Held(lease) => {
                        prop_assert_eq!(self.held.get(&n), Some(&lease.address))
                    }
                    AddressStep::HoldsOther(lease) => {
                        prop_assert_eq!(self.held.get(&n), Some(&lease.address));
                        prop_assert!(lease.address != wanted);
                    }
                    AddressStep::Full => prop_assert!(self.held.len() >= config.max_total),
                    AddressStep::HeldBy(holder) => {
                        prop_assert!(holder != who);
                        prop_assert!(self.held.values().any(|held| *held == wanted));
                    }
                    AddressStep::Releasing | AddressStep::Pending => {
                        return Err(TestCaseError::fail("no return or allocation is out"));
                    }
                    AddressStep::CoolingDown { until_ms } => {
                        prop_assert!(
                            !self.fixed.contains(&wanted),
                            "{} is reserved to the pod asking for it",
                            wanted
                        );
                        prop_assert_eq!(self.cooling.get(&wanted), Some(&until_ms));
                        prop_assert!(until_ms > self.now, "{} cooled down already", wanted);
                    }
                    AddressStep::Take(record) => {
                        prop_assert!(record.fixed && !record.lost);
                        prop_assert!(!self.held.values().any(|held| *held == wanted));
                        // Only a fixed address is reserved to the pod
                        // asking for it; a pool address another pod
                        // released is a stranger's until it cooled down.
                        if let Some(until) = self.cooling.get(&wanted) {
                            prop_assert!(
                                *until <= self.now || self.fixed.contains(&wanted),
                                "{} taken during its cooldown by a stranger",
                                wanted
                            );
                        }
                        if self.put(&record, refused) {
                            self.core.insert(*record);
                            self.held.insert(n, wanted);
                            // Its pod holds it again: its next release
                            // starts a new cooldown.
                            self.cooling.remove(&wanted);
                            self.fixed.insert(wanted);
                        } else {
                            self.core.untake(&record);
                        }
                    }
                    AddressStep::Allocate => {
                        prop_assert!(self.core.is_pending(wanted.addr()));
                        // A second ADD for it meanwhile is refused: it is
                        // being allocated, or the pod it is allocated for
                        // takes the last room.
                        let rival = owner(OWNERS);
                        let expected = if self.held.len() + 1 >= config.max_total {
                            AddressStep::Full
                        } else {
                            AddressStep::Pending
                        };
                        prop_assert_eq!(
                            self.core
                                .take_address_for(&config, &rival, wanted.addr(), self.now),
                            expected
                        );
                        if self.core.reserve_one(&config) {
                            let adopted = self.allocate(1, Some((address, who)));
                            if let Some(record) = adopted.first() {
                                prop_assert_eq!(record.lease.address, wanted);
                                self.held.insert(n, wanted);
                                self.cooling.remove(&wanted);
                                self.fixed.insert(wanted);
                            }
                        }
                        self.core.end_pending(wanted.addr());
                    }
                }
            }
            CoreOp::Release { owner: n, refused } => {
                let who = owner(n);
                let cooldown = millis(config.reuse_cooldown);
                match self.core.plan_release(&who, self.now, cooldown) {
                    None => prop_assert!(!self.held.contains_key(&n)),
                    Some(release) => {
                        let stored = match &release {
                            Release::Drop(lost) => {
                                prop_assert!(lost.lost);
                                if !refused {
                                    self.store.remove(&lost.lease.id);
                                    self.fixed.remove(&lost.lease.address);
                                }
                                !refused
                            }
                            Release::CoolDown(record) => self.put(record, refused),
                        };
                        if stored {
                            let address = self.held.remove(&n).unwrap();
                            // Dropped too: should the cloud give it back,
                            // the pool still cools it down.
                            self.cooling.insert(address, self.now + cooldown);
                            self.core.commit_release(&who, release, self.now, cooldown);
                        }
                    }
                }
            }
            CoreOp::Promote { refused } => {
                self.promote(refused);
            }
            CoreOp::Return { refused, answers } => {
                let returning = self.core.plan_returns(&config, self.now);
                for record in &returning {
                    prop_assert_eq!(&record.state, &AddressState::Releasing);
                    prop_assert!(!self.held.values().any(|held| *held == record.lease.address));
                }
                if refused && !returning.is_empty() {
                    self.core.undo_returns(&returning);
                    return Ok(());
                }
                for record in &returning {
                    self.put(record, false);
                }
                self.core.commit_returns(&returning);
                for (record, taken) in returning
                    .iter()
                    .zip(answers.iter().chain(std::iter::repeat(&true)))
                {
                    if *taken {
                        self.store.remove(&record.lease.id);
                        self.core.remove(&record.lease.id);
                        let n = returning_number(record);
                        self.cloud.remove(&n);
                        self.fixed.remove(&record.lease.address);
                    } else {
                        let kept = PoolCore::unreturned(record, self.now);
                        self.put(&kept, false);
                        self.core.insert(kept);
                    }
                }
            }
            CoreOp::Refill => {
                let want = self.core.plan_refill(&config, self.now);
                if want > 0 {
                    self.allocate(want, None);
                }
            }
            CoreOp::Gone { pick, refused } => {
                let ids = self.core.lease_ids();
                if ids.is_empty() {
                    return Ok(());
                }
                let mut ids = ids;
                ids.sort();
                let id = ids[pick % ids.len()].clone();
                match self.core.on_gone(&id) {
                    None => {}
                    Some(Gone::Drop(record)) => {
                        let dropped = matches!(
                            record.state,
                            AddressState::Idle | AddressState::Cooldown { .. }
                        );
                        prop_assert!(dropped, "{:?} dropped", record.state);
                        if !refused {
                            self.store.remove(&id);
                            self.core.drop_gone(&id, self.now);
                            self.cloud.remove(&returning_number(&record));
                            // The cloud may give the address out anew: the
                            // pool still cools it down (a model cooldown
                            // entry stays as it was).
                            self.fixed.remove(&record.lease.address);
                        }
                    }
                    Some(Gone::Lost(record)) => {
                        prop_assert!(
                            record.lost && matches!(record.state, AddressState::Assigned(_))
                        );
                        if self.put(&record, refused) {
                            self.cloud.remove(&returning_number(&record));
                            self.core.insert(record);
                        }
                    }
                }
            }
            CoreOp::Relisted { pick, refused } => {
                let mut ids = self.core.lease_ids();
                ids.sort();
                if let Some(id) = ids.get(pick % ids.len().max(1)).cloned()
                    && let Some(found) = self.core.relisted(&id)
                {
                    prop_assert!(!found.lost);
                    let n = returning_number(&found);
                    // Relisted: the cloud has it (again).
                    if !self.cloud.contains(&n) && self.put(&found, refused) {
                        self.cloud.insert(n);
                        self.core.insert(found);
                    }
                }
            }
            CoreOp::Drain(draining) => self.core.set_draining(draining),
            CoreOp::Advance(ms) => self.now += ms,
        }
        Ok(())
    }

    /// The invariants after every step.
    fn check(&self) -> Result<(), TestCaseError> {
        let config = config();
        // Memory is what the store holds.
        let memory: BTreeMap<String, _> = self
            .core
            .records()
            .map(|record| (record.lease.id.clone(), comparable(record, self.now)))
            .collect();
        let stored: BTreeMap<String, _> = self
            .store
            .iter()
            .map(|(id, record)| (id.clone(), comparable(record, self.now)))
            .collect();
        prop_assert_eq!(&memory, &stored, "memory and store disagree");
        // The idle index names every idle address once, and nothing else.
        let mut probe = self.core.clone();
        let mut taken = HashSet::new();
        while let Some(record) = probe.take_idle(&owner(OWNERS + 1), self.now) {
            prop_assert!(
                taken.insert(record.lease.id.clone()),
                "{} indexed twice",
                record.lease.id
            );
            prop_assert_eq!(
                self.core.state_of(&record.lease.id),
                Some(&AddressState::Idle),
                "a stale idle index entry"
            );
        }
        let (idle, assigned, _, releasing) = self.core.counts();
        prop_assert_eq!(taken.len(), idle, "an idle address missing from the index");
        prop_assert_eq!(releasing, 0, "every return was settled");
        // Who holds what.
        prop_assert_eq!(assigned, self.held.len());
        for (n, address) in &self.held {
            let lease = self.core.assigned_lease(&owner(*n));
            prop_assert_eq!(lease.map(|lease| lease.address), Some(*address));
        }
        prop_assert!(self.held.len() <= config.max_total);
        prop_assert!(self.core.len() <= config.held_cap());
        let addresses: HashSet<_> = self
            .core
            .records()
            .map(|record| record.lease.address)
            .collect();
        prop_assert_eq!(addresses.len(), self.core.len(), "an address held twice");
        // Nothing is left counted.
        prop_assert_eq!(self.core.in_flight(), 0);
        prop_assert_eq!(self.core.waiters(), 0);
        for n in 0..12 {
            prop_assert!(!self.core.is_pending(cloud_lease(n).address.addr()));
        }
        Ok(())
    }
}

/// The address number of a record's lease (10.0.0.n+2).
fn returning_number(record: &AddressRecord) -> u32 {
    lease_number(&record.lease)
}

/// The address number of a lease (10.0.0.n+2).
fn lease_number(lease: &hulk_ipam::Lease) -> u32 {
    match lease.address.addr() {
        std::net::IpAddr::V4(v4) => u32::from(v4.octets()[3]) - 2,
        std::net::IpAddr::V6(_) => unreachable!("the cloud gives IPv4 addresses"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn the_core_keeps_memory_and_store_in_step_whatever_the_store_refuses(
        ops in proptest::collection::vec(arb_core_op(), 1..80),
    ) {
        let mut model = CoreModel::default();
        for op in ops {
            model.step(op)?;
            model.check()?;
        }
    }
}
