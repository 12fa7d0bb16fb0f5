//! Network configurations: the list an administrator writes and the
//! single-plugin configuration a plugin reads on stdin.
//!
//! Fields the spec does not define are kept in `plugin` maps, never dropped,
//! so a configuration read and written again is unchanged.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::CniError;
use crate::result::{CniResult, Dns};
use crate::version::CniVersion;

/// The `ipam` section: the IPAM type and its own fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpamConf {
    /// The IPAM plugin (or, for hulk-vpc, backend) type.
    #[serde(rename = "type")]
    pub ipam_type: String,
    /// Every other field of the section.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// A container attachment named in a GC request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    /// The container ID given on ADD.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name given on ADD.
    pub ifname: String,
}

/// The configuration one plugin receives on stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The spec version of this configuration and of the answer.
    pub cni_version: CniVersion,
    /// The network name.
    pub name: String,
    /// The plugin's own object: type, capabilities, ipam, dns and its fields.
    #[serde(flatten)]
    pub plugin: PluginConf,
    /// Free-form arguments from the runtime (e.g. labels); plugins may ignore them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Capability arguments from the runtime (`mac`, `ips`, `bandwidth`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<Map<String, Value>>,
    /// The previous plugin's result (chained ADD) or the cached ADD result (DEL, CHECK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// Copied from the list: the runtime does not call CHECK.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disable_check: bool,
    /// Copied from the list: the runtime does not call GC.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disable_gc: bool,
    /// GC: the attachments that are still valid (spec 1.1.0 name).
    #[serde(
        default,
        rename = "cni.dev/valid-attachments",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// GC: the same list under the key libcni also sends.
    #[serde(
        default,
        rename = "cni.dev/attachments",
        skip_serializing_if = "Option::is_none"
    )]
    pub attachments: Option<Vec<Attachment>>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Checks a network name as the spec requires: an alphanumeric first
/// character, then alphanumerics, `_`, `.` or `-`.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if crate::env::is_spec_identifier(name) {
        Ok(())
    } else {
        Err(CniError::invalid_config(format!(
            "invalid network name {name:?}: it must start with a letter or digit and hold only letters, digits, '_', '.' or '-'"
        )))
    }
}

impl NetConf {
    /// Reads a configuration from JSON, with error codes as the spec wants:
    /// 6 for malformed JSON, 1 for an unsupported version, 7 for anything else wrong.
    pub fn from_slice(bytes: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(bytes).map_err(decode_error)?;
        NetConf::from_value(value)
    }

    /// Reads a configuration from an already parsed JSON value.
    pub fn from_value(value: Value) -> Result<NetConf, CniError> {
        let version = declared_version(&value)?;
        let conf: NetConf = serde_json::from_value(value).map_err(|error| {
            CniError::invalid_config(format!("invalid network configuration: {error}"))
                .in_version(version)
        })?;
        validate_network_name(&conf.name).map_err(|error| error.in_version(version))?;
        Ok(conf)
    }

    /// Deserializes the plugin-specific fields into the plugin's own type;
    /// a field of the wrong shape is error 7, naming the field.
    pub fn plugin_config<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        serde_json::from_value(Value::Object(self.plugin.fields.clone())).map_err(|error| {
            CniError::invalid_config(format!(
                "invalid {} configuration: {error}",
                self.plugin.plugin_type
            ))
            .in_version(self.cni_version)
        })
    }

    /// The GC request's valid attachments, from whichever key the runtime used.
    pub fn gc_attachments(&self) -> Option<&[Attachment]> {
        self.valid_attachments
            .as_deref()
            .or(self.attachments.as_deref())
    }

    /// Decodes `prevResult`; a result without `cniVersion` is read in the
    /// configuration's version.
    pub fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        let Some(value) = &self.prev_result else {
            return Ok(None);
        };
        let mut value = value.clone();
        if let Value::Object(fields) = &mut value {
            fields
                .entry("cniVersion")
                .or_insert_with(|| Value::String(self.cni_version.as_str().to_owned()));
        }
        CniResult::from_value(value)
            .map(|(_, result)| Some(result))
            .map_err(|error| {
                CniError::invalid_config(format!("invalid prevResult: {error}"))
                    .in_version(self.cni_version)
            })
    }
}

