//! Drives the plugin binary exactly as a container runtime does: exec with
//! the CNI environment and the configuration on stdin.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use hulk_agent_api::del_notes::DelNotes;
use serde_json::{Value, json};

struct Answer {
    success: bool,
    stdout: Value,
}

fn invoke(command: &str, config: &Value, extra_env: &[(&str, &str)]) -> Answer {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hulk-vpc-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "sandbox-1")
        .env("CNI_NETNS", "/var/run/netns/sandbox-1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0")
        .env("CNI_PATH", "/opt/cni/bin")
        .envs(extra_env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plugin starts");
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(config.to_string().as_bytes())
        .expect("stdin written");
    let output = child.wait_with_output().expect("plugin finishes");
    let stdout = if output.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&output.stdout).expect("stdout is one JSON document")
    };
    Answer {
        success: output.status.success(),
        stdout,
    }
}

fn config(version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "vpc",
        "type": "hulk-vpc-cni",
        "dryRun": true,
        "ipam": {"type": "mock", "subnet": "10.20.0.0/24"},
        "dns": {"nameservers": ["10.20.0.10"]}
    })
}

#[test]
fn version_lists_every_spec_version() {
    let answer = invoke("VERSION", &json!({"cniVersion": "1.1.0"}), &[]);
    assert!(answer.success);
    assert_eq!(
        answer.stdout["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn dry_add_reports_the_mock_lease_in_the_request_version() {
    let answer = invoke("ADD", &config("1.1.0"), &[]);
    assert!(answer.success, "{}", answer.stdout);
    assert_eq!(
        answer.stdout,
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [{
                "name": "eth0", "mac": "fa:16:3e:14:00:02", "mtu": 1450,
                "sandbox": "/var/run/netns/sandbox-1"
            }],
            "ips": [{"address": "10.20.0.2/24", "gateway": "10.20.0.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.20.0.1"}],
            "dns": {"nameservers": ["10.20.0.10"]}
        })
    );

    let old = invoke("ADD", &config("0.3.1"), &[]);
    assert_eq!(old.stdout["ips"][0]["version"], "4");
    assert!(old.stdout["interfaces"][0].get("mtu").is_none());
}

