//! Durable pool state: every address with its state, and the intent
//! records written before each backend call.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use hulk_ipam::{Lease, Owner, PoolKey};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Where an address is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressState {
    /// In the pool, ready to hand out.
    Idle,
    /// Held by a pod interface.
    Assigned(Owner),
    /// Released by a pod; handed out again only after `until_ms` (Unix
    /// milliseconds), so Service endpoints can converge first.
    Cooldown {
        /// When the cooldown ends.
        until_ms: u64,
    },
    /// Being returned to the backend (an intent record covers it).
    Releasing,
}

/// One address the node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRecord {
    /// The pool it belongs to.
    pub key: PoolKey,
    /// The backend's lease.
    pub lease: Lease,
    /// Its state.
    pub state: AddressState,
    /// When it last changed state (Unix milliseconds), for idle reclaim.
    pub since_ms: u64,
    /// Taken by a pod asking for this address by name (a fixed IP): it
    /// never serves other pods from the idle list; released and cooled
    /// down, it goes back to the backend.
    #[serde(default)]
    pub fixed: bool,
    /// The backend no longer has its lease (an orphan sweep did not find
    /// it: the cloud took the address back, and may have given it to
    /// another node) while a pod still held it. The pod keeps it until its
    /// DEL, which drops the record instead of cooling it down, so the
    /// address is never handed out again from this node.
    #[serde(default)]
    pub lost: bool,
}

/// What a backend call in flight was doing, written before the call and
/// removed after it, so a crash in between is repaired at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntentKind {
    /// Allocating `count` addresses for `key`.
    Allocate {
        /// The pool.
        key: PoolKey,
        /// How many.
        count: usize,
    },
    /// Releasing a lease.
    Release {
        /// The lease id.
        lease_id: String,
    },
}

/// An intent record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Its id, unique in the store.
    pub id: u64,
    /// What it covers.
    pub kind: IntentKind,
}

/// One change, applied atomically with the others of its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Insert or replace an address.
    PutAddress(Box<AddressRecord>),
    /// Forget an address.
    RemoveAddress(String),
    /// Insert an intent.
    PutIntent(Intent),
    /// Remove an intent.
    RemoveIntent(u64),
    /// Mark a pool drained by an operator (`true`) or resumed (`false`),
    /// so that a restarted agent does not refill what was drained.
    SetDrained(PoolKey, bool),
    /// Insert or replace the embedder's record of one attachment (hulk-node
    /// keeps, per container and interface, the sandbox and what ADD built),
    /// opaque to the pool, so it lives in the same file and commits with
    /// the same durability as the addresses.
    PutAttachment {
        /// The attachment's key, e.g. `container/ifname`.
        key: String,
        /// The record as the embedder encodes it.
        record: Vec<u8>,
    },
    /// Forget an attachment record.
    RemoveAttachment(String),
}

impl StoreOp {
    /// Insert or replace `record`.
    pub fn put(record: AddressRecord) -> StoreOp {
        StoreOp::PutAddress(Box::new(record))
    }
}

