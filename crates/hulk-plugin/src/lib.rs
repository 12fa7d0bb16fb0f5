//! The hulk-vpc CNI plugin as a library ([`VpcPlugin`]; the binary is
//! `hulk_cni::run(VpcPlugin)`). It forwards ADD, DEL, CHECK, STATUS and GC to
//! the node agent over its Unix socket and turns the answers into CNI
//! results. An agent that cannot be reached is error 103; one that does
//! not answer within `agentTimeoutSeconds` is 11 (the agent undoes an ADD
//! whose caller gave up, so a retry is safe). If DEL gets no answer, the
//! plugin leaves a note for the agent in `pendingDelDir` (the agent replays
//! it and returns the address), then tears the interface down locally.
//! With `"dryRun": true` ADD instead takes an address from an in-process
//! mock IPAM and reports what it would configure, touching nothing (for
//! demos).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hulk_agent_api::del_notes::{self, DelNotes};
use hulk_agent_api::{
    ClientError, DEFAULT_CALLER_TIMEOUT, PluginReply, PluginRequest, PodAttachment, PodRequest,
    call, codes,
};
use hulk_cni::{
    AttachRequest, CheckRequest, CniArgs, CniError, CniResult, DelRequest, ErrorCode, GcRequest,
    NetConf, Plugin,
};
use hulk_ipam::{AllocationRequest, IpamBackend, MacAddr, MemoryBackend, Owner, PoolKey};
use hulk_netns::{Datapath, NetlinkKernel};
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
    /// Where DEL leaves a note for the agent when the agent does not answer.
    #[serde(default = "default_pending_del_dir")]
    pending_del_dir: PathBuf,
}

fn default_mode() -> String {
    "l2".into()
}

fn default_socket() -> PathBuf {
    PathBuf::from(hulk_agent_api::DEFAULT_SOCKET)
}

fn default_timeout() -> u64 {
    DEFAULT_CALLER_TIMEOUT.as_secs()
}

fn default_pending_del_dir() -> PathBuf {
    PathBuf::from(del_notes::DEFAULT_DIR)
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
    fields: &PluginFields,
    config: &NetConf,
    container_id: &str,
    ifname: &str,
    netns: Option<&Path>,
    args: &CniArgs,
) -> PodRequest {
    PodRequest {
        netns: netns.map(Path::to_path_buf),
        // The agent undoes an ADD still running when the plugin stops waiting.
        timeout_ms: Some(fields.agent_timeout_seconds.saturating_mul(1000)),
        ..PodRequest::new(Owner {
            pod: args
                .pod_namespace()
                .zip(args.pod_name())
                .map(|(namespace, name)| format!("{namespace}/{name}")),
            cni_network: Some(config.name.clone()),
            pod_uid: args.pod_uid().map(str::to_owned),
            ..Owner::new(container_id, ifname)
        })
    }
}

