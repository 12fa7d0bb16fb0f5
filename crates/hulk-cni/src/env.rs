//! The environment contract: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_ARGS` and `CNI_PATH`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{CniError, ErrorCode};

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Attach a container to the network.
    Add,
    /// Detach a container; idempotent.
    Del,
    /// Verify an attachment.
    Check,
    /// Report whether the plugin can serve ADD.
    Status,
    /// Release everything not in the valid-attachments list.
    Gc,
    /// Report supported versions.
    Version,
}

impl Command {
    /// The command as written in `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = CniError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "ADD" => Ok(Command::Add),
            "DEL" => Ok(Command::Del),
            "CHECK" => Ok(Command::Check),
            "STATUS" => Ok(Command::Status),
            "GC" => Ok(Command::Gc),
            "VERSION" => Ok(Command::Version),
            other => Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("unknown CNI_COMMAND {other:?}"),
            )),
        }
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(BTreeMap<String, String>);

impl CniArgs {
    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// `K8S_POD_NAMESPACE`, set by kubelet's runtimes.
    pub fn pod_namespace(&self) -> Option<&str> {
        self.get("K8S_POD_NAMESPACE")
    }

    /// `K8S_POD_NAME`.
    pub fn pod_name(&self) -> Option<&str> {
        self.get("K8S_POD_NAME")
    }

    /// `K8S_POD_UID`.
    pub fn pod_uid(&self) -> Option<&str> {
        self.get("K8S_POD_UID")
    }

    /// `K8S_POD_INFRA_CONTAINER_ID`, the sandbox container.
    pub fn pod_infra_container_id(&self) -> Option<&str> {
        self.get("K8S_POD_INFRA_CONTAINER_ID")
    }

    /// Every pair, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }
}

impl FromStr for CniArgs {
    type Err = CniError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut pairs = BTreeMap::new();
        for pair in text.split(';').filter(|pair| !pair.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
                ));
            };
            if key.is_empty() {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS: {pair:?} has an empty key"),
                ));
            }
            pairs.insert(key.to_owned(), value.to_owned());
        }
        Ok(CniArgs(pairs))
    }
}

/// The invocation's environment, checked for what its command needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// The command.
    pub command: Command,
    /// `CNI_CONTAINERID`: required for ADD, DEL and CHECK.
    pub container_id: Option<String>,
    /// `CNI_NETNS`: required for ADD and CHECK; optional for DEL.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`: required for ADD, DEL and CHECK.
    pub ifname: Option<String>,
    /// `CNI_ARGS`.
    pub args: CniArgs,
    /// `CNI_PATH`, split on `:`.
    pub path: Vec<PathBuf>,
}

impl CniEnv {
    /// Reads the process environment.
    pub fn from_process() -> Result<CniEnv, CniError> {
        CniEnv::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the environment through `lookup`, so tests need not touch the
    /// process environment. Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let get = |key: &str| lookup(key).filter(|value| !value.is_empty());
        let command: Command = get("CNI_COMMAND")
            .ok_or_else(|| CniError::new(ErrorCode::InvalidEnvironment, "CNI_COMMAND is not set"))?
            .parse()?;
        let (needs_container, needs_netns) = match command {
            Command::Add | Command::Check => (true, true),
            Command::Del => (true, false),
            Command::Status | Command::Gc | Command::Version => (false, false),
        };
        let required = |key: &str, needed: bool| -> Result<Option<String>, CniError> {
            match get(key) {
                None if needed => Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("{key} is required for {command}"),
                )),
                value => Ok(value),
            }
        };
        let container_id = required("CNI_CONTAINERID", needs_container)?;
        if let Some(id) = &container_id {
            validate_container_id(id)?;
        }
        let netns = required("CNI_NETNS", needs_netns)?.map(PathBuf::from);
        let ifname = required("CNI_IFNAME", needs_container)?;
        if let Some(name) = &ifname {
            validate_interface_name(name)?;
        }
        let args = get("CNI_ARGS").as_deref().unwrap_or("").parse()?;
        let path = get("CNI_PATH")
            .map(|paths| std::env::split_paths(&paths).collect())
            .unwrap_or_default();
        Ok(CniEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

/// Checks a container ID as the spec requires: not empty, an alphanumeric
/// first character, then alphanumerics, `_`, `.` or `-`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if is_spec_identifier(id) {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("invalid CNI_CONTAINERID {id:?}"),
        ))
    }
}

/// The spec's rule for container IDs and network names: an alphanumeric
/// first character, then alphanumerics, `_`, `.` or `-`.
pub(crate) fn is_spec_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

/// Checks an interface name as Linux and the spec require: 1 to 15 bytes,
/// not `.` or `..`, no `/`, `:` or white space.
pub fn validate_interface_name(name: &str) -> Result<(), CniError> {
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_INTERFACE_NAME_LEN {
        Some("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("is . or ..")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains '/', ':' or white space")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("invalid CNI_IFNAME {name:?}: it {problem}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        CniEnv::from_lookup(|key| map.get(key).cloned())
    }

    #[test]
    fn add_reads_everything_including_kubernetes_args() {
        let env = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/pod"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u-1;K8S_POD_INFRA_CONTAINER_ID=abc123",
            ),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ])
        .unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.args.pod_namespace(), Some("default"));
        assert_eq!(env.args.pod_name(), Some("web-0"));
        assert_eq!(env.args.pod_uid(), Some("u-1"));
        assert_eq!(env.args.pod_infra_container_id(), Some("abc123"));
        assert_eq!(env.path.len(), 2);
    }

    #[test]
    fn each_command_requires_its_variables() {
        let missing_netns = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert_eq!(missing_netns.code, ErrorCode::InvalidEnvironment);
        assert!(missing_netns.msg.contains("CNI_NETNS"));

        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(del.netns, None);

        assert!(env(&[("CNI_COMMAND", "GC")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "STATUS")]).is_ok());
        assert!(env(&[]).is_err());
        assert!(env(&[("CNI_COMMAND", "add")]).is_err());
    }

    #[test]
    fn rejects_bad_container_ids_and_interface_names() {
        for id in ["-lead", "has space", "semi;colon"] {
            assert!(validate_container_id(id).is_err(), "{id}");
        }
        for name in [".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
            assert!(validate_interface_name(name).is_err(), "{name}");
        }
        assert!(validate_interface_name("fifteen-chars-x").is_ok());
    }

    #[test]
    fn rejects_malformed_cni_args() {
        assert!("A=1;B".parse::<CniArgs>().is_err());
        assert!("=1".parse::<CniArgs>().is_err());
        let args: CniArgs = "A=1;;B=x=y;".parse().unwrap();
        assert_eq!(args.get("B"), Some("x=y"));
    }
}
