//! Assign+release throughput from a warm pool, with 1, 2 and 64
//! concurrent tasks, in memory and durable (redb).

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hulk_ipam::{MemoryBackend, Owner, PoolKey};
use hulk_pool::{MemoryStore, PoolConfig, PoolManager, PoolStore, RedbStore, SystemClock};

const OPERATIONS_PER_ITERATION: u64 = 2 * 1024;

fn key() -> PoolKey {
    PoolKey::new("vpc", "subnet-a", ["sg"], None)
}

fn config() -> PoolConfig {
    PoolConfig {
        min_idle: 64,
        max_idle: 512,
        batch: 64,
        warm_up: 256,
        max_total: 4000,
        max_held: Some(4000),
        // No cooldown here: the bench measures the engine's hot path.
        reuse_cooldown: Duration::ZERO,
        idle_reclaim_after: None,
        assign_timeout: Duration::from_secs(10),
        ..PoolConfig::default()
    }
}

fn pools(runtime: &tokio::runtime::Runtime, store: Arc<dyn PoolStore>) -> Arc<PoolManager> {
    runtime.block_on(async {
        let backend = Arc::new(MemoryBackend::new("10.0.0.0/16".parse().expect("cidr")));
        let pools = PoolManager::open(backend, store, Arc::new(SystemClock), "node", config())
            .await
            .expect("open");
        pools.warm_up(&key()).await.expect("warm up");
        pools
    })
}

/// Runs `OPERATIONS_PER_ITERATION` assign+release operations split over `tasks`.
fn run(
    runtime: &tokio::runtime::Runtime,
    pools: &Arc<PoolManager>,
    tasks: u64,
    round: u64,
) -> Duration {
    let cycles = OPERATIONS_PER_ITERATION / 2 / tasks;
    runtime.block_on(async {
        let started = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|task| {
                let pools = pools.clone();
                tokio::spawn(async move {
                    for cycle in 0..cycles {
                        let owner = Owner {
                            container_id: format!("r{round}-t{task}-{cycle}"),
                            ifname: "eth0".into(),
                            pod: None,
                            cni_network: None,
                            pod_uid: None,
                        };
                        pools.assign(&key(), &owner).await.expect("assign");
                        pools.release(&key(), &owner).await.expect("release");
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.await.expect("task");
        }
        started.elapsed()
    })
}

fn bench_throughput(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let directory = std::env::temp_dir().join(format!("hulk-pool-bench-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let mut group = c.benchmark_group("pool assign+release");
    group.throughput(Throughput::Elements(OPERATIONS_PER_ITERATION));
    group.sample_size(10);
    for durable in [false, true] {
        let store: Arc<dyn PoolStore> = if durable {
            let path = directory.join("pool.redb");
            let _ = std::fs::remove_file(&path);
            Arc::new(RedbStore::open(&path).expect("redb"))
        } else {
            Arc::new(MemoryStore::default())
        };
        let pools = pools(&runtime, store);
        for tasks in [1u64, 2, 64] {
            let name = format!("{} {tasks} tasks", if durable { "redb" } else { "memory" });
            let mut round = 0;
            group.bench_function(name, |b| {
                b.iter_custom(|iterations| {
                    (0..iterations)
                        .map(|_| {
                            round += 1;
                            run(&runtime, &pools, tasks, round)
                        })
                        .sum()
                })
            });
        }
    }
    group.finish();
    let _ = std::fs::remove_dir_all(directory);
}

criterion_group!(benches, bench_throughput);
criterion_main!(benches);