/// Maps a JSON parse failure to code 6 (malformed) or 7 (well-formed but wrong).
pub(crate) fn decode_error(error: serde_json::Error) -> CniError {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => CniError::new(
            crate::error::ErrorCode::DecodingFailure,
            format!("network configuration is not valid JSON: {error}"),
        ),
        Category::Data => {
            CniError::invalid_config(format!("invalid network configuration: {error}"))
        }
    }
}

/// The `cniVersion` a document declares: 7 when missing or not a string, 1 when unsupported.
pub(crate) fn declared_version(value: &Value) -> Result<CniVersion, CniError> {
    let Some(object) = value.as_object() else {
        return Err(CniError::invalid_config(
            "network configuration must be a JSON object",
        ));
    };
    match object.get("cniVersion") {
        None => Err(CniError::invalid_config(
            "network configuration has no cniVersion",
        )),
        Some(Value::String(text)) => text.parse().map_err(|error| {
            CniError::new(
                crate::error::ErrorCode::IncompatibleVersion,
                format!("{error}"),
            )
        }),
        Some(other) => Err(CniError::invalid_config(format!(
            "cniVersion must be a string, found {other}"
        ))),
    }
}

/// One plugin's object, as in a configuration list's `plugins` and as the
/// plugin-specific part of [`NetConf`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginConf {
    /// The plugin type (the executable's name).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Capabilities whose runtime arguments this plugin wants in `runtimeConfig`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capabilities: BTreeMap<String, bool>,
    /// The IPAM section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamConf>,
    /// DNS settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// Plugin-specific fields, kept as given.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// A network configuration list, as written in `/etc/cni/net.d/*.conflist`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConfList {
    /// The list's spec version.
    pub cni_version: CniVersion,
    /// Versions the list is valid for (1.1.0); unknown ones are kept as text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cni_versions: Vec<String>,
    /// The network name.
    pub name: String,
    /// The runtime must not call CHECK.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disable_check: bool,
    /// The runtime must not call GC.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disable_gc: bool,
    /// The plugins, in ADD order.
    pub plugins: Vec<PluginConf>,
}

impl NetConfList {
    /// Reads and validates a list: a valid name and at least one plugin.
    pub fn from_slice(bytes: &[u8]) -> Result<NetConfList, CniError> {
        let value: Value = serde_json::from_slice(bytes).map_err(decode_error)?;
        declared_version(&value)?;
        let list: NetConfList = serde_json::from_value(value).map_err(|error| {
            CniError::invalid_config(format!("invalid configuration list: {error}"))
        })?;
        validate_network_name(&list.name)?;
        if list.plugins.is_empty() {
            return Err(CniError::invalid_config(
                "configuration list has no plugins",
            ));
        }
        Ok(list)
    }

    /// The version a runtime supporting `supported` would use: the highest
    /// of `cniVersions` it supports, or `cniVersion` when that list is absent.
    pub fn negotiate_version(&self, supported: &[CniVersion]) -> Option<CniVersion> {
        if self.cni_versions.is_empty() {
            return supported
                .contains(&self.cni_version)
                .then_some(self.cni_version);
        }
        self.cni_versions
            .iter()
            .filter_map(|text| text.parse::<CniVersion>().ok())
            .filter(|version| supported.contains(version))
            .max()
    }

