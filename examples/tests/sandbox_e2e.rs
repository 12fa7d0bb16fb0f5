//! The sandbox as the unit of truth, end to end on the host kernel
//! (macvlan): the real `hulk-agent` in a node namespace of its own (parent
//! `eth1`, a veth), the real `hulk-vpc-cni` exec'd as a runtime does, pods
//! as named namespaces. Each test drives the node the way runtimes and
//! crashes really do (a caller that gave up, a SIGKILLed agent, a lost DEL,
//! a foreign `eth0`, a first network, a DEL naming the wrong namespace) and
//! reads the outcome from the kernel (`ip -j`) and from the agent
//! (`hulkctl --json`). Root; nextest group `netns`.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hulk_netns::NETNS_RUN_DIR;
use serde_json::{Value, json};
use support::{Outcome, UltronFake, delete_netns, ip, ip_json};

/// One node: its namespace (`{tag}-n`, parent `eth1`), the agent's config,
/// sockets, store and logs in a scratch directory, and the pod namespaces
/// the test made. Everything goes on drop; the scratch directory (agent
/// logs) is kept when the test failed.
struct Node {
    tag: &'static str,
    dir: PathBuf,
    config: PathBuf,
    agent: Option<Child>,
    starts: usize,
    pods: BTreeSet<String>,
    /// The first three octets of the VPC subnet (`10.81.0`).
    prefix: &'static str,
}

/// One address the agent has assigned.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Assigned {
    container: String,
    ifname: String,
    address: String,
}

impl Node {
    /// A node whose VPC subnet is `{prefix}.0/24`, its parent's MTU
    /// `parent_mtu`, the agent configured with top-level settings `extra`,
    /// `[pool]` knobs `pool` and `[backend]` `backend(dir)` (`dir`: the
    /// scratch directory, for the backend's files). The agent is not
    /// started.
    fn new(
        tag: &'static str,
        prefix: &'static str,
        parent_mtu: u32,
        extra: &str,
        pool: &str,
        backend: impl FnOnce(&Path) -> String,
    ) -> Node {
        let dir = support::scratch_dir(tag);
        let config = dir.join("agent.toml");
        let backend = backend(&dir);
        std::fs::write(
            &config,
            format!(
                r#"
node_name = "sandbox-node"
socket = "{dir}/agent.sock"
rescue_socket = "{dir}/rescue.sock"
{state_file}
pending_del_dir = "{dir}/pending-dels"
node_netns = "{NETNS_RUN_DIR}/{tag}-n"
{extra}
[network]
parent = "eth1"
kind = "macvlan"
node_address = "{prefix}.250/24"
service_cidrs = ["10.96.0.0/12"]
[default_pool]
network = "vpc"
subnet = "subnet-a"
[pool]
{pool}
[backend]
{backend}
"#,
                dir = dir.display(),
                state_file = support::state_file_line(&dir, &backend),
            ),
        )
        .unwrap();
        let node = Node {
            tag,
            dir,
            config,
            agent: None,
            starts: 0,
            pods: BTreeSet::new(),
            prefix,
        };
        let name = node.node_ns();
        delete_netns(&name);
        ip(&["netns", "add", &name]);
        ip(&[
            "-n",
            &name,
            "link",
            "add",
            "eth1",
            "mtu",
            &parent_mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "eth1-peer",
        ]);
        for link in ["lo", "eth1", "eth1-peer"] {
            ip(&["-n", &name, "link", "set", link, "up"]);
        }
        node
    }

    fn node_ns(&self) -> String {
        format!("{}-n", self.tag)
    }

    fn rescue_socket(&self) -> PathBuf {
        self.dir.join("rescue.sock")
    }

    /// Starts the agent (again), its log in `agent-N.log`, and waits until
    /// both its sockets are served. A SIGKILLed agent leaves its socket
    /// files behind; they are removed first so that only a new agent's
    /// count as up.
    fn start(&mut self) {
        assert!(self.agent.is_none(), "the agent is already running");
        self.starts += 1;
        for socket in ["agent.sock", "rescue.sock"] {
            let _ = std::fs::remove_file(self.dir.join(socket));
        }
        let log = std::fs::File::create(self.log_path(self.starts)).unwrap();
        let mut agent = Command::new(env!("CARGO_BIN_EXE_hulk-agent"))
            .arg("--config")
            .arg(&self.config)
            .stderr(log)
            .spawn()
            .unwrap();
        support::wait_until_ready(
            &mut agent,
            &self.rescue_socket(),
            Duration::from_secs(60),
            || self.log(self.starts),
        );
        self.agent = Some(agent);
    }

