//! What tests of the node and of the crates above it share (feature
//! `testing`): the default pool, the node network, a pod's request, and a
//! node over the in-memory backend and the fake kernel. A helper panics
//! when its setup fails: it is how a test setup reports a broken test.

use std::path::PathBuf;
use std::sync::Arc;

use crate::pods::PodDirectory;
use crate::{Node, PodRequest};
use hulk_ipam::{MemoryBackend, Owner, PoolKey};
use hulk_netns::fake::FakeKernel;
use hulk_netns::{Datapath, NodeNetwork, SlaveKind};
use hulk_pool::{MemoryStore, PoolConfig, PoolManager, SystemClock};

/// The pool every test pod takes its address from.
pub fn key() -> PoolKey {
    PoolKey::new("vpc", "subnet-a", ["sg"], None)
}

/// A node on `eth1` with `hulk0` at 10.20.0.250/24 and one Service range.
pub fn network() -> NodeNetwork {
    NodeNetwork {
        parent: "eth1".into(),
        kind: SlaveKind::default(),
        host_link: "hulk0".into(),
        node_address: "10.20.0.250/24".parse().expect("a prefix"),
        service_cidrs: vec!["10.96.0.0/12".parse().expect("a prefix")],
    }
}

/// ADD/DEL of pod `name`'s `eth0` in `/var/run/netns/{name}`.
pub fn pod(name: &str) -> PodRequest {
    PodRequest {
        owner: Owner {
            container_id: name.into(),
            ifname: "eth0".into(),
            pod: Some(format!("default/{name}")),
            cni_network: Some("vpc".into()),
            pod_uid: None,
        },
        netns: Some(PathBuf::from(format!("/var/run/netns/{name}"))),
        pool: None,
        timeout_ms: None,
        address: None,
        mac: None,
    }
}

/// A node over `kernel` (which must hold `eth1`) and the mock backend in
/// 10.20.0.0/24, its pool warmed up with `config`, restored.
pub async fn memory_node(kernel: FakeKernel, config: PoolConfig) -> Arc<Node<FakeKernel>> {
    node_over(kernel, config, None).await
}

/// [`memory_node`], learning about pods from `pods`.
pub async fn memory_node_with_pods(
    kernel: FakeKernel,
    config: PoolConfig,
    pods: Arc<dyn PodDirectory>,
) -> Arc<Node<FakeKernel>> {
    node_over(kernel, config, Some(pods)).await
}

async fn node_over(
    kernel: FakeKernel,
    config: PoolConfig,
    pods: Option<Arc<dyn PodDirectory>>,
) -> Arc<Node<FakeKernel>> {
    let pools = PoolManager::open(
        Arc::new(MemoryBackend::new(
            "10.20.0.0/24".parse().expect("a prefix"),
        )),
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        "node-1",
        config,
    )
    .await
    .expect("the pools open");
    pools.warm_up(&key()).await.expect("the pool warms up");
    let mut node = Node::new(pools, Datapath::new(kernel), network(), key());
    if let Some(pods) = pods {
        node = node.with_pods(pods);
    }
    let node = Arc::new(node);
    node.restore().await.expect("the node restores");
    node
}
