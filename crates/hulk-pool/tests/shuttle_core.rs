//! The pool's core under shuttle: threads assigning, releasing and
//! refilling in every interleaving shuttle's random scheduler tries, with
//! the backend call made outside the lock as the engine does. No address
//! reaches two owners, concurrent refills never pass `max_total` (even
//! when the backend answers more than asked, and repeats an address the
//! pool holds), and the in-flight count always returns to zero. A second
//! scenario races the decisions the engine takes through the core when a
//! store write or a backend call fails: assignments put back, returns
//! undone or kept, promotions undone, and two pods asking for one fixed
//! address (one pending mark, one holder).

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use hulk_ipam::{Lease, Owner, PoolKey};
use hulk_pool::core::{AddressStep, AssignStep, Held, PoolCore, RefillEnd};
use hulk_pool::{AddressRecord, AddressState, PoolConfig};
use shuttle::sync::atomic::{AtomicUsize, Ordering};
use shuttle::sync::{Arc, Mutex};
use shuttle::thread;

fn config() -> PoolConfig {
    PoolConfig {
        min_idle: 2,
        max_idle: 3,
        batch: 2,
        warm_up: 0,
        max_total: 5,
        max_held: Some(5),
        reuse_cooldown: Duration::ZERO,
        ..PoolConfig::default()
    }
}

fn record(id: usize) -> AddressRecord {
    AddressRecord {
        key: PoolKey::new("vpc", "s", ["sg"], None),
        lease: Lease {
            id: format!("a{id}"),
            address: format!("10.0.0.{}/24", id + 2).parse().unwrap(),
            network: "vpc".into(),
            subnet: "s".into(),
            gateway: None,
            mac: None,
            mtu: None,
            gateway_mac: None,
            security_groups: vec![],
            qos_policy: None,
            node: "n".into(),
            owner: None,
            marked_by: None,
        },
        state: AddressState::Idle,
        since_ms: 0,
        fixed: false,
        lost: false,
    }
}

fn owner(name: &str) -> Owner {
    Owner {
        container_id: name.into(),
        ifname: "eth0".into(),
        pod: None,
        cni_network: None,
        pod_uid: None,
    }
}

/// One refill as the engine does it: plan under the lock, "call the
/// backend" outside it, screen and record the answer under the lock. The
/// backend answers one lease more than asked, and then one repeating the
/// address of the pool's first lease.
fn refill(core: &Mutex<PoolCore>, next_id: &AtomicUsize) {
    let want = core.lock().unwrap().plan_refill(&config(), 0);
    if want == 0 {
        return;
    }
    thread::yield_now();
    let mut answer: Vec<Lease> = (0..=want)
        .map(|_| record(next_id.fetch_add(1, Ordering::SeqCst)).lease)
        .collect();
    let mut repeated = record(next_id.fetch_add(1, Ordering::SeqCst)).lease;
    repeated.address = record(0).lease.address;
    answer.push(repeated);
    let mut core = core.lock().unwrap();
    let key = record(0).key;
    let screened = core.screen_answer(&key, &config(), want, None, answer, &Held::default());
    assert_eq!(
        screened.release.len(),
        2,
        "the extra and the repeat go back"
    );
    let records = screened
        .adopt
        .into_iter()
        .map(|lease| AddressRecord { lease, ..record(0) })
        .collect();
    core.finish_refill(want, RefillEnd::Allocated(records), 0);
}

/// Assigns from idle, refilling (as a waiting ADD wakes the refiller) when empty.
fn assign(core: &Mutex<PoolCore>, next_id: &AtomicUsize, who: &Owner) -> Option<Lease> {
    for _ in 0..3 {
        {
            let mut core = core.lock().unwrap();
            if let Some(lease) = core.assigned_lease(who) {
                return Some(lease);
            }
            if let Some(record) = core.take_idle(who, 0) {
                core.insert(record);
                return core.assigned_lease(who);
            }
        }
        refill(core, next_id);
    }
    None
}

