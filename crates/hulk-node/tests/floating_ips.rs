//! Floating IPs on the node, over the in-memory provider: associated at
//! ADD (by annotation or the node's setting) and recorded, given up per
//! policy by DEL and the liveness pass, a failed association failing the
//! ADD with everything rolled back, and the sweep.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hulk_agent_api::codes;
use hulk_cni::ErrorCode;
use hulk_ipam::{
    FloatingIp, FloatingIpHold, FloatingIpPolicy, FloatingIpProvider, FloatingIpRequest, IpamError,
    ListScope, MemoryBackend, MemoryFloatingIps,
};
use hulk_netns::Datapath;
use hulk_netns::fake::FakeKernel;
use hulk_node::pods::{
    FLOATING_IP_ANNOTATION, FLOATING_IP_POLICY_ANNOTATION, LivePods, PodDirectory,
    PodDirectoryError, PodInfo,
};
use hulk_node::testing::{key, network, pod};
use hulk_node::{FloatingIps, Node, NodeError, PodRequest};
use hulk_pool::{MemoryStore, PoolConfig, PoolManager, SystemClock};

/// Pods in memory, by `namespace/name`.
#[derive(Debug, Default)]
struct Pods(Mutex<HashMap<String, PodInfo>>);

impl Pods {
    fn annotate(&self, name: &str, annotations: &[(&str, &str)]) {
        let name = format!("default/{name}");
        self.0.lock().unwrap().insert(
            name.clone(),
            PodInfo {
                name,
                uid: None,
                annotations: annotations
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
                phase: Some("Running".into()),
            },
        );
    }
}

#[async_trait::async_trait]
impl PodDirectory for Pods {
    async fn pod(&self, name: &str) -> Result<Option<PodInfo>, PodDirectoryError> {
        Ok(self.0.lock().unwrap().get(name).cloned())
    }

    async fn live_pods(&self) -> Result<LivePods, PodDirectoryError> {
        Ok(LivePods::from_pods(
            self.0.lock().unwrap().values().cloned(),
        ))
    }
}

/// The memory provider, whose next association can fail: before doing
/// anything, or after associating (a reply lost on the way back).
#[derive(Debug)]
struct Provider {
    inner: MemoryFloatingIps,
    fail_next: Mutex<Option<(bool, IpamError)>>,
}

impl Provider {
    fn new() -> Arc<Self> {
        Arc::new(Provider {
            inner: MemoryFloatingIps::new("203.0.113.0/28".parse().unwrap()),
            fail_next: Mutex::new(None),
        })
    }

    fn fail_next(&self, after_associating: bool, error: IpamError) {
        *self.fail_next.lock().unwrap() = Some((after_associating, error));
    }
}

#[async_trait::async_trait]
impl FloatingIpProvider for Provider {
    async fn associate(&self, request: &FloatingIpRequest) -> Result<FloatingIp, IpamError> {
        let failure = self.fail_next.lock().unwrap().take();
        match failure {
            None => self.inner.associate(request).await,
            Some((false, error)) => Err(error),
            Some((true, error)) => {
                self.inner.associate(request).await?;
                Err(error)
            }
        }
    }

    async fn release(&self, hold: &FloatingIpHold) -> Result<(), IpamError> {
        self.inner.release(hold).await
    }

    async fn list(&self, scope: &ListScope) -> Result<Vec<FloatingIp>, IpamError> {
        self.inner.list(scope).await
    }

    async fn delete(&self, id: &str) -> Result<(), IpamError> {
        self.inner.delete(id).await
    }
}

struct Setup {
    node: Node<FakeKernel>,
    provider: Arc<Provider>,
    pods: Arc<Pods>,
}

