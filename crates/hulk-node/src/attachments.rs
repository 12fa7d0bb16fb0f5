//! The node's record of each attachment (one pod interface: a container
//! id and an interface name), kept durably in the pool's store so that
//! DEL, GC, restore and the rescue API work from what ADD actually did
//! rather than from what a later request claims.
//!
//! A record is written before ADD touches anything (phase
//! [`Phase::Adding`]), so that every crash point leaves a record the next
//! start can judge: the sandbox (its netns path and that namespace's
//! identity, so a recycled path is not taken for the same sandbox) and,
//! once ADD finished, everything it built ([`Attached`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hulk_ipam::{AttachmentId, FloatingIpHold, Owner, PoolKey};
use hulk_netns::{Attached, NsId};
use hulk_pool::{PoolStore, StoreError, StoreOp};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The store key of an attachment: `container/ifname` (an interface
/// name holds no `/`).
fn store_key(id: &AttachmentId) -> String {
    id.to_string()
}

/// Where an attachment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// ADD started and has not finished: the pod may hold a half-built
    /// interface (a killed agent, a cancelled ADD). A retried ADD rebuilds
    /// it; DEL and GC remove it.
    Adding,
    /// ADD finished; [`AttachmentRecord::created`] lists what it built.
    Ready,
}

/// What the node knows of one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    /// The holder as the pool knows it (container, interface, pod name and
    /// UID, CNI network).
    pub owner: Owner,
    /// `CNI_NETNS` at ADD.
    pub netns: PathBuf,
    /// The identity of the namespace at [`AttachmentRecord::netns`] when
    /// ADD ran; `None` only for records adopted without one.
    pub netns_id: Option<NsId>,
    /// The phase.
    pub phase: Phase,
    /// The pool the address came from, once assigned.
    pub pool: Option<PoolKey>,
    /// The pod address, once assigned.
    pub address: Option<IpNet>,
    /// What ADD built, once [`Phase::Ready`].
    pub created: Option<Attached>,
    /// When the record was last written (Unix milliseconds).
    pub since_ms: u64,
    /// The pod's floating IP: its port and policy as soon as ADD asks for
    /// one, its id once associated. Absent in records written before
    /// floating IPs existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floating_ip: Option<FloatingIpHold>,
}

impl AttachmentRecord {
    /// The record's identity.
    pub fn id(&self) -> AttachmentId {
        self.owner.attachment_id()
    }

    /// The pod address without its prefix, once assigned.
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.map(|address| address.addr())
    }
}

/// Attachment-store failures.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    /// The store refused the write.
    #[error("cannot record attachment {id}")]
    Store {
        /// The attachment.
        id: AttachmentId,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A record could not be encoded.
    #[error("cannot encode attachment {id}")]
    Encode {
        /// The attachment.
        id: AttachmentId,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
}

/// The attachment records: in memory for reads, written through to the
/// pool's store before a change is visible.
pub struct Attachments {
    store: Arc<dyn PoolStore>,
    records: Mutex<BTreeMap<AttachmentId, AttachmentRecord>>,
}

impl std::fmt::Debug for Attachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachments")
            .field("records", &self.records().len())
            .finish_non_exhaustive()
    }
}

impl Attachments {
    /// The records kept in `store`. Records that cannot be decoded are
    /// logged and skipped (left in the store for an operator).
    pub fn load(store: Arc<dyn PoolStore>) -> Result<Self, StoreError> {
        let snapshot = store.load()?;
        let mut records = BTreeMap::new();
        for (key, bytes) in snapshot.attachments {
            match serde_json::from_slice::<AttachmentRecord>(&bytes) {
                Ok(record) => {
                    records.insert(record.id(), record);
                }
                Err(error) => {
                    tracing::error!(attachment = %key, %error, "unreadable attachment record; skipped");
                }
            }
        }
        Ok(Attachments {
            store,
            records: Mutex::new(records),
        })
    }

