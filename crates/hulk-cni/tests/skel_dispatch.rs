//! The skeleton's contract: exactly one document on stdout, the right error
//! code for every kind of bad input, and no panic on any input.

use std::cell::RefCell;
use std::collections::HashMap;

use hulk_cni::{
    AttachRequest, CheckRequest, CniError, CniResult, DelRequest, ErrorCode, GcRequest, IpConfig,
    NetConf, Outcome, Plugin, dispatch,
};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Records which command reached it; fails on demand.
#[derive(Default)]
struct Recorder {
    calls: RefCell<Vec<String>>,
    fail_with: Option<CniError>,
}

impl Recorder {
    fn answer<T>(&self, call: String, value: T) -> Result<T, CniError> {
        self.calls.borrow_mut().push(call);
        match &self.fail_with {
            Some(error) => Err(error.clone()),
            None => Ok(value),
        }
    }
}

impl Plugin for Recorder {
    async fn add(&self, request: AttachRequest) -> Result<CniResult, CniError> {
        let result = CniResult {
            ips: vec![IpConfig {
                address: "10.0.0.9/24".parse().expect("literal"),
                gateway: Some("10.0.0.1".parse().expect("literal")),
                interface: None,
            }],
            ..CniResult::default()
        };
        self.answer(
            format!("ADD {} {}", request.container_id, request.ifname),
            result,
        )
    }

    async fn del(&self, request: DelRequest) -> Result<(), CniError> {
        self.answer(
            format!("DEL {} netns={:?}", request.container_id, request.netns),
            (),
        )
    }

    async fn check(&self, request: CheckRequest) -> Result<(), CniError> {
        self.answer(format!("CHECK {}", request.prev_result.ips.len()), ())
    }

    async fn status(&self, config: NetConf) -> Result<(), CniError> {
        self.answer(format!("STATUS {}", config.name), ())
    }

    async fn gc(&self, request: GcRequest) -> Result<(), CniError> {
        self.answer(format!("GC {}", request.valid_attachments.len()), ())
    }
}

fn full_env(command: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect()
}

fn run(plugin: &Recorder, env: &HashMap<String, String>, stdin: &[u8]) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(dispatch(plugin, |key| env.get(key).cloned(), stdin))
}

fn config(version: &str) -> Vec<u8> {
    json!({"cniVersion": version, "name": "vpc", "type": "hulk-vpc-cni"})
        .to_string()
        .into_bytes()
}

/// Parses stdout as exactly one JSON document.
fn single_document(outcome: &Outcome) -> Value {
    let mut documents = serde_json::Deserializer::from_slice(&outcome.stdout).into_iter::<Value>();
    let first = documents
        .next()
        .expect("no document on stdout")
        .expect("stdout is not JSON");
    assert!(
        documents.next().is_none(),
        "more than one document on stdout"
    );
    first
}

fn error_code(outcome: &Outcome) -> u64 {
    assert!(!outcome.success, "expected a failure");
    let document = single_document(outcome);
    assert!(
        document["msg"].as_str().is_some_and(|msg| !msg.is_empty()),
        "{document}"
    );
    document["code"].as_u64().expect("error without code")
}

