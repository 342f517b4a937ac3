//! The controller's durable state in an embedded redb file: workloads (as
//! canonical manifests), the last desired state published to each node (with
//! its generation), and the last status each node reported.
//!
//! Everything is validated again when loaded: a manifest goes back through
//! [`crate::manifest::parse`], a frame through `flotilla_proto::decode`.

use std::collections::BTreeMap;
use std::path::Path;

use flotilla_proto::{DesiredState, NodeStatus, decode, encode};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::manifest::{self, Workload};

/// Page cache of the store file.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Workload name → canonical manifest as JSON text.
const WORKLOADS: TableDefinition<&str, &str> = TableDefinition::new("workloads");
/// Node name → last published `DesiredState` frame.
const DESIRED: TableDefinition<&str, &[u8]> = TableDefinition::new("desired");
/// Node name → last received `NodeStatus` frame.
const STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("status");
/// Node name → last time (ms since the epoch, controller clock) it was heard from.
const LAST_SEEN: TableDefinition<&str, u64> = TableDefinition::new("last_seen");

/// Errors from the store. Each names what was being read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("opening store {path}: {source}")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    /// A transaction, table or commit failed.
    #[error("store {op}: {source}")]
    Db {
        op: &'static str,
        source: redb::Error,
    },
    /// A stored record no longer decodes (written by an incompatible version, or damaged).
    #[error("store: {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
}

fn db_err<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Db {
        op,
        source: e.into(),
    }
}

/// Everything the store holds, loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Workloads by name.
    pub workloads: BTreeMap<String, Workload>,
    /// Last published desired state per node.
    pub desired: BTreeMap<String, DesiredState>,
    /// Last status per node.
    pub status: BTreeMap<String, NodeStatus>,
    /// Last time each node was heard from.
    pub last_seen: BTreeMap<String, u64>,
}

/// A batch of changes written in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// Workloads to create or replace.
    pub put_workloads: Vec<Workload>,
    /// Workloads to delete.
    pub delete_workloads: Vec<String>,
    /// Desired states to record as published.
    pub put_desired: Vec<DesiredState>,
    /// Node statuses to record.
    pub put_status: Vec<NodeStatus>,
    /// Last-seen times to record.
    pub put_last_seen: Vec<(String, u64)>,
}

impl Batch {
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.put_workloads.is_empty()
            && self.delete_workloads.is_empty()
            && self.put_desired.is_empty()
            && self.put_status.is_empty()
            && self.put_last_seen.is_empty()
    }
}

