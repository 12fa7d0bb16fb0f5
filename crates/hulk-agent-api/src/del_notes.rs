//! Durable notes of DELs the agent did not see.
//!
//! When the CNI plugin cannot get an answer from the agent on DEL (the
//! agent is down, or did not answer in time), it still has to succeed:
//! the runtime retries a failed DEL forever and never frees the sandbox.
//! But succeeding without telling the agent would leave the pod's address
//! assigned for good if nothing else ever shows the agent the pod is gone.
//! So the plugin writes a note here first, and the agent replays every
//! note (a DEL is idempotent) when it starts and periodically, removing
//! each once its DEL is done.
//!
//! # Layout and file format
//!
//! One file per attachment in the directory ([`DEFAULT_DIR`] by default,
//! created mode 0700; files are mode 0600). The name is the container id
//! and the interface name, each percent-encoded (only ASCII letters,
//! digits, `-` and `_` are kept) and joined by `@`, plus `.json`:
//! `5f2c@eth0.json`. No name can hold `/` or start with `.`, whatever
//! the ids are. When that is longer than 200 bytes, the name is its first
//! 96 bytes, `~`, the 128-bit FNV-1a hash (32 hex digits) of all of it, and
//! `.json`. Since the encoding is one-to-one, a second note for the same
//! (container, ifname) lands on the same name and replaces the first.
//!
//! The content is one JSON object:
//!
//! ```json
//! {
//!   "version": 1,
//!   "written_ms": 1767225600000,
//!   "request": {"container_id": "5f2c", "ifname": "eth0",
//!               "netns": "/var/run/netns/5f2c", "pod": "default/web-0",
//!               "pool": null, "cni_network": "vpc", "pod_uid": null,
//!               "timeout_ms": 60000}
//! }
//! ```
//!
//! `version` is [`FORMAT_VERSION`]; `written_ms` is when the note was
//! written (milliseconds since the Unix epoch); `request` is the DEL's
//! [`PodRequest`] as the plugin would have sent it (its `timeout_ms` is
//! how long the plugin waited, not a deadline for the replay).
//!
//! Files whose names start with `.` are notes being written; files ending
//! in `.corrupt` are notes [`DelNotes::list`] could not read and set aside
//! for an operator.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::PodRequest;

/// Default directory: /var/lib/hulk-vpc/pending-dels
pub const DEFAULT_DIR: &str = "/var/lib/hulk-vpc/pending-dels";

/// The format version written in every note; [`DelNotes::list`] reads only
/// this one.
pub const FORMAT_VERSION: u32 = 1;

/// What every note's file name ends with.
const SUFFIX: &str = ".json";

/// What a note set aside by [`DelNotes::list`] gets after its name.
const CORRUPT_SUFFIX: &str = ".corrupt";

/// The longest encoded (container, ifname) used as a name as it is: with
/// the suffixes added, names stay well below the usual 255-byte limit.
const MAX_ENCODED: usize = 200;

/// How much of a long encoded name is kept before its hash, so that an
/// operator still recognises the container.
const HASHED_PREFIX: usize = 96;

/// How many `.corrupt` names [`DelNotes::list`] tries before leaving an
/// unreadable note in place.
const MAX_SET_ASIDE: u32 = 100;

