//! The agent binary end to end on the host kernel (macvlan), in a node
//! namespace of its own: it starts from a config file, serves ADD and DEL
//! on its socket, builds a real interface in a real pod namespace, and
//! stops cleanly on SIGTERM. Root; nextest group `netns`.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hulk_agent_api::PodRequest;
use hulk_agent_api::{PluginReply, PluginRequest, call};
use hulk_ipam::Owner;
use hulk_ipam::{AllocationRequest, IpamBackend, Lease, ListScope, PoolKey};
use hulk_netns::rtnetlink::{LinkUnspec, LinkVeth};
use hulk_netns::{Kernel, NETNS_RUN_DIR, NetlinkKernel, create_named_netns, delete_named_netns};
use hulk_pool::{AddressRecord, AddressState, Intent, IntentKind, PoolStore, RedbStore, StoreOp};
use ipnet::IpNet;

const NODE: &str = "hk-agent-test-node";
const POD: &str = "hk-agent-test-pod";
const ULTRON_NODE: &str = "hk-agent-ultron-node";
const ULTRON_POD: &str = "hk-agent-ultron-pod";
const RESCUE_NODE: &str = "hk-agent-rescue-node";
const RESCUE_POD: &str = "hk-agent-rescue-pod";
const STATUS_NODE: &str = "hk-agent-status-node";
const STATUS_POD: &str = "hk-agent-status-pod";

struct Agent(Child, &'static str, &'static str);

/// Runs the plugin as a runtime does, in the pod namespace.
fn plugin(command: &str, conf: &serde_json::Value, container: &str) -> support::Outcome {
    let netns = Path::new(NETNS_RUN_DIR).join(POD);
    support::exec_cni(
        Path::new(support::PLUGIN),
        command,
        container,
        &netns,
        "web-1",
        conf,
    )
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = delete_named_netns(self.1);
        let _ = delete_named_netns(self.2);
    }
}

async fn node_namespace(name: &str) {
    let _ = delete_named_netns(name);
    let node = create_named_netns(name).unwrap();
    hulk_netns::NetlinkWorker::spawn_in(node)
        .unwrap()
        .run(|handle| async move {
            handle
                .link()
                .add(LinkVeth::new("eth1", "eth1-peer").build())
                .execute()
                .await?;
            for name in ["eth1", "eth1-peer"] {
                let link = hulk_netns::link_by_name(&handle, name)
                    .await
                    .unwrap()
                    .unwrap();
                handle
                    .link()
                    .set(LinkUnspec::new_with_index(link.header.index).up().build())
                    .execute()
                    .await?;
            }
            Ok::<_, hulk_netns::rtnetlink::Error>(())
        })
        .await
        .unwrap()
        .unwrap();
}

fn config(dir: &Path, node: &str, extra: &str, backend: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
node_name = "test-node"
socket = "{dir}/agent.sock"
rescue_socket = "{dir}/rescue.sock"
{state_file}
node_netns = "{NETNS_RUN_DIR}/{node}"
{extra}
[network]
parent = "eth1"
kind = "macvlan"
node_address = "10.79.0.250/24"
service_cidrs = ["10.96.0.0/12"]
[default_pool]
network = "vpc"
subnet = "subnet-a"
[pool]
warm_up = 4
reuse_cooldown_seconds = 0
[backend]
{backend}
"#,
            dir = dir.display(),
            state_file = support::state_file_line(dir, backend),
        ),
    )
    .unwrap();
    path
}

/// Starts the agent in a node namespace of its own, with `backend` and
/// `extra` top-level settings; its log goes to `dir/agent.log`.
async fn start_agent(
    dir: &Path,
    node: &'static str,
    pod: &'static str,
    extra: &str,
    backend: &str,
) -> Agent {
    node_namespace(node).await;
    let _ = delete_named_netns(pod);
    create_named_netns(pod).unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_hulk-agent"))
            .arg("--config")
            .arg(config(dir, node, extra, backend))
            .stderr(log)
            .spawn()
            .unwrap(),
        node,
        pod,
    );
    // Blocking here is fine: the agent is another process and nothing
    // else runs on this test's runtime yet.
    support::wait_until_ready(
        &mut agent.0,
        &dir.join("rescue.sock"),
        Duration::from_secs(30),
        || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default(),
    );
    agent
}

