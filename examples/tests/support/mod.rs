//! What the binaries' tests share: a container runtime's exec of the CNI
//! plugin, scratch directories and loopback ports, `ip` and `hulkctl` as a
//! test reads them, and the fake cloud IPAM service.

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The plugin's answer: its result, or its error document.
pub type Outcome = Result<Value, Value>;

/// hulk-vpc's CNI plugin, as cargo built it for these tests.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_hulk-vpc-cni");

/// Runs CNI plugin `plugin` as containerd does: `command` for sandbox
/// `container` in namespace `netns` (pod `pod` of namespace `e2e`),
/// `conf` on stdin.
pub fn exec_cni(
    plugin: &Path,
    command: &str,
    container: &str,
    netns: &Path,
    pod: &str,
    conf: &Value,
) -> Outcome {
    exec_cni_on(plugin, command, container, netns, "eth0", pod, conf)
}

/// [`exec_cni`] for interface `ifname` (`CNI_IFNAME`): a pod's second
/// network, as Multus asks for one.
pub fn exec_cni_on(
    plugin: &Path,
    command: &str,
    container: &str,
    netns: &Path,
    ifname: &str,
    pod: &str,
    conf: &Value,
) -> Outcome {
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e;K8S_POD_NAME={pod}"),
        )
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the plugin starts");
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(conf.to_string().as_bytes())
        .expect("stdin written");
    let output = child.wait_with_output().expect("the plugin finishes");
    let document = if output.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&output.stdout).expect("stdout is one JSON document")
    };
    if output.status.success() {
        Ok(document)
    } else {
        Err(document)
    }
}

/// An empty scratch directory named after `name` (and this process).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hulk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Runs `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What `ip -j` prints for `args` (`["-n", ns, "addr"]`): its JSON, or
/// `None` when `ip` fails (a namespace deleted meanwhile).
pub fn ip_json(args: &[&str]) -> Option<Value> {
    let output = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .expect("ip runs");
    if !output.status.success() {
        return None;
    }
    // `ip -j route` prints nothing at all for an empty table.
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Some(Value::Array(Vec::new()));
    }
    Some(serde_json::from_slice(&output.stdout).expect("ip -j prints JSON"))
}

/// Deletes named network namespace `name` if it exists.
pub fn delete_netns(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// Runs `hulkctl --json` against the rescue socket `socket`: its exit code
/// and its answer (`null` when it printed none, e.g. the agent is down).
pub fn hulkctl(socket: &Path, args: &[&str]) -> (i32, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_hulkctl"))
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .output()
        .expect("hulkctl runs");
    let answer = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output.status.code().unwrap_or(-1), answer)
}

/// Waits until the agent `agent`, started with rescue socket `rescue`, is
/// ready: its sockets are bound first, before it restores the node and
/// replays DELs (requests wait in the backlog meanwhile), so a socket file
/// is no readiness signal; an answer on the rescue socket is. Panics with
/// `log()` when the agent exits or does not answer within `limit`.
pub fn wait_until_ready(
    agent: &mut Child,
    rescue: &Path,
    limit: Duration,
    log: impl Fn() -> String,
) {
    let started = Instant::now();
    while !rescue.exists() {
        if let Some(status) = agent.try_wait().expect("the agent can be waited for") {
            panic!("the agent exited ({status}): {}", log());
        }
        assert!(
            started.elapsed() < limit,
            "the agent did not bind its sockets: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let timeout = limit.saturating_sub(started.elapsed()).as_secs().max(1);
    let (code, answer) = hulkctl(rescue, &["--timeout", &timeout.to_string(), "status"]);
    // 0: ready; 1: answered, with something not ready (e.g. the cloud).
    assert!(
        code == 0 || code == 1,
        "the agent did not answer ({code}): {answer} {}",
        log()
    );
}

/// The `state_file` line of an agent configuration kept in `dir`, for a
/// `[backend]` section's text: empty for the in-process mock, whose leases
/// live in the agent's memory (the agent refuses a state file with it: a
/// restart would hand out again what the file says pods hold).
pub fn state_file_line(dir: &Path, backend: &str) -> String {
    if backend.trim_start().starts_with("type = \"mock\"") {
        String::new()
    } else {
        format!("state_file = \"{}/pool.redb\"", dir.display())
    }
}

/// The bearer token [`UltronFake`] asks for.
pub const ULTRON_TOKEN: &str = "e2e-token";

/// `hulk-ultron-fake` on a free loopback port: a cloud IPAM service that
/// outlives agent restarts, as a cloud does. Killed on drop.
pub struct UltronFake {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl UltronFake {
    /// Serves `subnet`, adding `latency_ms` to every call.
    pub fn start(subnet: &str, latency_ms: u64) -> UltronFake {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_hulk-ultron-fake"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--subnet", subnet])
            .args(["--latency-ms", &latency_ms.to_string()])
            .env("HULK_ULTRON_TOKEN", ULTRON_TOKEN)
            .stderr(Stdio::null())
            .spawn()
            .expect("the fake cloud starts");
        let fake = UltronFake { child, port };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the fake cloud did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        fake
    }

    /// The agent's `[backend]` section for it, its token in `token_file`
    /// (written here).
    pub fn backend(&self, token_file: &Path) -> String {
        std::fs::write(token_file, ULTRON_TOKEN).expect("token written");
        format!(
            "type = \"ultron\"\nurl = \"http://127.0.0.1:{}\"\ntoken_file = \"{}\"\ncluster = \"e2e\"",
            self.port,
            token_file.display()
        )
    }
}

impl UltronFake {
    /// A client of the fake reached at `port` (its own, or a proxy's), as
    /// the cloud's other users are: an operator deleting addresses,
    /// another node allocating.
    pub fn client_at(port: u16) -> hulk_openstack::ultron::UltronBackend {
        let http = hulk_openstack::HttpClient::new(&hulk_openstack::HttpSettings::default())
            .expect("an HTTP client");
        hulk_openstack::ultron::UltronBackend::new(
            http,
            format!("http://127.0.0.1:{port}"),
            ULTRON_TOKEN,
            "e2e",
        )
    }

    /// A client of the fake, see [`UltronFake::client_at`].
    pub fn client(&self) -> hulk_openstack::ultron::UltronBackend {
        UltronFake::client_at(self.port)
    }
}

impl Drop for UltronFake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