#[test]
fn version_lists_every_supported_version_without_needing_stdin() {
    let plugin = Recorder::default();
    let outcome = run(&plugin, &full_env("VERSION"), b"");
    assert!(outcome.success);
    assert_eq!(
        single_document(&outcome),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn add_answers_in_the_request_version() {
    for (version, carries_ip_version) in [
        ("0.3.0", true),
        ("0.4.0", true),
        ("1.0.0", false),
        ("1.1.0", false),
    ] {
        let plugin = Recorder::default();
        let outcome = run(&plugin, &full_env("ADD"), &config(version));
        assert!(outcome.success, "{version}");
        let document = single_document(&outcome);
        assert_eq!(document["cniVersion"], version);
        assert_eq!(
            document["ips"][0].get("version").is_some(),
            carries_ip_version,
            "{version}"
        );
        assert_eq!(plugin.calls.borrow().as_slice(), ["ADD c1 eth0"]);
    }
}

#[test]
fn del_check_status_and_gc_print_nothing_on_success() {
    let mut env = full_env("DEL");
    env.remove("CNI_NETNS");
    let plugin = Recorder::default();
    let outcome = run(&plugin, &env, &config("1.1.0"));
    assert_eq!(
        outcome,
        Outcome {
            stdout: Vec::new(),
            success: true
        }
    );

    let check_input = json!({
        "cniVersion": "1.0.0", "name": "vpc", "type": "t",
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.9/24"}]}
    });
    let outcome = run(
        &plugin,
        &full_env("CHECK"),
        check_input.to_string().as_bytes(),
    );
    assert!(outcome.success && outcome.stdout.is_empty());

    let gc_input = json!({
        "cniVersion": "1.1.0", "name": "vpc", "type": "t",
        "cni.dev/attachments": [{"containerID": "c1", "ifname": "eth0"}]
    });
    let outcome = run(&plugin, &full_env("GC"), gc_input.to_string().as_bytes());
    assert!(outcome.success && outcome.stdout.is_empty());

    let outcome = run(&plugin, &full_env("STATUS"), &config("1.1.0"));
    assert!(outcome.success && outcome.stdout.is_empty());

    assert_eq!(
        plugin.calls.borrow().as_slice(),
        ["DEL c1 netns=None", "CHECK 1", "GC 1", "STATUS vpc"]
    );
}

#[test]
fn each_kind_of_bad_input_gets_its_spec_code() {
    let mut no_ifname = full_env("ADD");
    no_ifname.remove("CNI_IFNAME");
    let mut bad_ifname = full_env("ADD");
    bad_ifname.insert("CNI_IFNAME".into(), "way-too-long-name0".into());
    let mut no_command = full_env("ADD");
    no_command.remove("CNI_COMMAND");

    type Case = (&'static str, HashMap<String, String>, Vec<u8>, u64);
    let cases: Vec<Case> = vec![
        ("unsupported version", full_env("ADD"), config("0.2.0"), 1),
        (
            "truncated JSON",
            full_env("ADD"),
            b"{\"cniVersion\": \"1.0.0\", \"na".to_vec(),
            6,
        ),
        ("empty stdin", full_env("ADD"), Vec::new(), 6),
        ("binary garbage", full_env("ADD"), vec![0xff, 0xfe, 0x00], 6),
        (
            "missing name",
            full_env("ADD"),
            br#"{"cniVersion":"1.0.0","type":"t"}"#.to_vec(),
            7,
        ),
        (
            "wrong field type",
            full_env("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"t","dns":"x"}"#.to_vec(),
            7,
        ),
        ("missing CNI_IFNAME", no_ifname, config("1.0.0"), 4),
        ("invalid CNI_IFNAME", bad_ifname, config("1.0.0"), 4),
        ("missing CNI_COMMAND", no_command, config("1.0.0"), 4),
        ("CHECK before 0.4.0", full_env("CHECK"), config("0.3.1"), 1),
        (
            "CHECK without prevResult",
            full_env("CHECK"),
            config("1.0.0"),
            7,
        ),
        (
            "STATUS before 1.1.0",
            full_env("STATUS"),
            config("1.0.0"),
            1,
        ),
        ("GC before 1.1.0", full_env("GC"), config("1.0.0"), 1),
    ];
    for (what, env, stdin, code) in cases {
        let plugin = Recorder::default();
        let outcome = run(&plugin, &env, &stdin);
        assert_eq!(error_code(&outcome), code, "{what}");
        assert!(
            plugin.calls.borrow().is_empty(),
            "{what}: the plugin was called"
        );
    }
}

#[test]
fn errors_are_written_in_the_request_version() {
    let mut env = full_env("ADD");
    env.remove("CNI_NETNS");
    let outcome = run(&Recorder::default(), &env, &config("0.4.0"));
    assert_eq!(single_document(&outcome)["cniVersion"], "0.4.0");
}

#[test]
fn plugin_errors_pass_through_with_their_code() {
    let plugin = Recorder {
        fail_with: Some(CniError::new(ErrorCode::Other(102), "subnet full")),
        ..Recorder::default()
    };
    let outcome = run(&plugin, &full_env("ADD"), &config("1.0.0"));
    assert_eq!(error_code(&outcome), 102);
    assert_eq!(single_document(&outcome)["cniVersion"], "1.0.0");

    let unavailable = Recorder {
        fail_with: Some(CniError::new(ErrorCode::PluginNotAvailable, "agent down")),
        ..Recorder::default()
    };
    assert_eq!(
        error_code(&run(&unavailable, &full_env("STATUS"), &config("1.1.0"))),
        50
    );
}

fn arb_command() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        "ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "BOGUS",
    ])
}

proptest! {
    #[test]
    fn random_stdin_never_panics_and_prints_one_document(
        command in arb_command(),
        stdin in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let outcome = run(&Recorder::default(), &full_env(command), &stdin);
        if outcome.success {
            prop_assert!(outcome.stdout.is_empty() || single_document(&outcome).is_object());
        } else {
            let code = error_code(&outcome);
            prop_assert!([1, 4, 6, 7].contains(&code), "unexpected code {}", code);
        }
    }

    #[test]
    fn truncated_configurations_are_decoding_failures(cut in 0usize..200) {
        let full = json!({
            "cniVersion": "1.1.0", "name": "vpc", "type": "hulk-vpc-cni",
            "ipam": {"type": "mock", "subnet": "10.0.0.0/24"},
            "prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.2/24"}]}
        })
        .to_string()
        .into_bytes();
        prop_assume!(cut < full.len());
        let outcome = run(&Recorder::default(), &full_env("ADD"), &full[..cut]);
        prop_assert_eq!(error_code(&outcome), 6);
    }

    #[test]
    fn random_json_objects_never_panic(
        value in proptest::collection::btree_map(
            proptest::sample::select(vec!["cniVersion", "name", "type", "ipam", "dns", "prevResult", "runtimeConfig", "cni.dev/attachments", "x"]),
            prop_oneof![
                Just(json!("1.1.0")), Just(json!("n")), Just(json!(null)), Just(json!(7)),
                Just(json!({"type": "t"})), Just(json!([{"containerID": "c", "ifname": "e"}])),
                Just(json!({"cniVersion": "1.1.0", "ips": [{"address": "bad"}]})),
            ],
            0..8,
        ),
        command in arb_command(),
    ) {
        let stdin = serde_json::to_vec(&value).unwrap();
        let outcome = run(&Recorder::default(), &full_env(command), &stdin);
        if !outcome.success {
            error_code(&outcome);
        }
    }
}