/// Everything a store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Addresses by lease id.
    pub addresses: BTreeMap<String, AddressRecord>,
    /// Intents by id.
    pub intents: BTreeMap<u64, Intent>,
    /// Pools an operator drained and has not resumed.
    pub drained: BTreeSet<PoolKey>,
    /// The embedder's attachment records by key ([`StoreOp::PutAttachment`]).
    pub attachments: BTreeMap<String, Vec<u8>>,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed: redb's error (the file's I/O, a full disk,
    /// corruption, a transaction or table error); boxed, since redb's
    /// error is large and this one travels in every `Result` of the pool.
    #[error("pool store database: {0}")]
    Database(#[source] Box<redb::Error>),
    /// The database is closed: reopening it after a failure failed (that
    /// failure was returned then).
    #[error("pool store is not open: reopening it after a failure failed")]
    NotOpen,
    /// A record could not be encoded or decoded.
    #[error("pool store record: {0}")]
    Record(#[from] serde_json::Error),
}

/// A transactional store of pool state.
pub trait PoolStore: Send + Sync {
    /// Reads everything.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies `ops` all or none.
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError>;
    /// Why the store cannot write now, if its last write failed and it has
    /// not recovered since (for STATUS and the liveness check); `None`
    /// while it works.
    fn failing(&self) -> Option<String> {
        None
    }
}

/// A store in memory (tests, benchmarks, embedding without durability).
#[derive(Debug, Default)]
pub struct MemoryStore {
    snapshot: Mutex<Snapshot>,
}

fn apply_to(snapshot: &mut Snapshot, ops: &[StoreOp]) {
    for op in ops {
        match op {
            StoreOp::PutAddress(record) => {
                snapshot
                    .addresses
                    .insert(record.lease.id.clone(), (**record).clone());
            }
            StoreOp::RemoveAddress(id) => {
                snapshot.addresses.remove(id);
            }
            StoreOp::PutIntent(intent) => {
                snapshot.intents.insert(intent.id, intent.clone());
            }
            StoreOp::RemoveIntent(id) => {
                snapshot.intents.remove(id);
            }
            StoreOp::SetDrained(key, true) => {
                snapshot.drained.insert(key.clone());
            }
            StoreOp::SetDrained(key, false) => {
                snapshot.drained.remove(key);
            }
            StoreOp::PutAttachment { key, record } => {
                snapshot.attachments.insert(key.clone(), record.clone());
            }
            StoreOp::RemoveAttachment(key) => {
                snapshot.attachments.remove(key);
            }
        }
    }
}

impl PoolStore for MemoryStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(self
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone())
    }

    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let mut snapshot = self
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        apply_to(&mut snapshot, ops);
        Ok(())
    }
}

const ADDRESSES: TableDefinition<&str, &[u8]> = TableDefinition::new("addresses");
const INTENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("intents");
/// Drained pools, keyed by the JSON of their `PoolKey`.
const DRAINED: TableDefinition<&str, ()> = TableDefinition::new("drained");
/// Attachment records of the embedder, opaque bytes by key.
const ATTACHMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("attachments");

/// A store in one redb file: ACID, crash-safe, one writer at a time.
///
/// After a failed write (a full disk, a read-only remount) redb refuses
/// every later transaction until the file is opened again, so a store
/// that failed reopens its file before the next operation: once the disk
/// has room again the store works again, without an agent restart.
pub struct RedbStore {
    path: std::path::PathBuf,
    /// The open database; `None` between a failed reopen and the next try.
    database: Mutex<Option<Database>>,
    /// Why the last operation failed, until one succeeds.
    failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

/// A redb error of any stage (open, transaction, table, storage, commit)
/// as the store's, its cause kept.
fn database_error(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Database(Box::new(error.into()))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RedbStore {
    /// Opens (or creates) the store at `path`. An existing file of 0
    /// bytes (a truncated copy, a failed restore) becomes a new store, said
    /// loudly: every address and attachment it held is forgotten, and only
    /// the cloud's holder marks can bring them back.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        if std::fs::metadata(path).is_ok_and(|metadata| metadata.len() == 0) {
            tracing::error!(
                path = %path.display(),
                "the pool state file is empty (0 bytes): starting a new store; \
                 what it held is rebuilt only from the cloud's holder marks"
            );
        }
        let database = RedbStore::create(path)?;
        Ok(RedbStore {
            path: path.to_path_buf(),
            database: Mutex::new(Some(database)),
            failure: Mutex::new(None),
        })
    }

    /// Opens the file and makes sure every table exists.
    fn create(path: &Path) -> Result<Database, StoreError> {
        let database = Database::create(path).map_err(database_error)?;
        // Create the tables once so that reads never meet a missing table.
        let transaction = database.begin_write().map_err(database_error)?;
        transaction.open_table(ADDRESSES).map_err(database_error)?;
        transaction.open_table(INTENTS).map_err(database_error)?;
        transaction.open_table(DRAINED).map_err(database_error)?;
        transaction
            .open_table(ATTACHMENTS)
            .map_err(database_error)?;
        transaction.commit().map_err(database_error)?;
        Ok(database)
    }