#[test]
fn del_check_status_and_gc_succeed_silently() {
    let added = invoke("ADD", &config("1.1.0"), &[]);
    let mut with_prev = config("1.1.0");
    with_prev["prevResult"] = added.stdout;
    for command in ["CHECK", "DEL"] {
        let answer = invoke(command, &with_prev, &[]);
        assert!(
            answer.success && answer.stdout.is_null(),
            "{command}: {}",
            answer.stdout
        );
    }
    let mut gc = config("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "sandbox-1", "ifname": "eth0"}]);
    assert!(invoke("GC", &gc, &[]).success);
    assert!(invoke("STATUS", &config("1.1.0"), &[]).success);
}

#[test]
fn check_reports_an_address_outside_the_subnet() {
    let mut conf = config("1.0.0");
    conf["prevResult"] = json!({"cniVersion": "1.0.0", "ips": [{"address": "192.0.2.9/24"}]});
    let answer = invoke("CHECK", &conf, &[]);
    assert!(!answer.success);
    assert_eq!(answer.stdout["code"], 7);
}

#[test]
fn bad_settings_get_spec_error_codes() {
    let mut bad_mode = config("1.0.0");
    bad_mode["mode"] = json!("l4");
    let mut bad_ipam = config("1.0.0");
    bad_ipam["ipam"] = json!({"type": "dhcp"});
    let mut bad_subnet = config("1.0.0");
    bad_subnet["ipam"]["subnet"] = json!("10.20.0.0/99");
    let mut not_dry = config("1.0.0");
    not_dry["dryRun"] = json!(false);
    not_dry["agentSocket"] = json!("/nonexistent/agent.sock");
    let cases = [
        (bad_mode, 2, "mode=l4"),
        (bad_ipam, 2, "ipam.type=dhcp"),
        (bad_subnet, 7, "invalid mock ipam section"),
        (
            not_dry,
            103,
            "agent at /nonexistent/agent.sock is unreachable",
        ),
    ];
    for (conf, code, message) in cases {
        let answer = invoke("ADD", &conf, &[]);
        assert!(!answer.success);
        assert_eq!(answer.stdout["code"], code, "{}", answer.stdout);
        let msg = answer.stdout["msg"].as_str().unwrap();
        assert!(msg.contains(message), "{msg}");
    }
}

#[test]
fn a_missing_environment_variable_is_code_4() {
    let answer = invoke("ADD", &config("1.0.0"), &[("CNI_NETNS", "")]);
    assert!(!answer.success);
    assert_eq!(answer.stdout["code"], 4);
    assert_eq!(answer.stdout["cniVersion"], "1.0.0");
}

#[test]
fn logs_go_to_the_configured_file_not_stdout() {
    let log = std::env::temp_dir().join(format!("hulk-vpc-cni-test-{}.log", std::process::id()));
    let mut conf = config("1.1.0");
    conf["logFile"] = json!(log.display().to_string());
    conf["logLevel"] = json!("info");
    let answer = invoke("ADD", &conf, &[]);
    assert!(answer.success);
    let logged = std::fs::read_to_string(&log).expect("log file written");
    std::fs::remove_file(&log).expect("log file removed");
    assert!(logged.contains("dry-run ADD"), "{logged}");
    assert!(logged.contains("10.20.0.2/24"), "{logged}");
}

#[test]
fn a_log_file_that_is_stdout_is_refused() {
    // stdout carries the one result document; a log line there corrupts it.
    for stdout in ["/dev/stdout", "/proc/self/fd/1"] {
        let mut conf = config("1.1.0");
        conf["logFile"] = json!(stdout);
        conf["logLevel"] = json!("info");
        let answer = invoke("ADD", &conf, &[]);
        assert!(!answer.success, "{stdout}");
        assert_eq!(answer.stdout["code"], 7, "{}", answer.stdout);
        let msg = answer.stdout["msg"].as_str().unwrap();
        assert!(msg.contains("stdout"), "{msg}");
    }
}

/// A configuration that talks to an agent at `dir/agent.sock`, waits 1 s
/// for it, and leaves DEL notes in `dir/pending-dels`.
fn agent_config(dir: &Path) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "vpc",
        "type": "hulk-vpc-cni",
        "agentSocket": dir.join("agent.sock"),
        "agentTimeoutSeconds": 1,
        "pendingDelDir": dir.join("pending-dels")
    })
}

/// A fake agent on `socket` that accepts one connection, reads the request
/// line and never answers. The request and the connection (kept open, so
/// that the plugin waits) come back through the receiver.
fn silent_agent(socket: &Path) -> mpsc::Receiver<(Value, UnixStream)> {
    let listener = UnixListener::bind(socket).expect("fake agent socket");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("the plugin connects");
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .expect("the request line");
        let request = serde_json::from_str(&line).expect("the request is JSON");
        let _ = sender.send((request, stream));
    });
    receiver
}

/// The one note in `dir`, as the agent will read it.
fn the_one_note(dir: &Path) -> hulk_node::PodRequest {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the note directory exists")
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let mut notes = DelNotes::new(dir).list().expect("the notes list");
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].path, files[0]);
    notes.remove(0).request
}

