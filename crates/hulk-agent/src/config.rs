//! The agent's configuration file (TOML), with defaults and validation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hulk_ipam::PoolKey;
use hulk_netns::{IpVlanFlag, IpVlanMode, MacVlanMode, NodeNetwork, SlaveKind};
use hulk_pool::PoolConfig;
use hulk_pool::core::millis;
use ipnet::IpNet;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name (Neutron `binding:host_id`, tags).
    pub node_name: String,
    /// The API socket the plugin connects to.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// The pool store; without it, state lives in memory only. Required
    /// with a cloud backend, refused with the memory backend (whose leases live in
    /// memory: a restart would hand out again what the store says pods
    /// hold).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// The namespace holding the parent interface; default: the agent's
    /// own (tests and demos point it at a namespace of their own).
    #[serde(default)]
    pub node_netns: Option<PathBuf>,
    /// Requests handled at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Deadline of one request, in seconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_seconds: u64,
    /// The rescue API's socket (`hulkctl`), root only.
    #[serde(default = "default_rescue_socket")]
    pub rescue_socket: PathBuf,
    /// Where to serve `/metrics` and `/healthz`; none without it.
    #[serde(default)]
    pub metrics_address: Option<SocketAddr>,
    /// Seconds between GC passes (DEL notes, gone sandboxes, dead pods,
    /// orphans).
    #[serde(default = "default_gc_interval")]
    pub gc_interval_seconds: u64,
    /// Where the plugin leaves a note for each DEL it did while the agent
    /// was unreachable (its `pendingDelDir`); replayed at start and on
    /// every GC pass.
    #[serde(default = "default_pending_del_dir")]
    pub pending_del_dir: PathBuf,
    /// The Kubernetes API, for pod annotations and the GC's live pods.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSection>,
    /// Where this agent's instance id is kept: the holder identity of the
    /// node's Lease. Kept across restarts, so a restarted agent is the same
    /// holder, while a second machine under the same node name is another.
    #[serde(default = "default_instance_file")]
    pub instance_file: PathBuf,
    /// Seconds between heartbeats: one of the node's marks in the backend
    /// rewritten with this agent's instance id, so that a second agent
    /// under this node name refuses to start, in any mode, and a dead
    /// agent's marks are taken over after three heartbeats
    /// (`hulk_pool::Fencing`). One backend call each.
    #[serde(default = "default_holder_heartbeat")]
    pub holder_heartbeat_seconds: u64,
    /// The node's datapath.
    pub network: NetworkSection,
    /// Where pods' addresses come from unless a pod asks otherwise.
    pub default_pool: PoolSection,
    /// Pool knobs.
    #[serde(default)]
    pub pool: PoolKnobs,
    /// The IPAM backend.
    pub backend: BackendSection,
}

fn default_socket() -> PathBuf {
    PathBuf::from(hulk_agent_api::DEFAULT_SOCKET)
}

fn default_rescue_socket() -> PathBuf {
    PathBuf::from(hulk_agent_api::DEFAULT_RESCUE_SOCKET)
}

fn default_pending_del_dir() -> PathBuf {
    PathBuf::from(hulk_agent_api::del_notes::DEFAULT_DIR)
}

fn default_instance_file() -> PathBuf {
    PathBuf::from("/var/lib/hulk-vpc/instance-id")
}

fn default_holder_heartbeat() -> u64 {
    60
}

fn default_gc_interval() -> u64 {
    60
}

/// `[kubernetes]`: in a pod, the defaults are the service account's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    /// The API server's URL; default from `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT`.
    #[serde(default)]
    pub api_server: Option<String>,
    /// The bearer token, read on each call (projected tokens rotate).
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// The API server's CA bundle.
    #[serde(default = "default_kube_ca_file")]
    pub ca_file: PathBuf,
    /// The namespace of the node's Lease (`hulk-vpc-node-<node>`), which
    /// fences the node's identity: one agent per node name.
    #[serde(default = "default_lease_namespace")]
    pub lease_namespace: String,
}

