//! Drives the plugin binary exactly as a container runtime does: exec with
//! the CNI environment and the configuration on stdin.

use std::io::Write;
use std::process::{Command, Stdio};

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
