//! Pod churn on a cluster sharing one /22 (issue 14 item 9): N nodes, each
//! with its own `PoolManager` and refiller, delete pods at a Poisson rate and
//! replace each at once. The run is in tokio's paused clock, the pools follow
//! it (`TokioClock`), so minutes of churn take seconds and every figure is in
//! simulated time. It measures what sizing a subnet needs: the addresses the
//! cluster holds against `nodes × (pods + churn × cooldown + idle)` (idle:
//! `min_idle` to `max_idle`), how long ADDs wait, and which fail, and why,
//! when the subnet is too small. Figures are in docs/pool.md.
//!
//! `cargo bench -p hulk-benches --bench pool_churn`

#![allow(missing_docs)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hulk_ipam::{FaultPlan, Faulty, MemoryBackend, Owner, PoolKey};
use hulk_pool::{
    AddressRecord, AddressState, MemoryStore, PoolConfig, PoolError, PoolManager, TokioClock,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;

const SUBNET: &str = "10.40.0.0/22";
/// Pods start and settle before anything is counted: longer than the
/// longest cooldown, so the cooling addresses have reached their steady
/// number.
const WARM_UP: Duration = Duration::from_secs(60);
/// The counted stretch of churn.
const MEASURED: Duration = Duration::from_secs(120);
/// How long kubelet waits before it retries a failed sandbox (a new
/// container id, a new ADD); the pod stays without an address meanwhile.
const RETRY_AFTER: Duration = Duration::from_secs(1);
const SEED: u64 = 14;

fn key() -> PoolKey {
    PoolKey::new("vpc", "subnet-a", ["sg"], None)
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    nodes: usize,
    pods: usize,
    /// Pod deletions per second per node, each followed by a replacement.
    churn: f64,
    cooldown: Duration,
    latency: Duration,
}

impl Scenario {
    fn config(&self) -> PoolConfig {
        // The default knobs (docs/pool.md) but the cooldown; `warm_up` is
        // unused: the pools get their first addresses from the refiller,
        // the only thing the bench runs beside the pods.
        PoolConfig {
            reuse_cooldown: self.cooldown,
            ..PoolConfig::default()
        }
    }

    /// The sizing formula of docs/pool.md, `nodes × (pods + churn × cooldown
    /// + idle)`, with `idle` idle addresses per node.
    fn predicted(&self, idle: usize) -> f64 {
        let per_node = self.pods as f64 + self.churn * self.cooldown.as_secs_f64() + idle as f64;
        self.nodes as f64 * per_node
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Exhausted,
    TimedOut,
    Other,
}

impl Outcome {
    fn of(result: &Result<hulk_ipam::Lease, PoolError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(PoolError::Degraded {
                exhausted: true, ..
            }) => Outcome::Exhausted,
            Err(PoolError::Empty { .. }) => Outcome::TimedOut,
            Err(_) => Outcome::Other,
        }
    }
}

/// One ADD: when it started (simulated ms since the run began), how long
/// it took, and how it ended.
#[derive(Debug, Clone, Copy)]
struct Add {
    started_ms: u64,
    wait_ms: u64,
    outcome: Outcome,
}

/// What the pods of one node share with their ADD tasks.
struct Node {
    pools: Arc<PoolManager>,
    /// Pods holding an address, deletion candidates.
    addressed: Mutex<Vec<Owner>>,
    adds: Mutex<Vec<Add>>,
    /// Numbers container ids: a retried sandbox is a new container.
    next_container: Mutex<u64>,
}

impl Node {
    fn owner(&self) -> Owner {
        let mut next = self.next_container.lock().expect("lock");
        *next += 1;
        Owner {
            container_id: format!("{}-c{next}", self.pools.node_name()),
            ifname: "eth0".into(),
            pod: None,
            cni_network: None,
            pod_uid: None,
        }
    }

    /// A pod's sandbox creation, retried as kubelet does until an ADD
    /// succeeds or the run ends.
    async fn add_pod(self: Arc<Self>, began: Instant, end: Instant) {
        loop {
            let owner = self.owner();
            let started = Instant::now();
            let result = self.pools.assign(&key(), &owner).await;
            let outcome = Outcome::of(&result);
            self.adds.lock().expect("lock").push(Add {
                started_ms: millis(started - began),
                wait_ms: millis(started.elapsed()),
                outcome,
            });
            if outcome == Outcome::Ok {
                self.addressed.lock().expect("lock").push(owner);
                return;
            }
            if Instant::now() + RETRY_AFTER >= end {
                return;
            }
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }

    /// Deletes pods at Poisson times and starts each one's replacement at
    /// once, until `end`. A deletion picks one of the node's `pods` places;
    /// one whose pod still waits for an address is skipped, so each running
    /// pod lives an exponential time of mean `pods / rate` and the rate is
    /// `rate` while every pod has its address: stalled ADDs do not speed up
    /// the deaths of the pods that got one.
    async fn churn(
        self: Arc<Self>,
        pods: usize,
        rate: f64,
        mut random: StdRng,
        began: Instant,
        end: Instant,
    ) {
        let mut replacements = Vec::new();
        loop {
            // Exponential gaps: a Poisson process of `rate` per second.
            let gap = -(1.0 - random.random_range(0.0..1.0f64)).ln() / rate;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            if Instant::now() >= end {
                break;
            }
            let victim = {
                let mut addressed = self.addressed.lock().expect("lock");
                let place = random.random_range(0..pods);
                if place >= addressed.len() {
                    continue;
                }
                addressed.swap_remove(place)
            };
            self.pools.release(&key(), &victim).await.expect("release");
            replacements.push(tokio::spawn(self.clone().add_pod(began, end)));
        }
        for replacement in replacements {
            replacement.await.expect("ADD task");
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Measured {
    adds: Vec<Add>,
    /// Addresses in the nodes' records, summed, once a simulated second.
    held: Vec<usize>,
    /// Addresses held by pods, summed, at the same times.
    assigned: Vec<usize>,
    /// The most stale `Releasing` records seen at once.
    stale: usize,
    problems: Vec<String>,
}

async fn simulate(scenario: Scenario) -> Measured {
    let backend = Arc::new(Faulty::new(
        MemoryBackend::new(SUBNET.parse().expect("cidr")),
        FaultPlan::fixed_latency(scenario.latency),
    ));
    let mut nodes = Vec::new();
    for n in 1..=scenario.nodes {
        let pools = PoolManager::open(
            backend.clone(),
            Arc::new(MemoryStore::default()),
            Arc::new(TokioClock::starting_at(1_000_000)),
            format!("node-{n}"),
            scenario.config(),
        )
        .await
        .expect("open");
        nodes.push(Arc::new(Node {
            pools,
            addressed: Mutex::new(Vec::new()),
            adds: Mutex::new(Vec::new()),
            next_container: Mutex::new(0),
        }));
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let refillers: Vec<_> = nodes
        .iter()
        .map(|node| tokio::spawn(node.pools.clone().run_refiller(key(), stop.clone())))
        .collect();
    let began = Instant::now();
    let counted_from = began + WARM_UP;
    let end = counted_from + MEASURED;
    let mut work = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        let mut random = StdRng::seed_from_u64(SEED.wrapping_mul(1000) + index as u64);
        // The node's first pods arrive over its first five seconds.
        for _ in 0..scenario.pods {
            let at = began + Duration::from_secs_f64(random.random_range(0.0..5.0));
            let node = node.clone();
            work.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                node.add_pod(began, end).await;
            }));
        }
        work.push(tokio::spawn(node.clone().churn(
            scenario.pods,
            scenario.churn,
            random,
            began,
            end,
        )));
    }
    let mut held = Vec::new();
    let mut assigned = Vec::new();
    let mut problems = Vec::new();
    let mut stale = 0;
    let mut tick = counted_from;
    while tick < end {
        tokio::time::sleep_until(tick).await;
        let records = records_by_node(&nodes);
        held.push(records.len());
        stale = stale.max(stale_releasing(&records));
        assigned.push(
            records
                .iter()
                .filter(|(_, record)| matches!(record.state, AddressState::Assigned(_)))
                .count(),
        );
        // A few examples are enough to find the cause.
        if problems.len() < 3 {
            let at = millis(tick - began) / 1000;
            problems.extend(
                shared_addresses(&records)
                    .into_iter()
                    .map(|shared| format!("at {at} s, {shared}")),
            );
        }
        tick += Duration::from_secs(1);
    }
    for task in work {
        task.await.expect("pod task");
    }
    // Allocations and returns under way end before the books are compared.
    stop.cancel();
    for refiller in refillers {
        refiller.await.expect("refiller");
    }
    problems.extend(check(&nodes, backend.inner()));
    let adds = nodes
        .iter()
        .flat_map(|node| node.adds.lock().expect("lock").clone())
        .filter(|add| add.started_ms >= millis(WARM_UP))
        .collect();
    Measured {
        adds,
        held,
        assigned,
        stale,
        problems,
    }
}

/// Every node's records, with the node's name.
fn records_by_node(nodes: &[Arc<Node>]) -> Vec<(String, AddressRecord)> {
    nodes
        .iter()
        .flat_map(|node| {
            let name = node.pools.node_name().to_owned();
            node.pools
                .records()
                .into_iter()
                .map(move |record| (name.clone(), record))
        })
        .collect()
}

/// Addresses in more than one record (of any node) that are not merely
/// being returned, with who has them how: a record in `Releasing` whose
/// address the backend already gave to another node is stale, not a
/// second holder (see [`stale_releasing`]).
fn shared_addresses(records: &[(String, AddressRecord)]) -> Vec<String> {
    let mut holders: HashMap<IpAddr, Vec<String>> = HashMap::new();
    for (node, record) in records {
        if record.state != AddressState::Releasing {
            holders
                .entry(record.lease.address.addr())
                .or_default()
                .push(format!("{node} {:?}", record.state));
        }
    }
    holders
        .into_iter()
        .filter(|(_, holders)| holders.len() > 1)
        .map(|(address, holders)| format!("{address} is in {} records: {holders:?}", holders.len()))
        .collect()
}

/// `Releasing` records whose address another record (of another node)
/// holds: the backend freed and reallocated it before the releasing node
/// dropped its record.
fn stale_releasing(records: &[(String, AddressRecord)]) -> usize {
    let live: std::collections::HashSet<IpAddr> = records
        .iter()
        .filter(|(_, record)| record.state != AddressState::Releasing)
        .map(|(_, record)| record.lease.address.addr())
        .collect();
    records
        .iter()
        .filter(|(_, record)| {
            record.state == AddressState::Releasing && live.contains(&record.lease.address.addr())
        })
        .count()
}

/// What must hold at the end: every address in one record only, every pod
/// the simulation believes addressed holding one, and the backend's books
/// equal to the nodes' records.
fn check(nodes: &[Arc<Node>], backend: &MemoryBackend) -> Vec<String> {
    let records = records_by_node(nodes);
    let mut problems = shared_addresses(&records);
    for node in nodes {
        for owner in node.addressed.lock().expect("lock").iter() {
            if node.pools.lease_of(owner).is_none() {
                problems.push(format!("{} lost its address", owner.container_id));
            }
        }
    }
    if backend.allocated() != records.len() {
        problems.push(format!(
            "the backend has {} addresses allocated, the nodes' records {}",
            backend.allocated(),
            records.len()
        ));
    }
    problems
}

fn row(scenario: &Scenario, measured: &Measured) -> String {
    let total = measured.adds.len().max(1) as f64;
    let share = |outcome: Outcome| {
        let count = measured
            .adds
            .iter()
            .filter(|add| add.outcome == outcome)
            .count();
        100.0 * count as f64 / total
    };
    let failed = 100.0 - share(Outcome::Ok);
    let mut waits: Vec<u64> = measured
        .adds
        .iter()
        .filter(|add| add.outcome == Outcome::Ok)
        .map(|add| add.wait_ms)
        .collect();
    waits.sort_unstable();
    let mean =
        |samples: &[usize]| samples.iter().sum::<usize>() as f64 / samples.len().max(1) as f64;
    format!(
        "| {} | {} | {} | {} | {} s | {} | {:.1} % ({:.1} / {:.1} / {:.1}) | {} | {} | {:.0} | {} / {:.0} | {:.0} / {:.0} | {} |",
        scenario.nodes,
        scenario.pods,
        scenario.churn,
        scenario.cooldown.as_secs(),
        scenario.latency.as_secs_f64(),
        measured.adds.len(),
        failed,
        share(Outcome::Exhausted),
        share(Outcome::TimedOut),
        share(Outcome::Other),
        percentile(&waits, 0.5),
        percentile(&waits, 0.99),
        mean(&measured.assigned),
        measured.held.iter().max().copied().unwrap_or(0),
        mean(&measured.held),
        scenario.predicted(scenario.config().min_idle),
        scenario.predicted(scenario.config().max_idle),
        measured.stale,
    )
}

fn main() {
    if std::env::args().any(|argument| argument == "--list") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let base = Scenario {
        nodes: 16,
        pods: 11,
        churn: 2.0,
        cooldown: Duration::from_secs(30),
        latency: Duration::from_millis(1500),
    };
    let mut scenarios = Vec::new();
    for latency in [Duration::from_millis(1500), Duration::from_secs(10)] {
        let base = Scenario { latency, ..base };
        scenarios.extend([
            base,
            Scenario {
                cooldown: Duration::from_secs(10),
                ..base
            },
            Scenario { churn: 1.0, ..base },
            Scenario { nodes: 8, ..base },
        ]);
    }
    println!(
        "\nPod churn on one {SUBNET} (1,021 allocatable addresses), simulated time: \
         {} s of warm-up, then {} s counted; failed ADDs retried after {} s\n",
        WARM_UP.as_secs(),
        MEASURED.as_secs(),
        RETRY_AFTER.as_secs()
    );
    println!(
        "| nodes | pods/node | churn /s/node | cooldown | backend latency | ADDs | failed (exhausted / timed out / other) | ADD wait p50 ms | p99 ms | pods addressed (mean) | held peak / mean | formula, min_idle / max_idle idle | stale releasing records, peak |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut problems = Vec::new();
    for scenario in &scenarios {
        let measured = runtime.block_on(simulate(*scenario));
        println!("{}", row(scenario, &measured));
        problems.extend(
            measured
                .problems
                .iter()
                .map(|problem| format!("{scenario:?}: {problem}")),
        );
    }
    if problems.is_empty() {
        println!(
            "\nchecks: no address in two live records (stale Releasing ones aside) at any sampled second or at the end; every addressed pod holds its lease; the backend's books equal the nodes' records"
        );
    } else {
        println!("\nPROBLEMS:");
        for problem in problems {
            println!("- {problem}");
        }
    }
}