fn default_lease_namespace() -> String {
    "hulk-vpc".into()
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn default_token_file() -> PathBuf {
    PathBuf::from(SERVICE_ACCOUNT).join("token")
}

fn default_kube_ca_file() -> PathBuf {
    PathBuf::from(SERVICE_ACCOUNT).join("ca.crt")
}

impl KubernetesSection {
    /// The API server's URL: the configured one, or the in-cluster one
    /// from `host` and `port` (`KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub fn api_server(&self, host: Option<&str>, port: Option<&str>) -> Result<String, String> {
        if let Some(url) = &self.api_server {
            return Ok(url.clone());
        }
        match (host, port) {
            (Some(host), port) => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.to_owned()
                };
                Ok(format!("https://{host}:{}", port.unwrap_or("443")))
            }
            (None, _) => Err(
                "[kubernetes]: api_server is not set and KUBERNETES_SERVICE_HOST is not in the environment"
                    .into(),
            ),
        }
    }
}

/// The prefix of environment overrides: `HULK_AGENT__NETWORK__PARENT=eth1`
/// sets `[network] parent`.
pub const ENV_PREFIX: &str = "HULK_AGENT__";

fn default_max_in_flight() -> usize {
    64
}

fn default_request_timeout() -> u64 {
    60
}

/// `[network]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// The VPC-facing parent interface.
    pub parent: String,
    /// `ipvlan` (default) or `macvlan`.
    #[serde(default)]
    pub kind: LinkKind,
    /// ipvlan `l2` (default), `l3`, `l3s`; macvlan `bridge` (default), `private`, `vepa`, `passthru`.
    #[serde(default)]
    pub mode: Option<LinkMode>,
    /// The host-side slave.
    #[serde(default = "default_host_link")]
    pub host_link: String,
    /// The node address on the host-side slave, with its prefix.
    pub node_address: IpNet,
    /// Service (ClusterIP) ranges.
    #[serde(default)]
    pub service_cidrs: Vec<IpNet>,
}

/// `[network] kind`: which slave of the parent a pod gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// An ipvlan slave (shares the parent's MAC).
    #[default]
    Ipvlan,
    /// A macvlan slave (its own MAC).
    Macvlan,
}

/// `[network] mode`: the ipvlan or macvlan mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkMode {
    /// ipvlan L2 (the default for ipvlan).
    L2,
    /// ipvlan L3.
    L3,
    /// ipvlan L3 with netfilter on the slave (L3S).
    L3s,
    /// macvlan bridge (the default for macvlan).
    Bridge,
    /// macvlan private.
    Private,
    /// macvlan VEPA.
    Vepa,
    /// macvlan passthru.
    Passthru,
}

impl std::fmt::Display for LinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkKind::Ipvlan => "ipvlan",
            LinkKind::Macvlan => "macvlan",
        })
    }
}

impl std::fmt::Display for LinkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkMode::L2 => "l2",
            LinkMode::L3 => "l3",
            LinkMode::L3s => "l3s",
            LinkMode::Bridge => "bridge",
            LinkMode::Private => "private",
            LinkMode::Vepa => "vepa",
            LinkMode::Passthru => "passthru",
        })
    }
}

fn default_host_link() -> String {
    "hulk0".into()
}

/// `[default_pool]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    /// VPC network id.
    pub network: String,
    /// Subnet id.
    pub subnet: String,
    /// Security group ids.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// QoS policy id.
    #[serde(default)]
    pub qos_policy: Option<String>,
}

/// `[pool]`: the knobs of `hulk_pool::PoolConfig`, durations in seconds
/// (the adaptive ADD wait target in milliseconds).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolKnobs {
    /// See `PoolConfig::min_idle`.
    pub min_idle: usize,
    /// See `PoolConfig::max_idle`.
    pub max_idle: usize,
    /// See `PoolConfig::batch`.
    pub batch: usize,
    /// See `PoolConfig::warm_up`.
    pub warm_up: usize,
    /// See `PoolConfig::max_total`.
    pub max_total: usize,
    /// See `PoolConfig::max_held`; absent: twice `max_total`.
    pub max_held: Option<usize>,
    /// See `PoolConfig::reuse_cooldown`.
    pub reuse_cooldown_seconds: u64,
    /// See `PoolConfig::assign_timeout`.
    pub assign_timeout_seconds: u64,
    /// See `PoolConfig::target_add_p99`, in milliseconds; absent: the
    /// static watermarks alone (the default).
    pub target_add_p99_ms: Option<u64>,
    /// See `PoolConfig::adaptive_calls_per_minute`.
    pub adaptive_calls_per_minute: u32,
}

