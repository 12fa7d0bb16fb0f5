//! The CNI error document and its codes.
//!
//! Codes 1 to 99 belong to the specification (CNI 1.1, "Error"); 100 and
//! above are each plugin's own, carried as [`ErrorCode::Other`] (a plugin
//! names its codes as constants of this type). [`ErrorCode::Internal`] is
//! 999, the code libcni itself uses for an internal failure
//! (`types.ErrInternal`), so a panic caught by [`crate::run`] reads the
//! same whichever plugin it came from.

use serde::{Deserialize, Serialize};

use crate::version::CniVersion;

/// A CNI error code: the spec's well-known codes, libcni's internal error,
/// and any plugin's own codes (100 and above) as [`ErrorCode::Other`].
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
    /// 999: an internal error (libcni's `ErrInternal`), e.g. a caught panic.
    Internal,
    /// Any other code: a plugin's own (100 and above), or one received
    /// from another plugin.
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
            ErrorCode::Internal => 999,
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
            999 => ErrorCode::Internal,
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

/// `cause` and its own causes, outermost first, joined by `": "`; a cause
/// whose text its predecessor already holds is skipped, since some errors
/// repeat their cause in their message.
pub fn cause_chain(mut cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut text = String::new();
    let mut previous = String::new();
    while let Some(next) = cause {
        let next_text = next.to_string();
        if !previous.contains(&next_text) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&next_text);
        }
        previous = next_text;
        cause = next.source();
    }
    text
}

/// `error` and its causes on one line (`error: cause: cause`), as a
/// binary prints a failure or a log line names it.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let causes = cause_chain(error.source());
    if causes.is_empty() {
        error.to_string()
    } else {
        format!("{error}: {causes}")
    }
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

    /// Puts `error`'s causes ([`std::error::Error::source`], outermost
    /// first, joined by `": "`) in `details`, so what the runtime logs
    /// names the real cause (an errno, a refused connection), not only
    /// the summary in `msg`. Nothing changes when `error` has no cause.
    pub fn with_causes(self, error: &(dyn std::error::Error + 'static)) -> Self {
        let causes = cause_chain(error.source());
        if causes.is_empty() {
            self
        } else {
            self.with_details(causes)
        }
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

    /// Shorthand for code 999 (internal error).
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

    #[derive(Debug, thiserror::Error)]
    #[error("create macvlan hulk1: {source}")]
    struct Outer {
        source: Middle,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("netlink: {source}")]
    struct Middle {
        source: std::io::Error,
    }

    #[test]
    fn causes_go_to_details_outermost_first_without_repeats() {
        let error = Outer {
            source: Middle {
                source: std::io::Error::from_raw_os_error(17),
            },
        };
        let cni = CniError::new(ErrorCode::Other(104), error.to_string()).with_causes(&error);
        // The middle error repeats its cause in its message: said once.
        assert_eq!(cni.details, "netlink: File exists (os error 17)");
        let plain = std::io::Error::from_raw_os_error(2);
        let cni = CniError::internal(plain.to_string()).with_causes(&plain);
        assert_eq!(cni.details, "", "no cause, no details");
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
