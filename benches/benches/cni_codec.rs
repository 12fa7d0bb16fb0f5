//! What the plugin spends on the CNI protocol itself per invocation:
//! parsing the configuration (with a cached `prevResult`) and writing the
//! result in an old and a new spec version.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hulk_cni::{CniResult, CniVersion, NetConf};
use serde_json::json;

fn configuration() -> Vec<u8> {
    json!({
        "cniVersion": "1.1.0", "name": "vpc", "type": "hulk-vpc-cni",
        "master": "eth1", "mode": "l2", "mtu": 1450,
        "serviceCidrs": ["10.96.0.0/12"],
        "ipam": {"type": "neutron", "network": "net-1", "subnet": "sub-1", "securityGroups": ["sg-1", "sg-2"]},
        "runtimeConfig": {"bandwidth": {"ingressRate": 100000, "egressRate": 100000}},
        "prevResult": {
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "mac": "fa:16:3e:00:00:02", "sandbox": "/var/run/netns/p"}],
            "ips": [{"address": "10.20.0.2/24", "gateway": "10.20.0.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.20.0.1"}, {"dst": "10.96.0.0/12", "gw": "10.20.0.250"}]
        }
    })
    .to_string()
    .into_bytes()
}

fn bench_codec(c: &mut Criterion) {
    let input = configuration();
    c.bench_function("parse configuration with prevResult", |b| {
        b.iter(|| {
            let conf = NetConf::from_slice(black_box(&input)).expect("valid");
            conf.prev_result().expect("valid prevResult")
        })
    });
    let result = NetConf::from_slice(&input)
        .and_then(|conf| conf.prev_result())
        .expect("valid")
        .expect("present");
    for version in [CniVersion::V0_4_0, CniVersion::V1_1_0] {
        c.bench_function(&format!("write result as {version}"), |b| {
            b.iter(|| {
                serde_json::to_vec(&black_box(&result).to_value(version)).expect("serializes")
            })
        });
    }
    let written = result.to_value(CniVersion::V1_1_0);
    c.bench_function("convert result 1.1.0 -> 0.4.0", |b| {
        b.iter(|| {
            CniResult::convert(black_box(written.clone()), CniVersion::V0_4_0).expect("converts")
        })
    });
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
