//! A trace-driven simulation of one node's pool over twelve hours, in
//! tokio's virtual time (`start_paused`), so the seconds are simulated and
//! the run takes seconds: an idle hour, a diurnal ramp of single ADDs,
//! bursts of 50-200 ADDs (some alone, some in rollout waves), two idle
//! hours, a smaller ramp with more bursts. Pods live minutes and are
//! deleted, so addresses churn through the reuse cooldown. The real
//! `PoolManager` and refiller run against `MemoryBackend` behind `Faulty`
//! with a fixed latency (2 s and 10 s a call), on a clock that reads the
//! virtual time, so cooldowns, the allocation-time average and the
//! arrival-rate estimate all follow the simulation.
//!
//! For each policy (static defaults, static tuned, adaptive) and latency
//! it prints a markdown row: ADD wait p50/p99/max (from the ADD reaching
//! the pool to its address, retries after `assign_timeout` included), the
//! p99 of single ADDs, of rollouts' first waves and of their later waves,
//! the ADDs that waited at all, the idle and held addresses on average (time
//! weighted, sampled every simulated second: the cloud cost), and the
//! backend's allocate and release calls. The trace is drawn from a seeded
//! RNG: every run prints the same table.
//!
//! `cargo bench -p hulk-benches --bench pool_adaptive`

#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hulk_ipam::{
    AllocationRequest, FaultPlan, Faulty, IpamBackend, IpamError, Lease, ListScope, MemoryBackend,
    Owner, PoolKey,
};
use hulk_pool::{MemoryStore, PoolConfig, PoolError, PoolManager, TokioClock};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The simulated span.
const SPAN: Duration = Duration::from_secs(12 * 3600);

/// The node's pod capacity in every policy; the trace never asks for more
/// pods at once than `LIVE_PODS_MOST`, so no ADD is refused as full.
const MAX_TOTAL: usize = 250;
const LIVE_PODS_MOST: usize = 240;

/// The trace's seed.
const SEED: u64 = 14;

const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;

fn key() -> PoolKey {
    PoolKey::new("vpc", "subnet-a", ["sg"], None)
}

fn owner(n: usize) -> Owner {
    Owner {
        container_id: format!("pod-{n}"),
        ifname: "eth0".into(),
        pod: None,
        cni_network: None,
        pod_uid: None,
    }
}

/// Where a pod's ADD comes from in the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A single ADD of a diurnal ramp.
    Single,
    /// The first wave of a rollout: nothing announced it.
    FirstWave,
    /// A later wave of a rollout, minutes after the one before.
    LaterWave,
}

/// One pod: when its ADD comes and when it is deleted (milliseconds from
/// the start of the trace).
#[derive(Debug, Clone, Copy)]
struct Pod {
    add_ms: u64,
    delete_ms: u64,
    kind: Kind,
}

/// Draws from the trace's RNG.
struct Draw(StdRng);

impl Draw {
    fn uniform(&mut self, low: f64, high: f64) -> f64 {
        self.0.random_range(low..high)
    }

    fn millis(&mut self, low: u64, high: u64) -> u64 {
        self.0.random_range(low..=high)
    }

    /// An exponential draw of mean `mean` (inverse transform).
    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform(0.0, 1.0)).ln()
    }
}

/// Single ADDs arriving as a Poisson stream whose rate rises from zero to
/// `peak` per second and back over `[from_ms, to_ms)` (half a sine: a
/// day's ramp compressed), by thinning; pods live 15 minutes on average.
fn diurnal(draw: &mut Draw, from_ms: u64, to_ms: u64, peak: f64, pods: &mut Vec<Pod>) {
    let span = (to_ms - from_ms) as f64;
    let mut at = from_ms as f64;
    loop {
        at += draw.exponential(1_000.0 / peak);
        if at >= to_ms as f64 {
            return;
        }
        let phase = (at - from_ms as f64) / span;
        if draw.uniform(0.0, 1.0) < (std::f64::consts::PI * phase).sin() {
            let add_ms = at as u64;
            let life = draw.exponential(15.0 * MINUTE_MS as f64) as u64;
            pods.push(Pod {
                add_ms,
                delete_ms: add_ms + life.max(1_000),
                kind: Kind::Single,
            });
        }
    }
}