/// A node with namespaces for `sandboxes`, pods from a directory, and
/// floating IPs from the provider; `network` is the node's setting.
async fn setup(sandboxes: &[&str], network_setting: Option<&str>) -> Setup {
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    for name in sandboxes {
        kernel.add_namespace(format!("/var/run/netns/{name}"));
    }
    let pools = PoolManager::open(
        Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap())),
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        "node-1",
        PoolConfig {
            assign_timeout: Duration::from_millis(50),
            ..PoolConfig::default()
        },
    )
    .await
    .unwrap();
    pools.warm_up(&key()).await.unwrap();
    let provider = Provider::new();
    let pods = Arc::new(Pods::default());
    let node = Node::new(pools, Datapath::new(kernel), network(), key())
        .with_pods(pods.clone())
        .with_floating_ips(FloatingIps {
            provider: provider.clone(),
            network: network_setting.map(str::to_owned),
            policy: FloatingIpPolicy::Release,
        });
    node.restore().await.unwrap();
    Setup {
        node,
        provider,
        pods,
    }
}

/// Pod `name`'s sandbox `sandbox`.
fn sandbox(name: &str, sandbox: &str) -> PodRequest {
    let mut request = pod(sandbox);
    request.owner.pod = Some(format!("default/{name}"));
    request
}

#[tokio::test]
async fn an_annotated_pod_gets_a_floating_ip_recorded_and_released_by_del() {
    let Setup {
        node,
        provider,
        pods,
    } = setup(&["a", "b"], None).await;
    pods.annotate("a", &[(FLOATING_IP_ANNOTATION, "public")]);
    pods.annotate("b", &[]);
    let attached = node.add(&pod("a")).await.unwrap();
    node.add(&pod("b")).await.unwrap();

    let held = provider.inner.all();
    assert_eq!(held.len(), 1, "only the annotated pod has one");
    let floating = &held[0];
    let lease = node.pools().lease_of(&pod("a").owner).unwrap();
    assert_eq!(floating.port.as_ref(), Some(&lease.id));
    assert_eq!(floating.pod.as_deref(), Some("default/a"));
    assert_eq!(floating.network, "public");
    assert_eq!(lease.address, attached.lease.address);
    let record = node
        .attachments()
        .get(&pod("a").attachment_id())
        .unwrap()
        .floating_ip
        .unwrap();
    assert_eq!(
        (record.id.as_ref(), record.address, record.policy),
        (
            Some(&floating.id),
            Some(floating.address),
            FloatingIpPolicy::Release
        )
    );

    node.del(&pod("a")).await.unwrap();
    assert!(provider.inner.all().is_empty(), "released: deleted");
    node.del(&pod("a")).await.unwrap();
}

#[tokio::test]
async fn a_kept_floating_ip_follows_the_pod_name_to_its_next_sandbox() {
    let Setup {
        node,
        provider,
        pods,
    } = setup(&["web-0-first", "web-0-second"], None).await;
    pods.annotate(
        "web-0",
        &[
            (FLOATING_IP_ANNOTATION, "public"),
            (FLOATING_IP_POLICY_ANNOTATION, "keep"),
        ],
    );
    let first = sandbox("web-0", "web-0-first");
    node.add(&first).await.unwrap();
    let before = provider.inner.all().remove(0);
    node.del(&first).await.unwrap();
    let kept = provider.inner.all();
    assert_eq!(kept.len(), 1, "kept");
    assert_eq!(
        kept[0].port, None,
        "and disassociated before the address went back"
    );

    let second = sandbox("web-0", "web-0-second");
    node.add(&second).await.unwrap();
    let after = provider.inner.all().remove(0);
    let lease = node.pools().lease_of(&second.owner).unwrap();
    assert_eq!((after.id, after.address), (before.id, before.address));
    assert_eq!(after.port, Some(lease.id));
}

#[tokio::test]
async fn the_nodes_setting_gives_every_pod_one_unless_its_annotation_declines() {
    let Setup {
        node,
        provider,
        pods,
    } = setup(&["a", "b"], Some("public")).await;
    pods.annotate("b", &[(FLOATING_IP_ANNOTATION, "false")]);
    node.add(&pod("a")).await.unwrap();
    node.add(&pod("b")).await.unwrap();
    let held = provider.inner.all();
    assert_eq!(
        held.iter().map(|f| f.pod.as_deref()).collect::<Vec<_>>(),
        [Some("default/a")]
    );
}