/// Failures of the note directory. Each names the file or directory;
/// the I/O or JSON error is the cause.
#[derive(Debug, thiserror::Error)]
pub enum DelNoteError {
    /// The directory could not be created (or its parent synced).
    #[error("cannot create the DEL note directory {}: {source}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The request could not be encoded as JSON.
    #[error("cannot encode the DEL note of container {container_id}: {source}")]
    Encode {
        /// The request's container id.
        container_id: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Writing, syncing or renaming the note (or syncing its directory) failed.
    #[error("cannot write the DEL note {}: {source}", path.display())]
    Write {
        /// The note's final path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The directory could not be listed.
    #[error("cannot list the DEL notes in {}: {source}", dir.display())]
    List {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A note could not be read.
    #[error("cannot read the DEL note {}: {source}", path.display())]
    Read {
        /// The note.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A note is not a note of any format version.
    #[error("the DEL note {} is corrupt: {source}", path.display())]
    Corrupt {
        /// The note.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A note has another format version (written by a newer plugin).
    #[error(
        "the DEL note {} has format version {version}; this build reads version {FORMAT_VERSION}",
        path.display()
    )]
    UnsupportedVersion {
        /// The note.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// A note could not be removed.
    #[error("cannot remove the DEL note {}: {source}", path.display())]
    Remove {
        /// The note.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One note as [`DelNotes::list`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelNote {
    /// Its file.
    pub path: PathBuf,
    /// The DEL to replay.
    pub request: PodRequest,
    /// When it was written (milliseconds since the Unix epoch).
    pub written_ms: u64,
}

/// A note's content (see the module docs); `R` is a borrowed request when
/// writing and an owned one when reading.
#[derive(Serialize, Deserialize)]
struct NoteFile<R> {
    version: u32,
    written_ms: u64,
    request: R,
}

/// Only the version, read first so that a note of another version is told
/// apart from a corrupt one.
#[derive(Deserialize)]
struct NoteVersion {
    version: u32,
}

/// The directory of DEL notes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelNotes {
    dir: PathBuf,
}

impl DelNotes {
    /// The notes in `dir` (created on the first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DelNotes { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes (atomically: temp file in the same dir + fsync + rename +
    /// fsync of the dir; created 0700 if missing) a note for this DEL; a
    /// second note for the same (container, ifname) replaces the first.
    /// Returns the note's path.
    pub fn write(&self, request: &PodRequest) -> Result<PathBuf, DelNoteError> {
        self.create_dir()?;
        let name = file_name(&request.owner.container_id, &request.owner.ifname);
        let path = self.dir.join(&name);
        let bytes = serde_json::to_vec_pretty(&NoteFile {
            version: FORMAT_VERSION,
            written_ms: now_ms(),
            request,
        })
        .map_err(|source| DelNoteError::Encode {
            container_id: request.owner.container_id.clone(),
            source,
        })?;
        // The process id keeps two plugins noting the same DEL at once off
        // each other's temp file; the leading dot keeps it out of `list`.
        let temp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written = write_synced(&temp, &bytes).and_then(|()| fs::rename(&temp, &path));
        if written.is_err() {
            // Best effort: a temp file left behind is ignored by `list`.
            let _ = fs::remove_file(&temp);
        }
        // Without syncing the directory, a power cut could lose the rename
        // after DEL has already told the runtime it succeeded.
        written
            .and_then(|()| sync_dir(&self.dir))
            .map_err(|source| DelNoteError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    /// Every note, oldest first (by `written_ms`, then path). A missing
    /// directory holds no notes.
    ///
    /// An unreadable or corrupt file is not fatal and not deleted silently:
    /// it is moved aside to `<name>.corrupt` (`<name>.1.corrupt`, ... when
    /// that is taken) and reported as a `tracing` warning naming the file,
    /// the cause and where it went. A note of another format version is
    /// reported the same way but left in place, for the agent version that
    /// reads it. Only a directory that cannot be listed is an error.
    pub fn list(&self) -> Result<Vec<DelNote>, DelNoteError> {
        let list_error = |source| DelNoteError::List {
            dir: self.dir.clone(),
            source,
        };
        let entries = match fs::read_dir(&self.dir) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            entries => entries.map_err(list_error)?,
        };
        let mut notes = Vec::new();
        for entry in entries {
            let name = entry.map_err(list_error)?.file_name();
            let Some(name) = name.to_str().filter(|name| is_note_name(name)) else {
                continue;
            };
            let path = self.dir.join(name);
            match read_note(&path) {
                Ok(Some(note)) => notes.push(note),
                // Removed since the directory was read: nothing to replay.
                Ok(None) => {}
                // A newer plugin's note: a newer agent will read it.
                Err(error @ DelNoteError::UnsupportedVersion { .. }) => {
                    tracing::warn!(%error, "leaving a DEL note of another format version in place");
                }
                Err(error) => set_aside(&path, &error),
            }
        }
        notes.sort_by(|a, b| (a.written_ms, &a.path).cmp(&(b.written_ms, &b.path)));
        Ok(notes)
    }

    /// Removes a note once the agent has done its DEL.
    ///
    /// A note already gone is fine. A note replaced since it was listed (a
    /// later DEL of the same attachment was noted) stays, so that the later
    /// DEL is replayed too. A note that cannot be read back is an error
    /// (and is left for the next [`DelNotes::list`] to set aside).
    pub fn remove(&self, note: &DelNote) -> Result<(), DelNoteError> {
        match read_note(&note.path)? {
            Some(current) if current == *note => {}
            _ => return Ok(()),
        }
        // Not synced: a removal lost to a power cut only replays a DEL
        // again, which the agent treats as done.
        match fs::remove_file(&note.path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(DelNoteError::Remove {
                path: note.path.clone(),
                source: error,
            }),
            _ => Ok(()),
        }
    }

    fn create_dir(&self) -> Result<(), DelNoteError> {
        let created = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir);
        // The directory's own entry must be durable too, or a note in a
        // freshly created directory could vanish with it.
        let parent = self
            .dir
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty());
        created
            .and_then(|()| parent.map_or(Ok(()), sync_dir))
            .map_err(|source| DelNoteError::CreateDir {
                dir: self.dir.clone(),
                source,
            })
    }
}

/// The note's file name for (container, ifname): see the module docs.
fn file_name(container_id: &str, ifname: &str) -> String {
    let encoded = format!(
        "{}@{}",
        percent_encode(container_id),
        percent_encode(ifname)
    );
    if encoded.len() <= MAX_ENCODED {
        return format!("{encoded}{SUFFIX}");
    }
    // `encoded` is ASCII, so any byte offset is a character boundary.
    let prefix = encoded.get(..HASHED_PREFIX).unwrap_or(&encoded);
    format!("{prefix}~{:032x}{SUFFIX}", fnv1a_128(encoded.as_bytes()))
}

/// Keeps ASCII letters, digits, `-` and `_`; everything else (`/`, `.`,
/// `%`, `@`, `~`, non-ASCII bytes) becomes `%XX`, so names cannot climb out
/// of the directory, hide, or run into the `@` and `~` separators.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// 128-bit FNV-1a: stable across builds and Rust versions (unlike std's
/// hasher), so a newer plugin's note still replaces an older one's; long
/// enough that two attachments' names never meet by accident.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET_BASIS: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u128::from(byte)).wrapping_mul(PRIME)
    })
}

