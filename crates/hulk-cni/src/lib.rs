//! CNI specification types and a plugin skeleton, for spec versions 0.3.0,
//! 0.3.1, 0.4.0, 1.0.0 and 1.1.0.
//!
//! - [`config`]: network configurations and lists, with plugin-specific
//!   fields kept;
//! - [`result`]: the ADD result and its conversion between versions;
//! - [`error`]: the error document, the spec's codes and room for a plugin's own (100+);
//! - [`env`]: the `CNI_*` environment contract, including Kubernetes `CNI_ARGS`;
//! - [`skel`]: a skeleton that dispatches ADD, DEL, CHECK, STATUS, GC and
//!   VERSION, prints exactly one document and never panics.
//!
//! # Example
//!
//! A plugin that hands out one fixed address:
//!
//! ```
//! use hulk_cni::{
//!     AttachRequest, CheckRequest, CniError, CniResult, DelRequest, GcRequest, IpConfig,
//!     NetConf, Plugin, dispatch,
//! };
//!
//! struct Fixed;
//!
//! impl Plugin for Fixed {
//!     async fn add(&self, _: AttachRequest) -> Result<CniResult, CniError> {
//!         Ok(CniResult {
//!             ips: vec![IpConfig {
//!                 address: "10.0.0.7/24".parse().unwrap(),
//!                 gateway: Some("10.0.0.1".parse().unwrap()),
//!                 interface: None,
//!             }],
//!             ..CniResult::default()
//!         })
//!     }
//!     async fn del(&self, _: DelRequest) -> Result<(), CniError> { Ok(()) }
//!     async fn check(&self, _: CheckRequest) -> Result<(), CniError> { Ok(()) }
//!     async fn status(&self, _: NetConf) -> Result<(), CniError> { Ok(()) }
//!     async fn gc(&self, _: GcRequest) -> Result<(), CniError> { Ok(()) }
//! }
//!
//! let env = |key: &str| match key {
//!     "CNI_COMMAND" => Some("ADD".to_string()),
//!     "CNI_CONTAINERID" => Some("c1".to_string()),
//!     "CNI_NETNS" => Some("/var/run/netns/c1".to_string()),
//!     "CNI_IFNAME" => Some("eth0".to_string()),
//!     _ => None,
//! };
//! let stdin = br#"{"cniVersion":"0.4.0","name":"vpc","type":"fixed"}"#;
//! let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! let outcome = runtime.block_on(dispatch(&Fixed, env, stdin));
//! assert!(outcome.success);
//! let printed: serde_json::Value = serde_json::from_slice(&outcome.stdout).unwrap();
//! assert_eq!(printed["ips"][0]["version"], "4"); // 0.4.0 results carry it
//! ```
//!
//! In a real plugin, `main` is just `hulk_cni::run(MyPlugin)`.

pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod skel;
pub mod version;

pub use config::{Attachment, IpamConf, NetConf, NetConfList, PluginConf};
pub use env::{CniArgs, CniEnv, Command};
pub use error::{CniError, ErrorCode, cause_chain, describe};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use skel::{
    AttachRequest, CheckRequest, DelRequest, GcRequest, Outcome, Plugin, dispatch, run,
};
pub use version::{CniVersion, VersionInfo};
