//! [`ControllerConfig`] and [`ReleaseSettings`]: how long a node must be
//! gone, how often a pass runs, and how fast addresses go back; and
//! [`ControllerFile`], the `hulk-controller` configuration file that holds
//! them with the leader lease, the Kubernetes API and the backend.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hulk_agent::config::BackendSection;
use hulk_kube::{ClientOptions, LeaseConfig};
use serde::Deserialize;

use crate::controller::LEADER_LEASE;

/// How the controller judges nodes gone and paces its passes. Read from
/// TOML (every field optional; unknown fields refused).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Seconds a node must have been missing from the API, counted from
    /// the first pass that missed it, before its addresses are returned
    /// (it must also be missing on at least two passes). Covers a node
    /// deleted and registered again by its kubelet, and a watch that lags.
    /// Default 300.
    pub grace_period_seconds: u64,
    /// Seconds between two passes (list the cluster's allocations, judge,
    /// release). Default 60.
    pub pass_interval_seconds: u64,
    /// How releases are paced.
    pub release: ReleaseSettings,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            grace_period_seconds: 300,
            pass_interval_seconds: 60,
            release: ReleaseSettings::default(),
        }
    }
}

impl ControllerConfig {
    /// [`ControllerConfig::grace_period_seconds`] as a duration.
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_seconds)
    }

    /// [`ControllerConfig::pass_interval_seconds`] as a duration.
    pub fn pass_interval(&self) -> Duration {
        Duration::from_secs(self.pass_interval_seconds)
    }

    /// Refuses values that cannot work.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pass_interval_seconds == 0 {
            return Err(ConfigError::invalid(
                "pass_interval_seconds",
                "must be at least 1",
            ));
        }
        self.release.validate()
    }
}

/// How releases go to the backend: at most `releases_per_second` calls
/// started a second, `concurrency` at a time, each checked right before it
/// starts (still leading, node still missing), with a progress line every
/// `batch_size`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReleaseSettings {
    /// Release calls started per second, at most (no bursts: one every
    /// `1 / releases_per_second` seconds). Default 20.
    pub releases_per_second: f64,
    /// Release calls in flight at once. With a backend taking `t` seconds
    /// a call, the rate reached is `min(releases_per_second, concurrency /
    /// t)`. Default 32: the default rate with a cloud taking 1.5 s a call.
    pub concurrency: usize,
    /// Releases per batch: a progress line (done, released, already gone,
    /// failed, skipped) is logged after each. Default 100.
    pub batch_size: usize,
}

impl Default for ReleaseSettings {
    fn default() -> Self {
        Self {
            releases_per_second: 20.0,
            concurrency: 32,
            batch_size: 100,
        }
    }
}

/// The most releases a second the pacing takes: beyond it a tick would be
/// shorter than a microsecond.
const MOST_PER_SECOND: f64 = 1_000_000.0;

impl ReleaseSettings {
    /// The time between two release calls' starts.
    pub fn spacing(&self) -> Duration {
        Duration::from_secs_f64(
            1.0 / self
                .releases_per_second
                .clamp(f64::MIN_POSITIVE, MOST_PER_SECOND),
        )
    }

    /// Refuses values that cannot work.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.releases_per_second.is_finite()
            && self.releases_per_second >= 0.001
            && self.releases_per_second <= MOST_PER_SECOND)
        {
            return Err(ConfigError::invalid(
                "release.releases_per_second",
                "must be between 0.001 and 1000000",
            ));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::invalid(
                "release.concurrency",
                "must be at least 1",
            ));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::invalid(
                "release.batch_size",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct ConfigError {
    /// The field, as written in TOML (`release.concurrency`).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl ConfigError {
    fn invalid(field: &'static str, problem: &'static str) -> Self {
        Self { field, problem }
    }
}

/// The `hulk-controller` configuration file (TOML; docs/operations.md,
/// "Configuration"): every section but `[backend]` optional, unknown
/// fields refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerFile {
    /// `metrics_address`: serves `/metrics` and `/healthz` here; none
    /// without it.
    #[serde(default)]
    pub metrics_address: Option<SocketAddr>,
    /// `[leader]`: the lease that elects the active replica.
    #[serde(default)]
    pub leader: LeaderSection,
    /// `[controller]`: grace period, pass interval, release pacing.
    #[serde(default)]
    pub controller: ControllerConfig,
    /// `[kubernetes]`: without it, in-cluster settings, else the
    /// kubeconfig.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSection>,
    /// `[backend]`: the agent's section, with the same cluster name (the
    /// controller lists and releases that cluster's allocations).
    pub backend: BackendSection,
}