    /// Runs `work` on the database, reopening the file first when the last
    /// operation failed, and remembering the outcome for
    /// [`PoolStore::failing`].
    fn with_database<T>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut database = lock(&self.database);
        if lock(&self.failure).is_some() {
            // The old handle must close before the file can open again.
            database.take();
            match RedbStore::create(&self.path) {
                Ok(reopened) => {
                    tracing::info!(path = %self.path.display(), "pool store reopened after a failure");
                    *database = Some(reopened);
                }
                Err(error) => {
                    *lock(&self.failure) = Some(error.to_string());
                    return Err(error);
                }
            }
        }
        let outcome = match database.as_ref() {
            Some(open) => work(open),
            None => Err(StoreError::NotOpen),
        };
        *lock(&self.failure) = match &outcome {
            // A record that does not decode is not the file's fault.
            Err(error @ (StoreError::Database(_) | StoreError::NotOpen)) => Some(error.to_string()),
            _ => None,
        };
        outcome
    }
}

impl PoolStore for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.with_database(load_from)
    }

    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        // Nothing to write is no transaction: an empty commit still takes
        // redb's single writer and an fsync, and callers that plan and
        // find nothing to do (the refiller's return loop, on every change
        // of a pool) would queue ADDs' writes behind them.
        if ops.is_empty() {
            return Ok(());
        }
        self.with_database(|database| apply_in(database, ops))
    }

    fn failing(&self) -> Option<String> {
        lock(&self.failure).clone()
    }
}

fn load_from(database: &Database) -> Result<Snapshot, StoreError> {
    let transaction = database.begin_read().map_err(database_error)?;
    let mut snapshot = Snapshot::default();
    let addresses = transaction.open_table(ADDRESSES).map_err(database_error)?;
    for entry in addresses.iter().map_err(database_error)? {
        let (key, value) = entry.map_err(database_error)?;
        let record: AddressRecord = serde_json::from_slice(value.value())?;
        snapshot.addresses.insert(key.value().to_owned(), record);
    }
    let intents = transaction.open_table(INTENTS).map_err(database_error)?;
    for entry in intents.iter().map_err(database_error)? {
        let (key, value) = entry.map_err(database_error)?;
        let intent: Intent = serde_json::from_slice(value.value())?;
        snapshot.intents.insert(key.value(), intent);
    }
    let drained = transaction.open_table(DRAINED).map_err(database_error)?;
    for entry in drained.iter().map_err(database_error)? {
        let (key, _) = entry.map_err(database_error)?;
        snapshot.drained.insert(serde_json::from_str(key.value())?);
    }
    let attachments = transaction
        .open_table(ATTACHMENTS)
        .map_err(database_error)?;
    for entry in attachments.iter().map_err(database_error)? {
        let (key, value) = entry.map_err(database_error)?;
        snapshot
            .attachments
            .insert(key.value().to_owned(), value.value().to_vec());
    }
    Ok(snapshot)
}