fn scenario() {
    let core = Arc::new(Mutex::new(PoolCore::default()));
    let next_id = Arc::new(AtomicUsize::new(0));
    {
        let mut core = core.lock().unwrap();
        for _ in 0..2 {
            core.insert(record(next_id.fetch_add(1, Ordering::SeqCst)));
        }
    }
    let threads: Vec<_> = ["p1", "p2", "p3"]
        .into_iter()
        .map(|name| {
            let (core, next_id) = (core.clone(), next_id.clone());
            thread::spawn(move || {
                let who = owner(name);
                // A retried ADD gets the same address (one that gave up,
                // with others taking every refill, may get one on retry).
                if let Some(first) = assign(&core, &next_id, &who) {
                    let again = assign(&core, &next_id, &who).map(|lease| lease.address);
                    assert_eq!(again, Some(first.address));
                }
                if name == "p1" {
                    let mut core = core.lock().unwrap();
                    if let Some(cooling) = core.cool_down(&who, 0, 0) {
                        core.commit_cool_down(&who, cooling);
                    }
                    core.promote_cooled(0);
                }
            })
        })
        .chain([{
            let (core, next_id) = (core.clone(), next_id.clone());
            thread::spawn(move || {
                refill(&core, &next_id);
                refill(&core, &next_id);
            })
        }])
        .collect();
    for handle in threads {
        handle.join().unwrap();
    }
    let core = core.lock().unwrap();
    assert_eq!(core.in_flight(), 0, "every planned allocation was finished");
    assert!(
        core.len() <= config().max_total,
        "{} addresses, cap {}",
        core.len(),
        config().max_total
    );
    let holders: Vec<_> = ["p1", "p2", "p3"]
        .iter()
        .filter_map(|name| core.assigned_lease(&owner(name)))
        .collect();
    let distinct: HashSet<_> = holders.iter().map(|lease| lease.address).collect();
    assert_eq!(
        distinct.len(),
        holders.len(),
        "an address reached two owners"
    );
    assert!(core.assigned_lease(&owner("p1")).is_none(), "p1 released");
    let mut held = Held::default();
    core.held(&mut held);
    assert_eq!(held.addresses.len(), core.len(), "an address held twice");
    let (idle, assigned, cooling, releasing) = core.counts();
    assert_eq!(idle + assigned + cooling + releasing, core.len());
    assert_eq!(assigned, holders.len());
}

/// Knobs for the moved decisions: one idle address is all the pool
/// keeps, so returns have surplus to give back.
fn lean_config() -> PoolConfig {
    PoolConfig {
        min_idle: 0,
        max_idle: 1,
        idle_reclaim_after: None,
        max_held: Some(8),
        ..config()
    }
}

/// An assignment from idle as the engine runs it, the store refusing the
/// first write: taken, put back, then taken again and stored.
fn assign_refused_then_stored(core: &Mutex<PoolCore>, who: &Owner) -> Option<Lease> {
    for refused in [true, false] {
        let mut core = core.lock().unwrap();
        if core.admit(&lean_config(), who, 0, !refused).is_some() {
            return core.assigned_lease(who);
        }
        match core.take_or_wait(&lean_config(), who, 0, false) {
            AssignStep::Take(record) if refused => core.untake(&record),
            AssignStep::Take(record) => {
                core.insert(*record);
                return core.assigned_lease(who);
            }
            _ => return None,
        }
    }
    None
}

/// A fixed address as the engine assigns it: marked pending under the
/// lock, allocated outside it, the answer screened and recorded under it,
/// the mark ended. Returns whether `who` got it.
fn assign_fixed(core: &Mutex<PoolCore>, who: &Owner, id: usize) -> bool {
    let address = record(id).lease.address.addr();
    let step = core
        .lock()
        .unwrap()
        .take_address_for(&lean_config(), who, address, 0);
    match step {
        AddressStep::Allocate => {}
        AddressStep::Held(_) => return true,
        AddressStep::HeldBy(holder) => {
            assert_ne!(&holder, who);
            return false;
        }
        AddressStep::Pending | AddressStep::Full => return false,
        other => panic!("{other:?} for an address nobody had"),
    }
    if core.lock().unwrap().reserve_one(&lean_config()) {
        thread::yield_now();
        let mut core = core.lock().unwrap();
        let screened = core.screen_answer(
            &record(0).key,
            &lean_config(),
            1,
            Some(address),
            vec![record(id).lease],
            &Held::default(),
        );
        let records = screened
            .adopt
            .into_iter()
            .map(|lease| AddressRecord {
                lease,
                state: AddressState::Assigned(who.clone()),
                fixed: true,
                ..record(0)
            })
            .collect();
        core.finish_refill(1, RefillEnd::Allocated(records), 0);
    }
    let mut core = core.lock().unwrap();
    core.end_pending(address);
    core.assigned_lease(who)
        .is_some_and(|lease| lease.address.addr() == address)
}

