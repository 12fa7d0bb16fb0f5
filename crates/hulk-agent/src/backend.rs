//! The IPAM backend a configuration's `[backend]` section names, built with
//! its credentials read from their files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use hulk_ipam::{FaultPlan, Faulty, FloatingIpProvider, IpamBackend, MacAddr, MemoryBackend};
use hulk_openstack::keystone::{Credentials, Keystone, KeystoneConfig};
use hulk_openstack::neutron::{NeutronAuth, NeutronClient};
use hulk_openstack::ultron::UltronBackend;
use hulk_openstack::{
    HttpClient, HttpSettings, NeutronBackend, NeutronBackendConfig, NeutronFloatingIps, NodePort,
};

use crate::config::{BackendSection, NODE_PORT_AUTO};

/// Why a backend could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A secret (token, application credential secret) could not be read.
    #[error("cannot read the secret file {}", path.display())]
    Secret {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client or the Neutron client could not be set up (a CA
    /// bundle that does not parse, an endpoint that is not a URL).
    #[error("cannot set up the {backend} backend's client")]
    Client {
        /// `ultron` or `neutron`.
        backend: &'static str,
        /// The cause.
        #[source]
        source: hulk_ipam::IpamError,
    },
}

fn read_secret(path: &Path) -> Result<String, BackendError> {
    let text = std::fs::read_to_string(path).map_err(|source| BackendError::Secret {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text.trim().to_owned())
}

/// An HTTP client trusting `ca_file` besides the system roots.
pub(crate) fn http_client(
    backend: &'static str,
    ca_file: &Option<PathBuf>,
) -> Result<HttpClient, BackendError> {
    HttpClient::new(&HttpSettings {
        ca_file: ca_file.clone(),
        ..HttpSettings::default()
    })
    .map_err(|source| BackendError::Client { backend, source })
}

/// What a node agent knows of its node that the Neutron backend's nested
/// mode (`[backend] node_port = "auto"`) finds the node's port by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFacts {
    /// The parent interface's MAC, when it could be read.
    pub parent_mac: Option<MacAddr>,
    /// The node's address (`[network] node_address`).
    pub node_address: IpAddr,
}

/// The backend `section` names, for the cluster (the controller): nested
/// mode is off, as the node port is a node's own; releasing a nested pod
/// port still removes its pair from the node port its tag names. Secrets
/// are read now, once; the Neutron backend authenticates with Keystone on
/// its first call.
///
/// # Errors
///
/// [`BackendError`] when a secret file cannot be read or a client cannot
/// be set up.
pub fn from_section(section: &BackendSection) -> Result<Arc<dyn IpamBackend>, BackendError> {
    Ok(build(section, None)?.ipam)
}

/// What a `[backend]` section gives: addresses, and floating IPs where the
/// backend has them.
#[derive(Clone)]
pub struct Backends {
    /// Pod addresses.
    pub ipam: Arc<dyn IpamBackend>,
    /// Floating IPs (Neutron only), sharing the address backend's client
    /// and Keystone token.
    pub floating_ips: Option<Arc<dyn FloatingIpProvider>>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("ipam", &self.ipam.name())
            .field("floating_ips", &self.floating_ips.is_some())
            .finish()
    }
}

/// [`from_section`], with the floating IP provider of a Neutron backend
/// (the controller's: nested mode off).
///
/// # Errors
///
/// As [`from_section`].
pub fn backends_from_section(section: &BackendSection) -> Result<Backends, BackendError> {
    build(section, None)
}

/// The backends `section` names, for the node `node` describes: with
/// `node_port` set, Neutron's nested mode (`"auto"` finds the node port by
/// `node`'s parent MAC and address). Otherwise as [`backends_from_section`].
///
/// # Errors
///
/// As [`from_section`].
pub fn for_node(section: &BackendSection, node: &NodeFacts) -> Result<Backends, BackendError> {
    build(section, Some(node))
}

fn build(section: &BackendSection, node: Option<&NodeFacts>) -> Result<Backends, BackendError> {
    let ipam: Arc<dyn IpamBackend> = match section {
        BackendSection::Memory {
            subnet,
            gateway,
            gateway_mac,
            latency_ms,
        } => {
            let mut memory = match gateway {
                Some(gateway) => MemoryBackend::with_gateway(*subnet, *gateway),
                None => MemoryBackend::new(*subnet),
            };
            if let Some(mac) = gateway_mac {
                memory = memory.with_gateway_mac(*mac);
            }
            let latency = Duration::from_millis(*latency_ms);
            Arc::new(Faulty::new(memory, FaultPlan::fixed_latency(latency)))
        }
        BackendSection::Ultron {
            url,
            token_file,
            cluster,
            ca_file,
        } => Arc::new(UltronBackend::new(
            http_client("ultron", ca_file)?,
            url.clone(),
            read_secret(token_file)?,
            cluster.clone(),
        )),
        BackendSection::Neutron {
            auth_url,
            application_credential_id,
            application_credential_secret_file,
            cluster,
            endpoint,
            region,
            ca_file,
            node_port,
            ..
        } => {
            let credentials = Credentials::ApplicationCredential {
                id: application_credential_id.clone(),
                secret: read_secret(application_credential_secret_file)?,
            };
            let mut keystone = KeystoneConfig::new(auth_url.clone(), credentials);
            keystone.region = region.clone();
            let http = http_client("neutron", ca_file)?;
            let keystone = Keystone::new(keystone, http.clone());
            let client = NeutronClient::new(
                http,
                NeutronAuth::Keystone(Box::new(keystone)),
                endpoint.clone(),
            )
            .map_err(|source| BackendError::Client {
                backend: "neutron",
                source,
            })?;
            let mut config = NeutronBackendConfig::new(cluster.clone());
            config.node_port = match (node_port.as_deref(), node) {
                (None, _) | (Some(_), None) => NodePort::Off,
                (Some(NODE_PORT_AUTO), Some(node)) => NodePort::Auto {
                    mac: node.parent_mac,
                    address: Some(node.node_address),
                },
                (Some(id), Some(_)) => NodePort::Id(id.to_owned()),
            };
            let neutron = Arc::new(NeutronBackend::new(client, config));
            return Ok(Backends {
                ipam: neutron.clone(),
                floating_ips: Some(Arc::new(NeutronFloatingIps::new(neutron))),
            });
        }
    };
    Ok(Backends {
        ipam,
        floating_ips: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_neutron_gives_floating_ips() {
        let secret = std::env::temp_dir().join(format!("hulk-backend-test-{}", std::process::id()));
        std::fs::write(&secret, "s3cret\n").unwrap();
        let neutron = BackendSection::Neutron {
            auth_url: "https://keystone.example:5000/v3".into(),
            application_credential_id: "id".into(),
            application_credential_secret_file: secret.clone(),
            cluster: "prod".into(),
            endpoint: None,
            region: None,
            ca_file: None,
            floating_network: Some("public".into()),
            floating_ip_policy: hulk_ipam::FloatingIpPolicy::Keep,
            node_port: None,
        };
        let built = backends_from_section(&neutron).unwrap();
        std::fs::remove_file(&secret).unwrap();
        assert_eq!(built.ipam.name(), "neutron");
        assert!(built.floating_ips.is_some());
        let memory = BackendSection::Memory {
            subnet: "10.20.0.0/24".parse().unwrap(),
            gateway: None,
            gateway_mac: None,
            latency_ms: 0,
        };
        assert!(
            backends_from_section(&memory)
                .unwrap()
                .floating_ips
                .is_none()
        );
    }
}
