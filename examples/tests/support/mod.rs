//! What the binaries' tests share: a container runtime's exec of the CNI
//! plugin, scratch directories and loopback ports.

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
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
