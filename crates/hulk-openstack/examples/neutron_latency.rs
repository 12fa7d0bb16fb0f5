//! Allocation latency against the Neutron of `scripts/openstack-tests`
//! (run with HULK_OPENSTACK_LATENCY=1): single ports and bulk-32, every
//! field set (subnet, security group, QoS policy, binding host, tags).

#![allow(missing_docs)]

use std::time::{Duration, Instant};

use hulk_ipam::{AllocationRequest, IpamBackend, PoolKey};
use hulk_openstack::neutron::{NeutronAuth, NeutronClient};
use hulk_openstack::{HttpClient, HttpSettings, NeutronBackend, NeutronBackendConfig};

#[path = "../tests/support/mod.rs"]
mod support;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), hulk_ipam::IpamError> {
    let vpc = support::vpc("latency", "10.66.0.0/22").await;
    let http = HttpClient::new(&HttpSettings::default())?;
    let client = NeutronClient::new(http, NeutronAuth::None, Some(support::env("NEUTRON_URL")))?;
    let backend = NeutronBackend::new(client, NeutronBackendConfig::new("latency"));
    let key = PoolKey::new(
        &vpc.network,
        &vpc.subnet,
        [vpc.security_group.clone()],
        Some(vpc.qos_policy.clone()),
    );
    // The first calls warm Neutron's caches and ours (subnet facts, extensions).
    let warm = backend
        .allocate(&AllocationRequest::new(key.clone(), "node-a", 1))
        .await?;
    backend.release(&warm[0].id).await?;

    let mut single = Vec::new();
    let mut release = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let lease = backend
            .allocate(&AllocationRequest::new(key.clone(), "node-a", 1))
            .await?;
        single.push(started.elapsed());
        let started = Instant::now();
        backend.release(&lease[0].id).await?;
        release.push(started.elapsed());
    }
    let mut bulk = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let leases = backend
            .allocate(&AllocationRequest::new(key.clone(), "node-a", 32))
            .await?;
        bulk.push(started.elapsed());
        for lease in leases {
            backend.release(&lease.id).await?;
        }
    }
    println!("| operation (real Neutron, loopback, SQLite) | runs | median |");
    println!("|---|---|---|");
    println!(
        "| allocate 1 port, all fields | {} | {:.0} ms |",
        single.len(),
        median(single).as_secs_f64() * 1e3
    );
    println!(
        "| release 1 port | {} | {:.0} ms |",
        release.len(),
        median(release).as_secs_f64() * 1e3
    );
    println!(
        "| allocate 32 ports in one bulk call, all fields | {} | {:.2} s |",
        bulk.len(),
        median(bulk).as_secs_f64()
    );
    Ok(())
}
