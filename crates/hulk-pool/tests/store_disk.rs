//! The redb store on a real, tiny filesystem that fills up: a failed write
//! is reported (`failing`) and, once space is back, the store works again
//! without a restart. Root (it mounts a tmpfs); nextest group `netns`.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use hulk_pool::{PoolStore, RedbStore, StoreOp};

/// A tmpfs of `size` mounted at a scratch directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(name: &str, size: &str) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("hulk-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs (needs root)");
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn attachment(n: usize) -> StoreOp {
    StoreOp::PutAttachment {
        key: format!("container-{n}/eth0"),
        record: vec![b'x'; 64 * 1024],
    }
}

#[test]
fn a_full_disk_fails_writes_until_space_is_back_then_the_store_recovers() {
    let disk = Tmpfs::mount("store-disk", "8m");
    let store = RedbStore::open(&disk.path().join("pool.redb")).unwrap();
    store.apply(&[attachment(0)]).unwrap();
    assert_eq!(store.failing(), None);

    // Fill the disk, then write until a write fails.
    let filler = disk.path().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    let failed = (1..200).find(|n| store.apply(&[attachment(*n)]).is_err());
    assert!(failed.is_some(), "no write failed on a full disk");
    let reason = store.failing().expect("the failure is reported");
    assert!(!reason.is_empty());
    // Still full: still failing, still reported.
    assert!(store.apply(&[attachment(500)]).is_err());
    assert!(store.failing().is_some());

    std::fs::remove_file(&filler).unwrap();
    store.apply(&[attachment(501)]).unwrap();
    assert_eq!(store.failing(), None, "recovered without a restart");
    let snapshot = store.load().unwrap();
    assert!(snapshot.attachments.contains_key("container-0/eth0"));
    assert!(snapshot.attachments.contains_key("container-501/eth0"));
}

#[test]
fn an_empty_state_file_opens_as_a_new_store() {
    let disk = Tmpfs::mount("store-empty", "8m");
    let path = disk.path().join("pool.redb");
    std::fs::write(&path, b"").unwrap();
    let store = RedbStore::open(&path).unwrap();
    assert!(store.load().unwrap().addresses.is_empty());
    store.apply(&[attachment(1)]).unwrap();
}