fn is_note_name(name: &str) -> bool {
    !name.starts_with('.') && name.ends_with(SUFFIX)
}

fn now_ms() -> u64 {
    // A clock before 1970 only makes the note sort first.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The note at `path`; `None` when it is gone.
fn read_note(path: &Path) -> Result<Option<DelNote>, DelNoteError> {
    let bytes = match fs::read(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        bytes => bytes.map_err(|source| DelNoteError::Read {
            path: path.to_path_buf(),
            source,
        })?,
    };
    let corrupt = |source| DelNoteError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    let NoteVersion { version } = serde_json::from_slice(&bytes).map_err(corrupt)?;
    if version != FORMAT_VERSION {
        return Err(DelNoteError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let note: NoteFile<PodRequest> = serde_json::from_slice(&bytes).map_err(corrupt)?;
    Ok(Some(DelNote {
        path: path.to_path_buf(),
        request: note.request,
        written_ms: note.written_ms,
    }))
}

/// Moves an unreadable note to the first free name of `<name>.corrupt`,
/// `<name>.1.corrupt`, ..., so that an earlier set-aside copy is kept too.
fn set_aside(path: &Path, error: &DelNoteError) {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned());
    let name = name.unwrap_or_default();
    let free = (0..MAX_SET_ASIDE)
        .map(|attempt| match attempt {
            0 => path.with_file_name(format!("{name}{CORRUPT_SUFFIX}")),
            n => path.with_file_name(format!("{name}.{n}{CORRUPT_SUFFIX}")),
        })
        .find(|candidate| !matches!(candidate.try_exists(), Ok(true)));
    let moved = match free {
        Some(aside) => fs::rename(path, &aside).map(|()| aside),
        None => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{MAX_SET_ASIDE} set-aside copies exist already"),
        )),
    };
    match moved {
        Ok(aside) => {
            tracing::warn!(%error, aside = %aside.display(), "set an unreadable DEL note aside")
        }
        Err(rename) => {
            tracing::warn!(%error, %rename, "cannot set an unreadable DEL note aside; leaving it in place")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use hulk_ipam::Owner;

    /// An empty scratch directory for one test (the crate has no tempdir
    /// dependency; the process id keeps parallel runs apart).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("hulk-del-notes-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn request(container_id: &str, ifname: &str) -> PodRequest {
        PodRequest {
            owner: Owner {
                container_id: container_id.into(),
                ifname: ifname.into(),
                pod: Some("default/web-0".into()),
                cni_network: Some("vpc".into()),
                pod_uid: Some("uid-1".into()),
            },
            netns: Some(PathBuf::from(format!("/var/run/netns/{container_id}"))),
            pool: None,
            timeout_ms: Some(60_000),
            address: None,
            mac: None,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_list_remove_round_trip() {
        let scratch = Scratch::new("round-trip");
        let notes = DelNotes::new(scratch.0.join("a/pending-dels"));
        assert_eq!(
            notes.list().unwrap(),
            [],
            "a missing directory holds no notes"
        );

        let pod = request("5f2c", "eth0");
        let path = notes.write(&pod).unwrap();
        assert_eq!(path, notes.dir().join("5f2c@eth0.json"));
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(notes.dir()), 0o700);
        assert_eq!(mode(&path), 0o600);
        let written: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(written["version"], FORMAT_VERSION);
        assert_eq!(written["request"]["container_id"], "5f2c");

        let listed = notes.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].path, path);
        assert_eq!(listed[0].request, pod);
        assert!(
            listed[0].written_ms > 1_600_000_000_000,
            "{}",
            listed[0].written_ms
        );

        notes.remove(&listed[0]).unwrap();
        assert_eq!(notes.list().unwrap(), []);
        assert_eq!(
            names(notes.dir()),
            Vec::<String>::new(),
            "no temp file left"
        );
        notes.remove(&listed[0]).unwrap();
    }

    #[test]
    fn a_second_note_replaces_the_first_and_notes_come_oldest_first() {
        let scratch = Scratch::new("replace");
        let notes = DelNotes::new(&scratch.0);
        notes.write(&request("b-first", "eth0")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        notes.write(&request("a-second", "eth0")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut again = request("b-first", "eth0");
        again.netns = None;
        notes.write(&again).unwrap();
        notes.write(&request("b-first", "net1")).unwrap();

        let listed: Vec<(String, String, Option<PathBuf>)> = notes
            .list()
            .unwrap()
            .into_iter()
            .map(|note| {
                (
                    note.request.owner.container_id,
                    note.request.owner.ifname,
                    note.request.netns,
                )
            })
            .collect();
        assert_eq!(
            listed,
            [
                (
                    "a-second".into(),
                    "eth0".into(),
                    Some("/var/run/netns/a-second".into())
                ),
                ("b-first".into(), "eth0".into(), None),
                (
                    "b-first".into(),
                    "net1".into(),
                    Some("/var/run/netns/b-first".into())
                ),
            ]
        );
    }

    #[test]
    fn remove_keeps_a_note_replaced_since_it_was_listed() {
        let scratch = Scratch::new("remove-replaced");
        let notes = DelNotes::new(&scratch.0);
        notes.write(&request("5f2c", "eth0")).unwrap();
        let listed = notes.list().unwrap();
        let mut later = request("5f2c", "eth0");
        later.owner.pod_uid = Some("uid-2".into());
        notes.write(&later).unwrap();

        notes.remove(&listed[0]).unwrap();
        let left = notes.list().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].request, later);
    }

    #[test]
    fn hostile_ids_stay_inside_the_directory_and_apart() {
        let scratch = Scratch::new("hostile");
        let notes = DelNotes::new(scratch.0.join("notes"));
        let long = "x".repeat(10_000);
        let pairs = [
            ("../../etc/passwd", "eth0"),
            ("..", ".."),
            (".", "eth0"),
            ("", ""),
            ("/abs/path", "../x"),
            ("a_b", "c"),
            ("a", "b_c"),
            ("a@b", "c"),
            ("a", "b@c"),
            ("a%40b", "c"),
            ("pod\0null\nline", "eth0"),
            ("ünïcödé/☃", "eth0"),
            (long.as_str(), "eth0"),
            (long.as_str(), "eth1"),
            (&long[..9_999], "eth0"),
        ];
        let mut paths = Vec::new();
        for (container_id, ifname) in pairs {
            let path = notes.write(&request(container_id, ifname)).unwrap();
            assert_eq!(path.parent(), Some(notes.dir()), "{container_id:?}");
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(name.len() < 240, "{} bytes", name.len());
            assert!(!name.starts_with('.'), "{name}");
            paths.push(path);
        }
        assert_eq!(
            names(&scratch.0),
            ["notes"],
            "nothing written next to the directory"
        );
        let mut listed: Vec<(String, String)> = notes
            .list()
            .unwrap()
            .into_iter()
            .map(|note| (note.request.owner.container_id, note.request.owner.ifname))
            .collect();
        listed.sort();
        let mut expected: Vec<(String, String)> = pairs
            .iter()
            .map(|(container_id, ifname)| ((*container_id).into(), (*ifname).into()))
            .collect();
        expected.sort();
        assert_eq!(listed, expected, "every pair has its own note");
    }

    #[test]
    fn corrupt_notes_are_set_aside_and_the_rest_listed() {
        let scratch = Scratch::new("corrupt");
        let notes = DelNotes::new(&scratch.0);
        let good = notes.write(&request("good", "eth0")).unwrap();
        fs::write(scratch.0.join("garbage.json"), "not json").unwrap();
        fs::write(scratch.0.join("garbage.json.corrupt"), "set aside before").unwrap();
        fs::write(scratch.0.join("no-request.json"), r#"{"version":1}"#).unwrap();
        fs::create_dir(scratch.0.join("a-directory.json")).unwrap();
        let newer = r#"{"version":2,"written_ms":1,"request":{}}"#;
        fs::write(scratch.0.join("newer.json"), newer).unwrap();
        fs::write(scratch.0.join(".half-written.json.7.tmp"), "{").unwrap();
        fs::write(scratch.0.join("README"), "not a note").unwrap();

        let listed = notes.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].path, good);
        assert_eq!(
            names(&scratch.0),
            [
                ".half-written.json.7.tmp",
                "README",
                "a-directory.json.corrupt",
                "garbage.json.1.corrupt",
                "garbage.json.corrupt",
                "good@eth0.json",
                "newer.json",
                "no-request.json.corrupt",
            ]
        );
        let aside = fs::read_to_string(scratch.0.join("garbage.json.1.corrupt")).unwrap();
        assert_eq!(aside, "not json");
        assert_eq!(
            notes.list().unwrap(),
            listed,
            "a second listing finds the same"
        );
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_it() {
        let scratch = Scratch::new("unwritable");
        let file = scratch.0.join("a-file");
        fs::write(&file, "").unwrap();
        let notes = DelNotes::new(file.join("pending-dels"));
        let error = notes.write(&request("5f2c", "eth0")).unwrap_err();
        assert!(matches!(error, DelNoteError::CreateDir { .. }), "{error:?}");
        assert!(error.to_string().contains("a-file/pending-dels"), "{error}");
        assert!(std::error::Error::source(&error).is_some());
    }
}
