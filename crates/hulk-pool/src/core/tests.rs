//! Unit tests of the core's decisions.

// Test code: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use super::*;

fn record(id: &str, last: u8, state: AddressState) -> AddressRecord {
    AddressRecord {
        key: PoolKey::new("vpc", "s", ["sg"], None),
        lease: Lease {
            id: id.into(),
            address: format!("10.0.0.{last}/24").parse().unwrap(),
            network: "vpc".into(),
            subnet: "s".into(),
            gateway: Some("10.0.0.1".parse().unwrap()),
            mac: None,
            mtu: None,
            gateway_mac: None,
            security_groups: vec!["sg".into()],
            qos_policy: None,
            node: "n".into(),
            owner: None,
            marked_by: None,
        },
        state,
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

fn demand_config() -> PoolConfig {
    PoolConfig {
        // Demand is the waiting ADDs alone.
        min_idle: 0,
        max_idle: 0,
        batch: 8,
        max_total: 20,
        assign_timeout: Duration::from_secs(30),
        ..PoolConfig::default()
    }
}

/// An idle record with a unique address for any `n` below 65,000.
fn numbered(n: u32) -> AddressRecord {
    let mut record = record(&format!("n-{n}"), 2, AddressState::Idle);
    let [_, _, high, low] = (n + 2).to_be_bytes();
    record.lease.address = format!("10.0.{high}.{low}/16").parse().unwrap();
    record.lease.gateway = Some("10.0.0.1".parse().unwrap());
    record
}

fn adaptive_config() -> PoolConfig {
    PoolConfig {
        min_idle: 2,
        max_idle: 40,
        batch: 8,
        max_total: 200,
        target_add_p99: Some(Duration::from_millis(500)),
        adaptive_calls_per_minute: 1_000,
        // Shrinks judged by the demand alone.
        idle_reclaim_after: None,
        ..PoolConfig::default()
    }
}

/// P(N >= s) for a Poisson N of mean `mean`, summed the plain way.
fn poisson_tail(mean: f64, s: usize) -> f64 {
    let mut pmf = (-mean).exp();
    let mut below = 0.0;
    for k in 0..s {
        below += pmf;
        pmf *= mean / (k + 1) as f64;
    }
    1.0 - below
}

#[test]
fn the_arrival_rate_follows_a_steady_stream_and_decays_when_it_stops() {
    let mut rate = ArrivalRate::default();
    // Two ADDs a second for an hour.
    for tick in 0..7_200u64 {
        rate.note(tick * 500);
    }
    let steady = rate.per_second_at(3_600_000);
    assert!((steady - 2.0).abs() < 0.1, "{steady}");
    // One memory time constant later, a factor e lower.
    let later = 3_600_000 + millis(ARRIVAL_MEMORY);
    let decayed = rate.per_second_at(later);
    assert!(
        (decayed - steady / std::f64::consts::E).abs() < 0.01,
        "{decayed}"
    );
    // A clock that went back neither panics nor moves the estimate.
    assert_eq!(rate.per_second_at(0), rate.per_second_at(3_599_500));
    rate.note(0);
    assert!(rate.per_second_at(3_600_000) >= steady);
}

#[test]
fn a_burst_counts_at_its_own_rate_and_is_remembered_for_minutes() {
    let mut rate = ArrivalRate::default();
    // 150 ADDs in ten seconds, after a quiet start.
    for n in 0..150u64 {
        rate.note(1_000_000 + n * 66);
    }
    let end = 1_000_000 + 149 * 66;
    let peak = rate.per_second_at(end);
    // About 15 a second times (1 - 1/e): far above the half an ADD a
    // second a five-minute average would say.
    assert!((8.0..15.0).contains(&peak), "{peak}");
    // A minute on, the burst rate is gone, the peak mostly remembered.
    let minute = end + 60_000;
    assert!(rate.burst_at(minute) < 0.01 * peak);
    assert!(rate.per_second_at(minute) > 0.8 * peak);
    // A single late ADD does not erase the memory.
    rate.note(minute);
    assert!(rate.per_second_at(minute) > 0.8 * peak);
}

#[test]
fn the_poisson_stock_is_the_smallest_with_at_most_the_late_fraction() {
    for mean in [0.001, 0.3, 1.0, 4.5, 17.0, 60.0] {
        let stock = poisson_stock(mean, 0.01, 1_000);
        assert!(poisson_tail(mean, stock) <= 0.01, "{mean}: {stock}");
        assert!(poisson_tail(mean, stock - 1) > 0.01, "{mean}: {stock}");
    }
    // A mean whose exp(-mean) underflows: about mean + 2.33 sigma.
    let stock = poisson_stock(2_000.0, 0.01, 5_000) as f64;
    let normal = 2_000.0 + 2.326 * 2_000f64.sqrt();
    assert!((stock - normal).abs() < 5.0, "{stock}");
    assert_eq!(poisson_stock(2_000.0, 0.01, 50), 50);
    assert_eq!(poisson_stock(0.0, 0.01, 50), 1);
    assert_eq!(poisson_stock(f64::NAN, 0.01, 0), 0);
}

#[test]
fn the_adaptive_target_rises_with_the_rate_and_falls_back_within_bounds() {
    let config = adaptive_config();
    let mut core = PoolCore::default();
    // Not adaptive yet: no latency measured.
    assert_eq!(core.adaptive_target(&config, 0), None);
    core.note_allocation(10_500);
    // No ADD yet: the floor.
    let quiet = core.adaptive_target(&config, 0).unwrap();
    assert_eq!(quiet, config.min_idle);
    // A burst of 100 ADDs in ten seconds.
    let mut targets = Vec::new();
    for n in 0..100u64 {
        core.note_arrival(n * 100);
        targets.push(core.adaptive_target(&config, n * 100).unwrap());
    }
    assert!(
        targets.windows(2).all(|pair| pair[0] <= pair[1]),
        "{targets:?}"
    );
    let busy = *targets.last().unwrap();
    let mean = core.arrival_rate(9_900) * 10.0;
    assert_eq!(busy, poisson_stock(mean, 0.01, config.max_idle));
    assert!(busy > quiet, "{busy}");
    // Ten times as many: capped at max_idle.
    for n in 0..1_000u64 {
        core.note_arrival(10_000 + n * 10);
    }
    assert_eq!(core.adaptive_target(&config, 20_000), Some(config.max_idle));
    // Idle: the target decays step by step back to min_idle.
    let decay: Vec<usize> = (1..=12u64)
        .map(|minutes| {
            core.adaptive_target(&config, 20_000 + minutes * 300_000)
                .unwrap()
        })
        .collect();
    assert!(decay.windows(2).all(|pair| pair[0] >= pair[1]), "{decay:?}");
    assert!(
        decay
            .iter()
            .any(|target| (config.min_idle + 1..config.max_idle).contains(target)),
        "{decay:?}"
    );
    assert_eq!(decay.last(), Some(&config.min_idle));
    // A target at or above the allocation time needs no stock.
    let relaxed = PoolConfig {
        target_add_p99: Some(Duration::from_secs(11)),
        ..config.clone()
    };
    assert_eq!(
        core.adaptive_target(&relaxed, 20_000),
        Some(config.min_idle)
    );
    // Without the knob, no adaptive target, and the static plan.
    let fixed = PoolConfig {
        target_add_p99: None,
        ..config
    };
    assert_eq!(core.adaptive_target(&fixed, 20_000), None);
    core.insert(numbered(0));
    core.insert(numbered(1));
    assert_eq!(core.plan_refill(&fixed, 20_000), 0);
    assert!(!core.wants_refill(&fixed, 20_000));
}

#[test]
fn adaptive_refills_and_returns_keep_within_the_call_budget() {
    let config = PoolConfig {
        adaptive_calls_per_minute: 2,
        ..adaptive_config()
    };
    let mut core = PoolCore::default();
    core.note_allocation(10_000);
    for n in 0..1_000u64 {
        core.note_arrival(n * 10);
    }
    let now = 10_000;
    assert_eq!(core.adaptive_target(&config, now), Some(config.max_idle));
    // Two calls of a batch, then the budget is spent.
    assert_eq!(core.plan_refill(&config, now), 8);
    assert_eq!(core.plan_refill(&config, now), 8);
    assert_eq!(core.plan_refill(&config, now), 0);
    // Waiting ADDs beyond what is coming are served anyway.
    core.waiters = 20;
    assert_eq!(core.plan_refill(&config, now), 8);
    core.waiters = 0;
    // A minute later, two more.
    assert_eq!(core.plan_refill(&config, now + 60_000), 8);
    assert_eq!(core.plan_refill(&config, now + 60_000), 8);
    assert_eq!(core.plan_refill(&config, now + 60_000), 0);
    let planned = core.in_flight();
    let records = (0..u32::try_from(planned).unwrap()).map(numbered).collect();
    core.finish_refill(planned, RefillEnd::Allocated(records), now + 60_000);
    // An hour without ADDs: the target is back at min_idle, and the
    // surplus beyond it and a batch goes back, two calls a minute.
    let quiet = now + 3_660_000;
    assert_eq!(core.adaptive_target(&config, quiet), Some(config.min_idle));
    assert_eq!(core.plan_shrink(&config, quiet).len(), 2);
    assert!(core.plan_shrink(&config, quiet).is_empty());
    let mut returned = 2;
    let mut minute = quiet;
    loop {
        minute += 60_000;
        let victims = core.plan_shrink(&config, minute).len();
        if victims == 0 {
            break;
        }
        assert!(victims <= 2, "{victims}");
        returned += victims;
    }
    assert_eq!(core.idle.len(), config.min_idle + config.batch);
    assert_eq!(returned, planned - config.min_idle - config.batch);
}

proptest::proptest! {
    /// Whatever the arrivals, latency and knobs: the adaptive target
    /// lies within the bounds, and what a refill toward it brings is
    /// never picked to go back at once (the pool does not oscillate).
    #[test]
    fn adaptive_refills_are_not_returned_at_once(
        arrivals in 0u64..400,
        spacing_ms in 1u64..2_000,
        latency_ms in 1u64..30_000,
        target_ms in 0u64..5_000,
        idle in 0u32..60,
        min_idle in 0usize..8,
        spread in 0usize..60,
        batch in 1usize..20,
    ) {
        let config = PoolConfig {
            min_idle,
            max_idle: min_idle + spread,
            batch,
            max_total: 200,
            target_add_p99: Some(Duration::from_millis(target_ms)),
            adaptive_calls_per_minute: 10_000,
            idle_reclaim_after: None,
            ..PoolConfig::default()
        };
        let mut core = PoolCore::default();
        core.note_allocation(latency_ms);
        for n in 0..arrivals {
            core.note_arrival(n * spacing_ms);
        }
        for n in 0..idle {
            core.insert(numbered(n));
        }
        let now = arrivals * spacing_ms;
        let target = core.adaptive_target(&config, now).unwrap();
        proptest::prop_assert!((config.min_idle..=config.max_idle).contains(&target));
        let mut next = idle;
        loop {
            let want = core.plan_refill(&config, now);
            if want == 0 {
                break;
            }
            let count = u32::try_from(want).unwrap();
            let records = (next..next + count).map(numbered).collect();
            next += count;
            core.finish_refill(want, RefillEnd::Allocated(records), now);
        }
        if next > idle {
            proptest::prop_assert!(core.idle.len() >= target);
            proptest::prop_assert!(core.plan_shrink(&config, now).is_empty());
        }
    }
}

#[test]
fn cooling_addresses_due_before_an_allocation_would_answer_count_as_supply() {
    let config = demand_config();
    let mut core = PoolCore::default();
    // Two addresses turn idle in 3 s, one in 20 s; two ADDs wait.
    core.insert(record("a", 2, AddressState::Cooldown { until_ms: 3_000 }));
    core.insert(record("b", 3, AddressState::Cooldown { until_ms: 3_000 }));
    core.insert(record("c", 4, AddressState::Cooldown { until_ms: 20_000 }));
    core.waiters = 2;
    // Before any allocation, the whole assign_timeout is the horizon.
    assert_eq!(core.plan_refill(&config, 0), 0);
    assert_eq!(core.next_due(0), Some(3_000));
    // Allocations take 10 s: the one due in 20 s does not count.
    core.note_allocation(10_000);
    core.waiters = 3;
    assert_eq!(core.plan_refill(&config, 0), 1);
    core.finish_refill(1, RefillEnd::Abandoned, 0);
    // Allocations take 1 s: nothing cooling counts.
    for _ in 0..40 {
        core.note_allocation(1_000);
    }
    assert_eq!(core.allocation_ms, Some(1_000));
    assert_eq!(core.plan_refill(&config, 0), 3);
}

#[test]
fn an_exhausted_batch_is_halved_down_to_one_then_degrades() {
    let config = demand_config();
    let mut core = PoolCore {
        waiters: 8,
        ..PoolCore::default()
    };
    let exhausted = |now_ms| RefillEnd::Failed {
        failure: BackendFailure {
            operation: "allocate".into(),
            kind: "exhausted".into(),
            message: "no".into(),
            at_ms: now_ms,
        },
        refusal: Some(Refusal::new(
            now_ms,
            Duration::from_secs(60),
            "no".into(),
            true,
        )),
        jitter: 0.5,
    };
    let mut asked = Vec::new();
    loop {
        let want = core.plan_refill(&config, 0);
        if want == 0 {
            break;
        }
        asked.push(want);
        core.finish_refill(want, exhausted(0), 0);
    }
    assert_eq!(asked, [8, 4, 2, 1]);
    assert!(core.degraded_at(0).is_some());
    assert!(core.tight_at(59_999));
    // The pause over, whole batches again.
    assert!(!core.tight_at(60_000));
    assert_eq!(core.plan_refill(&config, 60_000), 8);
}

#[test]
fn a_retry_after_of_zero_still_pauses_for_a_second() {
    let refusal = Refusal::new(5_000, Duration::ZERO, "slow down".into(), false);
    assert_eq!(refusal.until_ms, 5_000 + millis(BACKOFF_FIRST));
}

#[test]
fn a_replaced_record_leaves_no_stale_index_entry() {
    let mut core = PoolCore::default();
    core.insert(record("a", 2, AddressState::Assigned(owner("p1"))));
    // The same id again, idle (what a reused id did): p1 no longer
    // appears to hold it, and it is handed out once.
    core.insert(record("a", 2, AddressState::Idle));
    assert_eq!(core.assigned_lease(&owner("p1")), None);
    let taken = core.take_idle(&owner("p2"), 1).unwrap();
    core.insert(taken);
    assert!(core.take_idle(&owner("p3"), 1).is_none());
    assert_eq!(core.counts(), (0, 1, 0, 0));
}

#[test]
fn an_index_naming_a_missing_record_is_skipped_not_a_panic() {
    let mut core = PoolCore::default();
    core.idle.push_back("gone".into());
    core.owners
        .insert(owner("p1").attachment_id(), "gone-too".into());
    assert_eq!(core.assigned_lease(&owner("p1")), None);
    assert_eq!(core.cool_down(&owner("p1"), 0, 30_000), None);
    assert!(core.take_idle(&owner("p2"), 0).is_none());
    core.finish_refill(5, RefillEnd::Abandoned, 0);
    assert_eq!(core.in_flight(), 0);
}

#[test]
fn answers_are_screened_against_the_pool_others_and_themselves() {
    let config = PoolConfig {
        max_total: 4,
        max_held: Some(4),
        ..PoolConfig::default()
    };
    let key = PoolKey::new("vpc", "s", ["sg"], None);
    let mut core = PoolCore::default();
    core.insert(record("held", 2, AddressState::Idle));
    core.in_flight = 3;
    let mut others = Held::default();
    others.insert(&record("other", 3, AddressState::Idle).lease);
    let mut foreign = record("foreign", 9, AddressState::Idle).lease;
    foreign.subnet = "t".into();
    let answer = vec![
        record("held", 4, AddressState::Idle).lease,
        record("new-1", 2, AddressState::Idle).lease,
        record("new-2", 3, AddressState::Idle).lease,
        foreign,
        record("new-3", 5, AddressState::Idle).lease,
        record("new-3", 6, AddressState::Idle).lease,
        record("new-4", 5, AddressState::Idle).lease,
        record("new-5", 7, AddressState::Idle).lease,
        record("new-6", 8, AddressState::Idle).lease,
        record("new-7", 10, AddressState::Idle).lease,
    ];
    let screened = core.screen_answer(&key, &config, 3, None, answer, &others);
    let ids = |leases: &[(Lease, Anomaly)]| -> Vec<(String, &'static str)> {
        leases
            .iter()
            .map(|(lease, anomaly)| (lease.id.clone(), anomaly.kind()))
            .collect()
    };
    // Room: 4 - 1 held = 3, all of this allocation's reservation.
    let adopted: Vec<&str> = screened
        .adopt
        .iter()
        .map(|lease| lease.id.as_str())
        .collect();
    assert_eq!(adopted, ["new-3", "new-5", "new-6"]);
    assert_eq!(
        ids(&screened.quarantine),
        [
            ("held".into(), "duplicate_id"),
            ("new-3".into(), "duplicate_id")
        ]
    );
    assert_eq!(
        ids(&screened.release),
        [
            ("new-1".into(), "duplicate_address"),
            ("new-2".into(), "duplicate_address"),
            ("foreign".into(), "outside_subnet"),
            ("new-4".into(), "duplicate_address"),
            ("new-7".into(), "long_answer"),
        ]
    );
    assert!(!screened.short);
    // Another allocation in flight takes its share of the room.
    core.in_flight = 4;
    let screened = core.screen_answer(
        &key,
        &config,
        3,
        None,
        vec![
            record("a", 11, AddressState::Idle).lease,
            record("b", 12, AddressState::Idle).lease,
            record("c", 13, AddressState::Idle).lease,
        ],
        &Held::default(),
    );
    assert_eq!(screened.adopt.len(), 2);
    assert_eq!(screened.release[0].1, Anomaly::OverCap);
}

#[test]
fn pauses_are_capped_and_back_off_doubles_to_its_ceiling() {
    let forever = Refusal::new(u64::MAX - 5, Duration::MAX, "no".into(), false);
    assert_eq!(forever.until_ms, u64::MAX);
    let long = Refusal::new(
        1_000,
        Duration::from_secs(3_000_000_000),
        "no".into(),
        false,
    );
    assert_eq!(long.until_ms, 1_000 + millis(MAX_BACKEND_PAUSE));
    let windows: Vec<u64> = [1, 2, 3, 6, 7, 100, u32::MAX]
        .into_iter()
        .map(|failures| backoff_window(failures).as_secs())
        .collect();
    assert_eq!(windows, [1, 2, 4, 32, 60, 60, 60]);
    let mut core = PoolCore::default();
    for (failure, jitter, low, high) in [(1, 0.0, 500, 500), (2, 1.0, 2_000, 2_000)] {
        core.finish_refill(
            0,
            RefillEnd::Failed {
                failure: BackendFailure {
                    operation: "allocate".into(),
                    kind: "protocol".into(),
                    message: "not JSON".into(),
                    at_ms: 0,
                },
                refusal: None,
                jitter,
            },
            0,
        );
        assert_eq!(core.failures().1, failure);
        let until = core.backing_off_at(0).unwrap();
        assert!((low..=high).contains(&until), "{until}");
    }
    core.finish_refill(0, RefillEnd::Allocated(Vec::new()), 10);
    assert_eq!(core.paused_until(10), None);
    assert_eq!(core.failures().1, 0);
}

#[test]
fn a_fixed_address_request_waits_out_a_strangers_cooldown_but_not_its_own() {
    let config = demand_config();
    let mut core = PoolCore::default();
    // A pool address another pod released, and a pod's fixed address
    // released by its pod: both cooling down until 30 s.
    let pooled = record("pooled", 2, AddressState::Cooldown { until_ms: 30_000 });
    let mut reserved = record("reserved", 3, AddressState::Cooldown { until_ms: 30_000 });
    reserved.fixed = true;
    core.insert(pooled.clone());
    core.insert(reserved.clone());
    let who = owner("stateful-0");

    assert_eq!(
        core.take_address_for(&config, &who, pooled.lease.address.addr(), 29_999),
        AddressStep::CoolingDown { until_ms: 30_000 },
        "a stranger's endpoints may still point at it"
    );
    assert!(
        !core.is_pending(pooled.lease.address.addr()),
        "not allocated either"
    );
    match core.take_address_for(&config, &who, reserved.lease.address.addr(), 0) {
        AddressStep::Take(taken) => {
            assert_eq!(taken.state, AddressState::Assigned(who.clone()));
            assert!(taken.fixed);
        }
        other => panic!("its pod takes its fixed address back at once: {other:?}"),
    }
    // Once cooled down, the pool address serves the fixed request too
    // (also before a promotion made it idle).
    let other = owner("stateful-1");
    match core.take_address_for(&config, &other, pooled.lease.address.addr(), 30_000) {
        AddressStep::Take(taken) => assert_eq!(taken.state, AddressState::Assigned(other)),
        other => panic!("cooled down: {other:?}"),
    }
}

#[test]
fn an_address_leaving_the_pool_during_its_cooldown_comes_back_cooling() {
    let config = demand_config();
    let mut core = PoolCore::default();
    let cooling = record("cooling", 2, AddressState::Cooldown { until_ms: 30_000 });
    let mut used = record("used", 3, AddressState::Assigned(owner("pod-1")));
    used.lost = true;
    let idle = record("idle", 4, AddressState::Idle);
    for record in [&cooling, &used, &idle] {
        core.insert(record.clone());
    }
    let address = |record: &AddressRecord| record.lease.address.addr();
    // The cloud took all three back: the cooling one and the idle one
    // leave at once, the pod's at its DEL (10 s later, cooling 30 s).
    assert!(core.drop_gone("cooling", 0).is_some());
    assert!(core.drop_gone("idle", 0).is_some());
    let release = core.plan_release(&owner("pod-1"), 10_000, 30_000).unwrap();
    assert!(matches!(release, Release::Drop(_)));
    core.commit_release(&owner("pod-1"), release, 10_000, 30_000);
    assert!(core.is_empty());

    let at = |until_ms| AddressState::Cooldown { until_ms };
    assert_eq!(
        core.arrival_state(address(&cooling), AddressState::Idle, 20_000),
        at(30_000)
    );
    assert_eq!(
        core.arrival_state(address(&used), AddressState::Idle, 20_000),
        at(40_000)
    );
    assert_eq!(
        core.arrival_state(address(&idle), AddressState::Idle, 0),
        AddressState::Idle,
        "idle, it was cooled already"
    );
    assert_eq!(
        core.arrival_state(address(&cooling), AddressState::Idle, 30_000),
        AddressState::Idle,
        "its cooldown is over"
    );
    let fixed = AddressState::Assigned(owner("stateful-0"));
    assert_eq!(
        core.arrival_state(address(&used), fixed.clone(), 20_000),
        fixed,
        "an allocation for a pod was decided already"
    );
    // A pod asking for it by address waits the same.
    assert_eq!(
        core.take_address_for(&config, &owner("stateful-0"), address(&used), 20_000),
        AddressStep::CoolingDown { until_ms: 40_000 }
    );
    assert_eq!(
        core.take_address_for(&config, &owner("stateful-0"), address(&used), 40_000),
        AddressStep::Allocate
    );
    core.end_pending(address(&used));
}