#[tokio::test]
async fn the_agent_takes_addresses_from_an_ultron_service() {
    let dir = support::scratch_dir("agent-ultron");
    let port = support::free_port();
    let mut fake = Command::new(env!("CARGO_BIN_EXE_hulk-ultron-fake"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--subnet",
            "10.79.1.0/24",
        ])
        .env("HULK_ULTRON_TOKEN", "s3cret")
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the fake did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(dir.join("token"), "s3cret\n").unwrap();
    let backend = format!(
        "type = \"ultron\"\nurl = \"http://127.0.0.1:{port}\"\ntoken_file = \"{}\"\ncluster = \"test\"",
        dir.join("token").display()
    );
    let _agent = start_agent(&dir, ULTRON_NODE, ULTRON_POD, "", &backend).await;
    let pod = PodRequest {
        owner: Owner {
            container_id: "sandbox-u".into(),
            ifname: "eth0".into(),
            pod: None,
            cni_network: Some("vpc".into()),
            pod_uid: None,
        },
        netns: Some(Path::new(NETNS_RUN_DIR).join(ULTRON_POD)),
        pool: None,
        timeout_ms: None,
        address: None,
        mac: None,
    };
    let reply = call(
        &dir.join("agent.sock"),
        &PluginRequest::Add(pod),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let PluginReply::Added(attached) = reply else {
        panic!("ADD failed: {reply:?}");
    };
    assert_eq!(attached.lease.address.to_string(), "10.79.1.2/24");
    assert!(
        attached.lease.id.starts_with("mock-"),
        "served by the fake service"
    );
    fake.kill().unwrap();
    let _ = fake.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_agent_serves_add_and_del_and_stops_cleanly() {
    let dir = support::scratch_dir("agent-test");
    let mut agent = start_agent(
        &dir,
        NODE,
        POD,
        "",
        "type = \"mock\"\nsubnet = \"10.79.0.0/24\"",
    )
    .await;
    let socket = dir.join("agent.sock");

    let pod = PodRequest {
        owner: Owner {
            container_id: "sandbox-1".into(),
            ifname: "eth0".into(),
            pod: Some("default/web-0".into()),
            cni_network: Some("vpc".into()),
            pod_uid: None,
        },
        netns: Some(Path::new(NETNS_RUN_DIR).join(POD)),
        pool: None,
        timeout_ms: None,
        address: None,
        mac: None,
    };
    let timeout = Duration::from_secs(10);
    let PluginReply::Added(attached) = call(&socket, &PluginRequest::Add(pod.clone()), timeout)
        .await
        .unwrap()
    else {
        panic!("ADD failed");
    };
    assert_eq!(attached.lease.address.to_string(), "10.79.0.2/24");
    let kernel = NetlinkKernel::with_host(
        hulk_netns::Netns::open(Path::new(NETNS_RUN_DIR).join(POD)).unwrap(),
    )
    .unwrap();
    let eth0 = kernel.link(kernel.host(), "eth0").await.unwrap().unwrap();
    assert_eq!(eth0.index, attached.index);
    let addresses = kernel.addresses(kernel.host(), "eth0").await.unwrap();
    assert!(addresses.contains(&attached.lease.address), "{addresses:?}");
    match call(&socket, &PluginRequest::Check(pod.clone()), timeout)
        .await
        .unwrap()
    {
        PluginReply::Checked(found) => assert_eq!(found.lease.address, attached.lease.address),
        other => panic!("CHECK answered {other:?}"),
    }
    assert_eq!(
        call(&socket, &PluginRequest::Del(pod.clone()), timeout)
            .await
            .unwrap(),
        PluginReply::Done
    );
    assert!(kernel.link(kernel.host(), "eth0").await.unwrap().is_none());

    // The plugin, exec'd as a runtime does, through the same agent.
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "vpc", "type": "hulk-vpc-cni",
        "agentSocket": socket.display().to_string(),
    });
    let result = plugin("ADD", &conf, "sandbox-2").unwrap();
    assert_eq!(result["ips"][0]["address"], "10.79.0.3/24");
    assert_eq!(
        result["interfaces"][0]["sandbox"],
        format!("{NETNS_RUN_DIR}/{POD}")
    );
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result;
    plugin("CHECK", &with_prev, "sandbox-2").unwrap();
    plugin("STATUS", &conf, "sandbox-2").unwrap();

    // SIGTERM: the agent finishes and removes its socket.
    Command::new("kill")
        .arg(agent.0.id().to_string())
        .status()
        .unwrap();
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists());

    // With the agent down, ADD fails with 103 and STATUS says 50, but DEL
    // still removes the interface.
    let down = plugin("ADD", &conf, "sandbox-3").unwrap_err();
    assert_eq!(down["code"], 103);
    let status = plugin("STATUS", &conf, "sandbox-3").unwrap_err();
    assert_eq!(status["code"], 50);
    assert!(kernel.link(kernel.host(), "eth0").await.unwrap().is_some());
    plugin("DEL", &with_prev, "sandbox-2").unwrap();
    assert!(kernel.link(kernel.host(), "eth0").await.unwrap().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs hulkctl against the agent in `dir`: (exit code, JSON answer).
fn hulkctl(dir: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_hulkctl"))
        .arg("--socket")
        .arg(dir.join("rescue.sock"))
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let answer = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "hulkctl {args:?}: {error}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap(), answer)
}

/// One HTTP/1.0 GET on loopback: the body.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap()
}

