//! The agent's instance id: who holds the node's Lease.
//!
//! Kept in a file ([`crate::config::AgentConfig::instance_file`]) so that
//! a restarted agent on the same machine is the same holder and takes its
//! Lease back at once, while an agent on another machine under the same
//! node name is another holder and is refused until the first one's Lease
//! expires.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the instance id could not be read or created.
#[derive(Debug, thiserror::Error)]
#[error("cannot keep the agent's instance id in {}", path.display())]
pub struct InstanceIdError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The instance id kept at `path`, created on first use: the host name
/// and 64 random bits (`node-7.example/3f9c2a1b6d0e4f85`), so that an
/// operator reading the Lease knows the machine.
///
/// # Errors
///
/// [`InstanceIdError`] when the file cannot be read or written.
pub fn instance_id(path: &Path) -> Result<String, InstanceIdError> {
    let failed = |source| InstanceIdError {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(failed(error)),
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    let mut random = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut random))
        .map_err(failed)?;
    let id = format!("{host}/{:016x}", u64::from_be_bytes(random));
    if let Some(directory) = path.parent() {
        std::fs::create_dir_all(directory).map_err(failed)?;
    }
    // Written aside and renamed: a crash leaves the old file or the new
    // one, never half of it.
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(failed)?;
    file.write_all(id.as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("hulk-instance-{}", std::process::id()));
        let path = dir.join("instance-id");
        let _ = std::fs::remove_dir_all(&dir);
        let first = instance_id(&path).unwrap();
        assert!(first.contains('/'), "{first}");
        assert_eq!(instance_id(&path).unwrap(), first, "kept across restarts");
        std::fs::remove_file(&path).unwrap();
        assert_ne!(
            instance_id(&path).unwrap(),
            first,
            "another machine, another id"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
