//! Test-only setup of VPC resources on the Neutron from
//! tests/openstack/up.sh (noauth: every request is admin).

use serde_json::{Value, json};

/// An environment variable scripts/openstack-tests sets.
pub fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} is not set: run scripts/openstack-tests"))
}

/// Creates a resource through the raw API.
pub async fn create(kind: &str, body: Value) -> Value {
    let url = format!("{}/v2.0/{kind}", env("NEUTRON_URL"));
    let response = reqwest::Client::new()
        .post(&url)
        .json(&body)
        .send()
        .await
        .expect("neutron answers");
    let status = response.status();
    let value: Value = response.json().await.expect("json");
    assert!(status.is_success(), "{kind}: {status} {value}");
    value
}

pub struct Vpc {
    pub network: String,
    pub subnet: String,
    pub security_group: String,
    pub qos_policy: String,
}

pub async fn vpc(name: &str, cidr: &str) -> Vpc {
    let network = create("networks", json!({"network": {"name": name}})).await["network"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let subnet = create(
        "subnets",
        json!({"subnet": {"network_id": network, "ip_version": 4, "cidr": cidr, "enable_dhcp": false}}),
    )
    .await["subnet"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let security_group = create("security-groups", json!({"security_group": {"name": name}})).await
        ["security_group"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let qos_policy =
        create("qos/policies", json!({"policy": {"name": name}})).await["policy"]["id"]
            .as_str()
            .expect("id")
            .to_owned();
    create(
        &format!("qos/policies/{qos_policy}/bandwidth_limit_rules"),
        json!({"bandwidth_limit_rule": {"max_kbps": 10000, "max_burst_kbps": 1000, "direction": "egress"}}),
    )
    .await;
    Vpc {
        network,
        subnet,
        security_group,
        qos_policy,
    }
}