    /// The configuration plugin `index` receives, derived as the spec's
    /// section 3 says: the plugin object plus `name`, `cniVersion` and the
    /// list's flags, with `runtimeConfig` holding only the capability
    /// arguments the plugin declared.
    pub fn execution_config(
        &self,
        index: usize,
        version: CniVersion,
        capability_args: &Map<String, Value>,
        prev_result: Option<Value>,
    ) -> Option<NetConf> {
        let plugin = self.plugins.get(index)?;
        let runtime_config: Map<String, Value> = capability_args
            .iter()
            .filter(|(key, _)| plugin.capabilities.get(*key).copied().unwrap_or(false))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        Some(NetConf {
            cni_version: version,
            name: self.name.clone(),
            plugin: PluginConf {
                capabilities: BTreeMap::new(),
                ..plugin.clone()
            },
            args: None,
            runtime_config: (!runtime_config.is_empty()).then_some(runtime_config),
            prev_result,
            disable_check: false,
            disable_gc: false,
            valid_attachments: None,
            attachments: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use serde_json::json;

    fn conf(value: Value) -> Result<NetConf, CniError> {
        NetConf::from_slice(value.to_string().as_bytes())
    }

    #[test]
    fn keeps_plugin_specific_fields() {
        let conf = conf(json!({
            "cniVersion": "1.0.0", "name": "vpc", "type": "hulk-vpc-cni",
            "master": "eth1", "mode": "l2", "serviceCidrs": ["10.96.0.0/12"]
        }))
        .unwrap();
        assert_eq!(conf.plugin.fields["master"], "eth1");
        let again = serde_json::to_value(&conf).unwrap();
        assert_eq!(again["serviceCidrs"][0], "10.96.0.0/12");
    }

    #[test]
    fn error_codes_follow_the_kind_of_mistake() {
        let cases = [
            (json!({"name": "n", "type": "t"}), 7),
            (json!({"cniVersion": 1, "name": "n", "type": "t"}), 7),
            (json!({"cniVersion": "0.2.0", "name": "n", "type": "t"}), 1),
            (json!({"cniVersion": "1.0.0", "name": "n"}), 7),
            (
                json!({"cniVersion": "1.0.0", "name": "-bad", "type": "t"}),
                7,
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "ipam": 3}),
                7,
            ),
            (json!(["not", "an", "object"]), 7),
        ];
        for (input, code) in cases {
            let error = conf(input.clone()).unwrap_err();
            assert_eq!(error.code.as_u32(), code, "{input} gave {error}");
        }
        let error = NetConf::from_slice(b"{\"cniVersion\": ").unwrap_err();
        assert_eq!(error.code, ErrorCode::DecodingFailure);
    }

    #[test]
    fn errors_after_the_version_is_known_carry_it() {
        let error = conf(json!({"cniVersion": "0.4.0", "name": "n"})).unwrap_err();
        assert_eq!(error.cni_version, CniVersion::V0_4_0);
    }

    #[test]
    fn gc_accepts_both_attachment_keys() {
        let attachment = json!([{"containerID": "c1", "ifname": "eth0"}]);
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let mut input = json!({"cniVersion": "1.1.0", "name": "n", "type": "t"});
            input[key] = attachment.clone();
            let conf = conf(input).unwrap();
            let found = conf.gc_attachments().unwrap();
            assert_eq!(found[0].container_id, "c1");
            assert!(
                !conf.plugin.fields.contains_key(key),
                "{key} leaked into plugin fields"
            );
        }
    }

    #[test]
    fn prev_result_without_version_uses_the_config_version() {
        let conf = conf(json!({
            "cniVersion": "0.4.0", "name": "n", "type": "t",
            "prevResult": {"ips": [{"version": "4", "address": "10.0.0.2/24"}]}
        }))
        .unwrap();
        let prev = conf.prev_result().unwrap().unwrap();
        assert_eq!(prev.ips[0].address.to_string(), "10.0.0.2/24");
    }

    #[test]
    fn typed_plugin_config_names_the_bad_field() {
        #[derive(Debug, Deserialize)]
        struct Mine {
            #[allow(dead_code)]
            mtu: u32,
        }
        let conf =
            conf(json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "mtu": "big"})).unwrap();
        let error = conf.plugin_config::<Mine>().unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidNetworkConfig);
        assert!(error.msg.contains("invalid type"), "{}", error.msg);
    }

    #[test]
    fn negotiates_the_highest_common_version() {
        let list = NetConfList::from_slice(
            json!({
                "cniVersion": "1.0.0", "cniVersions": ["0.3.1", "1.1.0", "9.9.9"],
                "name": "n", "plugins": [{"type": "t"}]
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            list.negotiate_version(&CniVersion::ALL),
            Some(CniVersion::V1_1_0)
        );
        assert_eq!(
            list.negotiate_version(&[CniVersion::V0_3_1, CniVersion::V0_4_0]),
            Some(CniVersion::V0_3_1)
        );
        assert_eq!(list.negotiate_version(&[CniVersion::V0_4_0]), None);
    }

    #[test]
    fn a_list_needs_plugins() {
        let error = NetConfList::from_slice(br#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#)
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidNetworkConfig);
    }
}