    /// No records, written to `store` from now on (when the stored ones
    /// cannot be read).
    pub fn empty(store: Arc<dyn PoolStore>) -> Self {
        Attachments {
            store,
            records: Mutex::default(),
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<AttachmentId, AttachmentRecord>> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The record of `id`, if any.
    pub fn get(&self, id: &AttachmentId) -> Option<AttachmentRecord> {
        self.records().get(id).cloned()
    }

    /// Every record, by identity.
    pub fn all(&self) -> Vec<AttachmentRecord> {
        self.records().values().cloned().collect()
    }

    /// Writes `record` (durably first).
    pub fn put(&self, record: AttachmentRecord) -> Result<(), AttachmentError> {
        let id = record.id();
        let bytes = serde_json::to_vec(&record).map_err(|source| AttachmentError::Encode {
            id: id.clone(),
            source,
        })?;
        self.store
            .apply(&[StoreOp::PutAttachment {
                key: store_key(&id),
                record: bytes,
            }])
            .map_err(|source| AttachmentError::Store {
                id: id.clone(),
                source,
            })?;
        self.records().insert(id, record);
        Ok(())
    }

    /// Forgets `id` (durably first); nothing to forget is fine.
    pub fn remove(&self, id: &AttachmentId) -> Result<(), AttachmentError> {
        if !self.records().contains_key(id) {
            return Ok(());
        }
        self.store
            .apply(&[StoreOp::RemoveAttachment(store_key(id))])
            .map_err(|source| AttachmentError::Store {
                id: id.clone(),
                source,
            })?;
        self.records().remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hulk_pool::MemoryStore;

    fn record(container: &str) -> AttachmentRecord {
        AttachmentRecord {
            owner: Owner {
                container_id: container.into(),
                ifname: "eth0".into(),
                pod: Some("default/web-0".into()),
                cni_network: Some("vpc".into()),
                pod_uid: Some("uid-1".into()),
            },
            netns: "/var/run/netns/cni-1".into(),
            netns_id: Some(NsId {
                dev: 4,
                ino: 4026532000,
            }),
            phase: Phase::Adding,
            pool: None,
            address: Some("10.20.0.5/24".parse().unwrap()),
            created: None,
            since_ms: 7,
            floating_ip: None,
        }
    }

    #[test]
    fn records_survive_a_reload_and_removal_is_durable() {
        let store: Arc<dyn PoolStore> = Arc::new(MemoryStore::default());
        let attachments = Attachments::load(store.clone()).unwrap();
        attachments.put(record("a")).unwrap();
        attachments.put(record("b")).unwrap();
        let mut ready = record("a");
        ready.phase = Phase::Ready;
        attachments.put(ready.clone()).unwrap();
        attachments.remove(&record("b").id()).unwrap();
        attachments.remove(&record("never").id()).unwrap();

        let reloaded = Attachments::load(store).unwrap();
        assert_eq!(reloaded.all(), [ready]);
        assert_eq!(reloaded.get(&record("a").id()).unwrap().phase, Phase::Ready);
        assert!(reloaded.get(&record("b").id()).is_none());
    }

    #[test]
    fn records_without_a_floating_ip_still_read_and_one_survives_a_reload() {
        let older = r#"{"owner":{"container_id":"a","ifname":"eth0","pod":"default/web-0"},
            "netns":"/var/run/netns/cni-1","netns_id":null,"phase":"ready","pool":null,
            "address":"10.20.0.5/24","created":null,"since_ms":7}"#;
        let read: AttachmentRecord = serde_json::from_str(older).unwrap();
        assert_eq!(read.floating_ip, None);
        let written = serde_json::to_string(&read).unwrap();
        assert!(!written.contains("floating_ip"), "{written}");

        let store: Arc<dyn PoolStore> = Arc::new(MemoryStore::default());
        let mut held = record("a");
        held.floating_ip = Some(FloatingIpHold {
            port: "port-1".into(),
            id: Some("fip-1".into()),
            address: Some("203.0.113.9".parse().unwrap()),
            policy: hulk_ipam::FloatingIpPolicy::Keep,
        });
        Attachments::load(store.clone())
            .unwrap()
            .put(held.clone())
            .unwrap();
        assert_eq!(Attachments::load(store).unwrap().all(), [held]);
    }

    #[test]
    fn an_unreadable_record_is_skipped_not_fatal() {
        let store: Arc<dyn PoolStore> = Arc::new(MemoryStore::default());
        store
            .apply(&[StoreOp::PutAttachment {
                key: "x/eth0".into(),
                record: b"not json".to_vec(),
            }])
            .unwrap();
        Attachments::load(store.clone())
            .unwrap()
            .put(record("a"))
            .unwrap();
        assert_eq!(Attachments::load(store).unwrap().all().len(), 1);
    }
}
