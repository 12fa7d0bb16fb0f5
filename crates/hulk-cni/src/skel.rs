//! The plugin skeleton: reads the environment and stdin, checks them,
//! dispatches to a [`Plugin`], and prints exactly one answer.
//!
//! [`dispatch`] is pure (no process environment, no stdio), so it can be
//! tested with any input; [`run`] wires it to the process and turns even a
//! panic into an error document. Nothing but the final document is ever
//! written to stdout: logs go to stderr or to the file named by the
//! configuration's `logFile` field (level from `logLevel`, default `info`
//! for a file, `warn` for stderr).

use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{Attachment, NetConf, declared_version, decode_error};
use crate::env::{CniArgs, CniEnv, Command};
use crate::error::{CniError, ErrorCode};
use crate::result::CniResult;
use crate::version::{CniVersion, VersionInfo};

/// The largest configuration accepted on stdin; more is an I/O error (5).
pub const MAX_STDIN_BYTES: usize = 16 * 1024 * 1024;

/// An ADD or CHECK: a container's interface in its network namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: CniArgs,
    /// The network configuration from stdin.
    pub config: NetConf,
}

/// A CHECK: the attachment and the result of its ADD.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRequest {
    /// The attachment to verify.
    pub attachment: AttachRequest,
    /// `prevResult`: what ADD reported.
    pub prev_result: CniResult,
}