impl ControllerFile {
    /// Reads, parses and validates the file at `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigFileError`] naming `path`: it cannot be read, does not fit
    /// the schema (the TOML cause names the line and field), or a value
    /// cannot work (the cause names the field).
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`, the contents of the file at `path`
    /// (named in errors only).
    ///
    /// # Errors
    ///
    /// [`ConfigFileError::Schema`] or [`ConfigFileError::Invalid`], as
    /// [`ControllerFile::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigFileError> {
        let file: Self = toml::from_str(text).map_err(|source| ConfigFileError::Schema {
            path: path.to_path_buf(),
            source,
        })?;
        file.controller
            .validate()
            .and_then(|()| file.leader.validate())
            .map_err(|source| ConfigFileError::Invalid {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(file)
    }

    /// How to reach the Kubernetes API: `[kubernetes]`, else the defaults
    /// (in-cluster, else the kubeconfig).
    pub fn client_options(&self) -> ClientOptions {
        match &self.kubernetes {
            None => ClientOptions::default(),
            Some(section) => ClientOptions {
                api_server: Some(section.api_server.clone()),
                ca_file: section.ca_file.clone(),
                token_file: section.token_file.clone(),
            },
        }
    }
}

/// `[leader]`: the `coordination.k8s.io/v1` Lease that elects the active
/// replica.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderSection {
    /// The lease's namespace. Default: `POD_NAMESPACE` from the
    /// environment, else `kube-system`.
    pub namespace: Option<String>,
    /// The lease's name. Default [`LEADER_LEASE`].
    pub name: String,
    /// Seconds the lease lasts without renewal. Default
    /// [`LeaseConfig::LEADER_DURATION_SECONDS`].
    pub duration_seconds: u32,
}

impl LeaderSection {
    /// Refuses a Lease nobody can hold: an empty name, or one that expires
    /// as it is taken.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::invalid("leader.name", "must not be empty"));
        }
        if self.duration_seconds < 2 {
            return Err(ConfigError::invalid(
                "leader.duration_seconds",
                "must be at least 2 (renewed at a third of it)",
            ));
        }
        Ok(())
    }
}

impl Default for LeaderSection {
    fn default() -> Self {
        Self {
            namespace: None,
            name: LEADER_LEASE.to_owned(),
            duration_seconds: LeaseConfig::LEADER_DURATION_SECONDS,
        }
    }
}

