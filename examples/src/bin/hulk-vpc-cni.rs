//! The hulk-vpc CNI plugin. Until the datapath lands it serves dry runs:
//! ADD takes an address from the IPAM backend and reports the result it
//! would configure, without touching the pod's namespace.

use std::net::IpAddr;
use std::process::ExitCode;

use hulk_cni::{
    AttachRequest, CheckRequest, CniError, CniResult, DelRequest, ErrorCode, GcRequest, Interface,
    IpConfig, NetConf, Plugin, Route,
};
use hulk_ipam::{AllocationRequest, IpamBackend, IpamError, MockBackend, PoolKey};
use ipnet::IpNet;
use serde::Deserialize;

/// The plugin's own fields of the network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginFields {
    /// ipvlan mode: l2 (default), l3 or l3s.
    #[serde(default = "default_mode")]
    mode: String,
    /// Report what ADD would do instead of doing it.
    #[serde(default)]
    dry_run: bool,
}

fn default_mode() -> String {
    "l2".into()
}

/// The `ipam` section for the mock backend.
#[derive(Debug, Deserialize)]
struct MockIpam {
    subnet: IpNet,
    gateway: Option<IpAddr>,
}

struct VpcPlugin;

impl VpcPlugin {
    fn fields(config: &NetConf) -> Result<PluginFields, CniError> {
        let fields: PluginFields = config.plugin_config()?;
        if !matches!(fields.mode.as_str(), "l2" | "l3" | "l3s") {
            return Err(CniError::unsupported_field("mode", &fields.mode));
        }
        if !fields.dry_run {
            return Err(CniError::unsupported_field("dryRun", "false").with_details(
                "this build has no datapath yet: set \"dryRun\": true to run ADD against the IPAM backend only",
            ));
        }
        Ok(fields)
    }

    fn mock_ipam(config: &NetConf) -> Result<MockIpam, CniError> {
        let ipam = config
            .plugin
            .ipam
            .as_ref()
            .ok_or_else(|| CniError::invalid_config("the ipam section is required"))?;
        if ipam.ipam_type != "mock" {
            return Err(CniError::unsupported_field("ipam.type", &ipam.ipam_type));
        }
        serde_json::from_value(serde_json::Value::Object(ipam.fields.clone())).map_err(|error| {
            CniError::invalid_config(format!("invalid mock ipam section: {error}"))
        })
    }
}

impl MockIpam {
    fn backend(&self) -> MockBackend {
        match self.gateway {
            Some(gateway) => MockBackend::with_gateway(self.subnet, gateway),
            None => MockBackend::new(self.subnet),
        }
    }
}

fn ipam_error(error: IpamError) -> CniError {
    match error {
        IpamError::Exhausted { .. } | IpamError::Quota(_) => {
            CniError::new(ErrorCode::AddressExhausted, error.to_string())
        }
        error if error.is_retryable() => CniError::try_again_later(error.to_string()),
        error => CniError::new(ErrorCode::IpamBackend, error.to_string()),
    }
}

impl Plugin for VpcPlugin {
    async fn add(&self, request: AttachRequest) -> Result<CniResult, CniError> {
        let fields = VpcPlugin::fields(&request.config)?;
        let ipam = VpcPlugin::mock_ipam(&request.config)?;
        let key = PoolKey::new(
            &request.config.name,
            ipam.subnet.trunc().to_string(),
            Vec::<String>::new(),
            None,
        );
        let node = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let lease = ipam
            .backend()
            .allocate(&AllocationRequest::new(key, node, 1))
            .await
            .map_err(ipam_error)?
            .remove(0);
        tracing::info!(
            container = %request.container_id,
            address = %lease.address,
            mode = %fields.mode,
            "dry-run ADD"
        );
        let default_route = lease.gateway.map(|gateway| {
            let any = match gateway {
                IpAddr::V4(_) => "0.0.0.0/0",
                IpAddr::V6(_) => "::/0",
            };
            Route::new(any.parse().expect("literal prefix"), Some(gateway))
        });
        Ok(CniResult {
            interfaces: vec![Interface {
                name: request.ifname,
                mac: lease.mac.map(|mac| mac.to_string()),
                mtu: lease.mtu,
                sandbox: Some(request.netns.display().to_string()),
                ..Interface::default()
            }],
            ips: vec![IpConfig {
                address: lease.address,
                gateway: lease.gateway,
                interface: Some(0),
            }],
            routes: default_route.into_iter().collect(),
            dns: request.config.plugin.dns.clone().unwrap_or_default(),
        })
    }

    async fn del(&self, request: DelRequest) -> Result<(), CniError> {
        // A dry ADD configured nothing and its mock lease died with the process.
        VpcPlugin::fields(&request.config)?;
        Ok(())
    }

    async fn check(&self, request: CheckRequest) -> Result<(), CniError> {
        VpcPlugin::fields(&request.attachment.config)?;
        let subnet = VpcPlugin::mock_ipam(&request.attachment.config)?.subnet;
        match request.prev_result.ips.as_slice() {
            [ip] if subnet.contains(&ip.address.addr()) => Ok(()),
            ips => Err(CniError::invalid_config(format!(
                "prevResult should hold one address in {subnet}, it holds {ips:?}"
            ))),
        }
    }

    async fn status(&self, config: NetConf) -> Result<(), CniError> {
        VpcPlugin::fields(&config)?;
        VpcPlugin::mock_ipam(&config)?
            .backend()
            .health()
            .await
            .map_err(|error| CniError::new(ErrorCode::PluginNotAvailable, error.to_string()))
    }

    async fn gc(&self, request: GcRequest) -> Result<(), CniError> {
        VpcPlugin::fields(&request.config)?;
        tracing::info!(
            kept = request.valid_attachments.len(),
            "dry-run GC: nothing to release"
        );
        Ok(())
    }
}

fn main() -> ExitCode {
    hulk_cni::run(VpcPlugin)
}