#[test]
fn del_without_an_agent_succeeds_and_leaves_a_note_for_it() {
    let dir = support::scratch_dir("cni-del-note");
    let answer = invoke("DEL", &agent_config(&dir), &[]);
    assert!(
        answer.success && answer.stdout.is_null(),
        "{}",
        answer.stdout
    );
    let noted = the_one_note(&dir.join("pending-dels"));
    assert_eq!(noted.owner.container_id, "sandbox-1");
    assert_eq!(noted.owner.ifname, "eth0");
    assert_eq!(noted.owner.cni_network.as_deref(), Some("vpc"));
    assert_eq!(
        noted.netns.as_deref(),
        Some(Path::new("/var/run/netns/sandbox-1"))
    );
    assert_eq!(noted.owner.pod.as_deref(), Some("default/web-0"));
}

#[test]
fn del_against_a_silent_agent_leaves_a_note_too() {
    let dir = support::scratch_dir("cni-del-silent");
    let requests = silent_agent(&dir.join("agent.sock"));
    let answer = invoke("DEL", &agent_config(&dir), &[]);
    assert!(answer.success, "{}", answer.stdout);
    let (request, _connection) = requests
        .recv_timeout(Duration::from_secs(5))
        .expect("the agent got the DEL");
    assert_eq!(request["op"], "del");
    assert_eq!(request["timeout_ms"], 1000);
    assert_eq!(
        the_one_note(&dir.join("pending-dels")).owner.container_id,
        "sandbox-1"
    );
}

#[test]
fn del_fails_when_the_note_cannot_be_written() {
    let dir = support::scratch_dir("cni-del-unwritable");
    let file = dir.join("a-file");
    std::fs::write(&file, "").expect("a regular file");
    let mut conf = agent_config(&dir);
    conf["pendingDelDir"] = json!(file.join("pending-dels"));
    let answer = invoke("DEL", &conf, &[]);
    assert!(!answer.success, "DEL succeeded without its note");
    assert_eq!(answer.stdout["code"], 106, "{}", answer.stdout);
    let msg = answer.stdout["msg"].as_str().expect("a message");
    assert!(msg.contains("a-file/pending-dels"), "{msg}");
    let details = answer.stdout["details"].as_str().expect("details");
    assert!(details.contains("Not a directory"), "{details}");
}

#[test]
fn add_against_a_silent_agent_is_11_and_tells_the_agent_its_timeout() {
    let dir = support::scratch_dir("cni-add-silent");
    let socket = dir.join("agent.sock");
    let requests = silent_agent(&socket);
    let answer = invoke("ADD", &agent_config(&dir), &[]);
    assert!(!answer.success);
    assert_eq!(answer.stdout["code"], 11, "{}", answer.stdout);
    let msg = answer.stdout["msg"].as_str().expect("a message");
    assert!(msg.contains("timed out after 1s"), "{msg}");
    assert!(msg.contains(&socket.display().to_string()), "{msg}");
    let (request, _connection) = requests
        .recv_timeout(Duration::from_secs(5))
        .expect("the agent got the ADD");
    assert_eq!(request["op"], "add");
    assert_eq!(request["container_id"], "sandbox-1");
    assert_eq!(request["timeout_ms"], 1000);
}

#[test]
fn add_without_an_agent_is_103_with_the_cause() {
    let dir = support::scratch_dir("cni-add-unreachable");
    // No socket at all, then a socket file nobody listens on.
    let refused = dir.join("refused.sock");
    drop(UnixListener::bind(&refused).expect("a socket file"));
    let cases = [
        (dir.join("agent.sock"), "No such file or directory"),
        (refused, "Connection refused"),
    ];
    for (socket, cause) in cases {
        let mut conf = agent_config(&dir);
        conf["agentSocket"] = json!(socket);
        let answer = invoke("ADD", &conf, &[]);
        assert!(!answer.success);
        assert_eq!(answer.stdout["code"], 103, "{}", answer.stdout);
        let msg = answer.stdout["msg"].as_str().expect("a message");
        assert!(msg.contains("is unreachable"), "{msg}");
        assert!(msg.contains(cause), "{msg}");
        let details = answer.stdout["details"].as_str().expect("details");
        assert!(details.contains(&socket.display().to_string()), "{details}");
    }
}