/// A DEL. The namespace may already be gone.
#[derive(Debug, Clone, PartialEq)]
pub struct DelRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`, when the runtime still has it.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: CniArgs,
    /// The network configuration, with `prevResult` when the runtime cached it.
    pub config: NetConf,
}

/// A GC: release whatever is not in `valid_attachments`.
#[derive(Debug, Clone, PartialEq)]
pub struct GcRequest {
    /// The network configuration.
    pub config: NetConf,
    /// Attachments that must be kept.
    pub valid_attachments: Vec<Attachment>,
}

/// What a CNI plugin does for each command. The skeleton has already
/// checked the environment, the configuration and the version.
// The skeleton drives these futures on a current-thread runtime, so they need not be Send.
#[allow(async_fn_in_trait)]
pub trait Plugin {
    /// Versions this plugin accepts; a request in any other is error 1.
    fn supported_versions(&self) -> &[CniVersion] {
        &CniVersion::ALL
    }

    /// ADD: attach and report what was configured.
    async fn add(&self, request: AttachRequest) -> Result<CniResult, CniError>;

    /// DEL: detach. Must succeed when things are already gone.
    async fn del(&self, request: DelRequest) -> Result<(), CniError>;

    /// CHECK: report any difference from `prev_result` as an error.
    async fn check(&self, request: CheckRequest) -> Result<(), CniError>;

    /// STATUS: error 50 or 51 when ADD cannot be served.
    async fn status(&self, config: NetConf) -> Result<(), CniError>;

    /// GC: release resources of attachments not listed.
    async fn gc(&self, request: GcRequest) -> Result<(), CniError>;
}

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Everything for stdout: one JSON document, or nothing.
    pub stdout: Vec<u8>,
    /// Whether to exit 0.
    pub success: bool,
}

impl Outcome {
    fn document(value: &impl serde::Serialize, success: bool) -> Outcome {
        let mut stdout = serde_json::to_vec(value).unwrap_or_default();
        stdout.push(b'\n');
        Outcome { stdout, success }
    }

    fn silent_success() -> Outcome {
        Outcome {
            stdout: Vec::new(),
            success: true,
        }
    }

    fn failure(error: CniError) -> Outcome {
        Outcome::document(&error, false)
    }
}

/// Runs one invocation: `lookup` reads environment variables, `stdin` is
/// the whole input. Never panics on any input (plugin panics aside, which
/// [`run`] catches).
pub async fn dispatch<P: Plugin>(
    plugin: &P,
    lookup: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Outcome {
    let version_hint = peek_version(stdin);
    match dispatch_checked(plugin, lookup, stdin).await {
        Ok(outcome) => outcome,
        Err(error) => Outcome::failure(error.in_version(version_hint)),
    }
}

/// The version errors are written in: the request's when it names a
/// supported one, the newest otherwise.
fn peek_version(stdin: &[u8]) -> CniVersion {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|value| declared_version(&value).ok())
        .unwrap_or(CniVersion::LATEST)
}

async fn dispatch_checked<P: Plugin>(
    plugin: &P,
    lookup: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Outcome, CniError> {
    let env = CniEnv::from_lookup(lookup)?;
    if env.command == Command::Version {
        return Ok(version_answer(plugin));
    }
    let config = read_config(plugin, env.command, stdin)?;
    tracing::debug!(command = %env.command, network = %config.name, "dispatching");
    match env.command {
        Command::Add => {
            let version = config.cni_version;
            let result = plugin.add(attach_request(env, config)?).await?;
            Ok(Outcome::document(&result.to_value(version), true))
        }
        Command::Check => {
            let prev_result = config.prev_result()?.ok_or_else(|| {
                CniError::invalid_config("CHECK needs prevResult in the configuration")
            })?;
            let attachment = attach_request(env, config)?;
            plugin
                .check(CheckRequest {
                    attachment,
                    prev_result,
                })
                .await?;
            Ok(Outcome::silent_success())
        }
        Command::Del => {
            let request = DelRequest {
                container_id: required(env.container_id, "CNI_CONTAINERID")?,
                netns: env.netns,
                ifname: required(env.ifname, "CNI_IFNAME")?,
                args: env.args,
                config,
            };
            plugin.del(request).await?;
            Ok(Outcome::silent_success())
        }
        Command::Status => {
            plugin.status(config).await?;
            Ok(Outcome::silent_success())
        }
        Command::Gc => {
            let valid_attachments = config.gc_attachments().unwrap_or_default().to_vec();
            plugin
                .gc(GcRequest {
                    config,
                    valid_attachments,
                })
                .await?;
            Ok(Outcome::silent_success())
        }
        Command::Version => Ok(version_answer(plugin)),
    }
}

fn version_answer<P: Plugin>(plugin: &P) -> Outcome {
    Outcome::document(&VersionInfo::new(plugin.supported_versions()), true)
}

fn read_config<P: Plugin>(plugin: &P, command: Command, stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(CniError::new(
            ErrorCode::DecodingFailure,
            format!("{command} needs the network configuration on stdin, got nothing"),
        ));
    }
    let value: Value = serde_json::from_slice(stdin).map_err(decode_error)?;
    let version = declared_version(&value)?;
    if !plugin.supported_versions().contains(&version) {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("this plugin does not support CNI version {version}"),
        ));
    }
    let command_exists = match command {
        Command::Check => version.supports_check(),
        Command::Status | Command::Gc => version.supports_status_and_gc(),
        Command::Add | Command::Del | Command::Version => true,
    };
    if !command_exists {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("{command} does not exist in CNI version {version}"),
        ));
    }
    NetConf::from_value(value)
}

fn attach_request(env: CniEnv, config: NetConf) -> Result<AttachRequest, CniError> {
    Ok(AttachRequest {
        container_id: required(env.container_id, "CNI_CONTAINERID")?,
        netns: required(env.netns, "CNI_NETNS")?,
        ifname: required(env.ifname, "CNI_IFNAME")?,
        args: env.args,
        config,
    })
}

/// [`CniEnv`] already enforced presence per command; this keeps the request
/// types free of options without trusting that silently.
fn required<T>(value: Option<T>, key: &str) -> Result<T, CniError> {
    value.ok_or_else(|| CniError::new(ErrorCode::InvalidEnvironment, format!("{key} is not set")))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LogSettings {
    log_file: Option<PathBuf>,
    log_level: Option<String>,
}

/// Whether `file` is the file our stdout writes to (`/dev/stdout`,
/// `/proc/self/fd/1`, or the same file by another name).
fn is_stdout(file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata("/proc/self/fd/1")) {
        (Ok(log), Ok(stdout)) => log.dev() == stdout.dev() && log.ino() == stdout.ino(),
        _ => false,
    }
}

/// Sets up logging from the configuration's `logFile` and `logLevel`. A
/// log file that is stdout is refused: stdout carries exactly one
/// document, the result, and a log line there would corrupt it.
fn init_logging(stdin: &[u8]) -> Result<(), CniError> {
    let settings: LogSettings = serde_json::from_slice(stdin).unwrap_or_default();
    let file = settings.log_file.as_ref().and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| {
                eprintln!("hulk-cni: cannot open log file {}: {error}", path.display())
            })
            .ok()
    });
    if let (Some(file), Some(path)) = (&file, &settings.log_file)
        && is_stdout(file)
    {
        return Err(CniError::invalid_config(format!(
            "logFile {} is the plugin's stdout, which carries the result; log to a file or leave it out (stderr)",
            path.display()
        )));
    }
    let default_level = if file.is_some() { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_new(
        settings.log_level.as_deref().unwrap_or(default_level),
    )
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    // A second initialisation (tests, embedding) keeps the first subscriber.
    let _ = match file {
        Some(file) => builder.with_writer(std::sync::Mutex::new(file)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    Ok(())
}

fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN_BYTES as u64 + 1)
        .read_to_end(&mut input)
        .map_err(|error| CniError::new(ErrorCode::IoFailure, format!("reading stdin: {error}")))?;
    if input.len() > MAX_STDIN_BYTES {
        return Err(CniError::new(
            ErrorCode::IoFailure,
            format!("stdin is larger than {MAX_STDIN_BYTES} bytes"),
        ));
    }
    Ok(input)
}

/// The whole plugin process: call it from `main` and return its exit code.
pub fn run<P: Plugin>(plugin: P) -> ExitCode {
    let outcome = match read_stdin() {
        Ok(stdin) => match init_logging(&stdin) {
            Ok(()) => run_on_runtime(&plugin, |key| std::env::var(key).ok(), &stdin),
            Err(error) => Outcome::failure(error),
        },
        Err(error) => Outcome::failure(error),
    };
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(&outcome.stdout)
        .and_then(|()| stdout.flush());
    if let Err(error) = written {
        tracing::error!(%error, "cannot write the answer to stdout");
        return ExitCode::FAILURE;
    }
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_on_runtime<P: Plugin>(
    plugin: &P,
    lookup: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Outcome {
    let version_hint = peek_version(stdin);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return Outcome::failure(
                CniError::internal(format!("cannot start the async runtime: {error}"))
                    .in_version(version_hint),
            );
        }
    };
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(dispatch(plugin, lookup, stdin))
    }))
    .unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|text| text.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        tracing::error!(%reason, "plugin panicked");
        Outcome::failure(
            CniError::internal("the plugin panicked; this is a bug")
                .with_details(reason)
                .in_version(version_hint),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Panicking;

    impl Plugin for Panicking {
        async fn add(&self, _: AttachRequest) -> Result<CniResult, CniError> {
            panic!("boom in add")
        }
        async fn del(&self, _: DelRequest) -> Result<(), CniError> {
            Ok(())
        }
        async fn check(&self, _: CheckRequest) -> Result<(), CniError> {
            Ok(())
        }
        async fn status(&self, _: NetConf) -> Result<(), CniError> {
            Ok(())
        }
        async fn gc(&self, _: GcRequest) -> Result<(), CniError> {
            Ok(())
        }
    }

    #[test]
    fn a_panicking_plugin_becomes_an_internal_error_document() {
        let env = |key: &str| {
            let value = match key {
                "CNI_COMMAND" => "ADD",
                "CNI_CONTAINERID" => "c1",
                "CNI_NETNS" => "/var/run/netns/c1",
                "CNI_IFNAME" => "eth0",
                _ => return None,
            };
            Some(value.to_owned())
        };
        let stdin = br#"{"cniVersion":"0.4.0","name":"n","type":"t"}"#;
        let outcome = run_on_runtime(&Panicking, env, stdin);
        assert!(!outcome.success);
        let error: CniError = serde_json::from_slice(&outcome.stdout).unwrap();
        assert_eq!(error.code, ErrorCode::Internal);
        assert_eq!(error.details, "boom in add");
        assert_eq!(error.cni_version, CniVersion::V0_4_0);
    }
}
