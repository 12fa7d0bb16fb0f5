//! The datapath on the host kernel with macvlan (the host has no ipvlan;
//! `vm_ipvlan.rs` runs the same scenarios with ipvlan in the VM). Root;
//! nextest group `netns`.

mod support;

use hulk_netns::{MacVlanMode, SlaveKind};

const MACVLAN: SlaveKind = SlaveKind::MacVlan {
    mode: MacVlanMode::Bridge,
};

#[tokio::test]
async fn macvlan_pods_reach_each_other_the_gateway_the_node_and_services() {
    support::traffic_scenario("mvt", MACVLAN).await;
}

#[tokio::test]
async fn macvlan_detach_removes_the_pod_and_restore_rebuilds_the_node() {
    support::restore_scenario("mvr", MACVLAN).await;
}