/// A rollout at `at_ms`: `waves` bursts of 50-200 ADDs, each within ten
/// seconds, two to four minutes apart; its pods live 5-15 minutes.
fn rollout(draw: &mut Draw, at_ms: u64, waves: usize, pods: &mut Vec<Pod>) {
    let mut wave_ms = at_ms;
    for wave in 0..waves {
        let size = draw.millis(50, 200);
        let kind = if wave == 0 {
            Kind::FirstWave
        } else {
            Kind::LaterWave
        };
        for _ in 0..size {
            let add_ms = wave_ms + draw.millis(0, 10_000);
            pods.push(Pod {
                add_ms,
                delete_ms: add_ms + draw.millis(5 * MINUTE_MS, 15 * MINUTE_MS),
                kind,
            });
        }
        wave_ms += draw.millis(2 * MINUTE_MS, 4 * MINUTE_MS);
    }
}

/// The whole trace, sorted by ADD time, with ADDs that would put more than
/// `LIVE_PODS_MOST` pods on the node at once left out.
fn trace() -> Vec<Pod> {
    let mut draw = Draw(StdRng::seed_from_u64(SEED));
    let mut pods = Vec::new();
    // 0-1 h idle. 1-7 h: the day's ramp, with rollouts.
    diurnal(&mut draw, HOUR_MS, 7 * HOUR_MS, 0.05, &mut pods);
    for (hour, waves) in [(1.5, 1), (2.5, 3), (4.0, 2), (5.0, 1), (6.2, 3)] {
        let at = (hour * HOUR_MS as f64) as u64 + draw.millis(0, 10 * MINUTE_MS);
        rollout(&mut draw, at, waves, &mut pods);
    }
    // 7-9 h idle. 9-12 h: a smaller ramp, with rollouts.
    diurnal(&mut draw, 9 * HOUR_MS, 12 * HOUR_MS, 0.02, &mut pods);
    for (hour, waves) in [(9.5, 1), (10.3, 2), (11.2, 1)] {
        let at = (hour * HOUR_MS as f64) as u64 + draw.millis(0, 10 * MINUTE_MS);
        rollout(&mut draw, at, waves, &mut pods);
    }
    pods.sort_by_key(|pod| pod.add_ms);
    let mut live: Vec<u64> = Vec::new();
    pods.retain(|pod| {
        live.retain(|delete_ms| *delete_ms > pod.add_ms);
        let room = live.len() < LIVE_PODS_MOST;
        if room {
            live.push(pod.delete_ms);
        }
        room
    });
    pods
}

/// The slow backend, with its allocate and release calls counted.
struct Counted {
    inner: Faulty<MemoryBackend>,
    allocations: AtomicU64,
    releases: AtomicU64,
}

#[async_trait::async_trait]
impl IpamBackend for Counted {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn allocate(&self, request: &AllocationRequest) -> Result<Vec<Lease>, IpamError> {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.inner.allocate(request).await
    }

    async fn release(&self, id: &str) -> Result<(), IpamError> {
        self.releases.fetch_add(1, Ordering::Relaxed);
        self.inner.release(id).await
    }

    async fn update_owner(
        &self,
        id: &str,
        owner: Option<Owner>,
        marked_by: Option<hulk_ipam::InstanceMark>,
    ) -> Result<Lease, IpamError> {
        self.inner.update_owner(id, owner, marked_by).await
    }

    async fn list(&self, scope: &ListScope) -> Result<Vec<Lease>, IpamError> {
        self.inner.list(scope).await
    }

    async fn health(&self) -> Result<(), IpamError> {
        self.inner.health().await
    }
}

/// What one simulation measured.
struct Outcome {
    /// Every ADD's wait, in trace order.
    waits: Vec<Duration>,
    /// Time-weighted averages of idle and held addresses.
    idle: f64,
    held: f64,
    allocations: u64,
    releases: u64,
}

/// The ADD of pod `n`: retried (as kubelet does) when the pool gives up
/// after `assign_timeout`; returns how long the pod waited.
async fn add(pools: &PoolManager, n: usize) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        match pools.assign(&key(), &owner(n)).await {
            Ok(_) => return started.elapsed(),
            Err(PoolError::Empty { .. }) => continue,
            Err(error) => panic!("ADD of pod {n}: {error}"),
        }
    }
}

