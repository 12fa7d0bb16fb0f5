//! The node end to end with real ipvlan l2, driven as a container runtime
//! drives it: `hulk-agent` in a node namespace whose parent is a port of
//! the VPC's bridge (the gateway's namespace), pods as named namespaces,
//! and `hulk-vpc-cni` exec'd with the CNI environment and its
//! configuration on stdin. The cloud is `hulk-ultron-fake`, a process of
//! its own that outlives agent restarts and answers slowly, like a cloud.
//!
//! The host kernel has no ipvlan: `scripts/vm-tests` runs these tests
//! inside the VM (`--include-ignored`, one at a time).

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hulk_netns::{NETNS_RUN_DIR, Netns, run_blocking_in};
use serde_json::{Value, json};

const GATEWAY: &str = "10.50.0.1";
const GATEWAY_MAC: &str = "02:00:0a:32:00:01";
const NODE_ADDRESS: &str = "10.50.0.250";
const CLUSTER_IP: &str = "10.96.0.10";
/// What the cloud adds to every call: pods must not wait for it.
const BACKEND_LATENCY_MS: u64 = 1500;

/// Runs `ip` with `args`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Deletes a namespace that may not exist.
fn delete_netns(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// One test's VPC: a gateway namespace holding the subnet's bridge (with a
/// fixed MAC, which the mock backend reports as the gateway's) and a node
/// namespace whose `eth1` is a port of that bridge. Deleted on drop, with
/// the agent and every pod namespace.
struct Vpc {
    tag: &'static str,
    dir: PathBuf,
    cloud: Child,
    cloud_port: u16,
    agent: Option<Child>,
    pods: BTreeSet<String>,
}

impl Vpc {
    fn new(tag: &'static str) -> Vpc {
        let dir = std::env::temp_dir().join(format!("hulk-e2e-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ip(&["link", "set", "lo", "up"]);
        let (cloud, cloud_port) = start_cloud();
        let vpc = Vpc {
            tag,
            dir,
            cloud,
            cloud_port,
            agent: None,
            pods: BTreeSet::new(),
        };
        let gateway = vpc.gateway();
        delete_netns(&gateway);
        ip(&["netns", "add", &gateway]);
        ip(&["-n", &gateway, "link", "add", "vpc", "type", "bridge"]);
        ip(&["-n", &gateway, "link", "set", "vpc", "address", GATEWAY_MAC]);
        ip(&["-n", &gateway, "link", "set", "vpc", "up"]);
        ip(&[
            "-n",
            &gateway,
            "addr",
            "add",
            &format!("{GATEWAY}/24"),
            "dev",
            "vpc",
        ]);
        vpc.boot_node();
        vpc
    }

    fn gateway(&self) -> String {
        format!("{}-gw", self.tag)
    }

    fn node(&self) -> String {
        format!("{}-node", self.tag)
    }

    /// A node as it comes up from a (re)boot: its parent interface, plugged
    /// into the VPC, and nothing that hulk-vpc configured.
    fn boot_node(&self) {
        let (node, gateway) = (self.node(), self.gateway());
        delete_netns(&node);
        ip(&["netns", "add", &node]);
        ip(&[
            "-n", &node, "link", "add", "eth1", "type", "veth", "peer", "name", "port", "netns",
            &gateway,
        ]);
        ip(&["-n", &node, "link", "set", "eth1", "up"]);
        ip(&["-n", &gateway, "link", "set", "port", "master", "vpc", "up"]);
    }

    /// A reboot: the agent dies, every namespace (pods' and node's network
    /// state) is gone, the node comes back bare; the state file survives.
    fn reboot(&mut self) {
        self.kill_agent();
        for pod in std::mem::take(&mut self.pods) {
            ip(&["netns", "del", &pod]);
        }
        ip(&["netns", "del", &self.node()]);
        // The bridge port goes with the node's end of the veth, once the
        // kernel has cleaned the namespace up (asynchronously).
        let started = Instant::now();
        while link_names(&self.gateway()).contains("port") {
            assert!(started.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(50));
        }
        self.boot_node();
    }

    fn start_agent(&mut self) {
        let config = self.dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"
node_name = "e2e-node"
socket = "{dir}/agent.sock"
rescue_socket = "{dir}/rescue.sock"
state_file = "{dir}/pool.redb"
node_netns = "{netns}"
gc_interval_seconds = 3600
# As long as the plugin waits (agentTimeoutSeconds below): a burst of 100
# ADDs on a 1.5 s backend in a 2-core VM takes most of a minute.
request_timeout_seconds = 120
pending_del_dir = "{dir}/pending-dels"
[network]
parent = "eth1"
kind = "ipvlan"
mode = "l2"
node_address = "{NODE_ADDRESS}/24"
service_cidrs = ["10.96.0.0/12"]
[default_pool]
network = "vpc"
subnet = "subnet-e2e"
[pool]
min_idle = 16
max_idle = 64
batch = 16
warm_up = 32
max_total = 200
reuse_cooldown_seconds = 0
[backend]
type = "ultron"
url = "http://127.0.0.1:{port}"
token_file = "{dir}/token"
cluster = "e2e"
"#,
                dir = self.dir.display(),
                port = self.cloud_port,
                netns = netns_path(&self.node()).display(),
            ),
        )
        .unwrap();
        std::fs::write(self.dir.join("token"), CLOUD_TOKEN).unwrap();
        for socket in ["agent.sock", "rescue.sock"] {
            let _ = std::fs::remove_file(self.dir.join(socket));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let mut agent = Command::new(env!("CARGO_BIN_EXE_hulk-agent"))
            .arg("--config")
            .arg(&config)
            .stderr(log)
            .spawn()
            .unwrap();
        support::wait_until_ready(
            &mut agent,
            &self.dir.join("rescue.sock"),
            Duration::from_secs(60),
            || self.agent_log(),
        );
        self.agent = Some(agent);
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// SIGKILL: nothing is finished, the socket file stays behind.
    fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill().unwrap();
            agent.wait().unwrap();
        }
    }

    /// SIGTERM: a graceful stop, which must exit 0.
    fn stop_agent(&mut self) {
        let mut agent = self.agent.take().unwrap();
        let sent = Command::new("kill")
            .arg(agent.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
        let status = agent.wait().unwrap();
        assert!(status.success(), "{status}: {}", self.agent_log());
    }

    /// Creates the sandbox namespace of pod `name`.
    fn pod(&mut self, name: &str) -> String {
        let pod = format!("{}-{name}", self.tag);
        delete_netns(&pod);
        ip(&["netns", "add", &pod]);
        self.pods.insert(pod.clone());
        pod
    }

    /// `count` sandboxes `sandbox-N`, each in its namespace `pN`:
    /// (container id, namespace).
    fn sandboxes(&mut self, count: usize) -> Vec<(String, String)> {
        (0..count)
            .map(|index| (format!("sandbox-{index}"), self.pod(&format!("p{index}"))))
            .collect()
    }

    fn conf(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "vpc",
            "type": "hulk-vpc-cni",
            "agentSocket": self.dir.join("agent.sock"),
            "agentTimeoutSeconds": 120,
            // The agent's `pending_del_dir`: a DEL the agent missed is
            // noted here and replayed by it, inside this test's scratch dir.
            "pendingDelDir": self.dir.join("pending-dels"),
        })
    }

    /// Runs the plugin as a runtime does, for sandbox `container` in
    /// namespace `pod`: the result or the error document.
    fn plugin(&self, command: &str, container: &str, pod: &str, conf: &Value) -> Outcome {
        support::exec_cni(
            Path::new(support::PLUGIN),
            command,
            container,
            &netns_path(pod),
            pod,
            conf,
        )
    }

    /// ADD, which must succeed: the pod's address.
    fn add(&self, container: &str, pod: &str) -> Value {
        self.plugin("ADD", container, pod, &self.conf())
            .unwrap_or_else(|error| panic!("ADD {container}: {error}\n{}", self.agent_log()))
    }

    /// DEL with the ADD's result, as a runtime sends it.
    fn del(&self, container: &str, pod: &str, result: Option<&Value>) -> Outcome {
        let mut conf = self.conf();
        if let Some(result) = result {
            conf["prevResult"] = result.clone();
        }
        self.plugin("DEL", container, pod, &conf)
    }

    /// GC as a runtime sends it after a restart: these sandboxes are valid.
    fn gc(&self, valid: &[&str]) {
        let mut conf = self.conf();
        conf["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|container| json!({"containerID": container, "ifname": "eth0"}))
            .collect();
        self.plugin("GC", "", "", &conf).unwrap();
    }

    fn hulkctl(&self, args: &[&str]) -> Value {
        let output = Command::new(env!("CARGO_BIN_EXE_hulkctl"))
            .arg("--socket")
            .arg(self.dir.join("rescue.sock"))
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "hulkctl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// The addresses the agent holds for pods, by owning sandbox.
    fn assigned(&self) -> Vec<(String, String)> {
        let leases = self.hulkctl(&["leases"]);
        let mut assigned: Vec<(String, String)> = leases["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|record| {
                let owner = record["state"].get("Assigned")?;
                let cidr = record["lease"]["address"].as_str().unwrap();
                Some((
                    owner["container_id"].as_str().unwrap().to_owned(),
                    cidr.split('/').next().unwrap().to_owned(),
                ))
            })
            .collect();
        assigned.sort();
        assigned
    }

    /// The node's datapath must be what the agent wants: host slave up,
    /// node address, a route per pod holding an address and no other.
    fn assert_node_healthy(&self) {
        let node = self.hulkctl(&["node"]);
        let state = &node["state"];
        assert_eq!(state["host_link_up"], true, "{node}");
        assert_eq!(state["node_address_present"], true, "{node}");
        assert_eq!(state["missing_routes"], json!([]), "{node}");
        assert_eq!(state["stale_routes"], json!([]), "{node}");
    }

    /// Waits until the pool holds `idle` warm addresses.
    fn wait_warm(&self, idle: u64) {
        let started = Instant::now();
        loop {
            let pools = self.hulkctl(&["pools"]);
            let now: u64 = pools["pools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|pool| pool["stats"]["idle"].as_u64().unwrap())
                .sum();
            if now >= idle {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the pool did not warm up to {idle}: {pools}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the node's namespace has as links, by name.
    fn node_links(&self) -> String {
        link_names(&self.node())
    }
}

impl Drop for Vpc {
    fn drop(&mut self) {
        self.kill_agent();
        let _ = self.cloud.kill();
        for namespace in self
            .pods
            .iter()
            .cloned()
            .chain([self.node(), self.gateway()])
        {
            delete_netns(&namespace);
        }
    }
}

use support::Outcome;

const CLOUD_TOKEN: &str = "e2e-token";

/// Starts the cloud's IPAM service on a free loopback port.
fn start_cloud() -> (Child, u16) {
    let port = support::free_port();
    let cloud = Command::new(env!("CARGO_BIN_EXE_hulk-ultron-fake"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--subnet", "10.50.0.0/24", "--gateway-mac", GATEWAY_MAC])
        .args(["--latency-ms", &BACKEND_LATENCY_MS.to_string()])
        .env("HULK_ULTRON_TOKEN", CLOUD_TOKEN)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the cloud did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (cloud, port)
}

/// The link names of a namespace, one line each, without `lo`.
fn link_names(namespace: &str) -> String {
    let output = Command::new("ip")
        .args(["-n", namespace, "-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name != "lo")
        .collect::<Vec<_>>()
        .join(" ")
}

fn address_of(result: &Value) -> String {
    let cidr = result["ips"][0]["address"].as_str().unwrap();
    cidr.split('/').next().unwrap().to_owned()
}

/// Answers each TCP connection on `port` inside `namespace` with `identity`.
fn serve(namespace: &str, port: u16, identity: &'static str) {
    let netns = Netns::open(netns_path(namespace)).unwrap();
    let listener = run_blocking_in(&netns, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(identity.as_bytes());
        }
    });
}

/// Connects from inside `namespace`: what the server said, or why not.
fn fetch(namespace: &str, address: &str, port: u16) -> Result<String, String> {
    let target = SocketAddr::new(address.parse().unwrap(), port);
    let netns = Netns::open(netns_path(namespace)).unwrap();
    run_blocking_in(&netns, move || {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .map_err(|error| format!("connect {target}: {error}"))?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .map_err(|error| format!("read {target}: {error}"))?;
        Ok(reply)
    })
    .unwrap()
}

/// Runs `command` for every item at once: the outcomes, in order.
fn all_at_once<I: Sync, T: Send>(items: &[I], command: impl Fn(&I) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .iter()
            .map(|item| scope.spawn(|| command(item)))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .collect()
    })
}

#[test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
fn pods_reach_the_gateway_each_other_their_node_and_services_then_leave_nothing() {
    let mut vpc = Vpc::new("e2t");
    vpc.start_agent();
    vpc.wait_warm(3);
    let (a, b) = (vpc.pod("a"), vpc.pod("b"));
    let started = Instant::now();
    let result_a = vpc.add("sandbox-a", &a);
    let took = started.elapsed();
    let result_b = vpc.add("sandbox-b", &b);
    println!("ADD from a warm pool took {took:?} (backend latency {BACKEND_LATENCY_MS} ms)");
    let (address_a, address_b) = (address_of(&result_a), address_of(&result_b));
    assert_ne!(address_a, address_b);
    assert_eq!(result_a["interfaces"][0]["sandbox"], json!(netns_path(&a)));
    let mut check = vpc.conf();
    check["prevResult"] = result_a.clone();
    vpc.plugin("CHECK", "sandbox-a", &a, &check).unwrap();
    vpc.plugin("STATUS", "", "", &vpc.conf()).unwrap();

    // The gateway's neighbour entry is permanent, so the pod is reachable
    // before the VPC's flows would have been.
    let neighbours = Command::new("ip")
        .args(["-n", &a, "neigh", "show", GATEWAY])
        .output()
        .unwrap();
    let neighbours = String::from_utf8_lossy(&neighbours.stdout);
    assert!(
        neighbours.contains(GATEWAY_MAC) && neighbours.contains("PERMANENT"),
        "{neighbours}"
    );

    serve(&a, 8080, "pod-a");
    serve(&b, 8080, "pod-b");
    serve(&vpc.gateway(), 8080, "gateway");
    serve(&vpc.node(), 8081, "node");
    assert_eq!(fetch(&a, &address_b, 8080).as_deref(), Ok("pod-b"));
    assert_eq!(fetch(&a, GATEWAY, 8080).as_deref(), Ok("gateway"));
    assert_eq!(
        fetch(&vpc.gateway(), &address_a, 8080).as_deref(),
        Ok("pod-a")
    );
    assert_eq!(
        fetch(&vpc.node(), &address_a, 8080).as_deref(),
        Ok("pod-a"),
        "node -> pod (a kubelet probe)"
    );
    assert_eq!(fetch(&a, NODE_ADDRESS, 8081).as_deref(), Ok("node"));

    // kube-proxy's part, by hand: a ClusterIP DNATed to pod b with
    // masquerade-all; the pod's Service route sends it through the node.
    let node = vpc.node();
    let backend = format!("{address_b}:8080");
    for rule in [
        vec![
            "PREROUTING",
            "-d",
            CLUSTER_IP,
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &backend,
        ],
        vec!["POSTROUTING", "-d", "10.50.0.0/24", "-j", "MASQUERADE"],
    ] {
        let status = Command::new("ip")
            .args(["netns", "exec", &node, "iptables", "-t", "nat", "-A"])
            .args(&rule)
            .status()
            .unwrap();
        assert!(status.success(), "iptables {rule:?}");
    }
    assert_eq!(fetch(&a, CLUSTER_IP, 80).as_deref(), Ok("pod-b"));
    vpc.assert_node_healthy();

    for (container, pod, result) in [("sandbox-a", &a, &result_a), ("sandbox-b", &b, &result_b)] {
        vpc.del(container, pod, Some(result)).unwrap();
        // DEL again, as runtimes do: still a success.
        vpc.del(container, pod, Some(result)).unwrap();
        assert_eq!(link_names(pod), "", "{pod} keeps an interface");
    }
    assert_eq!(vpc.assigned(), vec![]);
    assert_eq!(vpc.node_links(), "eth1 hulk0");
    vpc.assert_node_healthy();
    vpc.stop_agent();
}

#[test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
fn a_hundred_concurrent_adds_then_dels_hand_out_distinct_addresses_and_leak_nothing() {
    let mut vpc = Vpc::new("e2c");
    vpc.start_agent();
    let sandboxes = vpc.sandboxes(100);
    let started = Instant::now();
    let results = all_at_once(&sandboxes, |(container, pod)| vpc.add(container, pod));
    println!(
        "100 concurrent ADDs took {:?} (pool warm-up 32, backend latency {BACKEND_LATENCY_MS} ms)",
        started.elapsed()
    );
    let addresses: BTreeSet<String> = results.iter().map(address_of).collect();
    assert_eq!(addresses.len(), 100, "an address was handed out twice");
    let assigned = vpc.assigned();
    assert_eq!(assigned.len(), 100);
    for ((container, _), result) in sandboxes.iter().zip(&results) {
        assert!(assigned.contains(&(container.clone(), address_of(result))));
    }
    vpc.assert_node_healthy();

    let added: Vec<_> = sandboxes.iter().zip(&results).collect();
    let deleted = all_at_once(&added, |((container, pod), result)| {
        vpc.del(container, pod, Some(result))
    });
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    assert_eq!(vpc.assigned(), vec![]);
    for (_, pod) in &sandboxes {
        assert_eq!(link_names(pod), "", "{pod} keeps an interface");
    }
    assert_eq!(vpc.node_links(), "eth1 hulk0");
    vpc.assert_node_healthy();
    vpc.stop_agent();
}

#[test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
fn an_agent_killed_mid_burst_restarts_and_the_runtime_retries_without_a_leak() {
    let mut vpc = Vpc::new("e2k");
    vpc.start_agent();
    let sandboxes = vpc.sandboxes(40);
    // The burst outlasts the warm pool, so some ADDs wait on the slow
    // backend when the agent dies.
    let answered = AtomicUsize::new(0);
    let outcomes = std::thread::scope(|scope| {
        let burst = scope.spawn(|| {
            all_at_once(&sandboxes, |(container, pod)| {
                let outcome = vpc.plugin("ADD", container, pod, &vpc.conf());
                answered.fetch_add(1, Ordering::SeqCst);
                outcome
            })
        });
        let started = Instant::now();
        while answered.load(Ordering::SeqCst) < 10 {
            assert!(started.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = vpc.agent.as_ref().unwrap().id();
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        burst.join().unwrap()
    });
    vpc.kill_agent();
    let failed: Vec<usize> = (0..outcomes.len())
        .filter(|index| outcomes[*index].is_err())
        .collect();
    println!("agent killed mid-burst: {} of 40 ADDs failed", failed.len());
    assert!(
        !failed.is_empty() && failed.len() < 40,
        "the kill did not land mid-burst"
    );
    for index in &failed {
        let code = &outcomes[*index].as_ref().unwrap_err()["code"];
        assert!(code == 103 || code == 11, "ADD failed with {code}");
    }

    vpc.start_agent();
    // The runtime tears a failed sandbox down (DEL) and makes a new one.
    let mut live: Vec<(String, String, Value)> = Vec::new();
    for (index, (container, pod)) in sandboxes.iter().enumerate() {
        match &outcomes[index] {
            Ok(result) => live.push((container.clone(), pod.clone(), result.clone())),
            Err(_) => {
                vpc.del(container, pod, None).unwrap();
                let retry = format!("{container}-retry");
                let result = vpc.add(&retry, pod);
                live.push((retry, pod.clone(), result));
            }
        }
    }
    let addresses: BTreeSet<String> = live
        .iter()
        .map(|(_, _, result)| address_of(result))
        .collect();
    assert_eq!(addresses.len(), 40, "an address was handed out twice");
    let mut expected: Vec<(String, String)> = live
        .iter()
        .map(|(container, _, result)| (container.clone(), address_of(result)))
        .collect();
    expected.sort();
    assert_eq!(vpc.assigned(), expected, "the agent's view after restart");
    vpc.assert_node_healthy();

    for (container, pod, result) in &live {
        vpc.del(container, pod, Some(result)).unwrap();
    }
    assert_eq!(vpc.assigned(), vec![]);
    assert_eq!(vpc.node_links(), "eth1 hulk0");
    vpc.stop_agent();
}

#[test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
fn after_a_node_reboot_the_agent_restores_the_node_and_gc_frees_the_dead_pods() {
    let mut vpc = Vpc::new("e2r");
    vpc.start_agent();
    let before: Vec<Value> = (0..5)
        .map(|index| {
            let pod = vpc.pod(&format!("p{index}"));
            vpc.add(&format!("old-{index}"), &pod)
        })
        .collect();
    assert_eq!(vpc.assigned().len(), 5);

    vpc.reboot();
    assert_eq!(vpc.node_links(), "eth1", "the reboot kept node state");
    vpc.start_agent();
    // Restored: the host slave and its address, routes for what it holds.
    assert!(vpc.node_links().contains("hulk0"), "{}", vpc.node_links());
    vpc.assert_node_healthy();
    assert_eq!(vpc.assigned().len(), 5, "the state file outlives a reboot");

    // The runtime comes back knowing no sandbox: its GC frees them all.
    vpc.gc(&[]);
    assert_eq!(vpc.assigned(), vec![]);
    vpc.assert_node_healthy();

    let pod = vpc.pod("new");
    let result = vpc.add("new-0", &pod);
    serve(&pod, 8080, "new pod");
    serve(&vpc.gateway(), 8080, "gateway");
    assert_eq!(
        fetch(&vpc.node(), &address_of(&result), 8080).as_deref(),
        Ok("new pod")
    );
    assert_eq!(fetch(&pod, GATEWAY, 8080).as_deref(), Ok("gateway"));
    let reused: BTreeSet<String> = before.iter().map(address_of).collect();
    println!(
        "after the reboot the new pod got {} (old pods had {reused:?})",
        address_of(&result)
    );
    vpc.del("new-0", &pod, Some(&result)).unwrap();
    assert_eq!(vpc.assigned(), vec![]);
    vpc.stop_agent();
}

/// The state file is lost while pods run (a wiped disk, an operator's
/// mistake). The restarted agent takes the pods' addresses back from the
/// cloud's marks of who holds each one, instead of sweeping them back to
/// the cloud while the pods still use them.
#[test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
fn a_lost_state_file_is_rebuilt_from_the_clouds_marks_of_who_holds_what() {
    let mut vpc = Vpc::new("e2l");
    vpc.start_agent();
    let mut pods = Vec::new();
    for index in 0..3 {
        let pod = vpc.pod(&format!("p{index}"));
        let sandbox = format!("sandbox-{index}");
        let result = vpc.add(&sandbox, &pod);
        pods.push((sandbox, pod, result));
    }
    let held = vpc.assigned();
    assert_eq!(held.len(), 3);
    vpc.stop_agent();
    std::fs::remove_file(vpc.dir.join("pool.redb")).unwrap();

    vpc.start_agent();
    assert_eq!(vpc.assigned(), held, "every pod's address is known again");
    vpc.assert_node_healthy();
    let (_, first_pod, first_result) = &pods[0];
    serve(first_pod, 8080, "still here");
    assert_eq!(
        fetch(&vpc.node(), &address_of(first_result), 8080).as_deref(),
        Ok("still here")
    );

    let newcomer = vpc.pod("new");
    let result = vpc.add("sandbox-new", &newcomer);
    assert!(
        held.iter()
            .all(|(_, address)| *address != address_of(&result)),
        "an address held by a pod was handed out again"
    );
    for (sandbox, pod, result) in &pods {
        vpc.del(sandbox, pod, Some(result)).unwrap();
    }
    vpc.del("sandbox-new", &newcomer, Some(&result)).unwrap();
    assert_eq!(vpc.assigned(), vec![]);
    vpc.stop_agent();
}

#[test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
fn a_del_while_the_agent_is_down_is_noted_and_replayed_when_the_agent_starts() {
    let mut vpc = Vpc::new("e2d");
    vpc.start_agent();
    let (gone, kept) = (vpc.pod("gone"), vpc.pod("kept"));
    let gone_result = vpc.add("sandbox-gone", &gone);
    let kept_result = vpc.add("sandbox-kept", &kept);
    vpc.stop_agent();

    let status = vpc.plugin("STATUS", "", "", &vpc.conf()).unwrap_err();
    assert_eq!(status["code"], 50, "{status}");
    vpc.del("sandbox-gone", &gone, Some(&gone_result)).unwrap();
    assert_eq!(link_names(&gone), "", "DEL without the agent left eth0");
    let notes = std::fs::read_dir(vpc.dir.join("pending-dels"))
        .unwrap()
        .count();
    assert_eq!(notes, 1, "the DEL left no note for the agent");

    // The agent replays the note before it serves: the address is back
    // without any GC.
    vpc.start_agent();
    let held: Vec<String> = vpc.assigned().into_iter().map(|(owner, _)| owner).collect();
    assert_eq!(held, ["sandbox-kept"], "the agent did not replay the DEL");
    let notes = std::fs::read_dir(vpc.dir.join("pending-dels"))
        .unwrap()
        .count();
    assert_eq!(notes, 0, "the replayed note stayed");
    // The runtime's GC afterwards changes nothing.
    vpc.gc(&["sandbox-kept"]);
    assert_eq!(
        vpc.assigned(),
        vec![("sandbox-kept".to_owned(), address_of(&kept_result))]
    );
    vpc.assert_node_healthy();
    assert_eq!(link_names(&kept), "eth0", "GC touched a valid pod");
    vpc.del("sandbox-kept", &kept, Some(&kept_result)).unwrap();
    assert_eq!(vpc.assigned(), vec![]);
    vpc.stop_agent();
}

/// A conflist of hulk-vpc-cni, then Debian's reference `tuning` and
/// `bandwidth` plugins, run as libcni runs a chain: each plugin gets the
/// previous one's result, CHECK gets the final one, DEL goes in reverse.
/// Debian's plugins speak up to spec 1.0.0, so the whole list does.
/// Tuning's sysctl and MTU land on our interface. Bandwidth passes ADD and
/// DEL of pods without limits through; it shapes through a host-side veth
/// peer, which an ipvlan pod lacks, so its CHECK fails, a pod with limits
/// fails its ADD cleanly, and the runtime's DEL of the chain leaves nothing
/// behind.
#[test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
fn the_result_chains_into_the_reference_tuning_and_bandwidth_plugins() {
    let mut vpc = Vpc::new("e2c");
    vpc.start_agent();
    let mut conf = vpc.conf();
    conf["cniVersion"] = json!("1.0.0");
    let plugins = [
        json!({
            "type": "tuning",
            "mtu": 1400,
            "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"},
        }),
        json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
    ];
    // One plugin of the list after ours, as libcni execs it.
    let reference = |plugin: &Value, command: &str, container: &str, pod: &str, extra: Value| {
        let mut conf = plugin.clone();
        conf["cniVersion"] = json!("1.0.0");
        conf["name"] = json!("vpc");
        for (key, value) in extra.as_object().unwrap() {
            conf[key] = value.clone();
        }
        let binary = format!("/usr/lib/cni/{}", plugin["type"].as_str().unwrap());
        support::exec_cni(
            Path::new(&binary),
            command,
            container,
            &netns_path(pod),
            pod,
            &conf,
        )
    };

    let pod = vpc.pod("a");
    // Pod a's step of the list after ours, given the result so far.
    let step = |plugin: &Value, command: &str, prev_result: &Value| {
        reference(
            plugin,
            command,
            "sandbox-a",
            &pod,
            json!({"prevResult": prev_result}),
        )
    };
    let ours = vpc.plugin("ADD", "sandbox-a", &pod, &conf).unwrap();
    let mut result = ours.clone();
    for plugin in &plugins {
        result = step(plugin, "ADD", &result)
            .unwrap_or_else(|error| panic!("{} ADD: {error}", plugin["type"]));
    }
    assert_eq!(
        result["ips"], ours["ips"],
        "the chain passes our addresses on"
    );
    assert_eq!(result["interfaces"][0]["name"], "eth0");
    let sysctl = Command::new("ip")
        .args(["netns", "exec", &pod, "cat"])
        .arg("/proc/sys/net/ipv4/conf/eth0/arp_notify")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "1");
    let link = Command::new("ip")
        .args(["-n", &pod, "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("mtu 1400"),
        "{}",
        String::from_utf8_lossy(&link.stdout)
    );
    conf["prevResult"] = result.clone();
    vpc.plugin("CHECK", "sandbox-a", &pod, &conf).unwrap();
    step(&plugins[0], "CHECK", &result).unwrap();
    // Bandwidth's CHECK looks for the veth peer even without limits.
    let refused = step(&plugins[1], "CHECK", &result).expect_err("bandwidth CHECK needs a veth");
    assert!(
        refused["msg"].as_str().unwrap().contains("veth"),
        "{refused}"
    );
    for plugin in plugins.iter().rev() {
        step(plugin, "DEL", &result)
            .unwrap_or_else(|error| panic!("{} DEL: {error}", plugin["type"]));
    }
    vpc.plugin("DEL", "sandbox-a", &pod, &conf).unwrap();
    assert_eq!(link_names(&pod), "");

    // A pod with bandwidth limits (kubernetes.io/ingress-bandwidth).
    let shaped = vpc.pod("b");
    conf.as_object_mut().unwrap().remove("prevResult");
    let ours = vpc.plugin("ADD", "sandbox-b", &shaped, &conf).unwrap();
    let tuned = reference(
        &plugins[0],
        "ADD",
        "sandbox-b",
        &shaped,
        json!({"prevResult": ours}),
    )
    .unwrap();
    let limits = json!({
        "prevResult": tuned,
        "runtimeConfig": {"bandwidth": {
            "ingressRate": 1_000_000, "ingressBurst": 100_000,
            "egressRate": 1_000_000, "egressBurst": 100_000,
        }},
    });
    let refused = reference(&plugins[1], "ADD", "sandbox-b", &shaped, limits.clone())
        .expect_err("bandwidth cannot shape an ipvlan pod");
    println!("bandwidth with limits on an ipvlan pod: {refused}");
    for plugin in plugins.iter().rev() {
        reference(plugin, "DEL", "sandbox-b", &shaped, limits.clone())
            .unwrap_or_else(|error| panic!("{} DEL: {error}", plugin["type"]));
    }
    vpc.plugin("DEL", "sandbox-b", &shaped, &conf).unwrap();
    assert_eq!(link_names(&shaped), "");
    assert_eq!(vpc.assigned(), vec![]);
    vpc.stop_agent();
}

/// The `p`th percentile (0-100) of `samples`, in milliseconds.
fn percentile(samples: &[Duration], p: usize) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

/// Times `count` ADDs then DELs, one after the other, as `run(command,
/// index)` does them: (ADD latencies, DEL latencies).
fn timed(count: usize, mut run: impl FnMut(&'static str, usize)) -> [Vec<Duration>; 2] {
    ["ADD", "DEL"].map(|command| {
        (0..count)
            .map(|index| {
                let started = Instant::now();
                run(command, index);
                started.elapsed()
            })
            .collect()
    })
}

/// Not a pass/fail on time: prints ADD and DEL latency through the agent
/// (warm pool) next to Debian's reference ipvlan + host-local plugins
/// doing the same in the same VM, and checks both did their work.
#[test]
#[ignore = "needs ipvlan: runs in the VM via scripts/vm-tests"]
fn add_latency_next_to_the_reference_ipvlan_and_host_local_plugins() {
    const PODS: usize = 30;
    let mut vpc = Vpc::new("e2l");
    vpc.start_agent();
    vpc.wait_warm(PODS as u64);
    let pods: Vec<String> = (0..PODS)
        .map(|index| vpc.pod(&format!("p{index}")))
        .collect();
    let mut results = Vec::new();
    let ours = timed(PODS, |command, index| {
        let container = format!("sandbox-{index}");
        match command {
            "ADD" => results.push(vpc.add(&container, &pods[index])),
            _ => {
                vpc.del(&container, &pods[index], Some(&results[index]))
                    .unwrap();
            }
        }
    });
    assert_eq!(vpc.assigned(), vec![]);

    // The reference plugins run inside the node, where their master is.
    let node = Netns::open(netns_path(&vpc.node())).unwrap();
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "reference",
        "type": "ipvlan",
        "master": "eth1",
        "mode": "l2",
        "ipam": {
            "type": "host-local",
            "dataDir": vpc.dir.join("host-local"),
            "ranges": [[{"subnet": "10.50.0.0/24", "rangeStart": "10.50.0.100", "gateway": GATEWAY}]],
            "routes": [{"dst": "0.0.0.0/0"}]
        }
    });
    let reference = |command: &'static str, index: usize| {
        let (pod, conf) = (pods[index].clone(), conf.clone());
        run_blocking_in(&node, move || {
            support::exec_cni(
                Path::new("/usr/lib/cni/ipvlan"),
                command,
                &format!("reference-{index}"),
                &netns_path(&pod),
                &pod,
                &conf,
            )
        })
        .unwrap()
        .unwrap_or_else(|error| panic!("reference {command}: {error}"));
    };
    let theirs = timed(PODS, reference);
    for pod in &pods {
        assert_eq!(link_names(pod), "", "{pod} keeps an interface");
    }

    println!(
        "\n| {PODS} pods, one at a time, in the VM | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms |"
    );
    println!("|---|---|---|---|---|");
    for (what, [adds, dels]) in [
        ("hulk-vpc-cni -> hulk-agent (warm pool, ipvlan l2)", &ours),
        ("reference ipvlan + host-local", &theirs),
    ] {
        println!(
            "| {what} | {:.1} | {:.1} | {:.1} | {:.1} |",
            percentile(adds, 50),
            percentile(adds, 99),
            percentile(dels, 50),
            percentile(dels, 99)
        );
    }
    vpc.stop_agent();
}
