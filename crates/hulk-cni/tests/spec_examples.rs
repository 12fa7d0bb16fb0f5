//! Cross-checks the types against the JSON examples of the CNI spec 1.1.0,
//! section 5 (stored in `spec-1.1.0/`).

use hulk_cni::{CniError, CniResult, CniVersion, ErrorCode, NetConf, NetConfList, VersionInfo};
use serde_json::{Value, json};

fn example(name: &str) -> Value {
    let path = format!("{}/tests/spec-1.1.0/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn list() -> NetConfList {
    NetConfList::from_slice(example("config-list.json").to_string().as_bytes())
        .expect("the spec example list is valid")
}

#[test]
fn the_configuration_list_round_trips_unchanged() {
    let list = list();
    assert_eq!(list.plugins.len(), 3);
    assert_eq!(list.plugins[1].capabilities.get("mac"), Some(&true));
    assert_eq!(
        serde_json::to_value(&list).unwrap(),
        example("config-list.json")
    );
    assert_eq!(
        list.negotiate_version(&CniVersion::ALL),
        Some(CniVersion::V1_1_0)
    );
}

#[test]
fn derived_plugin_configurations_match_the_spec() {
    let list = list();
    let capability_args = json!({
        "mac": "00:11:22:33:44:66",
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    });
    let capability_args = capability_args.as_object().unwrap();

    let bridge = list
        .execution_config(0, CniVersion::V1_1_0, capability_args, None)
        .unwrap();
    assert_eq!(
        serde_json::to_value(&bridge).unwrap(),
        example("add-bridge-input.json")
    );

    let tuning_prev = example("add-tuning-input.json")["prevResult"].clone();
    let tuning = list
        .execution_config(1, CniVersion::V1_1_0, capability_args, Some(tuning_prev))
        .unwrap();
    assert_eq!(
        serde_json::to_value(&tuning).unwrap(),
        example("add-tuning-input.json")
    );

    let portmap_prev = example("add-portmap-input.json")["prevResult"].clone();
    let portmap = list
        .execution_config(2, CniVersion::V1_1_0, capability_args, Some(portmap_prev))
        .unwrap();
    assert_eq!(
        serde_json::to_value(&portmap).unwrap(),
        example("add-portmap-input.json")
    );
    assert!(
        list.execution_config(3, CniVersion::V1_1_0, capability_args, None)
            .is_none()
    );
}

#[test]
fn stdin_examples_parse_as_plugin_configurations() {
    for name in [
        "add-bridge-input.json",
        "add-tuning-input.json",
        "add-portmap-input.json",
    ] {
        let value = example(name);
        let conf = NetConf::from_slice(value.to_string().as_bytes()).unwrap();
        assert_eq!(serde_json::to_value(&conf).unwrap(), value, "{name}");
    }
    let tuning =
        NetConf::from_slice(example("add-tuning-input.json").to_string().as_bytes()).unwrap();
    let prev = tuning.prev_result().unwrap().unwrap();
    assert_eq!(
        prev.interfaces[2].sandbox.as_deref(),
        Some("/var/run/netns/blue")
    );
    assert_eq!(prev.ips[0].interface, Some(2));
}

#[test]
fn results_round_trip_and_convert_like_libcni() {
    for name in ["add-ipam-result.json", "add-bridge-result.json"] {
        let value = example(name);
        let (version, result) = CniResult::from_value(value.clone()).unwrap();
        assert_eq!(version, CniVersion::V1_1_0);
        assert_eq!(result.to_value(version), value, "{name}");
    }
    let (_, bridge) = CniResult::from_value(example("add-bridge-result.json")).unwrap();
    let old = bridge.to_value(CniVersion::V0_3_1);
    assert_eq!(old["cniVersion"], "0.3.1");
    assert_eq!(old["ips"][0]["version"], "4");
    assert_eq!(old["ips"][0]["interface"], 2);
}

#[test]
fn gc_example_lists_the_valid_attachments() {
    let conf = NetConf::from_slice(example("gc-input.json").to_string().as_bytes()).unwrap();
    let attachments = conf.gc_attachments().unwrap();
    assert_eq!(attachments.len(), 2);
    assert_eq!(attachments[1].container_id, "123456");
    assert_eq!(attachments[1].ifname, "eth1");
}

#[test]
fn version_and_error_documents_match_the_spec_shape() {
    let info: VersionInfo = serde_json::from_value(example("version-result.json")).unwrap();
    assert_eq!(info, VersionInfo::new(&CniVersion::ALL));
    assert_eq!(
        serde_json::to_value(&info).unwrap(),
        example("version-result.json")
    );

    let error: CniError = serde_json::from_value(example("error-result.json")).unwrap();
    assert_eq!(error.code, ErrorCode::InvalidNetworkConfig);
    assert_eq!(
        serde_json::to_value(&error).unwrap(),
        example("error-result.json")
    );
}
