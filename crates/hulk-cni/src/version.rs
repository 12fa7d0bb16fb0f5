//! CNI specification versions and the VERSION command's answer.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A CNI specification version this crate can read and write.
///
/// Versions before 0.3.0 used a different result shape (`ip4`/`ip6`) that no
/// current runtime sends; they are rejected with error code 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// Spec 0.3.0: the rich result (interfaces, ips with `version`).
    V0_3_0,
    /// Spec 0.3.1: a typo fix of 0.3.0.
    V0_3_1,
    /// Spec 0.4.0: adds CHECK and `prevResult` on DEL.
    V0_4_0,
    /// Spec 1.0.0: drops `ips[].version`, list configs only.
    V1_0_0,
    /// Spec 1.1.0: adds STATUS, GC, route and interface attributes.
    V1_1_0,
}

impl CniVersion {
    /// Every supported version, oldest first.
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    /// The newest version, used for answers that have no request version.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// The version as the spec writes it, e.g. `"1.1.0"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Whether results of this version carry `ips[].version` ("4" or "6").
    pub fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// Whether this version knows the attributes added in 1.1.0
    /// (interface `mtu`/`socketPath`/`pciID`, route `mtu`/`advmss`/`priority`/`table`/`scope`).
    pub fn has_extended_attributes(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Whether the CHECK command exists in this version.
    pub fn supports_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// Whether the STATUS and GC commands exist in this version.
    pub fn supports_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

/// A version string that is not one of [`CniVersion::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI version {0:?} is not supported (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)")]
pub struct UnsupportedVersion(pub String);

impl FromStr for CniVersion {
    type Err = UnsupportedVersion;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        CniVersion::ALL
            .into_iter()
            .find(|version| version.as_str() == text)
            .ok_or_else(|| UnsupportedVersion(text.to_owned()))
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CniVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CniVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The answer to the VERSION command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// The version of this answer's own format.
    pub cni_version: CniVersion,
    /// Every version the plugin accepts.
    pub supported_versions: Vec<CniVersion>,
}

impl VersionInfo {
    /// The answer for a plugin that supports `versions`.
    pub fn new(versions: &[CniVersion]) -> Self {
        VersionInfo {
            cni_version: CniVersion::LATEST,
            supported_versions: versions.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version_and_prints_it_back() {
        for version in CniVersion::ALL {
            assert_eq!(version.as_str().parse::<CniVersion>(), Ok(version));
        }
    }

    #[test]
    fn rejects_pre_0_3_and_unknown_versions() {
        for text in ["0.1.0", "0.2.0", "1.2.0", "", "1.0", "v1.0.0"] {
            assert!(text.parse::<CniVersion>().is_err(), "{text} accepted");
        }
    }

    #[test]
    fn feature_gates_follow_the_spec_history() {
        assert!(CniVersion::V0_4_0.ips_carry_version());
        assert!(!CniVersion::V1_0_0.ips_carry_version());
        assert!(!CniVersion::V0_3_1.supports_check());
        assert!(CniVersion::V0_4_0.supports_check());
        assert!(!CniVersion::V1_0_0.supports_status_and_gc());
        assert!(CniVersion::V1_1_0.has_extended_attributes());
    }
}
