//! Root tests on the host kernel: the worker really lives in its own
//! namespace. Run in the `netns` nextest group (one at a time).

use futures::TryStreamExt;
use hulk_netns::rtnetlink::LinkVeth;
use hulk_netns::{NetlinkWorker, Netns, NetnsError, link_by_name};

async fn link_names(worker: &NetlinkWorker) -> Vec<String> {
    worker
        .run(|handle| async move {
            let links: Vec<_> = handle.link().get().execute().try_collect().await?;
            Ok::<_, hulk_netns::rtnetlink::Error>(
                links
                    .iter()
                    .flat_map(|link| &link.attributes)
                    .filter_map(|attribute| match attribute {
                        hulk_netns::rtnetlink::packet_route::link::LinkAttribute::IfName(name) => {
                            Some(name.clone())
                        }
                        _ => None,
                    })
                    .collect(),
            )
        })
        .await
        .expect("worker alive")
        .expect("link dump")
}

#[tokio::test]
async fn a_new_namespace_holds_only_loopback() {
    let worker = NetlinkWorker::spawn_in_new_namespace().unwrap();
    assert_eq!(link_names(&worker).await, ["lo"]);
}

#[tokio::test]
async fn links_made_inside_stay_inside() {
    let pod = NetlinkWorker::spawn_in_new_namespace().unwrap();
    pod.run(|handle| async move {
        handle
            .link()
            .add(LinkVeth::new("hulkt-a", "hulkt-b").build())
            .execute()
            .await
    })
    .await
    .unwrap()
    .unwrap();
    let mut names = link_names(&pod).await;
    names.sort();
    assert_eq!(names, ["hulkt-a", "hulkt-b", "lo"]);

    // The process's own namespace (the host's) does not see them.
    let host = NetlinkWorker::spawn_in(Netns::open("/proc/self/ns/net").unwrap()).unwrap();
    let found = host
        .run(|handle| async move { link_by_name(&handle, "hulkt-a").await })
        .await
        .unwrap()
        .unwrap();
    assert!(found.is_none());
}

#[tokio::test]
async fn a_second_worker_joins_an_existing_namespace() {
    let first = NetlinkWorker::spawn_in_new_namespace().unwrap();
    first
        .run(|handle| async move {
            handle
                .link()
                .add(LinkVeth::new("hulkj-a", "hulkj-b").build())
                .execute()
                .await
        })
        .await
        .unwrap()
        .unwrap();
    let second = NetlinkWorker::spawn_in(first.netns().try_clone().unwrap()).unwrap();
    let found = second
        .run(|handle| async move { link_by_name(&handle, "hulkj-b").await })
        .await
        .unwrap()
        .unwrap();
    assert!(found.is_some());
}

#[tokio::test]
async fn a_missing_link_is_none_and_a_missing_namespace_is_an_error() {
    let worker = NetlinkWorker::spawn_in_new_namespace().unwrap();
    let found = worker
        .run(|handle| async move { link_by_name(&handle, "nope0").await })
        .await
        .unwrap()
        .unwrap();
    assert!(found.is_none());
    assert!(matches!(
        Netns::open("/var/run/netns/hulk-does-not-exist"),
        Err(NetnsError::Open { .. })
    ));
}

#[tokio::test]
async fn many_jobs_run_concurrently_on_one_worker() {
    let worker = NetlinkWorker::spawn_in_new_namespace().unwrap();
    let jobs = (0..32).map(|index| {
        worker.run(move |handle| async move {
            let name = format!("hulkc{index}");
            handle
                .link()
                .add(LinkVeth::new(&name, &format!("{name}p")).build())
                .execute()
                .await
        })
    });
    for outcome in futures::future::join_all(jobs).await {
        outcome.unwrap().unwrap();
    }
    assert_eq!(link_names(&worker).await.len(), 1 + 64);
}

/// Two dumps at once on one netlink socket get EBUSY from the kernel;
/// `run_dump` makes them take turns, so many concurrent listings (STATUS
/// calls inspecting the node) all succeed. With plain `run` this fails.
#[tokio::test]
async fn concurrent_dumps_on_one_worker_all_succeed() {
    let worker = std::sync::Arc::new(NetlinkWorker::spawn_in_new_namespace().unwrap());
    worker
        .run(|handle| async move {
            handle
                .link()
                .add(LinkVeth::new("hulkt-c", "hulkt-d").build())
                .execute()
                .await
        })
        .await
        .unwrap()
        .unwrap();
    let dumps = (0..200).map(|_| {
        let worker = worker.clone();
        tokio::spawn(async move {
            worker
                .run_dump(|handle| async move {
                    let links: Vec<_> = handle.link().get().execute().try_collect().await?;
                    let addresses: Vec<_> = handle.address().get().execute().try_collect().await?;
                    Ok::<_, hulk_netns::rtnetlink::Error>((links.len(), addresses.len()))
                })
                .await
        })
    });
    let mut failures = Vec::new();
    for dump in futures::future::join_all(dumps).await {
        match dump.unwrap().unwrap() {
            Ok((links, _)) => assert_eq!(links, 3),
            Err(error) => failures.push(error.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 200 dumps failed: {:?}",
        failures.len(),
        failures.first()
    );
}