#[tokio::test]
async fn the_rescue_api_inspects_and_repairs_the_node() {
    let dir = support::scratch_dir("agent-rescue");
    let port = support::free_port();
    let extra = format!("metrics_address = \"127.0.0.1:{port}\"");
    let _agent = start_agent(
        &dir,
        RESCUE_NODE,
        RESCUE_POD,
        &extra,
        "type = \"mock\"\nsubnet = \"10.79.2.0/24\"",
    )
    .await;
    let pod = PodRequest {
        owner: Owner {
            container_id: "sandbox-r".into(),
            ifname: "eth0".into(),
            pod: Some("default/web-r".into()),
            cni_network: Some("vpc".into()),
            pod_uid: None,
        },
        netns: Some(Path::new(NETNS_RUN_DIR).join(RESCUE_POD)),
        pool: None,
        timeout_ms: None,
        address: None,
        mac: None,
    };
    let timeout = Duration::from_secs(10);
    let socket = dir.join("agent.sock");
    let PluginReply::Added(attached) = call(&socket, &PluginRequest::Add(pod.clone()), timeout)
        .await
        .unwrap()
    else {
        panic!("ADD failed");
    };
    let address = attached.lease.address.addr().to_string();

    let (code, status) = hulkctl(&dir, &["status"]);
    assert_eq!(code, 0, "{status}");
    assert_eq!(status["node"], "test-node");
    assert_eq!(status["assigned"], 1);
    assert_eq!(status["datapath_healthy"], true);
    let (_, pools) = hulkctl(&dir, &["pools"]);
    assert_eq!(pools["pools"][0]["key"]["subnet"], "subnet-a");
    assert_eq!(pools["pools"][0]["stats"]["assigned"], 1);
    let (_, leases) = hulkctl(&dir, &["leases", "--subnet", "subnet-a"]);
    let held: Vec<&serde_json::Value> = leases["leases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|record| record["state"]["Assigned"]["container_id"] == "sandbox-r")
        .collect();
    assert_eq!(held.len(), 1, "{leases}");
    assert_eq!(
        held[0]["lease"]["address"],
        attached.lease.address.to_string()
    );

    // A reboot-like loss of the host slave is seen, then repaired.
    let node = NetlinkKernel::with_host(
        hulk_netns::Netns::open(Path::new(NETNS_RUN_DIR).join(RESCUE_NODE)).unwrap(),
    )
    .unwrap();
    assert!(node.delete_link(node.host(), "hulk0").await.unwrap());
    let (_, broken) = hulkctl(&dir, &["node"]);
    assert_eq!(broken["state"]["host_link_present"], false, "{broken}");
    assert_eq!(
        broken["state"]["missing_routes"][0],
        format!("{address}/32")
    );
    let (code, reapplied) = hulkctl(&dir, &["reapply"]);
    assert_eq!((code, &reapplied["routes_installed"]), (0, &1.into()));
    let (_, repaired) = hulkctl(&dir, &["node"]);
    assert_eq!(repaired["state"]["host_link_present"], true, "{repaired}");
    assert_eq!(repaired["state"]["missing_routes"], serde_json::json!([]));

    // A pod gone without DEL: its address is released by hand.
    let (code, released) = hulkctl(&dir, &["release", &address]);
    assert_eq!(code, 0, "{released}");
    assert_eq!(released["owner"]["container_id"], "sandbox-r");
    let (code, again) = hulkctl(&dir, &["release", &address]);
    assert_eq!(code, 1, "{again}");
    let routes = node.routes(node.host(), "hulk0").await.unwrap();
    assert!(
        routes
            .iter()
            .all(|route| route.dst.addr().to_string() != address),
        "{routes:?}"
    );

    // Drained: idle addresses go back, ADD says try again later; refill resumes.
    let (code, drained) = hulkctl(&dir, &["drain", "subnet-a"]);
    assert_eq!(code, 0, "{drained}");
    assert!(drained["returned"].as_u64().unwrap() > 0, "{drained}");
    let (_, pools) = hulkctl(&dir, &["pools"]);
    assert_eq!(pools["pools"][0]["stats"]["draining"], true);
    assert_eq!(pools["pools"][0]["stats"]["idle"], 0);
    let reply = call(&socket, &PluginRequest::Add(pod.clone()), timeout)
        .await
        .unwrap();
    let PluginReply::Failed(error) = reply else {
        panic!("ADD on a drained pool: {reply:?}");
    };
    assert_eq!(error.code.as_u32(), 11);
    let (code, unknown) = hulkctl(&dir, &["drain", "subnet-z"]);
    assert_eq!(code, 1);
    assert!(
        unknown["message"]
            .as_str()
            .unwrap()
            .contains("known: subnet-a"),
        "{unknown}"
    );
    let (code, refilled) = hulkctl(&dir, &["refill", "subnet-a"]);
    assert_eq!(code, 0, "{refilled}");
    assert!(refilled["allocated"].as_u64().unwrap() > 0, "{refilled}");
    let second = PodRequest {
        owner: Owner {
            container_id: "sandbox-r2".into(),
            ifname: "eth1".into(),
            ..pod.clone().owner.clone()
        },
        ..pod.clone()
    };
    let reply = call(&socket, &PluginRequest::Add(second), timeout)
        .await
        .unwrap();
    assert!(matches!(reply, PluginReply::Added(_)), "{reply:?}");

    let (code, collected) = hulkctl(&dir, &["gc"]);
    assert_eq!(code, 0, "{collected}");
    assert_eq!(collected["pods_checked"], false);
    assert_eq!(collected["orphans"]["released"], 0);

    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains("hulk_agent_requests_total{op=\"add\",outcome=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hulk_agent_requests_total{op=\"add\",outcome=\"11\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hulk_pool_assigned_addresses{subnet=\"subnet-a\""),
        "{metrics}"
    );
    assert_eq!(http_get(port, "/healthz"), "ok\n");

    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
    let audit: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("hulk_audit"))
        .collect();
    for op in ["reapply", "release", "drain", "refill", "gc"] {
        assert!(
            audit
                .iter()
                .any(|line| line.contains(&format!(r#""op":"{op}""#))),
            "no audit line for {op}: {audit:#?}"
        );
    }
    assert!(
        audit.iter().all(|line| line.contains("peer=uid 0 pid ")),
        "{audit:#?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// STATUS lists the node's links, addresses and routes: concurrent calls
/// used to collide on one netlink socket (EBUSY) and answer a false 51
/// ("datapath broken") in 40-70 % of cases. 1,000 at once must all say
/// ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_the_truth_under_a_thousand_concurrent_calls() {
    let dir = support::scratch_dir("agent-status");
    let _agent = start_agent(
        &dir,
        STATUS_NODE,
        STATUS_POD,
        "",
        "type = \"mock\"\nsubnet = \"10.79.3.0/24\"",
    )
    .await;
    let socket = dir.join("agent.sock");
    let started = Instant::now();
    let calls = (0..1000).map(|_| {
        let socket = socket.clone();
        tokio::spawn(
            async move { call(&socket, &PluginRequest::Status, Duration::from_secs(60)).await },
        )
    });
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for call in calls {
        let answer = match call.await.unwrap() {
            Ok(PluginReply::Done) => "ready".to_owned(),
            Ok(PluginReply::Failed(error)) => format!("{}: {}", error.code.as_u32(), error.msg),
            Ok(other) => format!("{other:?}"),
            Err(error) => format!("no answer: {error}"),
        };
        *answers.entry(answer).or_default() += 1;
    }
    println!(
        "1000 concurrent STATUS calls in {:?}: {answers:?}",
        started.elapsed()
    );
    assert_eq!(answers.get("ready"), Some(&1000), "{answers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

const LOST_NODE: &str = "hk-agent-lost-node";
const LOST_POD: &str = "hk-agent-lost-pod";
const DOWN_NODE: &str = "hk-agent-down-node";
const DOWN_POD: &str = "hk-agent-down-pod";

/// The agent's default pool, as `config` writes it.
fn default_pool() -> PoolKey {
    PoolKey::new("vpc", "subnet-a", Vec::<String>::new(), None)
}

/// An ADD of container `container`'s interface `ifname` in `pod`'s
/// namespace: the address it got.
async fn add(dir: &Path, pod: &str, container: &str, ifname: &str) -> IpNet {
    let request = PodRequest {
        owner: Owner {
            container_id: container.into(),
            ifname: ifname.into(),
            pod: Some(format!("default/{container}")),
            cni_network: Some("vpc".into()),
            pod_uid: None,
        },
        netns: Some(Path::new(NETNS_RUN_DIR).join(pod)),
        pool: None,
        timeout_ms: None,
        address: None,
        mac: None,
    };
    let reply = call(
        &dir.join("agent.sock"),
        &PluginRequest::Add(request),
        Duration::from_secs(40),
    )
    .await
    .unwrap();
    let PluginReply::Added(attached) = reply else {
        panic!("ADD of {container}/{ifname} failed: {reply:?}");
    };
    attached.lease.address
}

/// Polls `hulkctl pools` until the default pool's `field` count is `want`.
async fn wait_for_pool(dir: &Path, field: &str, want: u64) {
    let started = Instant::now();
    loop {
        let (_, pools) = hulkctl(dir, &["pools"]);
        if pools["pools"][0]["stats"][field] == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{field} never reached {want}: {pools}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn addresses_the_cloud_took_back_are_not_handed_out_after_a_gc() {
    // The issue's input: a warm pool of 4, two of its idle addresses
    // deleted in the cloud and allocated by another node, a sweep.
    let dir = support::scratch_dir("agent-lost");
    let fake = support::UltronFake::start("10.79.4.0/24", 0);
    let backend = fake.backend(&dir.join("token"));
    let _agent = start_agent(&dir, LOST_NODE, LOST_POD, "", &backend).await;
    wait_for_pool(&dir, "idle", 4).await;
    let (_, leases) = hulkctl(&dir, &["leases"]);
    let idle: Vec<(String, String)> = leases["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| {
            (
                record["lease"]["id"].as_str().unwrap().to_owned(),
                record["lease"]["address"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(idle.len(), 4, "{leases}");
    let cloud = fake.client();
    let taken: BTreeSet<String> = idle[..2]
        .iter()
        .map(|(_, address)| address.clone())
        .collect();
    for (id, _) in &idle[..2] {
        cloud.release(id).await.unwrap();
    }
    let theirs: BTreeSet<String> = cloud
        .allocate(&AllocationRequest::new(default_pool(), "other-node", 2))
        .await
        .unwrap()
        .into_iter()
        .map(|lease| lease.address.to_string())
        .collect();
    assert_eq!(theirs, taken, "the other node got the two addresses");

    let (code, collected) = hulkctl(&dir, &["gc"]);
    assert_eq!(code, 0, "{collected}");
    assert_eq!(collected["orphans"]["dropped_idle"], 2, "{collected}");
    let (_, leases) = hulkctl(&dir, &["leases"]);
    for (id, address) in &idle[..2] {
        assert!(
            !leases.to_string().contains(&format!("\"{id}\"")),
            "{address} still listed: {leases}"
        );
    }
    // Our next ADDs: the two idle left, then one the refiller brings.
    let mut ours = BTreeSet::new();
    for (n, ifname) in ["eth0", "eth1", "eth2"].into_iter().enumerate() {
        let address = add(&dir, LOST_POD, &format!("sandbox-l{n}"), ifname).await;
        ours.insert(address.to_string());
    }
    assert_eq!(ours.len(), 3);
    assert!(
        ours.is_disjoint(&theirs),
        "{ours:?} shares an address with the other node's {theirs:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A loopback port that forwards to `target` once [`Healing::heal`] is
/// called, and refuses connections before: a cloud unreachable, then back.
struct Healing {
    port: u16,
    target: u16,
}

impl Healing {
    fn heal(&self) -> tokio::task::JoinHandle<()> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let target = self.target;
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_after_a_crash_mid_allocation_serves_while_the_cloud_is_unreachable() {
    let dir = support::scratch_dir("agent-down");
    let fake = support::UltronFake::start("10.79.5.0/24", 0);
    // What the crashed run left: an idle address, one being returned, and
    // one its interrupted allocation created that the store never got.
    let cloud = fake.client();
    let mut leases = cloud
        .allocate(&AllocationRequest::new(default_pool(), "test-node", 3))
        .await
        .unwrap()
        .into_iter();
    let (idle, orphan, returning) = (
        leases.next().unwrap(),
        leases.next().unwrap(),
        leases.next().unwrap(),
    );
    let record = |lease: &Lease, state| AddressRecord {
        key: default_pool(),
        lease: lease.clone(),
        state,
        since_ms: 0,
        fixed: false,
        lost: false,
    };
    {
        let store = RedbStore::open(&dir.join("pool.redb")).unwrap();
        store
            .apply(&[
                StoreOp::put(record(&idle, AddressState::Idle)),
                StoreOp::put(record(&returning, AddressState::Releasing)),
                StoreOp::PutIntent(Intent {
                    id: 1,
                    kind: IntentKind::Allocate {
                        key: default_pool(),
                        count: 1,
                    },
                }),
                StoreOp::PutIntent(Intent {
                    id: 2,
                    kind: IntentKind::Release {
                        lease_id: returning.id.clone(),
                    },
                }),
            ])
            .unwrap();
    }
    // The agent reaches the cloud through a port nothing listens on yet.
    let path = Healing {
        port: support::free_port(),
        target: fake.port,
    };
    let backend = fake
        .backend(&dir.join("token"))
        .replace(&format!(":{}", fake.port), &format!(":{}", path.port));
    let mut agent = start_agent(
        &dir,
        DOWN_NODE,
        DOWN_POD,
        "gc_interval_seconds = 3600",
        &backend,
    )
    .await;
    let (_, pools) = hulkctl(&dir, &["pools"]);
    assert_eq!(pools["pools"][0]["stats"]["idle"], 1, "{pools}");
    assert_eq!(pools["pools"][0]["stats"]["releasing"], 1, "{pools}");
    // ADD, STATUS and DEL work from the store meanwhile.
    let address = add(&dir, DOWN_POD, "sandbox-d", "eth0").await;
    assert_eq!(address, idle.address);
    let status = call(
        &dir.join("agent.sock"),
        &PluginRequest::Status,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(matches!(status, PluginReply::Done), "{status:?}");
    let del = PodRequest {
        owner: Owner {
            container_id: "sandbox-d".into(),
            ifname: "eth0".into(),
            pod: None,
            cni_network: Some("vpc".into()),
            pod_uid: None,
        },
        netns: Some(Path::new(NETNS_RUN_DIR).join(DOWN_POD)),
        pool: None,
        timeout_ms: None,
        address: None,
        mac: None,
    };
    let reply = call(
        &dir.join("agent.sock"),
        &PluginRequest::Del(del),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(matches!(reply, PluginReply::Done), "{reply:?}");

    // The cloud is back: a GC's sweep finishes the release and adopts
    // what the interrupted allocation left.
    let _forwarding = path.heal();
    let (code, collected) = hulkctl(&dir, &["gc"]);
    assert_eq!(code, 0, "{collected}");
    assert_eq!(collected["orphans"]["adopted_idle"], 1, "{collected}");
    wait_for_pool(&dir, "releasing", 0).await;
    let held: Vec<String> = cloud
        .list(&ListScope::Node("test-node".into()))
        .await
        .unwrap()
        .into_iter()
        .map(|lease| lease.id)
        .collect();
    assert!(!held.contains(&returning.id), "not released: {held:?}");
    assert!(
        held.contains(&orphan.id) && held.contains(&idle.id),
        "{held:?}"
    );
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    let snapshot = RedbStore::open(&dir.join("pool.redb"))
        .unwrap()
        .load()
        .unwrap();
    assert!(
        !snapshot.intents.contains_key(&1) && !snapshot.intents.contains_key(&2),
        "the start's intents are settled: {:?}",
        snapshot.intents
    );
    assert!(snapshot.addresses.contains_key(&orphan.id));
    assert!(!snapshot.addresses.contains_key(&returning.id));
    drop(agent);
    std::fs::remove_dir_all(&dir).unwrap();
}
