//! `hulk-controller` as the Deployment and the base platform run it:
//! `check-config`, `run` against the Kubernetes API stand-in and
//! `hulk-ultron-fake` (a deleted node's addresses go back, metrics, the
//! lease given up at SIGTERM), and `teardown` (refused while nodes are
//! listed, forced, reported).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hulk_ipam::{AllocationRequest, IpamBackend, ListScope, PoolKey};
use hulk_kube_standin::{StandIn, StandInConfig};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use support::UltronFake;

const CONTROLLER: &str = env!("CARGO_BIN_EXE_hulk-controller");
const LEASE_NAMESPACE: &str = "hulk-vpc";

async fn standin_with(nodes: &[&str]) -> StandIn {
    let standin = StandIn::start(StandInConfig::default())
        .await
        .expect("the stand-in starts");
    for name in nodes {
        let node = Node {
            metadata: ObjectMeta {
                name: Some((*name).to_owned()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        standin
            .apply_node(&node)
            .expect("the stand-in takes the node");
    }
    standin
}

/// The controller's configuration file in `dir`: the fake's backend, the
/// stand-in's API (if any), passes every second, no grace period.
fn config(dir: &Path, fake: &UltronFake, api_server: Option<&str>, extra: &str) -> PathBuf {
    let kubernetes = api_server
        .map(|url| format!("[kubernetes]\napi_server = \"{url}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "{extra}\n[leader]\nnamespace = \"{LEASE_NAMESPACE}\"\nduration_seconds = 2\n\n\
         [controller]\ngrace_period_seconds = 0\npass_interval_seconds = 1\n\n\
         [controller.release]\nreleases_per_second = 100\nconcurrency = 4\n\n\
         {kubernetes}\n[backend]\n{}\n",
        fake.backend(&dir.join("token"))
    );
    let path = dir.join("controller.toml");
    std::fs::write(&path, text).expect("configuration written");
    path
}

fn controller(config: &Path, args: &[&str]) -> Output {
    Command::new(CONTROLLER)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("hulk-controller runs")
}

async fn allocate(backend: &dyn IpamBackend, node: &str, count: usize) {
    let key = PoolKey::new("net", "subnet", ["sg"], None);
    backend
        .allocate(&AllocationRequest::new(key, node, count))
        .await
        .expect("allocation");
}

async fn nodes_of(backend: &dyn IpamBackend) -> Vec<String> {
    let mut nodes: Vec<String> = backend
        .list(&ListScope::Cluster)
        .await
        .expect("list")
        .into_iter()
        .map(|lease| lease.node)
        .collect();
    nodes.sort();
    nodes
}

/// A client of another cluster on the same fake.
fn other_cluster(fake: &UltronFake) -> hulk_openstack::ultron::UltronBackend {
    let http = hulk_openstack::HttpClient::new(&hulk_openstack::HttpSettings::default())
        .expect("an HTTP client");
    hulk_openstack::ultron::UltronBackend::new(
        http,
        format!("http://127.0.0.1:{}", fake.port),
        support::ULTRON_TOKEN,
        "other",
    )
}

#[test]
fn check_config_names_the_wrong_field() {
    let dir = support::scratch_dir("controller-config");
    let fake = UltronFake::start("10.81.0.0/24", 0);
    let good = config(&dir, &fake, None, "");
    let output = controller(&good, &["check-config"]);
    assert!(output.status.success(), "{output:?}");
    let bad = config(&dir, &fake, None, "");
    let text = std::fs::read_to_string(&bad).expect("read back");
    std::fs::write(&bad, text.replace("concurrency = 4", "concurrency = 0")).expect("written");
    let output = controller(&bad, &["check-config"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("release.concurrency"), "{stderr}");
    std::fs::remove_dir_all(&dir).expect("scratch removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_refuses_while_nodes_are_listed_and_forced_returns_everything() {
    let dir = support::scratch_dir("controller-teardown");
    let fake = UltronFake::start("10.82.0.0/24", 0);
    let standin = standin_with(&["n1"]).await;
    let path = config(&dir, &fake, Some(&standin.url()), "");
    let ours = fake.client();
    let other = other_cluster(&fake);
    allocate(&ours, "n1", 5).await;
    allocate(&ours, "n2", 3).await;
    allocate(&other, "n1", 2).await;

    let run = |args: &'static [&'static str]| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || controller(&path, args))
    };
    let refused = run(&["teardown"]).await.expect("joined");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("still lists 1 node"), "{stderr}");
    assert_eq!(
        nodes_of(&ours).await.len(),
        8,
        "a refused teardown released"
    );

    let forced = run(&["teardown", "--force"]).await.expect("joined");
    assert!(forced.status.success(), "{forced:?}");
    let stdout = String::from_utf8_lossy(&forced.stdout);
    assert!(
        stdout.contains(
            "round 1: listed 8, released 8, already gone 0, failed 0, not attempted 0, remaining 0"
        ),
        "{stdout}"
    );
    assert!(nodes_of(&ours).await.is_empty());
    assert_eq!(
        nodes_of(&other).await,
        ["n1", "n1"],
        "another cluster's addresses went"
    );

    // Again: nothing left, still a success.
    let again = run(&["teardown", "--force"]).await.expect("joined");
    assert!(again.status.success(), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).contains("listed 0, released 0"));
    std::fs::remove_dir_all(&dir).expect("scratch removed");
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("request sent");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer read");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_a_deleted_nodes_addresses_and_gives_the_lease_up_at_sigterm() {
    let dir = support::scratch_dir("controller-run");
    let fake = UltronFake::start("10.83.0.0/24", 0);
    let standin = standin_with(&["n1", "n2"]).await;
    let port = support::free_port();
    let path = config(
        &dir,
        &fake,
        Some(&standin.url()),
        &format!("metrics_address = \"127.0.0.1:{port}\""),
    );
    let ours = fake.client();
    allocate(&ours, "n1", 2).await;
    allocate(&ours, "n2", 3).await;
    assert!(standin.delete_node("n2"));

    let mut child = Command::new(CONTROLLER)
        .arg("--config")
        .arg(&path)
        .args(["run", "--holder", "replica-x"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hulk-controller starts");
    let started = Instant::now();
    while nodes_of(&ours).await != ["n1", "n1"] {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "n2's addresses stay: {:?}",
            nodes_of(&ours).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .expect("joined");
    assert!(
        metrics.contains(
            "hulk_controller_releases_total{outcome=\"released\",reason=\"node_gone\"} 3"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("hulk_controller_leader 1"), "{metrics}");
    let holder = |standin: &StandIn| {
        standin
            .lease(LEASE_NAMESPACE, "hulk-vpc-controller")
            .expect("lease readable")
            .and_then(|lease| lease.spec?.holder_identity)
    };
    assert!(
        holder(&standin).is_some_and(|holder| holder.starts_with("replica-x_")),
        "{:?}",
        holder(&standin)
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("joined")
        .expect("waited");
    assert!(status.success(), "{status:?}");
    assert_eq!(holder(&standin), None, "the lease is not given up");
    std::fs::remove_dir_all(&dir).expect("scratch removed");
}
