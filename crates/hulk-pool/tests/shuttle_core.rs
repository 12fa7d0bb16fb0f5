//! The pool's core under shuttle: threads assigning, releasing and
//! refilling in every interleaving shuttle's random scheduler tries, with
//! the backend call made outside the lock as the engine does. No address
//! reaches two owners, concurrent refills never pass `max_total` (even
//! when the backend answers more than asked, and repeats an address the
//! pool holds), and the in-flight count always returns to zero.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use hulk_ipam::{Lease, Owner, PoolKey};
use hulk_pool::core::{Held, PoolCore, RefillEnd};
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

#[test]
fn the_core_keeps_its_invariants_in_every_interleaving_tried() {
    shuttle::check_random(scenario, 2000);
}

#[test]
fn probabilistic_concurrency_testing_finds_no_violation_either() {
    shuttle::check_pct(scenario, 2000, 3);
}
