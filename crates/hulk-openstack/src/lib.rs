//! OpenStack Neutron (with Keystone v3 authentication) and UltrON-style
//! REST backends implementing `hulk_ipam::IpamBackend`.
//!
//! The crate holds its place in the workspace layout and exports nothing
//! yet; the backends are tracked in the project's issues.
