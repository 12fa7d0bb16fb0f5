//! 100,000 assign/release operations from 64 concurrent tasks against a
//! backend with latency and injected failures, with the refiller running:
//! no address held by two owners at once, no deadlock, and at the end the
//! backend, the store and the pool agree.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hulk_ipam::{FaultPlan, Faulty, IpamError, Latency, MemoryBackend, Owner, PoolKey};
use hulk_pool::{MemoryStore, PoolConfig, PoolError, PoolManager, PoolStore, SystemClock};
use ipnet::IpNet;

const TASKS: usize = 64;
const CYCLES_PER_TASK: usize = 782; // 64 x 782 x 2 operations = 100,096

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_operations_keep_every_invariant() {
    let backend = Arc::new(Faulty::new(
        MemoryBackend::new("10.0.0.0/20".parse().unwrap()),
        FaultPlan {
            latency: Latency::Uniform {
                min: Duration::ZERO,
                max: Duration::from_millis(3),
            },
            error_rate: 0.05,
            random_error: IpamError::Transient("injected".into()),
            seed: 42,
            ..FaultPlan::default()
        },
    ));
    let store = Arc::new(MemoryStore::default());
    let config = PoolConfig {
        min_idle: 48,
        max_idle: 160,
        batch: 32,
        warm_up: 96,
        max_total: 1000,
        max_held: Some(1000),
        reuse_cooldown: Duration::from_millis(2),
        idle_reclaim_after: None,
        assign_timeout: Duration::from_secs(5),
        backoff: Duration::from_millis(50),
        refill_interval: Duration::from_millis(20),
        backend_calls_per_second: 1000.0,
        backend_burst: 100,
        ..PoolConfig::default()
    };
    let pools = PoolManager::open(
        backend.clone(),
        store.clone(),
        Arc::new(SystemClock),
        "node-1",
        config.clone(),
    )
    .await
    .unwrap();
    let key = PoolKey::new("vpc", "subnet-a", ["sg"], None);
    pools.warm_up(&key).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refiller = tokio::spawn(pools.clone().run_refiller(key.clone(), shutdown.clone()));

    let holders: Arc<Mutex<HashMap<IpNet, String>>> = Arc::default();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (pools, key, holders) = (pools.clone(), key.clone(), holders.clone());
            tokio::spawn(async move {
                let mut refused = 0;
                for cycle in 0..CYCLES_PER_TASK {
                    let owner = Owner {
                        container_id: format!("t{task}-c{}", cycle % 3),
                        ifname: "eth0".into(),
                        pod: None,
                        cni_network: None,
                        pod_uid: None,
                    };
                    let lease = match pools.assign(&key, &owner).await {
                        Ok(lease) => lease,
                        Err(PoolError::Empty { .. }) => {
                            refused += 1;
                            continue;
                        }
                        Err(error) => panic!("assign: {error}"),
                    };
                    // A retried ADD gets the same address.
                    assert_eq!(
                        pools.assign(&key, &owner).await.unwrap().address,
                        lease.address
                    );
                    {
                        let mut holders = holders.lock().unwrap();
                        if let Some(other) =
                            holders.insert(lease.address, owner.container_id.clone())
                        {
                            panic!(
                                "{} held by {other} and {}",
                                lease.address, owner.container_id
                            );
                        }
                    }
                    tokio::task::yield_now().await;
                    holders.lock().unwrap().remove(&lease.address);
                    pools.release(&key, &owner).await.unwrap();
                }
                refused
            })
        })
        .collect();
    let mut refused = 0;
    for task in tasks {
        refused += tokio::time::timeout(Duration::from_secs(300), task)
            .await
            .expect("no deadlock: every task finishes")
            .unwrap();
    }
    shutdown.cancel();
    refiller.await.unwrap();

    let stats = pools.stats(&key);
    assert_eq!(stats.assigned, 0, "every assignment was released");
    assert_eq!(stats.in_flight, 0);
    let records = store.load().unwrap();
    assert!(
        records.intents.is_empty(),
        "no backend call left unresolved"
    );
    assert_eq!(
        backend.inner().allocated(),
        records.addresses.len(),
        "backend and store agree"
    );
    assert!(records.addresses.len() <= config.max_total);
    eprintln!(
        "{} operations, {refused} assignments refused, {} backend calls, {} addresses held at the end",
        TASKS * CYCLES_PER_TASK * 2,
        backend.calls(),
        records.addresses.len()
    );
}