/// The address and MAC the runtime asks for, by the conventions runtimes
/// use: `IP=` / `MAC=` in `CNI_ARGS` (podman's `--ip`, `network reload`)
/// and the `ips` / `mac` capabilities in `runtimeConfig`. An address may
/// be written with a prefix (`10.61.0.50/24`); the subnet's prefix is what
/// the pod gets. One address per interface; two sources must agree.
fn requested(
    config: &NetConf,
    args: &CniArgs,
) -> Result<(Option<IpAddr>, Option<MacAddr>), CniError> {
    let runtime = config.runtime_config.as_ref();
    let mut addresses: Vec<(String, &str)> = Vec::new();
    if let Some(value) = args.get("IP") {
        addresses.extend(
            value
                .split(',')
                .map(|one| (one.trim().to_owned(), "CNI_ARGS IP")),
        );
    }
    if let Some(ips) = runtime.and_then(|runtime| runtime.get("ips")) {
        let list = ips
            .as_array()
            .ok_or_else(|| CniError::invalid_config("runtimeConfig.ips must be a list"))?;
        for ip in list {
            let text = ip
                .as_str()
                .ok_or_else(|| CniError::invalid_config("runtimeConfig.ips must hold strings"))?;
            addresses.push((text.to_owned(), "runtimeConfig.ips"));
        }
    }
    let address = agreeing(&addresses, "IP address", |text| {
        text.parse::<IpNet>()
            .map(|net| net.addr())
            .or_else(|_| text.parse::<IpAddr>())
            .ok()
    })?;
    let mut macs: Vec<(String, &str)> = Vec::new();
    if let Some(value) = args.get("MAC") {
        macs.push((value.to_owned(), "CNI_ARGS MAC"));
    }
    if let Some(value) = runtime.and_then(|runtime| runtime.get("mac")) {
        let text = value
            .as_str()
            .ok_or_else(|| CniError::invalid_config("runtimeConfig.mac must be a string"))?;
        macs.push((text.to_owned(), "runtimeConfig.mac"));
    }
    let mac = agreeing(&macs, "MAC address", |text| text.parse::<MacAddr>().ok())?;
    Ok((address, mac))
}

