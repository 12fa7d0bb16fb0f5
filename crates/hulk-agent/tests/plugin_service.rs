//! The agent's socket API over the in-memory kernel and mock backend.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use hulk_node::testing as support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hulk_agent::plugin_service::{PluginMetrics, PluginService};
use hulk_agent::server::{ServeLimits, serve};
use hulk_agent_api::codes;
use hulk_agent_api::{ClientError, PluginReply, PluginRequest, PodRequest, call};
use hulk_cni::{Attachment, ErrorCode};
use hulk_ipam::Owner;
use hulk_netns::fake::FakeKernel;
use hulk_pool::PoolConfig;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

const PODS: usize = 20;

fn pod(n: usize) -> PodRequest {
    PodRequest {
        owner: Owner {
            container_id: format!("c{n}"),
            ifname: "eth0".into(),
            pod: None,
            cni_network: Some("vpc".into()),
            pod_uid: None,
        },
        netns: Some(PathBuf::from(format!("/var/run/netns/p{n}"))),
        pool: None,
        timeout_ms: None,
        address: None,
        mac: None,
    }
}

async fn start(socket: &Path) -> CancellationToken {
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    for n in 0..PODS {
        kernel.add_namespace(format!("/var/run/netns/p{n}"));
    }
    let config = PoolConfig {
        warm_up: 32,
        batch: 32,
        max_idle: 40,
        ..PoolConfig::default()
    };
    let node = support::memory_node(kernel, config).await;
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let stop = CancellationToken::new();
    let limits = ServeLimits {
        max_in_flight: 2,
        request_timeout: Duration::from_secs(5),
        ..ServeLimits::default()
    };
    let api = Arc::new(PluginService::new(node, PluginMetrics::default()));
    tokio::spawn(serve(api, listener, limits, stop.clone()));
    stop
}

fn socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hulk-agent-{name}-{}.sock", std::process::id()))
}

const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_get_distinct_addresses_and_dels_return_them() {
    let path = socket("burst");
    let stop = start(&path).await;
    let adds = (0..PODS).map(|n| {
        let path = path.clone();
        tokio::spawn(async move {
            call(&path, &PluginRequest::Add(pod(n)), TIMEOUT)
                .await
                .unwrap()
        })
    });
    let mut addresses = HashSet::new();
    for add in adds {
        match add.await.unwrap() {
            PluginReply::Added(attached) => assert!(addresses.insert(attached.lease.address)),
            other => panic!("ADD answered {other:?}"),
        }
    }
    assert_eq!(addresses.len(), PODS);
    for n in 0..PODS {
        match call(&path, &PluginRequest::Check(pod(n)), TIMEOUT)
            .await
            .unwrap()
        {
            // CHECK answers with what the pod has, for the plugin to
            // compare with the runtime's prevResult.
            PluginReply::Checked(found) => assert!(addresses.contains(&found.lease.address)),
            other => panic!("CHECK answered {other:?}"),
        }
        assert_eq!(
            call(&path, &PluginRequest::Del(pod(n)), TIMEOUT)
                .await
                .unwrap(),
            PluginReply::Done
        );
        assert_eq!(
            call(&path, &PluginRequest::Del(pod(n)), TIMEOUT)
                .await
                .unwrap(),
            PluginReply::Done
        );
    }
    let valid = vec![Attachment {
        container_id: "c0".into(),
        ifname: "eth0".into(),
    }];
    assert_eq!(
        call(
            &path,
            &PluginRequest::Gc {
                cni_network: Some("vpc".into()),
                valid
            },
            TIMEOUT
        )
        .await
        .unwrap(),
        PluginReply::Done
    );
    stop.cancel();
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn failures_come_back_as_cni_errors() {
    let path = socket("errors");
    let stop = start(&path).await;
    let mut missing_netns = pod(1);
    missing_netns.netns = Some(PathBuf::from("/var/run/netns/nowhere"));
    let PluginReply::Failed(error) = call(&path, &PluginRequest::Add(missing_netns), TIMEOUT)
        .await
        .unwrap()
    else {
        panic!("ADD into a missing namespace succeeded");
    };
    assert_eq!(error.code, codes::NAMESPACE);

    let mut raw = tokio::net::UnixStream::connect(&path).await.unwrap();
    raw.write_all(b"{not json\n").await.unwrap();
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut raw, &mut reply)
        .await
        .unwrap();
    let reply: PluginReply = serde_json::from_str(&reply).unwrap();
    assert!(
        matches!(reply, PluginReply::Failed(error) if error.code == ErrorCode::DecodingFailure)
    );
    stop.cancel();
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn an_absent_agent_is_a_client_error() {
    let error = call(&socket("absent"), &PluginRequest::Del(pod(0)), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Io { .. }), "{error}");
}
