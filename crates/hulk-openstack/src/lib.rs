//! IPAM backends for hulk-vpc: OpenStack Neutron ports with Keystone v3
//! authentication, and an UltrON-style REST IPAM service.
//!
//! - [`keystone`]: password or application-credential auth, a cached token
//!   refreshed before expiry, endpoints from the catalog;
//! - [`neutron`]: a thin client for ports (single and bulk create, filtered
//!   and paginated list, compare-and-swap update, tags, delete), subnets and
//!   networks, mapping `NeutronError` types to [`hulk_ipam::IpamError`];
//! - [`NeutronBackend`]: [`hulk_ipam::IpamBackend`] on top, every port
//!   tagged `hulk-vpc`, `hulk-cluster=…` and `hulk-node=…`; with
//!   [`NodePort`], nested mode for nodes that are Nova VMs (pod addresses
//!   allowed on the node's own port);
//! - [`floating_ips`]: floating IPs, and [`NeutronFloatingIps`], the
//!   [`hulk_ipam::FloatingIpProvider`] sharing a [`NeutronBackend`]'s client;
//! - [`ultron`]: the UltrON-style REST contract v1 (`docs/ultron-ipam-v1.md`),
//!   its client [`ultron::UltronBackend`] and, with the `ultron-server`
//!   feature, a conformant server over any backend.
//!
//! # Example
//!
//! ```no_run
//! use hulk_ipam::{AllocationRequest, IpamBackend, PoolKey};
//! use hulk_openstack::keystone::{Credentials, Keystone, KeystoneConfig};
//! use hulk_openstack::neutron::{NeutronAuth, NeutronClient};
//! use hulk_openstack::{HttpClient, HttpSettings, NeutronBackend, NeutronBackendConfig};
//!
//! # async fn example() -> Result<(), hulk_ipam::IpamError> {
//! let http = HttpClient::new(&HttpSettings::default())?;
//! let credentials = Credentials::ApplicationCredential {
//!     id: "3f1c…".into(),
//!     secret: "s3cret".into(),
//! };
//! let keystone = Keystone::new(
//!     KeystoneConfig::new("https://keystone.example:5000/v3", credentials),
//!     http.clone(),
//! );
//! let client = NeutronClient::new(http, NeutronAuth::Keystone(Box::new(keystone)), None)?;
//! let backend = NeutronBackend::new(client, NeutronBackendConfig::new("prod-eu1"));
//! let key = PoolKey::new("vpc-net-id", "subnet-id", ["sg-id"], None);
//! let leases = backend.allocate(&AllocationRequest::new(key, "node-1", 8)).await?;
//! println!("{} addresses, first {}", leases.len(), leases[0].address);
//! # Ok(())
//! # }
//! ```

pub mod floating_ips;
mod http;
pub mod keystone;
pub mod neutron;
mod neutron_backend;
pub mod ultron;

pub use floating_ips::NeutronFloatingIps;
pub use http::{HttpClient, HttpSettings};
pub use neutron_backend::{NeutronBackend, NeutronBackendConfig, NodePort};