/// Returns as the engine runs them: picked and stored as releasing under
/// the lock (or put back when the store refuses), the backend asked
/// outside it, each answer settled under it (taken: gone; refused: kept).
fn return_surplus(core: &Mutex<PoolCore>, store_refuses: bool) {
    let returning = {
        let mut core = core.lock().unwrap();
        let returning = core.plan_returns(&lean_config(), 0);
        if store_refuses {
            core.undo_returns(&returning);
            return;
        }
        core.commit_returns(&returning);
        returning
    };
    for (n, record) in returning.iter().enumerate() {
        thread::yield_now();
        let mut core = core.lock().unwrap();
        if n % 2 == 0 {
            core.remove(&record.lease.id);
        } else {
            core.insert(PoolCore::unreturned(record, 0));
        }
    }
}

/// A release, then cooled addresses promoted with the store refusing the
/// first write (undone) and taking the second.
fn release_and_promote(core: &Mutex<PoolCore>, who: &Owner) {
    let mut core = core.lock().unwrap();
    if let Some(release) = core.plan_release(who, 0, 0) {
        core.commit_release(who, release, 0, 0);
    }
    let promoted = core.promote_cooled(0);
    core.undo_promotion(&promoted, 0);
    core.promote_cooled(0);
}

/// One thread's work on the shared core.
type Work = Box<dyn FnOnce(&Mutex<PoolCore>) + Send>;

/// The decisions the engine used to take itself, racing: assignments
/// whose store write fails, two pods asking for one fixed address,
/// returns whose store write or backend call fails, promotions undone.
fn moved_decisions() {
    let core = Arc::new(Mutex::new(PoolCore::default()));
    {
        let mut core = core.lock().unwrap();
        for id in 0..3 {
            core.insert(record(id));
        }
    }
    let spawn = |work: Work| {
        let core = core.clone();
        thread::spawn(move || work(&core))
    };
    let threads = vec![
        spawn(Box::new(|core| {
            let who = owner("p1");
            if assign_refused_then_stored(core, &who).is_some() {
                release_and_promote(core, &who);
            }
        })),
        spawn(Box::new(|core| {
            return_surplus(core, true);
            return_surplus(core, false);
        })),
        spawn(Box::new(|core| {
            assign_fixed(core, &owner("p2"), 9);
        })),
        spawn(Box::new(|core| {
            assign_fixed(core, &owner("p3"), 9);
        })),
    ];
    for handle in threads {
        handle.join().unwrap();
    }
    let core = core.lock().unwrap();
    assert_eq!(core.in_flight(), 0, "every reservation was ended");
    assert_eq!(core.waiters(), 0);
    assert!(
        !core.is_pending(record(9).lease.address.addr()),
        "the pending mark ended"
    );
    let fixed_holders = ["p2", "p3"]
        .iter()
        .filter(|name| core.assigned_lease(&owner(name)).is_some())
        .count();
    assert!(fixed_holders <= 1, "one fixed address, two pods");
    assert!(core.assigned_lease(&owner("p1")).is_none(), "p1 released");
    // The idle index names each idle address once, and nothing else.
    let (idle, _, _, releasing) = core.counts();
    assert_eq!(releasing, 0, "every return was settled");
    let mut probe = core.clone();
    let mut taken = HashSet::new();
    while let Some(record) = probe.take_idle(&owner("probe"), 0) {
        assert!(taken.insert(record.lease.id.clone()), "indexed twice");
        assert_eq!(core.state_of(&record.lease.id), Some(&AddressState::Idle));
    }
    assert_eq!(taken.len(), idle, "an idle address missing from the index");
    let mut held = Held::default();
    core.held(&mut held);
    assert_eq!(held.addresses.len(), core.len(), "an address held twice");
}

#[test]
fn the_core_keeps_its_invariants_in_every_interleaving_tried() {
    shuttle::check_random(scenario, 2000);
}

#[test]
fn probabilistic_concurrency_testing_finds_no_violation_either() {
    shuttle::check_pct(scenario, 2000, 3);
}

#[test]
fn the_moved_decisions_keep_their_invariants_in_every_interleaving_tried() {
    shuttle::check_random(moved_decisions, 2000);
}

#[test]
fn probabilistic_concurrency_testing_finds_no_violation_in_the_moved_decisions() {
    shuttle::check_pct(moved_decisions, 2000, 3);
}