impl Default for PoolKnobs {
    fn default() -> Self {
        let defaults = PoolConfig::default();
        PoolKnobs {
            min_idle: defaults.min_idle,
            max_idle: defaults.max_idle,
            batch: defaults.batch,
            warm_up: defaults.warm_up,
            max_total: defaults.max_total,
            max_held: defaults.max_held,
            reuse_cooldown_seconds: defaults.reuse_cooldown.as_secs(),
            assign_timeout_seconds: defaults.assign_timeout.as_secs(),
            target_add_p99_ms: defaults.target_add_p99.map(millis),
            adaptive_calls_per_minute: defaults.adaptive_calls_per_minute,
        }
    }
}

/// `[backend]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendSection {
    /// The in-memory backend (demos, tests): `type = "memory"` (or its
    /// older name, `"mock"`). It forgets its leases when the agent stops.
    #[serde(alias = "mock")]
    Memory {
        /// The subnet it hands out.
        subnet: IpNet,
        /// The gateway; default: the subnet's first host.
        #[serde(default)]
        gateway: Option<std::net::IpAddr>,
        /// The gateway's MAC: with it pods get a permanent neighbour entry.
        #[serde(default)]
        gateway_mac: Option<hulk_ipam::MacAddr>,
        /// Added to every call, to behave like a slow cloud (demos, e2e).
        #[serde(default)]
        latency_ms: u64,
    },
    /// An UltrON-style IPAM service (docs/ultron-ipam-v1.md).
    Ultron {
        /// The service's base URL (without `/v1`).
        url: String,
        /// A file holding the bearer token (a mounted Secret).
        token_file: PathBuf,
        /// The cluster's name, tagged on every address.
        cluster: String,
        /// A PEM CA bundle to trust besides the system roots.
        #[serde(default)]
        ca_file: Option<PathBuf>,
    },
    /// OpenStack Neutron with Keystone v3 application credentials.
    Neutron {
        /// Keystone's v3 URL.
        auth_url: String,
        /// The application credential's id.
        application_credential_id: String,
        /// A file holding the application credential's secret.
        application_credential_secret_file: PathBuf,
        /// The cluster's name, tagged on every port.
        cluster: String,
        /// The Neutron endpoint, when not the catalog's.
        #[serde(default)]
        endpoint: Option<String>,
        /// The catalog region.
        #[serde(default)]
        region: Option<String>,
        /// A PEM CA bundle to trust besides the system roots.
        #[serde(default)]
        ca_file: Option<PathBuf>,
        /// Nested mode, for nodes that are Nova VMs: `"auto"` (the port
        /// with the parent interface's MAC and the node's address) or the
        /// node port's id. Pod addresses are then unbound ports, each
        /// allowed on the node port (`allowed_address_pairs`). Absent: off,
        /// pod ports bound to the node's host (bare metal).
        #[serde(default)]
        node_port: Option<String>,
        /// The external network (name or id) every pod gets a floating IP
        /// of, unless its `hulk-vpc.io/floating-ip` annotation says
        /// `"false"`; without it, only pods whose annotation names a
        /// network (or says `"true"`, which then is refused) get one.
        #[serde(default)]
        floating_network: Option<String>,
        /// What happens to a pod's floating IP when the pod goes, unless
        /// its `hulk-vpc.io/floating-ip-policy` annotation says: `release`
        /// (deleted, the default) or `keep` (disassociated, and associated
        /// again with the next pod of the same name).
        #[serde(default)]
        floating_ip_policy: hulk_ipam::FloatingIpPolicy,
    },
}

/// The value of `[backend] node_port` that finds the node port by itself.
pub const NODE_PORT_AUTO: &str = "auto";

/// Whether `text` has a UUID's form (Neutron's ids): 8-4-4-4-12 hex digits.
fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.chars().all(|c| c.is_ascii_hexdigit()))
}