fn apply_in(database: &Database, ops: &[StoreOp]) -> Result<(), StoreError> {
    let transaction = database.begin_write().map_err(database_error)?;
    {
        let mut addresses = transaction.open_table(ADDRESSES).map_err(database_error)?;
        let mut intents = transaction.open_table(INTENTS).map_err(database_error)?;
        let mut drained = transaction.open_table(DRAINED).map_err(database_error)?;
        let mut attachments = transaction
            .open_table(ATTACHMENTS)
            .map_err(database_error)?;
        for op in ops {
            match op {
                StoreOp::PutAddress(record) => {
                    let bytes = serde_json::to_vec(record)?;
                    addresses
                        .insert(record.lease.id.as_str(), bytes.as_slice())
                        .map_err(database_error)?;
                }
                StoreOp::RemoveAddress(id) => {
                    addresses.remove(id.as_str()).map_err(database_error)?;
                }
                StoreOp::PutIntent(intent) => {
                    let bytes = serde_json::to_vec(intent)?;
                    intents
                        .insert(intent.id, bytes.as_slice())
                        .map_err(database_error)?;
                }
                StoreOp::RemoveIntent(id) => {
                    intents.remove(*id).map_err(database_error)?;
                }
                StoreOp::SetDrained(key, true) => {
                    let key = serde_json::to_string(key)?;
                    drained.insert(key.as_str(), ()).map_err(database_error)?;
                }
                StoreOp::SetDrained(key, false) => {
                    let key = serde_json::to_string(key)?;
                    drained.remove(key.as_str()).map_err(database_error)?;
                }
                StoreOp::PutAttachment { key, record } => {
                    attachments
                        .insert(key.as_str(), record.as_slice())
                        .map_err(database_error)?;
                }
                StoreOp::RemoveAttachment(key) => {
                    attachments.remove(key.as_str()).map_err(database_error)?;
                }
            }
        }
    }
    transaction.commit().map_err(database_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, state: AddressState) -> AddressRecord {
        AddressRecord {
            key: PoolKey::new("net", "sub", ["sg"], None),
            lease: Lease {
                id: id.into(),
                address: "10.0.0.2/24".parse().unwrap(),
                network: "net".into(),
                subnet: "sub".into(),
                gateway: None,
                mac: None,
                mtu: None,
                gateway_mac: None,
                security_groups: vec![],
                qos_policy: None,
                node: "n".into(),
                owner: None,
                marked_by: None,
            },
            state,
            since_ms: 1,
            fixed: false,
            lost: false,
        }
    }

    fn exercise(store: &dyn PoolStore) {
        let intent = Intent {
            id: 7,
            kind: IntentKind::Release {
                lease_id: "a".into(),
            },
        };
        store
            .apply(&[
                StoreOp::put(record("a", AddressState::Idle)),
                StoreOp::put(record("b", AddressState::Releasing)),
                StoreOp::PutIntent(intent.clone()),
            ])
            .unwrap();
        store
            .apply(&[
                StoreOp::RemoveAddress("b".into()),
                StoreOp::put(record("a", AddressState::Cooldown { until_ms: 9 })),
            ])
            .unwrap();
        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.addresses.len(), 1);
        assert_eq!(
            snapshot.addresses["a"].state,
            AddressState::Cooldown { until_ms: 9 }
        );
        assert_eq!(snapshot.intents[&7], intent);
        store.apply(&[StoreOp::RemoveIntent(7)]).unwrap();
        assert!(store.load().unwrap().intents.is_empty());

        let drained = PoolKey::new("net", "retired", ["sg"], Some("qos".into()));
        store
            .apply(&[StoreOp::SetDrained(drained.clone(), true)])
            .unwrap();
        assert_eq!(
            store.load().unwrap().drained,
            BTreeSet::from([drained.clone()])
        );

        let put = |key: &str, record: &[u8]| StoreOp::PutAttachment {
            key: key.into(),
            record: record.to_vec(),
        };
        store
            .apply(&[put("c1/eth0", b"first"), put("c2/eth0", b"other")])
            .unwrap();
        store
            .apply(&[
                put("c1/eth0", b"second"),
                StoreOp::RemoveAttachment("c2/eth0".into()),
            ])
            .unwrap();
        assert_eq!(
            store.load().unwrap().attachments,
            BTreeMap::from([("c1/eth0".to_owned(), b"second".to_vec())])
        );
    }

    #[test]
    fn the_memory_store_applies_batches() {
        exercise(&MemoryStore::default());
    }

    #[test]
    fn the_redb_store_applies_batches_and_survives_reopening() {
        let directory =
            std::env::temp_dir().join(format!("hulk-pool-store-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("pool.redb");
        let _ = std::fs::remove_file(&path);
        exercise(&RedbStore::open(&path).unwrap());
        let reopened = RedbStore::open(&path).unwrap();
        let snapshot = reopened.load().unwrap();
        assert_eq!(snapshot.addresses.len(), 1);
        let drained = snapshot.drained.into_iter().next().unwrap();
        assert_eq!(drained.subnet, "retired");
        reopened
            .apply(&[StoreOp::SetDrained(drained, false)])
            .unwrap();
        assert!(reopened.load().unwrap().drained.is_empty());
        assert_eq!(snapshot.attachments["c1/eth0"], b"second");
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