#[tokio::test]
async fn a_failed_association_fails_the_add_and_rolls_everything_back() {
    let Setup {
        node,
        provider,
        pods,
    } = setup(&["a"], None).await;
    pods.annotate("a", &[(FLOATING_IP_ANNOTATION, "public")]);
    for (after_associating, error, code) in [
        (
            false,
            IpamError::Exhausted {
                subnet: "public".into(),
            },
            codes::ADDRESS_EXHAUSTED,
        ),
        // Associated, but the answer was lost: the port still finds it.
        (
            true,
            IpamError::Transient("reset".into()),
            ErrorCode::TryAgainLater,
        ),
    ] {
        provider.fail_next(after_associating, error);
        let failed = node.add(&pod("a")).await.unwrap_err();
        assert!(matches!(failed, NodeError::FloatingIp { .. }), "{failed}");
        let cni = failed.to_cni();
        assert_eq!(cni.code, code);
        assert!(cni.msg.contains("floating IP"), "{}", cni.msg);
        assert_eq!(node.pools().stats(&key()).assigned, 0, "address back");
        assert!(node.attachments().all().is_empty(), "no record left");
        assert!(provider.inner.all().is_empty(), "no floating IP left");
        assert!(
            node.datapath()
                .kernel()
                .host_namespace()
                .route_lines()
                .is_empty(),
            "nothing built"
        );
    }
    node.add(&pod("a")).await.unwrap();
    assert_eq!(provider.inner.all().len(), 1);
}

#[tokio::test]
async fn a_pod_asking_on_a_node_without_floating_ips_is_refused() {
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    kernel.add_namespace("/var/run/netns/a");
    let pools = PoolManager::open(
        Arc::new(MemoryBackend::new("10.20.0.0/24".parse().unwrap())),
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        "node-1",
        PoolConfig::default(),
    )
    .await
    .unwrap();
    pools.warm_up(&key()).await.unwrap();
    let pods = Arc::new(Pods::default());
    pods.annotate("a", &[(FLOATING_IP_ANNOTATION, "public")]);
    let node = Node::new(pools, Datapath::new(kernel), network(), key()).with_pods(pods);
    node.restore().await.unwrap();
    let refused = node.add(&pod("a")).await.unwrap_err();
    assert_eq!(refused.to_cni().code, ErrorCode::InvalidNetworkConfig);
    assert!(refused.to_string().contains("floating IP"), "{refused}");
    assert_eq!(node.pools().stats(&key()).assigned, 0);
}

#[tokio::test]
async fn the_liveness_pass_and_the_sweep_give_floating_ips_up() {
    let Setup {
        node,
        provider,
        pods,
    } = setup(&["a", "b"], Some("public")).await;
    pods.annotate("a", &[]);
    pods.annotate("b", &[]);
    node.add(&pod("a")).await.unwrap();
    node.add(&pod("b")).await.unwrap();
    assert_eq!(provider.inner.all().len(), 2);

    // The runtime lost pod a's DEL: its sandbox is gone.
    node.datapath()
        .kernel()
        .remove_namespace(pod("a").netns.as_deref().unwrap());
    node.collect_gone_sandboxes().await.unwrap();
    let collected = node.collect_gone_sandboxes().await.unwrap();
    assert_eq!(collected, [pod("a").attachment_id()]);
    assert_eq!(
        provider
            .inner
            .all()
            .iter()
            .map(|f| f.pod.as_deref())
            .collect::<Vec<_>>(),
        [Some("default/b")]
    );

    // Pod b's port is deleted under its floating IP (an operator, a
    // sweep): the node's sweep deletes the orphan.
    let lease = node.pools().lease_of(&pod("b").owner).unwrap();
    provider.inner.port_deleted(&lease.id);
    assert_eq!(node.sweep_floating_ips().await.unwrap(), 1);
    assert!(provider.inner.all().is_empty());
    assert_eq!(node.sweep_floating_ips().await.unwrap(), 0);
}