impl BackendSection {
    /// The node's floating IP setting: the external network every pod gets
    /// a floating IP of (`None`: only annotated pods) and the default
    /// policy. Only the Neutron backend has floating IPs.
    pub fn floating_ip_setting(&self) -> (Option<String>, hulk_ipam::FloatingIpPolicy) {
        match self {
            BackendSection::Neutron {
                floating_network,
                floating_ip_policy,
                ..
            } => (floating_network.clone(), *floating_ip_policy),
            _ => (None, hulk_ipam::FloatingIpPolicy::default()),
        }
    }
}

/// Why a configuration cannot be used. Each says where the problem is:
/// the file, an environment override, or a value that is well-formed but
/// not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("the configuration file is not valid TOML")]
    Syntax(#[source] toml::de::Error),
    /// An environment override cannot be applied.
    #[error("environment variable {variable}: {problem}")]
    Override {
        /// The variable (`HULK_AGENT__...`).
        variable: String,
        /// What is wrong with its name.
        problem: String,
    },
    /// A field is missing, unknown or of the wrong type (in the file, or
    /// set by an override: the message names the field).
    #[error("the configuration does not fit the agent's schema")]
    Schema(#[source] toml::de::Error),
    /// A value is well-formed but not usable; the message names the field.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl AgentConfig {
    /// Reads the file at `path` and parses it with the overrides among
    /// `variables` ([`AgentConfig::parse_with_overrides`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] saying whether the file, an override or a value is
    /// at fault.
    pub fn load(
        path: &std::path::Path,
        variables: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_with_overrides(&text, variables)
    }

    /// Parses and validates a configuration file's text.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field that is wrong.
    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        Self::parse_with_overrides(text, std::iter::empty())
    }

    /// Parses `text` with the overrides among `variables` (those starting
    /// with [`ENV_PREFIX`]; pass `std::env::vars()`) applied, then
    /// validates. A value is read as TOML when it parses as a TOML value
    /// (numbers, booleans, arrays), else as a string.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] saying whether the text, an override or a value is
    /// at fault.
    pub fn parse_with_overrides(
        text: &str,
        variables: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(ConfigError::Syntax)?;
        for (name, value) in variables {
            if let Some(path) = name.strip_prefix(ENV_PREFIX) {
                override_field(&mut table, path, &value).map_err(|problem| {
                    ConfigError::Override {
                        variable: name.clone(),
                        problem,
                    }
                })?;
            }
        }
        let config: AgentConfig = toml::Value::Table(table)
            .try_into()
            .map_err(ConfigError::Schema)?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        // The pool's own check would name its field, `assign_timeout`.
        if self.pool.assign_timeout_seconds == 0 {
            return Err("[pool] assign_timeout_seconds must be at least 1".into());
        }
        if !(1..=86_400).contains(&self.holder_heartbeat_seconds) {
            return Err("holder_heartbeat_seconds must be 1 to 86400 (a day)".into());
        }
        if self.gc_interval_seconds == 0 {
            return Err("gc_interval_seconds must be at least 1".into());
        }
        self.pool_config()?;
        self.slave_kind()?;
        if let BackendSection::Neutron {
            node_port: Some(node_port),
            ..
        } = &self.backend
        {
            if node_port != NODE_PORT_AUTO && !is_uuid(node_port) {
                return Err(format!(
                    "[backend] node_port must be \"{NODE_PORT_AUTO}\" or a Neutron port id \
                     (a UUID such as 6f1c2a3e-1b2c-4d5e-8f90-1a2b3c4d5e6f), not {node_port:?}"
                ));
            }
            // Port security passes one MAC per address pair: the node
            // port's, which only ipvlan slaves share.
            if self.network.kind != LinkKind::Ipvlan {
                return Err(format!(
                    "[backend] node_port (nested mode) needs [network] kind = \"ipvlan\": \
                     Neutron lets pod addresses through the node's port with its MAC only, \
                     and {} slaves have their own",
                    self.network.kind
                ));
            }
        }
        if let BackendSection::Neutron {
            floating_network: Some(network),
            ..
        } = &self.backend
            && network.trim().is_empty()
        {
            return Err(
                "[backend] floating_network must name an external network (name or id), \
                 or be left out"
                    .into(),
            );
        }
        if self.node_name.is_empty() {
            return Err("node_name must not be empty".into());
        }
        // Cloud addresses outlive the agent, and only the store knows
        // cooldowns, drains and the holders the cloud's marks have not
        // caught up with yet.
        if self.state_file.is_none() && !matches!(self.backend, BackendSection::Memory { .. }) {
            return Err(
                "state_file is required with a cloud backend: without it a restarted agent \
                 forgets which pods hold addresses"
                    .into(),
            );
        }
        // The memory backend keeps its leases in the agent's memory: restarted, it
        // hands out from the start of its subnet again while the store
        // says pods hold those addresses, so one address ends up in two
        // pods.
        if self.state_file.is_some() && matches!(self.backend, BackendSection::Memory { .. }) {
            return Err(
                "state_file cannot be used with backend.type = \"memory\": that backend keeps \
                 its leases in memory, so after a restart it hands out again the addresses the \
                 state file says pods hold, and one address ends up in two pods; remove \
                 state_file (the memory backend is for demos and tests) or use a cloud backend"
                    .into(),
            );
        }
        Ok(())
    }

    /// The pool knobs as the engine takes them, validated.
    ///
    /// # Errors
    ///
    /// A message naming the knob that is wrong.
    pub fn pool_config(&self) -> Result<PoolConfig, String> {
        let knobs = &self.pool;
        let config = PoolConfig {
            min_idle: knobs.min_idle,
            max_idle: knobs.max_idle,
            batch: knobs.batch,
            warm_up: knobs.warm_up,
            max_total: knobs.max_total,
            max_held: knobs.max_held,
            reuse_cooldown: Duration::from_secs(knobs.reuse_cooldown_seconds),
            assign_timeout: Duration::from_secs(knobs.assign_timeout_seconds),
            target_add_p99: knobs.target_add_p99_ms.map(Duration::from_millis),
            adaptive_calls_per_minute: knobs.adaptive_calls_per_minute,
            ..PoolConfig::default()
        };
        config
            .validate()
            .map(|()| config)
            .map_err(|error| format!("[pool]: {error}"))
    }

    /// The slave kind from `kind` and `mode`.
    ///
    /// # Errors
    ///
    /// A message naming a mode that is not one of the kind's.
    pub fn slave_kind(&self) -> Result<SlaveKind, String> {
        let network = &self.network;
        let macvlan = |mode| Ok(SlaveKind::MacVlan { mode });
        match (network.kind, network.mode) {
            (LinkKind::Ipvlan, None | Some(LinkMode::L2)) => Ok(ipvlan(IpVlanMode::L2)),
            (LinkKind::Ipvlan, Some(LinkMode::L3)) => Ok(ipvlan(IpVlanMode::L3)),
            (LinkKind::Ipvlan, Some(LinkMode::L3s)) => Ok(ipvlan(IpVlanMode::L3s)),
            (LinkKind::Macvlan, None | Some(LinkMode::Bridge)) => macvlan(MacVlanMode::Bridge),
            (LinkKind::Macvlan, Some(LinkMode::Private)) => macvlan(MacVlanMode::Private),
            (LinkKind::Macvlan, Some(LinkMode::Vepa)) => macvlan(MacVlanMode::Vepa),
            (LinkKind::Macvlan, Some(LinkMode::Passthru)) => macvlan(MacVlanMode::Passthru),
            (kind, Some(mode)) => Err(format!(
                "[network]: mode {mode} is not a mode of {kind} (ipvlan: l2, l3, l3s; macvlan: bridge, private, vepa, passthru)"
            )),
        }
    }

    /// The node network.
    ///
    /// # Errors
    ///
    /// As [`AgentConfig::slave_kind`].
    pub fn node_network(&self) -> Result<NodeNetwork, String> {
        Ok(NodeNetwork {
            parent: self.network.parent.clone(),
            kind: self.slave_kind()?,
            host_link: self.network.host_link.clone(),
            node_address: self.network.node_address,
            service_cidrs: self.network.service_cidrs.clone(),
        })
    }

    /// The default pool key.
    pub fn default_pool_key(&self) -> PoolKey {
        let pool = &self.default_pool;
        PoolKey::new(
            pool.network.clone(),
            pool.subnet.clone(),
            pool.security_groups.clone(),
            pool.qos_policy.clone(),
        )
    }
}

