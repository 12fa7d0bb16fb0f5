//! Tests that need ipvlan and dummy links, which the host kernel lacks:
//! `scripts/vm-tests` runs them inside a VM booting Debian's kernel.

mod support;

use hulk_netns::rtnetlink::LinkDummy;
use hulk_netns::{IpVlanFlag, IpVlanMode, Kernel, NetlinkKernel, NetlinkWorker, SlaveKind};

const IPVLAN_L2: SlaveKind = SlaveKind::IpVlan {
    mode: IpVlanMode::L2,
    flag: IpVlanFlag::Bridge,
};

#[tokio::test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
async fn ipvlan_slaves_of_a_dummy_parent_in_a_fresh_namespace() {
    let host = NetlinkWorker::spawn_in_new_namespace().unwrap();
    host.run(|handle| async move {
        handle
            .link()
            .add(LinkDummy::new("vpc0").up().build())
            .execute()
            .await
    })
    .await
    .unwrap()
    .unwrap();
    let kernel = NetlinkKernel::with_host(host.netns().try_clone().unwrap()).unwrap();
    let parent = kernel.link(kernel.host(), "vpc0").await.unwrap().unwrap();
    assert_eq!(parent.slave, None);
    let kinds = [
        IPVLAN_L2,
        SlaveKind::IpVlan {
            mode: IpVlanMode::L3,
            flag: IpVlanFlag::Bridge,
        },
        SlaveKind::IpVlan {
            mode: IpVlanMode::L3s,
            flag: IpVlanFlag::Private,
        },
        SlaveKind::IpVlan {
            mode: IpVlanMode::L2,
            flag: IpVlanFlag::Vepa,
        },
    ];
    for (number, kind) in kinds.into_iter().enumerate() {
        let name = format!("pod{number}");
        kernel
            .create_slave("vpc0", &name, kind, kernel.host())
            .await
            .unwrap();
        // Read back through a fresh netlink dump: kind, mode and flag as created.
        let slave = kernel.link(kernel.host(), &name).await.unwrap().unwrap();
        assert_eq!(slave.slave, Some(kind), "{name}");
        assert_eq!(
            slave.mac, parent.mac,
            "an ipvlan slave shares its parent's MAC"
        );
    }
}

#[tokio::test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
async fn ipvlan_pods_reach_each_other_the_gateway_the_node_and_services() {
    support::traffic_scenario("ivt", IPVLAN_L2).await;
}

#[tokio::test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
async fn ipvlan_detach_removes_the_pod_and_restore_rebuilds_the_node() {
    support::restore_scenario("ivr", IPVLAN_L2).await;
}
