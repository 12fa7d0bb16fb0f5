//! The hulk-vpc CNI plugin. It forwards ADD, DEL, CHECK, STATUS and GC to
//! the node agent over its Unix socket and turns the answers into CNI
//! results. If the agent is down, DEL still tears the interface down
//! locally (the agent reclaims the address later). With `"dryRun": true`
//! ADD instead takes an address from an in-process mock IPAM and reports
//! what it would configure, touching nothing (for demos).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use hulk_cni::{
    AttachRequest, CheckRequest, CniArgs, CniError, CniResult, DelRequest, ErrorCode, GcRequest,
    NetConf, Plugin,
};
use hulk_ipam::{AllocationRequest, IpamBackend, IpamError, MockBackend, PoolKey};
use hulk_netns::{Datapath, NetlinkKernel};
use hulk_node::agent::{AgentReply, AgentRequest, call};
use hulk_node::{PodAttachment, PodRequest};
use ipnet::IpNet;
use serde::Deserialize;

/// The plugin's own fields of the network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginFields {
    /// ipvlan mode: l2 (default), l3 or l3s (the agent's configuration
    /// builds the interface; a different value here is refused).
    #[serde(default = "default_mode")]
    mode: String,
    /// Report what ADD would do instead of doing it.
    #[serde(default)]
    dry_run: bool,
    /// The agent's socket.
    #[serde(default = "default_socket")]
    agent_socket: PathBuf,
    /// How long to wait for the agent.
    #[serde(default = "default_timeout")]
    agent_timeout_seconds: u64,
}

fn default_mode() -> String {
    "l2".into()
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/hulk-vpc/agent.sock")
}

fn default_timeout() -> u64 {
    60
}

/// The `ipam` section for dry runs.
#[derive(Debug, Deserialize)]
struct MockIpam {
    subnet: IpNet,
    gateway: Option<IpAddr>,
}

fn fields(config: &NetConf) -> Result<PluginFields, CniError> {
    let fields: PluginFields = config.plugin_config()?;
    if !matches!(fields.mode.as_str(), "l2" | "l3" | "l3s") {
        return Err(CniError::unsupported_field("mode", &fields.mode));
    }
    Ok(fields)
}

fn mock_ipam(config: &NetConf) -> Result<MockIpam, CniError> {
    let ipam = config
        .plugin
        .ipam
        .as_ref()
        .ok_or_else(|| CniError::invalid_config("a dry run needs an ipam section"))?;
    if ipam.ipam_type != "mock" {
        return Err(CniError::unsupported_field("ipam.type", &ipam.ipam_type));
    }
    serde_json::from_value(serde_json::Value::Object(ipam.fields.clone()))
        .map_err(|error| CniError::invalid_config(format!("invalid mock ipam section: {error}")))
}

fn pod_request(
    config: &NetConf,
    container_id: &str,
    ifname: &str,
    netns: Option<&Path>,
    args: &CniArgs,
) -> PodRequest {
    PodRequest {
        cni_network: Some(config.name.clone()),
        pod_uid: args.pod_uid().map(str::to_owned),
        container_id: container_id.to_owned(),
        ifname: ifname.to_owned(),
        netns: netns.map(Path::to_path_buf),
        pod: args
            .pod_namespace()
            .zip(args.pod_name())
            .map(|(namespace, name)| format!("{namespace}/{name}")),
        pool: None,
    }
}

/// Sends `request`; an unreachable agent is `Err(None)`, a refusal `Err(Some(error))`.
async fn ask(fields: &PluginFields, request: AgentRequest) -> Result<AgentReply, Option<CniError>> {
    let timeout = Duration::from_secs(fields.agent_timeout_seconds);
    match call(&fields.agent_socket, &request, timeout).await {
        Ok(AgentReply::Failed(error)) => Err(Some(error)),
        Ok(reply) => Ok(reply),
        Err(error) => {
            tracing::warn!(%error, "the agent is unreachable");
            Err(None)
        }
    }
}

fn unreachable(fields: &PluginFields) -> CniError {
    CniError::new(
        ErrorCode::AgentUnavailable,
        format!(
            "the hulk-vpc agent at {} is unreachable",
            fields.agent_socket.display()
        ),
    )
}

