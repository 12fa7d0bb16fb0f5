//! The ADD result and its conversion between spec versions.
//!
//! [`CniResult`] holds the union of what every supported version can say.
//! [`CniResult::to_value`] writes it in one version, dropping what that
//! version cannot express and adding `ips[].version` where the version wants
//! it (0.3.x and 0.4.0), as libcni's converters do. [`CniResult::from_value`]
//! reads any supported version back.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::version::{CniVersion, UnsupportedVersion};

/// The result of an ADD, independent of the spec version it is written in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    /// Interfaces created or used; `ips[].interface` indexes this list.
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    pub ips: Vec<IpConfig>,
    /// Routes installed in the sandbox.
    pub routes: Vec<Route>,
    /// DNS settings for the sandbox.
    pub dns: Dns,
}

/// An interface in a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// Hardware address, when L2 addresses are meaningful.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The sandbox (netns path) holding the interface; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// A vhost-user or similar socket path (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// PCI address of a device (1.1.0 and later).
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// An address assigned to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// The address with its prefix length, e.g. `10.1.0.5/16`.
    pub address: IpNet,
    /// The subnet's gateway, when there is one.
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`]; absent in IPAM plugin results.
    pub interface: Option<u32>,
}

/// A route in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Next hop; absent means the default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Route MTU (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// TCP advertised MSS (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Route priority / metric (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Route scope, as the kernel numbers it (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    /// A plain route to `dst`, via `gw` if given.
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Self {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// DNS settings, as in both network configurations and results.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers, in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<IpAddr>,
    /// Local domain for short names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains, in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

/// Why a result document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// The JSON does not have the result's shape.
    #[error("malformed result: {0}")]
    Malformed(#[from] serde_json::Error),
    /// `cniVersion` is missing.
    #[error("result has no cniVersion")]
    MissingVersion,
    /// `cniVersion` names an unsupported version.
    #[error(transparent)]
    Version(#[from] UnsupportedVersion),
    /// `ips[].version` contradicts the address.
    #[error("ips entry {address} is marked as IP version {marked}")]
    IpVersionMismatch {
        /// The address.
        address: IpNet,
        /// The version the entry claims.
        marked: String,
    },
    /// `ips[].interface` points past the interface list.
    #[error("ips entry {address} names interface {index}, but the result has {count} interfaces")]
    InterfaceOutOfRange {
        /// The address.
        address: IpNet,
        /// The index given.
        index: u32,
        /// The number of interfaces.
        count: usize,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResult {
    cni_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ips: Vec<WireIp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    dns: Dns,
}

#[derive(Serialize, Deserialize)]
struct WireIp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interface: Option<u32>,
}

fn family_label(address: &IpNet) -> &'static str {
    match address {
        IpNet::V4(_) => "4",
        IpNet::V6(_) => "6",
    }
}

impl CniResult {
    /// The result as `version` can express it: fields newer than `version`
    /// are dropped. Writing a result in `version` and reading it back gives
    /// exactly this.
    pub fn restricted_to(&self, version: CniVersion) -> CniResult {
        let mut result = self.clone();
        if !version.has_extended_attributes() {
            for interface in &mut result.interfaces {
                interface.mtu = None;
                interface.socket_path = None;
                interface.pci_id = None;
            }
            for route in &mut result.routes {
                *route = Route::new(route.dst, route.gw);
            }
        }
        result
    }

    /// The result written in `version`, as a JSON object.
    pub fn to_value(&self, version: CniVersion) -> Value {
        let result = self.restricted_to(version);
        let wire = WireResult {
            cni_version: Some(version.as_str().to_owned()),
            interfaces: result.interfaces,
            ips: result
                .ips
                .into_iter()
                .map(|ip| WireIp {
                    version: version
                        .ips_carry_version()
                        .then(|| family_label(&ip.address).to_owned()),
                    address: ip.address,
                    gateway: ip.gateway,
                    interface: ip.interface,
                })
                .collect(),
            routes: result.routes,
            dns: result.dns,
        };
        // Only string-keyed structs of strings, numbers and addresses: serde_json cannot fail on them.
        serde_json::to_value(wire).expect("result types always serialize")
    }

    /// Reads a result document of any supported version, returning the
    /// version it was written in.
    pub fn from_value(value: Value) -> Result<(CniVersion, CniResult), ResultError> {
        let wire: WireResult = serde_json::from_value(value)?;
        let version: CniVersion = wire
            .cni_version
            .as_deref()
            .ok_or(ResultError::MissingVersion)?
            .parse()?;
        let interface_count = wire.interfaces.len();
        let ips = wire
            .ips
            .into_iter()
            .map(|ip| {
                if let Some(marked) = &ip.version
                    && marked != family_label(&ip.address)
                {
                    return Err(ResultError::IpVersionMismatch {
                        address: ip.address,
                        marked: marked.clone(),
                    });
                }
                if let Some(index) = ip.interface
                    && index as usize >= interface_count
                {
                    return Err(ResultError::InterfaceOutOfRange {
                        address: ip.address,
                        index,
                        count: interface_count,
                    });
                }
                Ok(IpConfig {
                    address: ip.address,
                    gateway: ip.gateway,
                    interface: ip.interface,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let result = CniResult {
            interfaces: wire.interfaces,
            ips,
            routes: wire.routes,
            dns: wire.dns,
        };
        Ok((version, result.restricted_to(version)))
    }

    /// Rewrites a result document in another version, as libcni does for
    /// `prevResult` and cached results.
    pub fn convert(value: Value, to: CniVersion) -> Result<Value, ResultError> {
        let (_, result) = CniResult::from_value(value)?;
        Ok(result.to_value(to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Some("fa:16:3e:00:00:01".into()),
                mtu: Some(1450),
                sandbox: Some("/var/run/netns/pod".into()),
                ..Interface::default()
            }],
            ips: vec![IpConfig {
                address: "10.0.0.5/24".parse().unwrap(),
                gateway: Some("10.0.0.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![Route {
                table: Some(100),
                ..Route::new(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("10.0.0.1".parse().unwrap()),
                )
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn old_versions_get_ip_version_and_lose_new_attributes() {
        let value = sample().to_value(CniVersion::V0_4_0);
        assert_eq!(
            value,
            json!({
                "cniVersion": "0.4.0",
                "interfaces": [{"name": "eth0", "mac": "fa:16:3e:00:00:01", "sandbox": "/var/run/netns/pod"}],
                "ips": [{"version": "4", "address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}]
            })
        );
    }

    #[test]
    fn version_1_1_keeps_everything_and_has_no_ip_version() {
        let value = sample().to_value(CniVersion::V1_1_0);
        assert_eq!(value["interfaces"][0]["mtu"], 1450);
        assert_eq!(value["routes"][0]["table"], 100);
        assert!(value["ips"][0].get("version").is_none());
    }

    #[test]
    fn converts_1_x_results_down_and_back_up() {
        let down =
            CniResult::convert(sample().to_value(CniVersion::V1_1_0), CniVersion::V0_3_1).unwrap();
        assert_eq!(down["ips"][0]["version"], "4");
        let (version, back) = CniResult::from_value(down).unwrap();
        assert_eq!(version, CniVersion::V0_3_1);
        assert_eq!(back, sample().restricted_to(CniVersion::V0_3_1));
    }

    #[test]
    fn rejects_a_wrong_ip_version_marker() {
        let error = CniResult::from_value(json!({
            "cniVersion": "0.4.0",
            "ips": [{"version": "6", "address": "10.0.0.5/24"}]
        }))
        .unwrap_err();
        assert!(
            matches!(error, ResultError::IpVersionMismatch { .. }),
            "{error}"
        );
    }

    #[test]
    fn rejects_an_interface_index_past_the_list() {
        let error = CniResult::from_value(json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.0.0.5/24", "interface": 1}]
        }))
        .unwrap_err();
        assert!(matches!(
            error,
            ResultError::InterfaceOutOfRange {
                index: 1,
                count: 1,
                ..
            }
        ));
    }

    #[test]
    fn rejects_missing_and_unsupported_versions() {
        assert!(matches!(
            CniResult::from_value(json!({"ips": []})),
            Err(ResultError::MissingVersion)
        ));
        assert!(matches!(
            CniResult::from_value(json!({"cniVersion": "0.2.0"})),
            Err(ResultError::Version(_))
        ));
    }
}
