//! Assignment latency from a warm durable pool (p50/p99), and a burst of
//! 200 pod ADDs against a backend that takes 10 s per call: time until all
//! pods have addresses with a warm pool and with none (every ADD calling
//! the backend itself). The burst runs in tokio's virtual time, so the
//! seconds are simulated, exactly.

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use hulk_ipam::{
    AllocationRequest, FaultPlan, Faulty, IpamBackend, Latency, MemoryBackend, Owner, PoolKey,
};
use hulk_pool::{PoolConfig, PoolManager, RedbStore, SystemClock};

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

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn durable_latency() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let directory = std::env::temp_dir().join(format!("hulk-pool-latency-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let path = directory.join("pool.redb");
    let samples = runtime.block_on(async {
        let backend = Arc::new(MemoryBackend::new("10.0.0.0/16".parse().expect("cidr")));
        let store = Arc::new(RedbStore::open(&path).expect("redb"));
        let config = PoolConfig {
            min_idle: 64,
            max_idle: 2048,
            batch: 256,
            warm_up: 2048,
            max_total: 4000,
            max_held: Some(4000),
            ..PoolConfig::default()
        };
        let pools = PoolManager::open(backend, store, Arc::new(SystemClock), "node", config)
            .await
            .expect("open");
        pools.warm_up(&key()).await.expect("warm up");
        let mut samples = Vec::new();
        for n in 0..2000 {
            let started = std::time::Instant::now();
            pools.assign(&key(), &owner(n)).await.expect("assign");
            samples.push(started.elapsed());
        }
        samples
    });
    let _ = std::fs::remove_dir_all(directory);
    let mut sorted = samples;
    sorted.sort();
    println!(
        "durable (redb) assignment from a warm pool, {} samples: p50 {:?}, p99 {:?}",
        sorted.len(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99)
    );
}

fn slow_backend() -> Arc<Faulty<MemoryBackend>> {
    Arc::new(Faulty::new(
        MemoryBackend::new("10.0.0.0/16".parse().expect("cidr")),
        FaultPlan {
            latency: Latency::Fixed(Duration::from_secs(10)),
            ..FaultPlan::default()
        },
    ))
}

/// Every pod's wait, in virtual time.
async fn burst(
    pools: Option<Arc<PoolManager>>,
    backend: Arc<Faulty<MemoryBackend>>,
) -> Vec<Duration> {
    let started = tokio::time::Instant::now();
    let handles: Vec<_> = (0..200)
        .map(|n| {
            let (pools, backend) = (pools.clone(), backend.clone());
            tokio::spawn(async move {
                match pools {
                    Some(pools) => {
                        pools.assign(&key(), &owner(n)).await.expect("assign");
                    }
                    None => {
                        backend
                            .allocate(&AllocationRequest::new(key(), "node", 1))
                            .await
                            .expect("allocate");
                    }
                }
                started.elapsed()
            })
        })
        .collect();
    let mut waits = Vec::new();
    for handle in handles {
        waits.push(handle.await.expect("pod"));
    }
    waits.sort();
    waits
}

fn report(what: &str, waits: &[Duration]) {
    println!(
        "| {what} | {:.1} s | {:.1} s | {:.1} s |",
        percentile(waits, 0.5).as_secs_f64(),
        percentile(waits, 0.99).as_secs_f64(),
        waits.last().expect("pods").as_secs_f64()
    );
}

fn burst_of_200() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!("\n200 pod ADDs at once, backend 10 s per call (virtual time)\n");
        println!("| setup | p50 wait | p99 wait | all pods addressed |\n|---|---|---|---|");
        let waits = burst(None, slow_backend()).await;
        report("no pool: each ADD calls the backend", &waits);
        for (warm_up, batch) in [(64, 64), (200, 64)] {
            let backend = slow_backend();
            let config = PoolConfig {
                min_idle: 32,
                max_idle: 256,
                batch,
                warm_up,
                max_total: 400,
                max_held: Some(400),
                assign_timeout: Duration::from_secs(120),
                refill_interval: Duration::from_secs(1),
                ..PoolConfig::default()
            };
            let pools = PoolManager::open(
                backend.clone(),
                Arc::new(hulk_pool::MemoryStore::default()),
                Arc::new(SystemClock),
                "node",
                config,
            )
            .await
            .expect("open");
            pools.warm_up(&key()).await.expect("warm up");
            let stop = tokio_util::sync::CancellationToken::new();
            let refiller = tokio::spawn(pools.clone().run_refiller(key(), stop.clone()));
            let waits = burst(Some(pools), backend).await;
            report(
                &format!("warm pool: {warm_up} pre-allocated, refill batches of {batch}"),
                &waits,
            );
            stop.cancel();
            refiller.await.expect("refiller");
        }
    });
}

fn main() {
    if std::env::args().any(|argument| argument == "--list") {
        return;
    }
    durable_latency();
    burst_of_200();
}