/// The one value the runtime's `(text, source)` requests name, parsed by
/// `parse`: none when there is none, an error (7) when one does not parse
/// or two disagree (one address, one MAC per interface).
fn agreeing<T: PartialEq + Copy>(
    requests: &[(String, &str)],
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, CniError> {
    let mut agreed: Option<T> = None;
    for (text, source) in requests.iter().filter(|(text, _)| !text.is_empty()) {
        let parsed = parse(text).ok_or_else(|| {
            CniError::invalid_config(format!("{source}: {text:?} is not an {what}"))
        })?;
        match agreed {
            Some(agreed_so_far) if agreed_so_far != parsed => {
                return Err(CniError::invalid_config(format!(
                    "one {what} per interface: the runtime asks for two ({source} says {text:?})"
                )));
            }
            _ => agreed = Some(parsed),
        }
    }
    Ok(agreed)
}

/// CHECK's comparison of the runtime's `prevResult` with what the agent
/// found: our interface (named `ifname`, in a sandbox) must be listed, with
/// the pod's MAC when it lists one, and every address it lists for that
/// interface must be the pod's, which must be among them.
fn compare_prev_result(
    prev: &CniResult,
    ifname: &str,
    found: &PodAttachment,
) -> Result<(), CniError> {
    let mismatch = |message: String| CniError::new(codes::DATAPATH, message);
    let ours: Vec<usize> = prev
        .interfaces
        .iter()
        .enumerate()
        .filter(|(_, interface)| interface.name == ifname && interface.sandbox.is_some())
        .map(|(index, _)| index)
        .collect();
    let Some(&index) = ours.first() else {
        return Err(mismatch(format!(
            "prevResult does not list interface {ifname} in the sandbox"
        )));
    };
    if let (Some(listed), Some(mac)) = (&prev.interfaces[index].mac, &found.mac)
        && !listed.eq_ignore_ascii_case(&mac.to_string())
    {
        return Err(mismatch(format!(
            "prevResult gives {ifname} MAC {listed}, the pod's is {}",
            mac
        )));
    }
    let listed: Vec<IpNet> = prev
        .ips
        .iter()
        .filter(|ip| {
            ip.interface
                .and_then(|interface| usize::try_from(interface).ok())
                .is_some_and(|interface| ours.contains(&interface))
        })
        .map(|ip| ip.address)
        .collect();
    let address = found.lease.address;
    if let Some(other) = listed.iter().find(|listed| **listed != address) {
        return Err(mismatch(format!(
            "prevResult names {other} on {ifname}, which the pod does not have (it has {address})"
        )));
    }
    if !listed.contains(&address) {
        return Err(mismatch(format!(
            "prevResult does not list the pod's address {address} on {ifname}"
        )));
    }
    Ok(())
}

/// Why a request to the agent got no reply to act on.
enum AgentError {
    /// The agent answered with this CNI error.
    Refused(CniError),
    /// No usable answer: the agent could not be reached, did not answer in
    /// time, or answered something that is not a reply.
    NoAnswer(ClientError),
}

impl AgentError {
    /// The CNI error to report.
    fn into_cni(self, fields: &PluginFields) -> CniError {
        match self {
            AgentError::Refused(error) => error,
            AgentError::NoAnswer(error) => no_answer(fields, &error),
        }
    }
}

/// Sends `request` and waits up to `agentTimeoutSeconds` for the reply.
async fn ask(fields: &PluginFields, request: PluginRequest) -> Result<PluginReply, AgentError> {
    let timeout = Duration::from_secs(fields.agent_timeout_seconds);
    match call(&fields.agent_socket, &request, timeout).await {
        Ok(PluginReply::Failed(error)) => Err(AgentError::Refused(error)),
        Ok(reply) => Ok(reply),
        Err(error) => {
            tracing::warn!(error = %hulk_cni::describe(&error), "no answer from the agent");
            Err(AgentError::NoAnswer(error))
        }
    }
}

/// The CNI error for an agent that gave no answer: 11 when it was reached
/// but too slow (the agent undoes an ADD whose caller gave up, so a retry
/// is safe), 103 when it could not be reached (or the connection broke:
/// the agent went away mid-request), 100 when its answer is not
/// a reply (a plugin and agent of incompatible versions). The full cause
/// is in `details`.
fn no_answer(fields: &PluginFields, error: &ClientError) -> CniError {
    let socket = fields.agent_socket.display();
    let cni = match error {
        ClientError::Timeout(_) => CniError::try_again_later(format!(
            "the hulk-vpc agent at {socket} timed out after {}s",
            fields.agent_timeout_seconds
        )),
        ClientError::Io { source, .. } => CniError::new(
            codes::AGENT_UNAVAILABLE,
            format!("the hulk-vpc agent at {socket} is unreachable: {source}"),
        ),
        ClientError::Reply(_) => CniError::new(
            codes::INTERNAL,
            format!("the hulk-vpc agent at {socket} sent an unreadable reply"),
        ),
    };
    cni.with_details(hulk_cni::describe(error))
}

/// Removes the pod's interface without the agent, as DEL does when the
/// agent gave no answer. Kept to this one function so that the local
/// teardown can change (it does not know who owns the interface) without
/// touching DEL's flow.
async fn local_teardown(netns: Option<&Path>, ifname: &str) -> Result<(), CniError> {
    let datapath_error = |error: &(dyn std::error::Error + 'static)| {
        CniError::new(codes::DATAPATH, hulk_cni::describe(error))
    };
    let kernel = NetlinkKernel::new().map_err(|error| datapath_error(&error))?;
    Datapath::new(kernel)
        .detach(netns, ifname, None, None)
        .await
        .map_err(|error| datapath_error(&error))
}

/// Writes the note the agent replays for a DEL it did not see. Failing it
/// fails DEL: succeeding without the note would leave the address assigned
/// to a pod that is gone.
fn note_del(fields: &PluginFields, pod: &PodRequest) -> Result<PathBuf, CniError> {
    let notes = DelNotes::new(&fields.pending_del_dir);
    notes.write(pod).map_err(|error| {
        CniError::new(
            codes::STATE_STORE,
            format!(
                "the hulk-vpc agent did not answer and the DEL cannot be noted for it in {}",
                notes.dir().display()
            ),
        )
        .with_details(hulk_cni::describe(&error))
    })
}

async fn dry_add(request: &AttachRequest) -> Result<CniResult, CniError> {
    let ipam = mock_ipam(&request.config)?;
    let backend = match ipam.gateway {
        Some(gateway) => MemoryBackend::with_gateway(ipam.subnet, gateway),
        None => MemoryBackend::new(ipam.subnet),
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
        .map_err(|error| {
            CniError::new(codes::of_ipam_error(&error), error.to_string()).with_causes(&error)
        })?
        .remove(0);
    let attachment = PodAttachment {
        mac: lease.mac,
        mtu: lease.mtu.unwrap_or(1500),
        index: 0,
        lease,
        routes: Vec::new(),
    };
    tracing::info!(container = %request.container_id, address = %attachment.lease.address, "dry-run ADD");
    Ok(attachment.to_cni_result(&request.ifname, &request.netns))
}

/// The hulk-vpc CNI plugin: each operation is one request to the node
/// agent (see the crate docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct VpcPlugin;

impl Plugin for VpcPlugin {
    async fn add(&self, request: AttachRequest) -> Result<CniResult, CniError> {
        let fields = fields(&request.config)?;
        let mut result = if fields.dry_run {
            dry_add(&request).await?
        } else {
            let mut pod = pod_request(
                &fields,
                &request.config,
                &request.container_id,
                &request.ifname,
                Some(&request.netns),
                &request.args,
            );
            (pod.address, pod.mac) = requested(&request.config, &request.args)?;
            match ask(&fields, PluginRequest::Add(pod)).await {
                Ok(PluginReply::Added(attachment)) => {
                    attachment.to_cni_result(&request.ifname, &request.netns)
                }
                Ok(other) => {
                    return Err(CniError::new(
                        codes::INTERNAL,
                        format!("unexpected agent reply {other:?}"),
                    ));
                }
                Err(error) => return Err(error.into_cni(&fields)),
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
            &fields,
            &request.config,
            &request.container_id,
            &request.ifname,
            request.netns.as_deref(),
            &request.args,
        );
        match ask(&fields, PluginRequest::Del(pod.clone())).await {
            Ok(_) => Ok(()),
            Err(AgentError::Refused(error)) => Err(error),
            Err(AgentError::NoAnswer(_)) => {
                // The note first: a crash after it still gets the address
                // back (the agent replays the note); a crash before the
                // teardown only leaves the runtime's retry to do it.
                let note = note_del(&fields, &pod)?;
                local_teardown(request.netns.as_deref(), &request.ifname).await?;
                tracing::warn!(
                    container = %request.container_id,
                    note = %note.display(),
                    "no answer from the agent: noted the DEL for it and tore the interface down locally"
                );
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
        let mut pod = pod_request(
            &fields,
            &attachment.config,
            &attachment.container_id,
            &attachment.ifname,
            Some(&attachment.netns),
            &attachment.args,
        );
        (pod.address, pod.mac) = requested(&attachment.config, &attachment.args)?;
        match ask(&fields, PluginRequest::Check(pod)).await {
            Ok(PluginReply::Checked(found)) => {
                compare_prev_result(&request.prev_result, &attachment.ifname, &found)
            }
            // An agent older than the comparison: its own check passed.
            Ok(_) => Ok(()),
            Err(error) => Err(error.into_cni(&fields)),
        }
    }

    async fn status(&self, config: NetConf) -> Result<(), CniError> {
        let fields = fields(&config)?;
        if fields.dry_run {
            return Ok(());
        }
        // Whatever kept the agent from answering, ADD cannot be served now.
        ask(&fields, PluginRequest::Status)
            .await
            .map(|_| ())
            .map_err(|error| match error {
                AgentError::Refused(error) => error,
                AgentError::NoAnswer(error) => CniError {
                    code: ErrorCode::PluginNotAvailable,
                    ..no_answer(&fields, &error)
                },
            })
    }

    async fn gc(&self, request: GcRequest) -> Result<(), CniError> {
        let fields = fields(&request.config)?;
        if fields.dry_run {
            return Ok(());
        }
        ask(
            &fields,
            PluginRequest::Gc {
                cni_network: Some(request.config.name.clone()),
                valid: request.valid_attachments,
            },
        )
        .await
        .map(|_| ())
        .map_err(|error| error.into_cni(&fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(runtime: serde_json::Value) -> NetConf {
        NetConf::from_value(json!({
            "cniVersion": "1.0.0", "name": "vpc", "type": "hulk-vpc-cni",
            "runtimeConfig": runtime,
        }))
        .unwrap()
    }

    fn args(text: &str) -> CniArgs {
        text.parse().unwrap()
    }

    #[test]
    fn a_runtime_asks_for_an_address_and_a_mac_by_either_convention() {
        let none = requested(&conf(json!({})), &args("IgnoreUnknown=1")).unwrap();
        assert_eq!(none, (None, None));
        let podman = requested(
            &conf(json!({})),
            &args("IgnoreUnknown=1;IP=10.61.0.50;MAC=02:11:22:33:44:55"),
        )
        .unwrap();
        assert_eq!(podman.0, Some("10.61.0.50".parse().unwrap()));
        assert_eq!(podman.1, Some(MacAddr([2, 0x11, 0x22, 0x33, 0x44, 0x55])));
        let capability = requested(
            &conf(json!({"ips": ["10.61.0.50/24"], "mac": "02:11:22:33:44:55"})),
            &args("IP=10.61.0.50"),
        )
        .unwrap();
        assert_eq!(capability, podman, "agreeing sources are one request");
    }

    #[test]
    fn what_cannot_be_one_request_is_refused_with_7() {
        for (runtime, cni_args) in [
            (json!({"ips": ["10.61.0.50", "10.61.0.51"]}), ""),
            (json!({"ips": ["10.61.0.50"]}), "IP=10.61.0.51"),
            (json!({}), "IP=ten.dot"),
            (json!({"mac": "zz:11"}), ""),
            (json!({"mac": "02:00:00:00:00:01"}), "MAC=02:00:00:00:00:02"),
            (json!({"ips": "10.61.0.50"}), ""),
        ] {
            let error = requested(&conf(runtime.clone()), &args(cni_args)).unwrap_err();
            assert_eq!(
                error.code,
                ErrorCode::InvalidNetworkConfig,
                "{runtime} {cni_args}"
            );
        }
    }

    fn found() -> PodAttachment {
        let lease: hulk_ipam::Lease = serde_json::from_value(json!({
            "id": "l1", "address": "10.20.0.5/24", "network": "vpc", "subnet": "s",
            "gateway": "10.20.0.1", "mac": null, "mtu": 1500, "gateway_mac": null,
            "security_groups": [], "qos_policy": null, "node": "n", "owner": null
        }))
        .unwrap();
        PodAttachment {
            lease,
            index: 3,
            mac: Some(MacAddr([2, 0, 0, 0, 0, 9])),
            mtu: 1500,
            routes: Vec::new(),
        }
    }

    #[test]
    fn check_compares_the_prev_result_with_the_pod() {
        let good = found().to_cni_result("eth0", Path::new("/var/run/netns/a"));
        compare_prev_result(&good, "eth0", &found()).unwrap();

        let mut other_address = good.clone();
        other_address.ips[0].address = "10.20.0.99/24".parse().unwrap();
        let error = compare_prev_result(&other_address, "eth0", &found()).unwrap_err();
        assert!(error.msg.contains("10.20.0.99/24"), "{}", error.msg);

        let mut other_mac = good.clone();
        other_mac.interfaces[0].mac = Some("02:00:00:00:00:10".into());
        assert!(compare_prev_result(&other_mac, "eth0", &found()).is_err());

        let mut no_address = good.clone();
        no_address.ips.clear();
        assert!(compare_prev_result(&no_address, "eth0", &found()).is_err());

        assert!(compare_prev_result(&good, "eth1", &found()).is_err());
    }
}