/// Sets the field at `path` (`NETWORK__PARENT`) in `table`.
fn override_field(table: &mut toml::Table, path: &str, raw: &str) -> Result<(), String> {
    let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    let Some((field, sections)) = keys.split_last() else {
        return Err("no field named".into());
    };
    if keys.iter().any(String::is_empty) {
        return Err("an empty name between `__`".into());
    }
    let mut current = table;
    for section in sections {
        let entry = current
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("{section} is not a section"))?;
    }
    let value = toml::from_str::<toml::Table>(&format!("value = {raw}"))
        .ok()
        .and_then(|mut parsed| parsed.remove("value"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    current.insert(field.clone(), value);
    Ok(())
}

fn ipvlan(mode: IpVlanMode) -> SlaveKind {
    SlaveKind::IpVlan {
        mode,
        flag: IpVlanFlag::Bridge,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error and its causes, as the binary prints them.
    fn described(error: &ConfigError) -> String {
        let causes = hulk_cni::cause_chain(std::error::Error::source(error));
        format!("{error}: {causes}")
    }

    const MINIMAL: &str = r#"
        node_name = "node-1"
        [network]
        parent = "eth1"
        node_address = "10.20.0.250/24"
        service_cidrs = ["10.96.0.0/12"]
        [default_pool]
        network = "vpc"
        subnet = "subnet-a"
        security_groups = ["sg-b", "sg-a"]
        [backend]
        type = "memory"
        subnet = "10.20.0.0/24"
    "#;

    #[test]
    fn a_minimal_file_gets_the_defaults() {
        let config = AgentConfig::parse(MINIMAL).unwrap();
        assert_eq!(config.socket, PathBuf::from("/run/hulk-vpc/agent.sock"));
        assert_eq!(config.slave_kind().unwrap(), SlaveKind::default());
        assert_eq!(
            config.pool_config().unwrap().min_idle,
            PoolConfig::default().min_idle
        );
        assert_eq!(config.default_pool_key().security_groups, ["sg-a", "sg-b"]);
        assert_eq!(config.node_network().unwrap().host_link, "hulk0");
    }

    #[test]
    fn the_heartbeat_is_a_second_to_a_day() {
        assert_eq!(
            AgentConfig::parse(MINIMAL)
                .unwrap()
                .holder_heartbeat_seconds,
            60
        );
        for seconds in [0, 86_401, i64::MAX] {
            let file = MINIMAL.replace(
                "node_name = \"node-1\"",
                &format!("node_name = \"node-1\"\nholder_heartbeat_seconds = {seconds}"),
            );
            let error = described(&AgentConfig::parse(&file).unwrap_err());
            assert!(
                error.contains("holder_heartbeat_seconds must be 1 to 86400"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_readme_example_is_a_valid_configuration() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .expect("README next to the workspace");
        let example = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|block| block.split("```").next())
            .expect("a toml block in the README");
        let config = AgentConfig::parse(example).unwrap();
        assert_eq!(config.node_name, "node-1");
        assert_eq!(
            config.state_file,
            Some(PathBuf::from("/var/lib/hulk-vpc/pool.redb"))
        );
    }

    #[test]
    fn the_cloud_backends_parse_and_need_a_state_file() {
        let with_state = MINIMAL.replace(
            "node_name = \"node-1\"",
            "node_name = \"node-1\"\nstate_file = \"/var/lib/hulk-vpc/pool.redb\"",
        );
        let ultron = with_state.replace(
            "type = \"memory\"\n        subnet = \"10.20.0.0/24\"",
            "type = \"ultron\"\nurl = \"https://ipam.example\"\ntoken_file = \"/etc/hulk/token\"\ncluster = \"prod\"",
        );
        assert!(matches!(
            AgentConfig::parse(&ultron).unwrap().backend,
            BackendSection::Ultron { .. }
        ));
        let in_memory = ultron.replace("state_file = \"/var/lib/hulk-vpc/pool.redb\"", "");
        let error = AgentConfig::parse(&in_memory).unwrap_err();
        assert!(
            described(&error).contains("state_file is required"),
            "{}",
            described(&error)
        );
        let neutron = with_state.replace(
            "type = \"memory\"\n        subnet = \"10.20.0.0/24\"",
            "type = \"neutron\"\nauth_url = \"https://keystone:5000/v3\"\napplication_credential_id = \"id\"\napplication_credential_secret_file = \"/etc/hulk/secret\"\ncluster = \"prod\"",
        );
        let BackendSection::Neutron {
            region, node_port, ..
        } = AgentConfig::parse(&neutron).unwrap().backend
        else {
            panic!("not neutron");
        };
        assert_eq!((region, node_port), (None, None), "nested mode is off");
        for setting in ["auto", "6f1c2a3e-1b2c-4d5e-8f90-1a2b3c4d5e6f"] {
            let nested = format!("{neutron}\nnode_port = \"{setting}\"\n");
            let BackendSection::Neutron { node_port, .. } =
                AgentConfig::parse(&nested).unwrap().backend
            else {
                panic!("not neutron");
            };
            assert_eq!(node_port.as_deref(), Some(setting));
        }
        for (setting, expected) in [
            ("", "must be \"auto\" or a Neutron port id"),
            ("a port", "must be \"auto\" or a Neutron port id"),
            ("Auto", "must be \"auto\" or a Neutron port id"),
            (
                "6f1c2a3e-1b2c-4d5e-8f90",
                "must be \"auto\" or a Neutron port id",
            ),
        ] {
            let nested = format!("{neutron}\nnode_port = \"{setting}\"\n");
            let error = described(&AgentConfig::parse(&nested).unwrap_err());
            assert!(error.contains(expected), "{expected:?} not in {error}");
        }
        let macvlan = format!("{neutron}\nnode_port = \"auto\"\n")
            .replace("parent = \"eth1\"", "parent = \"eth1\"\nkind = \"macvlan\"");
        let error = described(&AgentConfig::parse(&macvlan).unwrap_err());
        assert!(
            error.contains("needs [network] kind = \"ipvlan\""),
            "{error}"
        );
        assert_eq!(
            AgentConfig::parse(&neutron)
                .unwrap()
                .backend
                .floating_ip_setting(),
            (None, hulk_ipam::FloatingIpPolicy::Release)
        );
        let floating = neutron.replace(
            "cluster = \"prod\"",
            "cluster = \"prod\"\nfloating_network = \"public\"\nfloating_ip_policy = \"keep\"",
        );
        assert_eq!(
            AgentConfig::parse(&floating)
                .unwrap()
                .backend
                .floating_ip_setting(),
            (Some("public".into()), hulk_ipam::FloatingIpPolicy::Keep)
        );
        let wrong = floating.replace("\"keep\"", "\"forever\"");
        assert!(AgentConfig::parse(&wrong).is_err());
        let empty = floating.replace("\"public\"", "\"\"");
        let error = described(&AgentConfig::parse(&empty).unwrap_err());
        assert!(error.contains("floating_network must name"), "{error}");
    }

    #[test]
    fn the_memory_backend_keeps_its_older_name() {
        let old = MINIMAL.replace("type = \"memory\"", "type = \"mock\"");
        assert_eq!(
            AgentConfig::parse(&old).unwrap().backend,
            AgentConfig::parse(MINIMAL).unwrap().backend
        );
    }

    #[test]
    fn the_memory_backend_refuses_a_state_file() {
        let with_state = MINIMAL.replace(
            "node_name = \"node-1\"",
            "node_name = \"node-1\"\nstate_file = \"/var/lib/hulk-vpc/pool.redb\"",
        );
        let error = AgentConfig::parse(&with_state).unwrap_err();
        for named in ["state_file", "backend.type = \"memory\"", "two pods"] {
            assert!(
                described(&error).contains(named),
                "{named:?} not in {}",
                described(&error)
            );
        }
        // The same through the environment, as a DaemonSet may set it.
        let variables = [(
            "HULK_AGENT__STATE_FILE".to_owned(),
            "/var/lib/hulk-vpc/pool.redb".to_owned(),
        )];
        let error = AgentConfig::parse_with_overrides(MINIMAL, variables).unwrap_err();
        assert!(
            described(&error).contains("state_file cannot be used"),
            "{}",
            described(&error)
        );
        assert_eq!(AgentConfig::parse(MINIMAL).unwrap().state_file, None);
    }

    #[test]
    fn environment_overrides_any_field() {
        let variables = [
            ("HULK_AGENT__NODE_NAME", "node-7"),
            ("HULK_AGENT__NETWORK__PARENT", "ens5"),
            ("HULK_AGENT__NETWORK__SERVICE_CIDRS", r#"["10.100.0.0/16"]"#),
            ("HULK_AGENT__POOL__MIN_IDLE", "3"),
            ("HULK_AGENT__METRICS_ADDRESS", "0.0.0.0:9464"),
            ("HULK_AGENT__KUBERNETES__API_SERVER", "https://10.96.0.1"),
            ("UNRELATED", "x"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
        let config = AgentConfig::parse_with_overrides(MINIMAL, variables).unwrap();
        assert_eq!(config.node_name, "node-7");
        assert_eq!(config.network.parent, "ens5");
        assert_eq!(
            config.network.service_cidrs,
            ["10.100.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(config.pool.min_idle, 3);
        assert_eq!(
            config.metrics_address,
            Some("0.0.0.0:9464".parse().unwrap())
        );
        let kubernetes = config.kubernetes.unwrap();
        assert_eq!(kubernetes.token_file, default_token_file());
        assert_eq!(
            kubernetes.api_server(None, None).unwrap(),
            "https://10.96.0.1"
        );

        let typo = [("HULK_AGENT__NETWORK__PARNET".to_owned(), "eth1".to_owned())];
        let error = AgentConfig::parse_with_overrides(MINIMAL, typo).unwrap_err();
        assert!(
            described(&error).contains("parnet"),
            "{}",
            described(&error)
        );
    }

    #[test]
    fn the_in_cluster_api_server_comes_from_the_service_environment() {
        let section = KubernetesSection {
            api_server: None,
            token_file: default_token_file(),
            ca_file: default_kube_ca_file(),
            lease_namespace: default_lease_namespace(),
        };
        assert_eq!(
            section.api_server(Some("10.96.0.1"), Some("443")).unwrap(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            section.api_server(Some("fd00::1"), None).unwrap(),
            "https://[fd00::1]:443"
        );
        assert!(section.api_server(None, None).is_err());
    }

    #[test]
    fn the_adaptive_pool_is_opt_in() {
        let fixed = AgentConfig::parse(MINIMAL).unwrap().pool_config().unwrap();
        assert_eq!(fixed.target_add_p99, None);
        let text = format!(
            "{MINIMAL}\n[pool]\nmax_idle = 64\ntarget_add_p99_ms = 250\nadaptive_calls_per_minute = 12\n"
        );
        let adaptive = AgentConfig::parse(&text).unwrap().pool_config().unwrap();
        assert_eq!(adaptive.target_add_p99, Some(Duration::from_millis(250)));
        assert_eq!(adaptive.adaptive_calls_per_minute, 12);
        assert_eq!(adaptive.max_idle, 64);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                MINIMAL.replace("parent = \"eth1\"", "parent = \"eth1\"\nmode = \"l4\""),
                "unknown variant `l4`, expected one of `l2`, `l3`, `l3s`",
            ),
            (
                MINIMAL.replace("parent = \"eth1\"", "parent = \"eth1\"\nmode = \"bridge\""),
                "mode bridge is not a mode of ipvlan",
            ),
            (
                format!("{MINIMAL}\n[pool]\nassign_timeout_seconds = 0\n"),
                "[pool] assign_timeout_seconds must be at least 1",
            ),
            (
                format!("{MINIMAL}\n[pool]\nmin_idle = 50\nmax_idle = 5\n"),
                "min_idle (50) is above max_idle (5)",
            ),
            (
                format!(
                    "{MINIMAL}\n[pool]\ntarget_add_p99_ms = 500\nadaptive_calls_per_minute = 0\n"
                ),
                "adaptive_calls_per_minute must be at least 1",
            ),
            (MINIMAL.replace("node_name", "nodename"), "nodename"),
            (
                MINIMAL.replace("type = \"memory\"", "type = \"carrier-pigeon\""),
                "carrier-pigeon",
            ),
            (
                MINIMAL.replace("10.20.0.250/24", "not-an-address"),
                "node_address",
            ),
        ];
        for (text, expected) in cases {
            let error = described(&AgentConfig::parse(&text).unwrap_err());
            assert!(error.contains(expected), "{expected:?} not in {error}");
            // Values are shown as the user wrote them, not as Rust debug
            // output.
            assert!(!error.contains("Some("), "{error}");
        }
    }
}