    /// SIGKILL: nothing finishes, nothing is cleaned up.
    fn kill(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill().unwrap();
            agent.wait().unwrap();
        }
    }

    fn log_path(&self, start: usize) -> PathBuf {
        self.dir.join(format!("agent-{start}.log"))
    }

    fn log(&self, start: usize) -> String {
        std::fs::read_to_string(self.log_path(start)).unwrap_or_default()
    }

    /// Creates pod namespace `{tag}-{name}`; returns its name.
    fn pod(&mut self, name: &str) -> String {
        let pod = format!("{}-{name}", self.tag);
        delete_netns(&pod);
        ip(&["netns", "add", &pod]);
        self.pods.insert(pod.clone());
        pod
    }

    /// Removes a pod's sandbox as a runtime does once it is done with it.
    fn remove_pod(&mut self, pod: &str) {
        ip(&["netns", "del", pod]);
        self.pods.remove(pod);
    }

    /// The plugin's configuration: this node's agent and DEL-note
    /// directory (the agent's `pending_del_dir`), `timeout` seconds for
    /// the agent.
    fn conf(&self, timeout: u64) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "vpc",
            "type": "hulk-vpc-cni",
            "agentSocket": self.dir.join("agent.sock"),
            "agentTimeoutSeconds": timeout,
            "pendingDelDir": self.dir.join("pending-dels"),
        })
    }

    /// Runs the plugin as a runtime does: `command` for `container`'s
    /// interface `ifname` in pod namespace `pod`.
    fn cni(
        &self,
        command: &str,
        container: &str,
        pod: &str,
        ifname: &str,
        conf: &Value,
    ) -> Outcome {
        support::exec_cni_on(
            Path::new(support::PLUGIN),
            command,
            container,
            &netns_path(pod),
            ifname,
            pod,
            conf,
        )
    }

    /// `hulkctl --json ARGS`, which must succeed.
    fn hulkctl(&self, args: &[&str]) -> Value {
        let (code, answer) = support::hulkctl(&self.rescue_socket(), args);
        assert_eq!(code, 0, "hulkctl {args:?}: {answer}");
        answer
    }

    /// The addresses the agent holds for pods, ordered.
    fn assigned(&self) -> Vec<Assigned> {
        let leases = self.hulkctl(&["leases"]);
        let mut assigned: Vec<Assigned> = leases["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|record| {
                let owner = record["state"].get("Assigned")?;
                Some(Assigned {
                    container: owner["container_id"].as_str().unwrap().to_owned(),
                    ifname: owner["ifname"].as_str().unwrap().to_owned(),
                    address: bare(record["lease"]["address"].as_str().unwrap()),
                })
            })
            .collect();
        assigned.sort();
        assigned
    }

    /// The attachment records, as `hulkctl attachments` lists them.
    fn attachments(&self) -> Vec<Value> {
        self.hulkctl(&["attachments"])["attachments"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Whether `address` is in this node's VPC subnet.
    fn in_vpc(&self, address: &str) -> bool {
        address.starts_with(&format!("{}.", self.prefix))
    }

    /// The /32 routes to pods on the node's host-side slave.
    fn host_routes(&self) -> Vec<String> {
        let routes = ip_json(&["-n", &self.node_ns(), "route", "show", "dev", "hulk0"])
            .unwrap_or_else(|| json!([]));
        routes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|route| route["dst"].as_str())
            .filter(|dst| self.in_vpc(dst) && !dst.contains('/'))
            .map(str::to_owned)
            .collect()
    }

    /// Polls `done` every 100 ms until it holds or `limit` passes; false
    /// on timeout.
    fn wait_until(&self, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let started = Instant::now();
        loop {
            if done() {
                return true;
            }
            if started.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        for pod in std::mem::take(&mut self.pods) {
            delete_netns(&pod);
        }
        delete_netns(&self.node_ns());
        if std::thread::panicking() {
            eprintln!("agent logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn netns_path(pod: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(pod)
}

/// An address without its prefix length.
fn bare(cidr: &str) -> String {
    cidr.split('/').next().unwrap().to_owned()
}

/// The link names in namespace `ns` (`None`: the namespace is gone).
fn links(ns: &str) -> Option<Vec<String>> {
    let links = ip_json(&["-n", ns, "link", "show"])?;
    Some(
        links
            .as_array()
            .unwrap()
            .iter()
            .map(|link| link["ifname"].as_str().unwrap().to_owned())
            .collect(),
    )
}

/// The IPv4 addresses in namespace `ns` other than loopback's, as
/// (interface, address) (`None`: the namespace is gone).
fn addresses(ns: &str) -> Option<Vec<(String, String)>> {
    let links = ip_json(&["-n", ns, "-4", "addr", "show"])?;
    Some(
        links
            .as_array()
            .unwrap()
            .iter()
            .filter(|link| link["ifname"] != "lo")
            .flat_map(|link| {
                let name = link["ifname"].as_str().unwrap().to_owned();
                link["addr_info"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |info| (name.clone(), info["local"].as_str().unwrap().to_owned()))
            })
            .collect(),
    )
}

/// The default routes in namespace `ns` as (device, metric).
fn default_routes(ns: &str) -> Vec<(String, u64)> {
    let routes = ip_json(&["-n", ns, "route", "show", "default"]).unwrap();
    let mut found: Vec<(String, u64)> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|route| {
            (
                route["dev"].as_str().unwrap().to_owned(),
                route["metric"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    found.sort();
    found
}

/// A pool that is warm before the first ADD and hands released addresses
/// out again at once (so a doubled address would show).
const WARM_POOL: &str =
    "min_idle = 4\nmax_idle = 16\nbatch = 4\nwarm_up = 4\nreuse_cooldown_seconds = 0";

/// A node on the in-process mock backend (no restarts: the mock's
/// memory goes with the agent).
fn mock_node(tag: &'static str, prefix: &'static str, parent_mtu: u32) -> Node {
    let backend = format!("type = \"mock\"\nsubnet = \"{prefix}.0/24\"");
    let mut node = Node::new(tag, prefix, parent_mtu, "", WARM_POOL, |_| backend);
    node.start();
    node
}

#[test]
fn an_add_whose_caller_gave_up_leaves_nothing() {
    // An empty pool that nothing fills before the ADD asks (no warm-up, no
    // idle minimum), and a cloud slower than the caller's patience.
    let mut node = Node::new(
        "hk-sb-t",
        "10.81.0",
        1500,
        "",
        "min_idle = 0\nwarm_up = 0\nreuse_cooldown_seconds = 0",
        |_| "type = \"mock\"\nsubnet = \"10.81.0.0/24\"\nlatency_ms = 4000".into(),
    );
    node.start();
    let pod = node.pod("p");
    let conf = node.conf(2);

    let started = Instant::now();
    let error = node.cni("ADD", "slow", &pod, "eth0", &conf).unwrap_err();
    let waited = started.elapsed();
    assert_eq!(error["code"], 11, "{error}");
    let text = error.to_string();
    assert!(
        text.contains("timed out") || text.contains("gave up") || text.contains("timeout"),
        "{error}"
    );
    assert!(waited < Duration::from_secs(3), "ADD took {waited:?}");

    let started = Instant::now();
    node.cni("DEL", "slow", &pod, "eth0", &conf).unwrap();
    let del = started.elapsed();
    assert!(del < Duration::from_secs(1), "DEL took {del:?}");
    println!("ADD answered {error} after {waited:?}; DEL took {del:?}");

    // The cloud answers the abandoned allocation 4 s after it was asked:
    // through then and a while after, the pod stays empty and nobody
    // holds an address.
    let clean_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < clean_until {
        assert_eq!(links(&pod).unwrap(), ["lo"], "the pod got an interface");
        assert_eq!(node.assigned(), [], "an address is assigned");
        assert_eq!(node.attachments(), Vec::<Value>::new(), "a record stayed");
        std::thread::sleep(Duration::from_millis(250));
    }
    // The allocation did land (in the pool, idle), so the window was real.
    let pools = node.hulkctl(&["pools"]);
    assert!(
        pools["pools"][0]["stats"]["idle"].as_u64().unwrap() > 0,
        "the slow allocation never landed: {pools}"
    );
    assert!(node.host_routes().is_empty(), "{:?}", node.host_routes());
}

/// SIGKILLs the agent of a node holding one added pod, then, with the
/// agent down, does `while_down` (the runtime's part) and removes the
/// pod's sandbox; restarts the agent and returns how long the address took
/// to be free again.
fn crash_then_remove_the_sandbox(
    tag: &'static str,
    prefix: &'static str,
    while_down: impl FnOnce(&Node, &str, &Value),
) -> Duration {
    let cloud = UltronFake::start(&format!("{prefix}.0/24"), 0);
    let mut node = Node::new(
        tag,
        prefix,
        1500,
        "gc_interval_seconds = 1",
        WARM_POOL,
        |dir| cloud.backend(&dir.join("token")),
    );
    node.start();
    let pod = node.pod("p");
    let conf = node.conf(10);
    let result = node.cni("ADD", "gone", &pod, "eth0", &conf).unwrap();
    let address = bare(result["ips"][0]["address"].as_str().unwrap());
    assert_eq!(
        node.assigned(),
        [Assigned {
            container: "gone".into(),
            ifname: "eth0".into(),
            address: address.clone()
        }]
    );
    node.kill();
    while_down(&node, &pod, &result);
    node.remove_pod(&pod);
    node.start();
    let started = Instant::now();
    let freed = node.wait_until(Duration::from_secs(10), || node.assigned().is_empty());
    let took = started.elapsed();
    println!("the address was free {took:?} after the restart");
    assert!(
        freed,
        "{address} is still assigned {took:?} after the restart: {:?}\n{}",
        node.assigned(),
        node.log(2)
    );
    assert_eq!(node.attachments(), Vec::<Value>::new());
    assert!(
        !node.host_routes().contains(&address),
        "{:?}",
        node.host_routes()
    );
    // Handed out again, it is the next pod's without trouble.
    let next = node.pod("q");
    node.cni("ADD", "next", &next, "eth0", &conf).unwrap();
    assert_eq!(node.assigned().len(), 1);
    drop(cloud);
    took
}

#[test]
fn without_kubernetes_a_removed_container_never_strands_its_address() {
    let took = crash_then_remove_the_sandbox("hk-sb-d", "10.82.0", |node, pod, result| {
        let mut conf = node.conf(10);
        conf["prevResult"] = result.clone();
        node.cni("DEL", "gone", pod, "eth0", &conf).unwrap();
        assert_eq!(
            links(pod).unwrap(),
            ["lo"],
            "DEL without the agent left eth0"
        );
        let notes: Vec<_> = std::fs::read_dir(node.dir.join("pending-dels"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(notes, ["gone@eth0.json"], "no note for the agent");
    });
    // Replayed before the agent serves: free at the first look.
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[test]
fn without_kubernetes_a_lost_del_never_strands_its_address() {
    // The runtime lost the DEL: only the sandbox's disappearance tells.
    let took = crash_then_remove_the_sandbox("hk-sb-l", "10.83.0", |_, _, _| {});
    // Two liveness passes, one second apart, after the start.
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn a_foreign_eth0_survives_our_del() {
    let mut node = mock_node("hk-sb-f", "10.84.0", 1500);
    let pod = node.pod("p");
    ip(&[
        "-n", &pod, "link", "add", "eth0", "type", "veth", "peer", "name", "theirs",
    ]);
    let conf = node.conf(10);
    let error = node.cni("ADD", "c", &pod, "eth0", &conf).unwrap_err();
    assert_eq!(error["code"], 104, "{error}");
    assert!(error.to_string().contains("already exists"), "{error}");
    node.cni("DEL", "c", &pod, "eth0", &conf).unwrap();
    let mut found = links(&pod).unwrap();
    found.sort();
    assert_eq!(
        found,
        ["eth0", "lo", "theirs"],
        "our DEL removed their veth"
    );
    assert_eq!(node.assigned(), []);
    assert_eq!(node.attachments(), Vec::<Value>::new());
    assert!(node.host_routes().is_empty(), "{:?}", node.host_routes());
}

#[test]
fn a_second_network_keeps_the_first_networks_default_route() {
    let mut node = mock_node("hk-sb-s", "10.85.0", 1500);
    let pod = node.pod("p");
    // The first network: a veth whose peer is in the node namespace, an
    // address and the pod's default route through it.
    ip(&[
        "-n",
        &pod,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "first0",
        "netns",
        &node.node_ns(),
    ]);
    ip(&["-n", &pod, "link", "set", "eth0", "up"]);
    ip(&["-n", &node.node_ns(), "link", "set", "first0", "up"]);
    ip(&["-n", &pod, "addr", "add", "192.168.77.2/24", "dev", "eth0"]);
    ip(&["-n", &pod, "route", "add", "default", "via", "192.168.77.1"]);
    let first = default_routes(&pod);
    assert_eq!(first, [("eth0".to_owned(), 0)]);

    let conf = node.conf(10);
    let result = node.cni("ADD", "c", &pod, "eth1", &conf).unwrap();
    assert_eq!(result["interfaces"][0]["name"], "eth1", "{result}");
    let both = default_routes(&pod);
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(
        both.contains(&first[0]),
        "the first default route changed: {both:?}"
    );
    let ours = both.iter().find(|(dev, _)| dev == "eth1").unwrap();
    assert!(ours.1 > first[0].1, "ours is not below the first: {both:?}");

    node.cni("DEL", "c", &pod, "eth1", &conf).unwrap();
    assert_eq!(default_routes(&pod), first, "DEL changed the first network");
    assert_eq!(node.assigned(), []);

    // Attached again, then the first network leaves: ours stays.
    let again = node.cni("ADD", "c", &pod, "eth1", &conf).unwrap();
    ip(&["-n", &node.node_ns(), "link", "del", "first0"]);
    let left = default_routes(&pod);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, "eth1", "{left:?}");
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = again;
    node.cni("CHECK", "c", &pod, "eth1", &with_prev).unwrap();
    node.cni("DEL", "c", &pod, "eth1", &conf).unwrap();
    assert_eq!(links(&pod).unwrap(), ["lo"]);
    assert_eq!(node.assigned(), []);
}

#[test]
fn an_mtu_above_the_parents_is_clamped() {
    // The mock backend's leases carry MTU 1450 (an overlay VPC's, its
    // `MOCK_MTU`; not configurable), above this parent's 1400.
    let mut node = mock_node("hk-sb-m", "10.86.0", 1400);
    let pod = node.pod("p");
    let result = node.cni("ADD", "c", &pod, "eth0", &node.conf(10)).unwrap();
    assert!(result["ips"][0]["address"].is_string(), "{result}");
    let link = ip_json(&["-n", &pod, "link", "show", "eth0"]).unwrap();
    assert_eq!(link[0]["mtu"], 1400, "{link}");
    let log = node.log(1);
    assert!(
        log.contains("above the parent's") && log.contains("requested=1450"),
        "no warning: {log}"
    );
}

#[test]
fn a_del_naming_another_pods_namespace_touches_nothing_of_it() {
    let mut node = mock_node("hk-sb-x", "10.87.0", 1500);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let conf = node.conf(10);
    let a_address = bare(
        node.cni("ADD", "ca", &a, "eth0", &conf).unwrap()["ips"][0]["address"]
            .as_str()
            .unwrap(),
    );
    let b_address = bare(
        node.cni("ADD", "cb", &b, "eth0", &conf).unwrap()["ips"][0]["address"]
            .as_str()
            .unwrap(),
    );
    let b_before = addresses(&b).unwrap();
    assert_eq!(b_before, [("eth0".to_owned(), b_address.clone())]);

    // Container A's DEL, but with B's namespace.
    node.cni("DEL", "ca", &b, "eth0", &conf).unwrap();
    assert_eq!(addresses(&b).unwrap(), b_before, "B's eth0 was touched");
    assert_eq!(links(&a).unwrap(), ["lo"], "A was not torn down");
    assert_eq!(
        node.assigned(),
        [Assigned {
            container: "cb".into(),
            ifname: "eth0".into(),
            address: b_address.clone()
        }]
    );
    assert_eq!(node.host_routes(), [b_address]);
    assert!(!node.host_routes().contains(&a_address));
}

/// splitmix64: a tiny deterministic generator, so a seed replays a run's
/// choices (the timing of kills is real and does not replay exactly).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`%.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number"))
    })
}

/// What the runtime knows of one pod after the chaos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Its last ADD succeeded.
    Up,
    /// Its last ADD failed.
    Failed,
    /// Its last DEL succeeded.
    Deleted,
}

/// One pod of a round.
#[derive(Debug)]
struct ChaosPod {
    container: String,
    netns: String,
    script: Vec<&'static str>,
}

#[derive(Debug, Default)]
struct ChaosFigures {
    rounds: u64,
    kills: u64,
    kills_mid_request: u64,
    requests: u64,
    add_retries: u64,
}

/// Retries `command` for a pod until it succeeds, as a runtime does, for
/// up to 30 s; the errors seen on the way, or the last one on failure.
fn until_ok(node: &Node, command: &str, pod: &ChaosPod, conf: &Value) -> Result<Value, Vec<Value>> {
    let started = Instant::now();
    let mut errors = Vec::new();
    loop {
        match node.cni(command, &pod.container, &pod.netns, "eth0", conf) {
            Ok(result) => return Ok(result),
            Err(error) => {
                let permanent = !matches!(error["code"].as_u64(), Some(11 | 103));
                errors.push(error);
                if permanent || started.elapsed() > Duration::from_secs(30) {
                    return Err(errors);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The checks after a round: every broken invariant, described.
fn broken_invariants(node: &Node, live: &BTreeMap<String, String>) -> Vec<String> {
    let mut broken = Vec::new();
    let assigned = node.assigned();
    let attachments = node.attachments();
    // (a) no address on two live interfaces; (b) each VPC address in a
    // live sandbox is the one assigned to that sandbox's container; (c) no
    // temporary link left.
    let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (container, netns) in live {
        let Some(found) = addresses(netns) else {
            broken.push(format!("live pod {container}: namespace {netns} is gone"));
            continue;
        };
        for (ifname, address) in found.into_iter().filter(|(_, a)| node.in_vpc(a)) {
            holders
                .entry(address.clone())
                .or_default()
                .push(format!("{netns}/{ifname}"));
            let expected = Assigned {
                container: container.clone(),
                ifname: ifname.clone(),
                address: address.clone(),
            };
            if !assigned.contains(&expected) {
                broken.push(format!(
                    "(b) {netns}/{ifname} holds {address}, not assigned to {container}"
                ));
            }
        }
        let names = links(netns).unwrap_or_default();
        if let Some(temporary) = names.iter().find(|name| name.starts_with("hulk")) {
            broken.push(format!(
                "(c) {netns} still has our temporary link {temporary}"
            ));
        }
        if !names.iter().any(|name| name == "eth0") {
            broken.push(format!("(b) {container} is up but {netns} has no eth0"));
        }
    }
    for (address, on) in &holders {
        if on.len() > 1 {
            broken.push(format!("(a) {address} is on {on:?}"));
        }
    }
    // (b) every assigned address belongs to a live sandbox's attachment.
    for held in &assigned {
        match live.get(&held.container) {
            None => broken.push(format!("(b) {held:?} is assigned to a gone sandbox")),
            Some(netns) => {
                let recorded = attachments.iter().any(|record| {
                    record["owner"]["container_id"] == held.container.as_str()
                        && record["netns"] == netns_path(netns).to_str().unwrap()
                });
                if !recorded {
                    broken.push(format!("(b) {held:?} has no attachment in {netns}"));
                }
            }
        }
    }
    for record in &attachments {
        let container = record["owner"]["container_id"].as_str().unwrap();
        if !live.contains_key(container) {
            broken.push(format!("(b) a record of a gone sandbox stayed: {record}"));
        }
    }
    // (c) the node routes exactly the assigned addresses.
    let routed = node.host_routes();
    for route in &routed {
        if !assigned.iter().any(|held| &held.address == route) {
            broken.push(format!("(c) host route to {route}, which is not assigned"));
        }
    }
    for held in &assigned {
        if !routed.contains(&held.address) {
            broken.push(format!("(c) no host route to {held:?}"));
        }
    }
    broken
}

/// One round: pods, concurrent plugin requests and GCs, a SIGKILL at a
/// random moment, the restart, the runtime's recovery, two GC passes, the
/// invariants; then every pod leaves. Returns the broken invariants.
fn chaos_round(
    node: &mut Node,
    rng: &mut Rng,
    round: u64,
    figures: &mut ChaosFigures,
) -> Vec<String> {
    let conf = node.conf(10);
    let count = 4 + rng.below(3);
    let mut pods: Vec<ChaosPod> = (0..count)
        .map(|index| {
            let mut script = vec!["ADD"];
            if rng.chance(50) {
                script.push("CHECK");
            }
            if rng.chance(40) {
                script.push("DEL");
                if rng.chance(50) {
                    script.push("ADD");
                }
            }
            ChaosPod {
                container: format!("r{round}c{index}"),
                netns: node.pod(&format!("{round}-{index}")),
                script,
            }
        })
        .collect();
    let kill_after = Duration::from_millis(rng.below(401));
    let gc_after = Duration::from_millis(rng.below(301));
    let starts: Vec<Duration> = pods
        .iter()
        .map(|_| Duration::from_millis(rng.below(101)))
        .collect();

    // The chaos: each pod's script in a thread, a GC, and the kill.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let outcomes: Vec<Vec<(&'static str, Outcome)>> = std::thread::scope(|scope| {
        let node = &*node;
        let workers: Vec<_> = pods
            .iter()
            .zip(&starts)
            .map(|(pod, start)| {
                let (conf, in_flight) = (&conf, &in_flight);
                scope.spawn(move || {
                    std::thread::sleep(*start);
                    let mut added: Option<Value> = None;
                    let mut outcomes = Vec::new();
                    for &command in &pod.script {
                        let mut conf = conf.clone();
                        if command == "CHECK" {
                            // A runtime checks what ADD answered, and only that.
                            let Some(result) = &added else { continue };
                            conf["prevResult"] = result.clone();
                        }
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        let outcome = node.cni(command, &pod.container, &pod.netns, "eth0", &conf);
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        if command == "ADD" {
                            added = outcome.as_ref().ok().cloned();
                        }
                        outcomes.push((command, outcome));
                    }
                    outcomes
                })
            })
            .collect();
        scope.spawn(|| {
            std::thread::sleep(gc_after);
            let _ = support::hulkctl(&node.rescue_socket(), &["gc"]);
        });
        std::thread::sleep(kill_after);
        let busy = in_flight.load(Ordering::SeqCst);
        // Only the kill is done from here while the workers run.
        let pid = node.agent.as_ref().unwrap().id();
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        figures.kills += 1;
        if busy > 0 {
            figures.kills_mid_request += 1;
        }
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap())
            .collect()
    });
    node.kill(); // reaps it
    figures.requests += outcomes.iter().map(|o| o.len() as u64).sum::<u64>();
    node.start();

    // What the runtime saw, and what it does about it.
    let mut broken = Vec::new();
    let mut live: BTreeMap<String, String> = BTreeMap::new();
    for (pod, outcome) in pods.iter_mut().zip(&outcomes) {
        let mut seen = Seen::Deleted;
        for (command, result) in outcome {
            // (e) a request the agent could not finish (killed, or down)
            // fails the way the plugin documents it: 103 unreachable or
            // went away, 11 too slow; both tell the runtime to retry.
            if let Err(error) = result
                && !matches!(error["code"].as_u64(), Some(11 | 103))
            {
                broken.push(format!(
                    "(e) {command} of {} failed with {error}",
                    pod.container
                ));
            }
            match (*command, result) {
                ("ADD", Ok(_)) => seen = Seen::Up,
                ("ADD", Err(_)) => seen = Seen::Failed,
                ("DEL", Ok(_)) => seen = Seen::Deleted,
                ("DEL", Err(error)) => {
                    broken.push(format!("DEL of {} failed: {error}", pod.container));
                    seen = Seen::Failed;
                }
                _ => {}
            }
        }
        match seen {
            Seen::Up if rng.chance(20) => {
                let del = until_ok(node, "DEL", pod, &conf);
                if let Err(errors) = del {
                    broken.push(format!(
                        "DEL of {} never succeeded: {errors:?}",
                        pod.container
                    ));
                }
                node.remove_pod(&pod.netns);
            }
            // The runtime lost the DEL (it crashed): only the sandbox
            // leaving tells.
            Seen::Up if rng.chance(10) => node.remove_pod(&pod.netns),
            Seen::Up => {
                live.insert(pod.container.clone(), pod.netns.clone());
            }
            Seen::Deleted => node.remove_pod(&pod.netns),
            Seen::Failed => {
                // 0: ADD again without DEL; 1: DEL then ADD (containerd's
                // way); 2: DEL and remove the sandbox.
                let choice = rng.below(3);
                if choice > 0
                    && let Err(errors) = until_ok(node, "DEL", pod, &conf)
                {
                    broken.push(format!(
                        "DEL of {} never succeeded: {errors:?}",
                        pod.container
                    ));
                }
                if choice == 2 {
                    node.remove_pod(&pod.netns);
                    continue;
                }
                figures.add_retries += 1;
                let how = if choice == 0 {
                    "without DEL"
                } else {
                    "after DEL"
                };
                match until_ok(node, "ADD", pod, &conf) {
                    Ok(_) => {
                        live.insert(pod.container.clone(), pod.netns.clone());
                    }
                    Err(errors) => {
                        // (d) the runtime's retry must get the pod up.
                        let record: Vec<Value> = node
                            .attachments()
                            .into_iter()
                            .filter(|record| {
                                record["owner"]["container_id"] == pod.container.as_str()
                            })
                            .collect();
                        broken.push(format!(
                            "(d) retried ADD of {} ({how}) never succeeded: {errors:?}; its record: {record:?}; {} holds {:?}",
                            pod.container,
                            pod.netns,
                            addresses(&pod.netns)
                        ));
                        // The runtime gives up on the sandbox.
                        let _ = until_ok(node, "DEL", pod, &conf);
                        node.remove_pod(&pod.netns);
                    }
                }
            }
        }
    }
    // Two passes: a sandbox is judged gone on two in a row.
    for _ in 0..2 {
        node.hulkctl(&["gc"]);
    }
    broken.extend(broken_invariants(node, &live));
    if !broken.is_empty() {
        // One line per pod, lease and record: the evidence of the round.
        eprintln!("round {round}: killed after {kill_after:?}");
        for (pod, outcome) in pods.iter().zip(&outcomes) {
            eprintln!("  {} {:?}: {outcome:?}", pod.container, pod.script);
        }
        for held in node.assigned() {
            eprintln!("  lease {held:?}");
        }
        for record in node.attachments() {
            eprintln!("  record {record}");
        }
        for netns in live.values() {
            eprintln!("  {netns}: {:?} {:?}", links(netns), addresses(netns));
        }
    }

    // Everyone leaves: nothing may stay behind.
    for (container, netns) in &live {
        let pod = ChaosPod {
            container: container.clone(),
            netns: netns.clone(),
            script: Vec::new(),
        };
        if let Err(errors) = until_ok(node, "DEL", &pod, &conf) {
            broken.push(format!("DEL of {container} never succeeded: {errors:?}"));
        }
        node.remove_pod(netns);
    }
    if !node.assigned().is_empty() || !node.attachments().is_empty() {
        broken.push(format!(
            "after every pod left: leases {:?}, attachments {:?}",
            node.assigned(),
            node.attachments()
        ));
    }
    figures.rounds += 1;
    broken
}

#[test]
fn sigkill_at_random_points_never_doubles_or_strands_an_address() {
    let seed = env_number("HULK_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let rounds = env_number("HULK_CHAOS_ROUNDS").unwrap_or(30);
    println!("HULK_CHAOS_SEED={seed} HULK_CHAOS_ROUNDS={rounds}");
    // A cloud that outlives the agent and answers slowly enough that kills
    // land inside backend calls too.
    let cloud = UltronFake::start("10.88.0.0/24", 30);
    let mut node = Node::new(
        "hk-sb-k",
        "10.88.0",
        1500,
        "gc_interval_seconds = 1",
        WARM_POOL,
        |dir| cloud.backend(&dir.join("token")),
    );
    node.start();
    let mut rng = Rng(seed);
    let mut figures = ChaosFigures::default();
    let started = Instant::now();
    for round in 0..rounds {
        let broken = chaos_round(&mut node, &mut rng, round, &mut figures);
        assert!(
            broken.is_empty(),
            "HULK_CHAOS_SEED={seed}, round {round}: {broken:#?}\n(agent logs in {})",
            node.dir.display()
        );
    }
    println!(
        "{} rounds, {} kills ({} with a request in flight), {} requests, {} retried ADDs, in {:?}",
        figures.rounds,
        figures.kills,
        figures.kills_mid_request,
        figures.requests,
        figures.add_retries,
        started.elapsed()
    );
    drop(cloud);
}

/// The state file is lost while the agent is down, and one pod's sandbox
/// dies meanwhile (a replacement node sees only dead ones). The restarted
/// agent adopts both pods' addresses from the cloud's holder marks, with
/// no attachment record: the one a live interface holds keeps its host
/// route, the dead one is not routed and goes back after two GC passes.
#[test]
fn after_a_lost_state_file_only_addresses_a_live_interface_holds_are_kept_and_routed() {
    let cloud = UltronFake::start("10.89.0.0/24", 0);
    let mut node = Node::new(
        "hk-sb-u",
        "10.89.0",
        1500,
        "gc_interval_seconds = 1",
        WARM_POOL,
        |dir| cloud.backend(&dir.join("token")),
    );
    node.start();
    let conf = node.conf(10);
    let (live, dead) = (node.pod("live"), node.pod("dead"));
    let mut added = Vec::new();
    for (container, pod) in [("live", &live), ("dead", &dead)] {
        let result = node.cni("ADD", container, pod, "eth0", &conf).unwrap();
        added.push(bare(result["ips"][0]["address"].as_str().unwrap()));
    }
    let (live_address, dead_address) = (added[0].clone(), added[1].clone());
    // A clean stop: the owner marks' last pass tells the cloud both holders.
    let mut agent = node.agent.take().unwrap();
    Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    assert!(agent.wait().unwrap().success(), "{}", node.log(1));
    std::fs::remove_file(node.dir.join("pool.redb")).unwrap();
    node.remove_pod(&dead);

    node.start();
    let held: Vec<String> = node
        .assigned()
        .into_iter()
        .map(|assigned| assigned.address)
        .collect();
    assert_eq!(held.len(), 2, "both adopted from the marks: {held:?}");
    assert_eq!(
        node.attachments(),
        Vec::<Value>::new(),
        "no record of either"
    );
    assert_eq!(
        node.host_routes(),
        std::slice::from_ref(&live_address),
        "routed only to the live pod\n{}",
        node.log(2)
    );
    let started = Instant::now();
    let freed = node.wait_until(Duration::from_secs(10), || node.assigned().len() == 1);
    println!(
        "the dead pod's address was free {:?} after the restart",
        started.elapsed()
    );
    assert!(freed, "{:?}\n{}", node.assigned(), node.log(2));
    assert_eq!(node.assigned()[0].container, "live");
    assert_eq!(node.host_routes(), std::slice::from_ref(&live_address));
    assert!(
        addresses(&live)
            .unwrap()
            .iter()
            .any(|(_, address)| *address == live_address),
        "the live pod keeps its address"
    );
    assert!(
        node.log(2).contains("held by a live interface"),
        "the kept address is logged with its namespace"
    );
    assert_ne!(live_address, dead_address);
    drop(cloud);
}
