//! Tests that need ipvlan and dummy links, which the host kernel lacks:
//! `scripts/vm-tests` runs them inside a VM booting Debian's kernel.

use futures::TryStreamExt;
use hulk_netns::rtnetlink::packet_route::link::{
    InfoData, InfoIpVlan, InfoKind, IpVlanMode, LinkAttribute, LinkInfo, LinkMessage,
};
use hulk_netns::rtnetlink::{LinkDummy, LinkIpVlan};
use hulk_netns::{NetlinkWorker, link_by_name};

fn kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                LinkInfo::Kind(kind) => Some(kind),
                _ => None,
            }),
            _ => None,
        })
}

fn ipvlan_mode(link: &LinkMessage) -> Option<IpVlanMode> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                LinkInfo::Data(InfoData::IpVlan(data)) => data.iter().find_map(|item| match item {
                    InfoIpVlan::Mode(mode) => Some(*mode),
                    _ => None,
                }),
                _ => None,
            }),
            _ => None,
        })
}

fn parent_index(link: &LinkMessage) -> Option<u32> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Link(index) => Some(*index),
            _ => None,
        })
}

#[tokio::test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
async fn ipvlan_l2_slave_of_a_dummy_parent_in_a_fresh_namespace() {
    let worker = NetlinkWorker::spawn_in_new_namespace().unwrap();
    let (parent, slave) = worker
        .run(|handle| async move {
            handle
                .link()
                .add(LinkDummy::new("vpc0").up().build())
                .execute()
                .await?;
            let parent = link_by_name(&handle, "vpc0").await?.expect("parent exists");
            let slave = LinkIpVlan::new("pod0", parent.header.index, IpVlanMode::L2).build();
            handle.link().add(slave).execute().await?;
            // Re-read through a fresh dump, as a user of the netns would see it.
            let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
            let slave = links
                .into_iter()
                .find(|link| {
                    link.attributes
                        .contains(&LinkAttribute::IfName("pod0".into()))
                })
                .expect("slave listed");
            Ok::<_, hulk_netns::NetnsError>((parent, slave))
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kind(&parent), Some(&InfoKind::Dummy));
    assert_eq!(kind(&slave), Some(&InfoKind::IpVlan));
    assert_eq!(ipvlan_mode(&slave), Some(IpVlanMode::L2));
    assert_eq!(parent_index(&slave), Some(parent.header.index));
}