async fn dry_add(request: &AttachRequest) -> Result<CniResult, CniError> {
    let ipam = mock_ipam(&request.config)?;
    let backend = match ipam.gateway {
        Some(gateway) => MockBackend::with_gateway(ipam.subnet, gateway),
        None => MockBackend::new(ipam.subnet),
    };
    let key = PoolKey::new(
        &request.config.name,
        ipam.subnet.trunc().to_string(),
        Vec::<String>::new(),
        None,
    );
    let node = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    let lease = backend
        .allocate(&AllocationRequest::new(key, node, 1))
        .await
        .map_err(|error| match error {
            IpamError::Exhausted { .. } => {
                CniError::new(ErrorCode::AddressExhausted, error.to_string())
            }
            error => CniError::new(ErrorCode::IpamBackend, error.to_string()),
        })?
        .remove(0);
    let attachment = PodAttachment {
        mac: lease.mac.map(|mac| mac.octets()),
        mtu: lease.mtu.unwrap_or(1500),
        index: 0,
        lease,
    };
    tracing::info!(container = %request.container_id, address = %attachment.lease.address, "dry-run ADD");
    Ok(attachment.to_cni_result(&request.ifname, &request.netns))
}

struct VpcPlugin;

impl Plugin for VpcPlugin {
    async fn add(&self, request: AttachRequest) -> Result<CniResult, CniError> {
        let fields = fields(&request.config)?;
        let mut result = if fields.dry_run {
            dry_add(&request).await?
        } else {
            let pod = pod_request(
                &request.config,
                &request.container_id,
                &request.ifname,
                Some(&request.netns),
                &request.args,
            );
            match ask(&fields, AgentRequest::Add(pod)).await {
                Ok(AgentReply::Added(attachment)) => {
                    attachment.to_cni_result(&request.ifname, &request.netns)
                }
                Ok(other) => {
                    return Err(CniError::internal(format!(
                        "unexpected agent reply {other:?}"
                    )));
                }
                Err(error) => return Err(error.unwrap_or_else(|| unreachable(&fields))),
            }
        };
        result.dns = request.config.plugin.dns.clone().unwrap_or_default();
        Ok(result)
    }

    async fn del(&self, request: DelRequest) -> Result<(), CniError> {
        let fields = fields(&request.config)?;
        if fields.dry_run {
            return Ok(());
        }
        let pod = pod_request(
            &request.config,
            &request.container_id,
            &request.ifname,
            request.netns.as_deref(),
            &request.args,
        );
        match ask(&fields, AgentRequest::Del(pod)).await {
            Ok(_) => Ok(()),
            Err(Some(error)) => Err(error),
            Err(None) => {
                // The agent is down: remove the interface here; the agent
                // returns the address when its reconciliation sees the pod gone.
                let kernel = NetlinkKernel::new()
                    .map_err(|error| CniError::new(ErrorCode::Datapath, error.to_string()))?;
                Datapath::new(kernel)
                    .detach(request.netns.as_deref(), &request.ifname, None, None)
                    .await
                    .map_err(|error| CniError::new(ErrorCode::Datapath, error.to_string()))?;
                tracing::warn!(container = %request.container_id, "agent down: tore the interface down locally");
                Ok(())
            }
        }
    }

    async fn check(&self, request: CheckRequest) -> Result<(), CniError> {
        let attachment = request.attachment;
        let fields = fields(&attachment.config)?;
        if fields.dry_run {
            let subnet = mock_ipam(&attachment.config)?.subnet;
            return match request.prev_result.ips.as_slice() {
                [ip] if subnet.contains(&ip.address.addr()) => Ok(()),
                ips => Err(CniError::invalid_config(format!(
                    "prevResult should hold one address in {subnet}, it holds {ips:?}"
                ))),
            };
        }
        let pod = pod_request(
            &attachment.config,
            &attachment.container_id,
            &attachment.ifname,
            Some(&attachment.netns),
            &attachment.args,
        );
        ask(&fields, AgentRequest::Check(pod))
            .await
            .map(|_| ())
            .map_err(|error| error.unwrap_or_else(|| unreachable(&fields)))
    }

    async fn status(&self, config: NetConf) -> Result<(), CniError> {
        let fields = fields(&config)?;
        if fields.dry_run {
            return Ok(());
        }
        ask(&fields, AgentRequest::Status)
            .await
            .map(|_| ())
            .map_err(|error| {
                error.unwrap_or_else(|| {
                    CniError::new(ErrorCode::PluginNotAvailable, unreachable(&fields).msg)
                })
            })
    }

    async fn gc(&self, request: GcRequest) -> Result<(), CniError> {
        let fields = fields(&request.config)?;
        if fields.dry_run {
            return Ok(());
        }
        ask(
            &fields,
            AgentRequest::Gc {
                cni_network: Some(request.config.name.clone()),
                valid: request.valid_attachments,
            },
        )
        .await
        .map(|_| ())
        .map_err(|error| error.unwrap_or_else(|| unreachable(&fields)))
    }
}

fn main() -> ExitCode {
    hulk_cni::run(VpcPlugin)
}