/// The redb-backed store.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // redb's default page cache is 1 GiB; the controller's working set
        // lives in memory already, so a small cache is enough (and keeps the
        // memory per node down on large fleets).
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let tx = db.begin_write().map_err(db_err("begin"))?;
        {
            tx.open_table(WORKLOADS).map_err(db_err("create table"))?;
            tx.open_table(DESIRED).map_err(db_err("create table"))?;
            tx.open_table(STATUS).map_err(db_err("create table"))?;
            tx.open_table(LAST_SEEN).map_err(db_err("create table"))?;
        }
        tx.commit().map_err(db_err("commit"))?;
        Ok(Self { db })
    }

    /// Reads everything.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let tx = self.db.begin_read().map_err(db_err("begin read"))?;
        let mut snap = Snapshot::default();

        let table = tx.open_table(WORKLOADS).map_err(db_err("open workloads"))?;
        for row in table.iter().map_err(db_err("read workloads"))? {
            let (name, text) = row.map_err(db_err("read workloads"))?;
            let mut parsed = manifest::parse(text.value()).map_err(|e| StoreError::Corrupt {
                what: format!("workload {}", name.value()),
                reason: e.to_string(),
            })?;
            match (parsed.pop(), parsed.is_empty()) {
                (Some(w), true) => snap.workloads.insert(w.name.clone(), w),
                _ => {
                    return Err(StoreError::Corrupt {
                        what: format!("workload {}", name.value()),
                        reason: "expected exactly one manifest".into(),
                    });
                }
            };
        }

        let table = tx.open_table(DESIRED).map_err(db_err("open desired"))?;
        for row in table.iter().map_err(db_err("read desired"))? {
            let (name, frame) = row.map_err(db_err("read desired"))?;
            let state = decode::<DesiredState>(frame.value()).map_err(|e| StoreError::Corrupt {
                what: format!("desired state of node {}", name.value()),
                reason: e.to_string(),
            })?;
            snap.desired.insert(name.value().to_string(), state);
        }

        let table = tx.open_table(STATUS).map_err(db_err("open status"))?;
        for row in table.iter().map_err(db_err("read status"))? {
            let (name, frame) = row.map_err(db_err("read status"))?;
            // A status is only a cache of what the node will report again:
            // drop one that no longer decodes rather than refuse to start.
            match decode::<NodeStatus>(frame.value()) {
                Ok(status) => {
                    snap.status.insert(name.value().to_string(), status);
                }
                Err(e) => tracing::warn!(node = name.value(), "dropping stored status: {e}"),
            }
        }

        let table = tx.open_table(LAST_SEEN).map_err(db_err("open last_seen"))?;
        for row in table.iter().map_err(db_err("read last_seen"))? {
            let (name, ms) = row.map_err(db_err("read last_seen"))?;
            snap.last_seen.insert(name.value().to_string(), ms.value());
        }
        Ok(snap)
    }

    /// Writes `batch` atomically: all of it or none of it.
    pub fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(db_err("begin"))?;
        {
            let mut table = tx.open_table(WORKLOADS).map_err(db_err("open workloads"))?;
            for w in &batch.put_workloads {
                let text = w.to_json().to_string();
                table
                    .insert(w.name.as_str(), text.as_str())
                    .map_err(db_err("write workload"))?;
            }
            for name in &batch.delete_workloads {
                table
                    .remove(name.as_str())
                    .map_err(db_err("delete workload"))?;
            }
            let mut table = tx.open_table(DESIRED).map_err(db_err("open desired"))?;
            for state in &batch.put_desired {
                let frame = encode(state).map_err(|e| StoreError::Corrupt {
                    what: format!("desired state of node {}", state.node),
                    reason: e.to_string(),
                })?;
                table
                    .insert(state.node.as_str(), frame.as_slice())
                    .map_err(db_err("write desired"))?;
            }
            let mut table = tx.open_table(STATUS).map_err(db_err("open status"))?;
            for status in &batch.put_status {
                let frame = encode(status).map_err(|e| StoreError::Corrupt {
                    what: format!("status of node {}", status.node),
                    reason: e.to_string(),
                })?;
                table
                    .insert(status.node.as_str(), frame.as_slice())
                    .map_err(db_err("write status"))?;
            }
            let mut table = tx.open_table(LAST_SEEN).map_err(db_err("open last_seen"))?;
            for (name, ms) in &batch.put_last_seen {
                table
                    .insert(name.as_str(), ms)
                    .map_err(db_err("write last_seen"))?;
            }
        }
        tx.commit().map_err(db_err("commit"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::NodeInfo;

    fn workload(name: &str, image: &str) -> Workload {
        let text = format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\n\
             spec:\n  containers:\n  - name: main\n    image: {image}\n"
        );
        manifest::parse(&text).unwrap().remove(0)
    }

    #[test]
    fn survives_reopen_and_writes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let store = Store::open(&path).unwrap();
            let desired = DesiredState {
                node: "pi-1".into(),
                generation: 4,
                pods: vec![],
            };
            let status = NodeStatus {
                node: "pi-1".into(),
                instance: 1,
                seq: 2,
                observed_generation: 4,
                desired_error: None,
                health: Default::default(),
                info: NodeInfo::default(),
                pods: vec![],
            };
            store
                .write(&Batch {
                    put_workloads: vec![workload("web", "oci:/a"), workload("db", "oci:/b")],
                    put_desired: vec![desired],
                    put_status: vec![status],
                    put_last_seen: vec![("pi-1".into(), 99)],
                    ..Batch::default()
                })
                .unwrap();
            store
                .write(&Batch {
                    delete_workloads: vec!["db".into()],
                    ..Batch::default()
                })
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.workloads.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(snap.workloads["web"], workload("web", "oci:/a"));
        assert_eq!(snap.desired["pi-1"].generation, 4);
        assert_eq!(snap.status["pi-1"].seq, 2);
        assert_eq!(snap.last_seen["pi-1"], 99);
    }
}
