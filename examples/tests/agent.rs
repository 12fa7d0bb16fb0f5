//! The agent binary end to end on the host kernel (macvlan), in a node
//! namespace of its own: it starts from a config file, serves ADD and DEL
//! on its socket, builds a real interface in a real pod namespace, and
//! stops cleanly on SIGTERM. Root; nextest group `netns`.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hulk_netns::rtnetlink::{LinkUnspec, LinkVeth};
use hulk_netns::{Kernel, NETNS_RUN_DIR, NetlinkKernel, create_named_netns, delete_named_netns};
use hulk_node::PodRequest;
use hulk_node::agent::{AgentReply, AgentRequest, call};

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
state_file = "{dir}/pool.redb"
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
            dir = dir.display()
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
        container_id: "sandbox-u".into(),
        ifname: "eth0".into(),
        netns: Some(Path::new(NETNS_RUN_DIR).join(ULTRON_POD)),
        pod: None,
        pool: None,
        cni_network: Some("vpc".into()),
        pod_uid: None,
        timeout_ms: None,
        address: None,
        mac: None,
    };
    let reply = call(
        &dir.join("agent.sock"),
        &AgentRequest::Add(pod),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let AgentReply::Added(attached) = reply else {
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
        container_id: "sandbox-1".into(),
        ifname: "eth0".into(),
        netns: Some(Path::new(NETNS_RUN_DIR).join(POD)),
        pod: Some("default/web-0".into()),
        pool: None,
        cni_network: Some("vpc".into()),
        pod_uid: None,
        timeout_ms: None,
        address: None,
        mac: None,
    };
    let timeout = Duration::from_secs(10);
    let AgentReply::Added(attached) = call(&socket, &AgentRequest::Add(pod.clone()), timeout)
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
    match call(&socket, &AgentRequest::Check(pod.clone()), timeout)
        .await
        .unwrap()
    {
        AgentReply::Checked(found) => assert_eq!(found.lease.address, attached.lease.address),
        other => panic!("CHECK answered {other:?}"),
    }
    assert_eq!(
        call(&socket, &AgentRequest::Del(pod.clone()), timeout)
            .await
            .unwrap(),
        AgentReply::Done
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
        container_id: "sandbox-r".into(),
        ifname: "eth0".into(),
        netns: Some(Path::new(NETNS_RUN_DIR).join(RESCUE_POD)),
        pod: Some("default/web-r".into()),
        pool: None,
        cni_network: Some("vpc".into()),
        pod_uid: None,
        timeout_ms: None,
        address: None,
        mac: None,
    };
    let timeout = Duration::from_secs(10);
    let socket = dir.join("agent.sock");
    let AgentReply::Added(attached) = call(&socket, &AgentRequest::Add(pod.clone()), timeout)
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
    let reply = call(&socket, &AgentRequest::Add(pod.clone()), timeout)
        .await
        .unwrap();
    let AgentReply::Failed(error) = reply else {
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
        container_id: "sandbox-r2".into(),
        ifname: "eth1".into(),
        ..pod.clone()
    };
    let reply = call(&socket, &AgentRequest::Add(second), timeout)
        .await
        .unwrap();
    assert!(matches!(reply, AgentReply::Added(_)), "{reply:?}");

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
            async move { call(&socket, &AgentRequest::Status, Duration::from_secs(60)).await },
        )
    });
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for call in calls {
        let answer = match call.await.unwrap() {
            Ok(AgentReply::Done) => "ready".to_owned(),
            Ok(AgentReply::Failed(error)) => format!("{}: {}", error.code.as_u32(), error.msg),
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