async fn simulate(config: PoolConfig, latency: Duration, pods: &[Pod]) -> Outcome {
    let backend = Arc::new(Counted {
        inner: Faulty::new(
            MemoryBackend::new("10.0.0.0/16".parse().expect("cidr")),
            FaultPlan::fixed_latency(latency),
        ),
        allocations: AtomicU64::new(0),
        releases: AtomicU64::new(0),
    });
    let clock = Arc::new(TokioClock::starting_at(1_800_000_000_000));
    let pools = PoolManager::open(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        clock,
        "node",
        config,
    )
    .await
    .expect("open");
    pools.warm_up(&key()).await.expect("warm up");
    let stop = tokio_util::sync::CancellationToken::new();
    let refiller = tokio::spawn(pools.clone().run_refiller(key(), stop.clone()));
    let start = tokio::time::Instant::now();
    let handles: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(n, pod)| {
            let pools = pools.clone();
            let pod = *pod;
            tokio::spawn(async move {
                tokio::time::sleep_until(start + Duration::from_millis(pod.add_ms)).await;
                let waited = add(&pools, n).await;
                tokio::time::sleep_until(start + Duration::from_millis(pod.delete_ms)).await;
                pools.release(&key(), &owner(n)).await.expect("DEL");
                waited
            })
        })
        .collect();
    // Sample the pool every simulated second: equal steps, so the mean of
    // the samples is the time-weighted average.
    let (mut idle, mut held, mut samples) = (0u64, 0u64, 0u64);
    let mut tick = tokio::time::interval_at(start, Duration::from_secs(1));
    while start.elapsed() < SPAN {
        tick.tick().await;
        let stats = pools.stats(&key());
        idle += stats.idle as u64;
        held += (stats.idle + stats.assigned + stats.cooldown + stats.releasing) as u64;
        samples += 1;
    }
    let mut waits = Vec::with_capacity(handles.len());
    for handle in handles {
        waits.push(handle.await.expect("pod"));
    }
    stop.cancel();
    refiller.await.expect("refiller");
    Outcome {
        waits,
        idle: idle as f64 / samples as f64,
        held: held as f64 / samples as f64,
        allocations: backend.allocations.load(Ordering::Relaxed),
        releases: backend.releases.load(Ordering::Relaxed),
    }
}

/// The `fraction` percentile of `waits` (nearest rank), in milliseconds.
fn percentile(waits: impl Iterator<Item = Duration>, fraction: f64) -> u128 {
    let mut sorted: Vec<Duration> = waits.collect();
    sorted.sort();
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).map_or(0, Duration::as_millis)
}

/// The three policies compared, all with the node's pod capacity.
fn policies() -> [(&'static str, PoolConfig); 3] {
    let base = PoolConfig {
        max_total: MAX_TOTAL,
        ..PoolConfig::default()
    };
    [
        ("static defaults (4/16, batch 8)", base.clone()),
        (
            "static tuned (32/96, batch 32)",
            PoolConfig {
                min_idle: 32,
                max_idle: 96,
                batch: 32,
                warm_up: 32,
                ..base.clone()
            },
        ),
        (
            "adaptive (p99 0.5 s, 4..128, batch 32, 60 calls/min)",
            PoolConfig {
                max_idle: 128,
                batch: 32,
                target_add_p99: Some(Duration::from_millis(500)),
                adaptive_calls_per_minute: 60,
                ..base
            },
        ),
    ]
}

fn main() {
    if std::env::args().any(|argument| argument == "--list") {
        return;
    }
    let pods = trace();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    println!(
        "\n{} pod ADDs over {} simulated hours (seed {SEED}), max_total {MAX_TOTAL}\n",
        pods.len(),
        SPAN.as_secs() / 3600
    );
    let count = |kind| pods.iter().filter(|pod| pod.kind == kind).count();
    println!(
        "ADDs: {} single (ramps), {} in first waves of rollouts, {} in later waves\n",
        count(Kind::Single),
        count(Kind::FirstWave),
        count(Kind::LaterWave)
    );
    println!(
        "| backend | policy | ADD wait p50 | p99 | max | p99 single | p99 first waves | p99 later waves | ADDs that waited | idle (avg) | held (avg) | allocate calls | release calls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for latency in [Duration::from_secs(2), Duration::from_secs(10)] {
        for (name, config) in policies() {
            let outcome = runtime.block_on(simulate(config, latency, &pods));
            let all = || outcome.waits.iter().copied();
            let of = |kind| {
                let waits = all().zip(&pods).filter(move |(_, pod)| pod.kind == kind);
                percentile(waits.map(|(wait, _)| wait), 0.99)
            };
            let waited = all().filter(|wait| !wait.is_zero()).count();
            println!(
                "| {} s | {name} | {} ms | {} ms | {} ms | {} ms | {} ms | {} ms | {:.1} % | {:.1} | {:.1} | {} | {} |",
                latency.as_secs(),
                percentile(all(), 0.5),
                percentile(all(), 0.99),
                percentile(all(), 1.0),
                of(Kind::Single),
                of(Kind::FirstWave),
                of(Kind::LaterWave),
                100.0 * waited as f64 / outcome.waits.len() as f64,
                outcome.idle,
                outcome.held,
                outcome.allocations,
                outcome.releases,
            );
        }
    }
}
