//! The stand-in's wire formats, read back by kube's own client.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use hulk_kube_standin::{Resource, StandIn, StandInConfig, Verb, pod_on as pod};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::core::{PartialObjectMeta, TypeMeta};

async fn standin(config: StandInConfig) -> (StandIn, kube::Client) {
    let standin = match StandIn::start(config).await {
        Ok(standin) => standin,
        Err(error) => panic!("stand-in does not start: {error}"),
    };
    let url = match standin.url().parse() {
        Ok(url) => url,
        Err(error) => panic!("bad url {}: {error}", standin.url()),
    };
    match kube::Client::try_from(kube::Config::new(url)) {
        Ok(client) => (standin, client),
        Err(error) => panic!("no client: {error}"),
    }
}

fn apply(standin: &StandIn, pod: &Pod) -> Pod {
    match standin.apply_pod(pod) {
        Ok(pod) => pod,
        Err(error) => panic!("stand-in refuses the pod: {error}"),
    }
}

fn status_of<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason),
        other => panic!("not an API error: {other:?}"),
    }
}

fn metadata_type() -> Option<TypeMeta> {
    Some(TypeMeta {
        api_version: "meta.k8s.io/v1".to_owned(),
        kind: "PartialObjectMetadata".to_owned(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_lists_select_fields_and_page_from_one_snapshot() {
    let (standin, client) = standin(StandInConfig::default()).await;
    for name in ["a", "b", "c"] {
        apply(&standin, &pod(name, "n1", "Running"));
    }
    apply(&standin, &pod("elsewhere", "n2", "Running"));
    apply(&standin, &pod("done", "n1", "Succeeded"));

    let api = Api::<PartialObjectMeta<Pod>>::all(client.clone());
    let params = ListParams::default()
        .fields("spec.nodeName=n1,status.phase!=Succeeded")
        .limit(2);
    let first = match api.list(&params).await {
        Ok(list) => list,
        Err(error) => panic!("list fails: {error}"),
    };
    assert_eq!(first.types.kind, "PartialObjectMetadataList");
    assert_eq!(first.types.api_version, "meta.k8s.io/v1");
    assert_eq!(first.items.len(), 2);
    assert!(first.items.iter().all(|item| item.types == metadata_type()));
    let token = first.metadata.continue_.clone().unwrap_or_default();
    assert!(!token.is_empty());

    // A pod created between the pages is not in the second one.
    apply(&standin, &pod("late", "n1", "Running"));
    let second = match api.list(&params.clone().continue_token(&token)).await {
        Ok(list) => list,
        Err(error) => panic!("continue fails: {error}"),
    };
    let names: Vec<_> = first
        .items
        .iter()
        .chain(&second.items)
        .filter_map(|item| item.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(second.metadata.continue_, None);
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );

    // The full form carries the spec.
    let full = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields("spec.nodeName=n2"))
        .await
        .map(|list| list.items);
    let nodes: Option<Vec<_>> = full.ok().map(|items| {
        items
            .into_iter()
            .filter_map(|pod| pod.spec?.node_name)
            .collect()
    });
    assert_eq!(nodes, Some(vec!["n2".to_owned()]));

    let unsupported = api
        .list(&ListParams::default().fields("spec.hostname=x"))
        .await;
    assert_eq!(status_of(unsupported), (400, "BadRequest".to_owned()));

    let one = Api::<PartialObjectMeta<Pod>>::namespaced(client, "default")
        .get("a")
        .await;
    assert_eq!(one.ok().map(|pod| pod.types), Some(metadata_type()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_added_modified_deleted_when_leaving_the_selector_and_bookmarks() {
    let (standin, client) = standin(StandInConfig {
        bookmark_interval: Duration::from_millis(100),
        ..StandInConfig::default()
    })
    .await;
    let api = Api::<PartialObjectMeta<Pod>>::all(client);
    let start = standin.resource_version().to_string();
    let params = WatchParams::default()
        .fields("spec.nodeName=n1,status.phase!=Succeeded")
        .timeout(5);
    let stream = match api.watch(&params, &start).await {
        Ok(stream) => stream,
        Err(error) => panic!("watch fails: {error}"),
    };
    let mut stream = stream.boxed();

    let created = apply(&standin, &pod("a", "n1", "Pending"));
    apply(&standin, &pod("other", "n2", "Pending"));
    let running = apply(&standin, &pod("a", "n1", "Running"));
    apply(&standin, &pod("a", "n1", "Succeeded"));
    let finished_at = standin.resource_version().to_string();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(2), stream.try_next()).await;
        match event {
            Ok(Ok(Some(WatchEvent::Added(pod)))) => {
                seen.push(("ADDED", pod.metadata.resource_version));
            }
            Ok(Ok(Some(WatchEvent::Modified(pod)))) => {
                seen.push(("MODIFIED", pod.metadata.resource_version));
            }
            Ok(Ok(Some(WatchEvent::Deleted(pod)))) => {
                assert_eq!(pod.types, metadata_type());
                seen.push(("DELETED", pod.metadata.resource_version));
            }
            Ok(Ok(Some(WatchEvent::Bookmark(bookmark)))) => {
                assert_eq!(bookmark.types.kind, "PartialObjectMetadata");
                seen.push(("BOOKMARK", Some(bookmark.metadata.resource_version)));
            }
            other => panic!("unexpected {other:?}"),
        }
        // Bookmarks before the last change are not what this test looks at.
        if seen.last().is_some_and(|(kind, version)| {
            *kind == "BOOKMARK" && version.as_deref() != Some(finished_at.as_str())
        }) {
            seen.pop();
        }
    }
    assert_eq!(
        seen,
        [
            ("ADDED", created.metadata.resource_version),
            ("MODIFIED", running.metadata.resource_version),
            ("DELETED", Some(finished_at.clone())),
            ("BOOKMARK", Some(finished_at)),
        ]
    );
}

async fn first_event(
    api: &Api<PartialObjectMeta<Pod>>,
    version: &str,
) -> Option<WatchEvent<PartialObjectMeta<Pod>>> {
    let stream = api
        .watch(&WatchParams::default().timeout(2), version)
        .await
        .ok()?;
    let mut stream = stream.boxed();
    stream.next().await?.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_before_the_retained_history_is_an_expired_error_event() {
    let (standin, client) = standin(StandInConfig {
        history_window: 2,
        ..StandInConfig::default()
    })
    .await;
    let api = Api::<PartialObjectMeta<Pod>>::all(client);
    apply(&standin, &pod("a", "n1", "Running"));
    let old = standin.resource_version().to_string();

    // Within the window: the next change is replayed.
    apply(&standin, &pod("b", "n1", "Running"));
    assert!(matches!(
        first_event(&api, &old).await,
        Some(WatchEvent::Added(_))
    ));

    // Two more changes push it out of a window of two.
    apply(&standin, &pod("c", "n1", "Running"));
    apply(&standin, &pod("d", "n1", "Running"));
    let expired = |event: Option<WatchEvent<_>>| match event {
        Some(WatchEvent::Error(status)) => (status.code, status.reason),
        other => panic!("not an error event: {other:?}"),
    };
    assert_eq!(
        expired(first_event(&api, &old).await),
        (410, "Expired".to_owned())
    );

    let recent = standin.resource_version().to_string();
    standin.expire_history();
    assert_eq!(
        expired(first_event(&api, "1").await),
        (410, "Expired".to_owned())
    );
    // The current version is still fine: nothing after it was forgotten.
    apply(&standin, &pod("e", "n1", "Running"));
    assert!(matches!(
        first_event(&api, &recent).await,
        Some(WatchEvent::Added(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_answer_already_exists_conflict_and_not_found() {
    let (standin, client) = standin(StandInConfig::default()).await;
    let api = Api::<Lease>::namespaced(client, "kube-system");
    assert_eq!(status_of(api.get("x").await), (404, "NotFound".to_owned()));

    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("x".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".to_owned()),
            ..LeaseSpec::default()
        }),
    };
    let created = match api.create(&PostParams::default(), &lease).await {
        Ok(created) => created,
        Err(error) => panic!("create fails: {error}"),
    };
    assert!(created.metadata.uid.is_some());
    let again = api.create(&PostParams::default(), &lease).await;
    assert_eq!(status_of(again), (409, "AlreadyExists".to_owned()));

    let updated = api.replace("x", &PostParams::default(), &created).await;
    assert!(updated.is_ok());
    let stale = api.replace("x", &PostParams::default(), &created).await;
    assert_eq!(status_of(stale), (409, "Conflict".to_owned()));
    assert_eq!(standin.requests(Verb::Update, Resource::Leases), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_is_unauthorized_and_a_denied_verb_forbidden() {
    let (standin, client) = standin(StandInConfig {
        token: Some("secret".to_owned()),
        ..StandInConfig::default()
    })
    .await;
    let api = Api::<Pod>::namespaced(client, "default");
    assert_eq!(
        status_of(api.get("a").await),
        (401, "Unauthorized".to_owned())
    );

    let (standin_open, client) = self::standin(StandInConfig::default()).await;
    standin_open.deny(Verb::List, Resource::Pods);
    let api = Api::<Pod>::all(client);
    assert_eq!(
        status_of(api.list(&ListParams::default()).await),
        (403, "Forbidden".to_owned())
    );
    assert_eq!(standin.requests(Verb::Get, Resource::Pods), 1);
}