/// `[kubernetes]`: an explicit API server (tests, out-of-cluster runs).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    /// The API server's URL (`https://...`, `http://` for a local
    /// stand-in).
    pub api_server: String,
    /// A PEM file with the CAs that sign the API server's certificate;
    /// none: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A file holding the bearer token; none: no token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// Why a configuration file was refused; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read.
    #[error("cannot read the configuration file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or does not fit the schema (an unknown or
    /// missing field, a value of the wrong type).
    #[error(
        "the configuration file {} does not fit the controller's schema",
        path.display()
    )]
    Schema {
        /// The file.
        path: PathBuf,
        /// The cause, naming the line and the field.
        #[source]
        source: toml::de::Error,
    },
    /// A value cannot work.
    #[error("invalid configuration in {}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The cause, naming the field.
        #[source]
        source: ConfigError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_fields_are_checked() {
        assert_eq!(ControllerConfig::default().validate(), Ok(()));
        let mut config = ControllerConfig::default();
        config.release.concurrency = 0;
        assert_eq!(
            config.validate().map_err(|error| error.field),
            Err("release.concurrency")
        );
        let mut config = ControllerConfig::default();
        config.release.releases_per_second = f64::NAN;
        assert_eq!(
            config.validate().map_err(|error| error.field),
            Err("release.releases_per_second")
        );
        let config = ControllerConfig {
            pass_interval_seconds: 0,
            ..ControllerConfig::default()
        };
        assert_eq!(
            config.validate().map_err(|error| error.field),
            Err("pass_interval_seconds")
        );
    }

    #[test]
    fn spacing_follows_the_rate() {
        let settings = ReleaseSettings {
            releases_per_second: 4.0,
            ..ReleaseSettings::default()
        };
        assert_eq!(settings.spacing(), Duration::from_millis(250));
    }

    /// The smallest file: an in-memory backend, every other section
    /// default.
    const MINIMAL: &str = "[backend]\ntype = \"memory\"\nsubnet = \"10.20.0.0/24\"\n";

    fn path() -> &'static Path {
        Path::new("/etc/hulk-vpc/controller.toml")
    }

    /// `error` as the binary prints it: the error, then its causes.
    fn chain(error: &ConfigFileError) -> String {
        hulk_cni::describe(error)
    }

    #[test]
    fn a_minimal_file_takes_the_defaults() {
        let file = ControllerFile::parse(MINIMAL, path()).unwrap();
        assert_eq!(file.metrics_address, None);
        assert_eq!(file.leader, LeaderSection::default());
        assert_eq!(file.leader.name, "hulk-vpc-controller");
        assert_eq!(file.controller, ControllerConfig::default());
        assert_eq!(file.client_options(), ClientOptions::default());
        assert!(matches!(file.backend, BackendSection::Memory { .. }));
    }

    #[test]
    fn every_section_is_read() {
        let text = format!(
            "metrics_address = \"127.0.0.1:9465\"\n\
             [leader]\nnamespace = \"hulk-vpc\"\nduration_seconds = 20\n\
             [controller]\ngrace_period_seconds = 600\n\
             [controller.release]\nconcurrency = 4\n\
             [kubernetes]\napi_server = \"http://127.0.0.1:6443\"\ntoken_file = \"/t\"\n\
             {MINIMAL}"
        );
        let file = ControllerFile::parse(&text, path()).unwrap();
        assert_eq!(
            file.metrics_address,
            Some("127.0.0.1:9465".parse().unwrap())
        );
        assert_eq!(file.leader.namespace.as_deref(), Some("hulk-vpc"));
        assert_eq!(file.leader.name, "hulk-vpc-controller");
        assert_eq!(file.leader.duration_seconds, 20);
        assert_eq!(file.controller.grace_period_seconds, 600);
        assert_eq!(file.controller.pass_interval_seconds, 60);
        assert_eq!(file.controller.release.concurrency, 4);
        assert_eq!(
            file.client_options(),
            ClientOptions {
                api_server: Some("http://127.0.0.1:6443".to_owned()),
                ca_file: None,
                token_file: Some(PathBuf::from("/t")),
            }
        );
    }

    #[test]
    fn an_unknown_field_is_named_with_the_file() {
        let text = format!("[leader]\nnmae = \"x\"\n{MINIMAL}");
        let error = ControllerFile::parse(&text, path()).unwrap_err();
        assert!(matches!(error, ConfigFileError::Schema { .. }), "{error:?}");
        let message = chain(&error);
        assert!(
            message.contains("/etc/hulk-vpc/controller.toml"),
            "{message}"
        );
        assert!(message.contains("nmae"), "{message}");
    }

    #[test]
    fn a_leader_lease_nobody_can_hold_is_refused() {
        for (leader, field) in [
            ("name = \"\"", "leader.name"),
            ("duration_seconds = 0", "leader.duration_seconds"),
        ] {
            let text = format!("[leader]\n{leader}\n{MINIMAL}");
            let error = ControllerFile::parse(&text, path()).unwrap_err();
            let ConfigFileError::Invalid { source, .. } = &error else {
                panic!("not refused as invalid: {error:?}");
            };
            assert_eq!(source.field, field);
        }
    }

    #[test]
    fn a_missing_backend_is_named() {
        let error =
            ControllerFile::parse("metrics_address = \"127.0.0.1:0\"\n", path()).unwrap_err();
        assert!(matches!(error, ConfigFileError::Schema { .. }), "{error:?}");
        assert!(chain(&error).contains("backend"), "{}", chain(&error));
    }

    #[test]
    fn a_value_that_cannot_work_names_its_field_and_file() {
        let text = format!("[controller.release]\nconcurrency = 0\n{MINIMAL}");
        let error = ControllerFile::parse(&text, path()).unwrap_err();
        let ConfigFileError::Invalid {
            path: named,
            source,
        } = &error
        else {
            panic!("not refused as invalid: {error:?}");
        };
        assert_eq!(named, path());
        assert_eq!(source.field, "release.concurrency");
        assert_eq!(
            chain(&error),
            "invalid configuration in /etc/hulk-vpc/controller.toml: \
             release.concurrency must be at least 1"
        );
    }

    #[test]
    fn a_file_that_cannot_be_read_is_named() {
        let missing = Path::new("/nonexistent/hulk-vpc/controller.toml");
        let error = ControllerFile::load(missing).unwrap_err();
        assert!(matches!(error, ConfigFileError::Read { .. }), "{error:?}");
        assert!(
            error
                .to_string()
                .contains("/nonexistent/hulk-vpc/controller.toml"),
            "{error}"
        );
    }
}
