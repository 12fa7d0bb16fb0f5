//! The CNI error document and its codes.
//!
//! Codes 1 to 99 belong to the specification. hulk-vpc's own codes start at 100:
//!
//! | code | meaning | what the operator does |
//! |------|---------|------------------------|
//! | 100  | internal error (a bug, including a caught panic) | report it with the plugin log |
//! | 101  | the IPAM backend refused or failed the request | read `details`; see the backend's logs |
//! | 102  | the subnet or quota is exhausted | grow the subnet or quota, or move pods |
//! | 103  | the node agent could not be reached | check the agent DaemonSet and its socket |
//! | 104  | netlink / datapath configuration failed | `hulkctl node`, kernel log |
//! | 105  | the pod's network namespace could not be entered | the runtime removed it; retry the pod |
//! | 106  | the node state store failed | check the agent's state directory and disk |

use serde::{Deserialize, Serialize};

use crate::version::CniVersion;

/// A CNI error code: the spec's well-known codes and hulk-vpc's own (100+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1: the request's CNI version is not supported.
    IncompatibleVersion,
    /// 2: a configuration field has a value this plugin does not support.
    UnsupportedField,
    /// 3: the container is unknown or does not exist.
    UnknownContainer,
    /// 4: a required environment variable is missing or invalid.
    InvalidEnvironment,
    /// 5: an I/O failure, e.g. reading stdin.
    IoFailure,
    /// 6: the input could not be decoded (malformed JSON).
    DecodingFailure,
    /// 7: the network configuration is invalid.
    InvalidNetworkConfig,
    /// 11: a transient failure; the runtime should retry later.
    TryAgainLater,
    /// 50: STATUS: the plugin cannot serve ADD requests now.
    PluginNotAvailable,
    /// 51: STATUS: the plugin cannot serve ADD requests, existing pods have limited connectivity.
    PluginNotAvailableLimitedConnectivity,
    /// 100: an internal error in the plugin.
    Internal,
    /// 101: the IPAM backend refused or failed the request.
    IpamBackend,
    /// 102: no address left in the subnet or quota.
    AddressExhausted,
    /// 103: the node agent could not be reached.
    AgentUnavailable,
    /// 104: configuring the datapath (netlink) failed.
    Datapath,
    /// 105: the pod network namespace could not be opened or entered.
    Namespace,
    /// 106: the node's state store failed.
    StateStore,
    /// Any other code, as received from another plugin.
    Other(u32),
}

impl ErrorCode {
    /// The numeric code written in the error document.
    pub fn as_u32(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::IoFailure => 5,
            ErrorCode::DecodingFailure => 6,
            ErrorCode::InvalidNetworkConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::PluginNotAvailable => 50,
            ErrorCode::PluginNotAvailableLimitedConnectivity => 51,
            ErrorCode::Internal => 100,
            ErrorCode::IpamBackend => 101,
            ErrorCode::AddressExhausted => 102,
            ErrorCode::AgentUnavailable => 103,
            ErrorCode::Datapath => 104,
            ErrorCode::Namespace => 105,
            ErrorCode::StateStore => 106,
            ErrorCode::Other(code) => code,
        }
    }

    /// The code for a number, with unknown numbers kept as [`ErrorCode::Other`].
    pub fn from_u32(code: u32) -> Self {
        match code {
            1 => ErrorCode::IncompatibleVersion,
            2 => ErrorCode::UnsupportedField,
            3 => ErrorCode::UnknownContainer,
            4 => ErrorCode::InvalidEnvironment,
            5 => ErrorCode::IoFailure,
            6 => ErrorCode::DecodingFailure,
            7 => ErrorCode::InvalidNetworkConfig,
            11 => ErrorCode::TryAgainLater,
            50 => ErrorCode::PluginNotAvailable,
            51 => ErrorCode::PluginNotAvailableLimitedConnectivity,
            100 => ErrorCode::Internal,
            101 => ErrorCode::IpamBackend,
            102 => ErrorCode::AddressExhausted,
            103 => ErrorCode::AgentUnavailable,
            104 => ErrorCode::Datapath,
            105 => ErrorCode::Namespace,
            106 => ErrorCode::StateStore,
            other => ErrorCode::Other(other),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.as_u32())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u32::deserialize(deserializer).map(ErrorCode::from_u32)
    }
}

/// A failure as the CNI protocol reports it: printed as JSON on stdout with a
/// non-zero exit status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("CNI error {}: {msg}{}", code.as_u32(), details_suffix(details))]
pub struct CniError {
    /// The spec version the document is written in.
    #[serde(rename = "cniVersion")]
    pub cni_version: CniVersion,
    /// The error code.
    pub code: ErrorCode,
    /// A short message.
    pub msg: String,
    /// A longer explanation, when there is one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}

impl CniError {
    /// An error with `code` and `msg`, written in the newest spec version
    /// until [`CniError::in_version`] pins the request's version.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        CniError {
            cni_version: CniVersion::LATEST,
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds the long explanation.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Writes the document in the request's spec version.
    pub fn in_version(mut self, version: CniVersion) -> Self {
        self.cni_version = version;
        self
    }

    /// Shorthand for code 7 (invalid network configuration).
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        CniError::new(ErrorCode::InvalidNetworkConfig, msg)
    }

    /// Shorthand for code 2: the spec asks the message to name the key and value.
    pub fn unsupported_field(key: &str, value: impl std::fmt::Display) -> Self {
        CniError::new(
            ErrorCode::UnsupportedField,
            format!("unsupported field in network configuration: {key}={value}"),
        )
    }

    /// Shorthand for code 11 (try again later).
    pub fn try_again_later(msg: impl Into<String>) -> Self {
        CniError::new(ErrorCode::TryAgainLater, msg)
    }

    /// Shorthand for code 100 (internal error).
    pub fn internal(msg: impl Into<String>) -> Self {
        CniError::new(ErrorCode::Internal, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_code_survives_its_number() {
        for number in (0..=120).chain([999, 65_535]) {
            assert_eq!(ErrorCode::from_u32(number).as_u32(), number);
        }
    }

    #[test]
    fn error_document_has_the_spec_shape() {
        let error = CniError::try_again_later("pool refilling")
            .with_details("subnet-a has 0 idle addresses")
            .in_version(CniVersion::V0_4_0);
        let json = serde_json::to_value(&error).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "0.4.0",
                "code": 11,
                "msg": "pool refilling",
                "details": "subnet-a has 0 idle addresses"
            })
        );
    }

    #[test]
    fn empty_details_are_omitted() {
        let json = serde_json::to_value(CniError::internal("boom")).unwrap();
        assert!(json.get("details").is_none());
    }

    #[test]
    fn unsupported_field_names_key_and_value() {
        let error = CniError::unsupported_field("mode", "l4");
        assert_eq!(error.code.as_u32(), 2);
        assert!(error.msg.contains("mode=l4"), "{}", error.msg);
    }
}
