//! The controller's durable state in an embedded redb file: workloads (as
//! canonical manifests), the last desired state published to each node (with
//! its generation), and the last status each node reported.
//!
//! Everything is validated again when loaded: a manifest goes back through
//! [`crate::manifest::parse`], a frame through `flotilla_proto::decode`
//! (statuses by [`crate::fleet::Fleet::restore`], which keeps them as frames).
//!
//! The page cache is fixed ([`CACHE_BYTES`]), not per node: on a large
//! fleet it fills up once and stays at that size.

use std::collections::BTreeMap;
use std::path::Path;

use flotilla_proto::{DesiredState, check_label_key, check_label_value, decode};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::manifest::namespace::Namespace;
use crate::manifest::{self, Workload};
use crate::rollout::{Revision, Rollout};

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
/// (Workload, revision number) → `{"createdMs", "cause", "manifest"}` as JSON
/// text, the manifest canonical.
const REVISIONS: TableDefinition<(&str, u64), &str> = TableDefinition::new("revisions");
/// Workload → its rollout (`Rollout::to_json`), running or the last one.
const ROLLOUTS: TableDefinition<&str, &str> = TableDefinition::new("rollouts");
/// Node name → labels set at the controller, as a JSON object of strings.
const NODE_LABELS: TableDefinition<&str, &str> = TableDefinition::new("node_labels");
/// Node name → when it became NotReady (ms since the epoch, controller
/// clock), while it is: a restarted controller keeps counting replicas'
/// toleration from there. Written when it changes, not per status.
const NOT_READY_SINCE: TableDefinition<&str, u64> = TableDefinition::new("not_ready_since");
/// Secret name → the Secret sealed under the controller's key
/// (`secrets::Vault`); never a value in the clear.
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
/// Namespace name → its canonical document as JSON text.
const NAMESPACES: TableDefinition<&str, &str> = TableDefinition::new("namespaces");

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
    /// Last status frame per node (not decoded yet).
    pub status: BTreeMap<String, Vec<u8>>,
    /// Last time each node was heard from.
    pub last_seen: BTreeMap<String, u64>,
    /// Labels set at the controller, per node.
    pub node_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// When each NotReady node became so.
    pub not_ready_since: BTreeMap<String, u64>,
    /// Every kept revision of every workload.
    pub revisions: Vec<Revision>,
    /// Each workload's rollout.
    pub rollouts: Vec<Rollout>,
    /// Secrets as stored (sealed), by name.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// Namespaces by name (`default`, implicit, is never stored).
    pub namespaces: BTreeMap<String, Namespace>,
}

/// A batch of changes written in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// Workloads to create or replace.
    pub put_workloads: Vec<Workload>,
    /// Workloads to delete.
    pub delete_workloads: Vec<String>,
    /// Desired-state frames to record as published, by node (encoded once,
    /// for the store and the publish alike).
    pub put_desired: Vec<(String, Vec<u8>)>,
    /// Node status frames to record, by node.
    pub put_status: Vec<(String, Vec<u8>)>,
    /// Last-seen times to record.
    pub put_last_seen: Vec<(String, u64)>,
    /// Controller labels to record per node (an empty map removes the row).
    pub put_node_labels: Vec<(String, BTreeMap<String, String>)>,
    /// NotReady instants to record per node (`None` removes the row).
    pub put_not_ready_since: Vec<(String, Option<u64>)>,
    /// Revisions to record.
    pub put_revisions: Vec<Revision>,
    /// Revisions to drop, by workload and number.
    pub delete_revisions: Vec<(String, u64)>,
    /// Rollouts to record.
    pub put_rollouts: Vec<Rollout>,
    /// Rollouts to drop, by workload.
    pub delete_rollouts: Vec<String>,
    /// Secrets to create or replace, already sealed, by name.
    pub put_secrets: Vec<(String, Vec<u8>)>,
    /// Secrets to delete.
    pub delete_secrets: Vec<String>,
    /// Namespaces to create or replace.
    pub put_namespaces: Vec<Namespace>,
    /// Namespaces to delete.
    pub delete_namespaces: Vec<String>,
}

impl Batch {
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.put_workloads.is_empty()
            && self.delete_workloads.is_empty()
            && self.put_desired.is_empty()
            && self.put_status.is_empty()
            && self.put_last_seen.is_empty()
            && self.put_node_labels.is_empty()
            && self.put_not_ready_since.is_empty()
            && self.put_revisions.is_empty()
            && self.put_secrets.is_empty()
            && self.delete_secrets.is_empty()
            && self.put_namespaces.is_empty()
            && self.delete_namespaces.is_empty()
            && self.delete_revisions.is_empty()
            && self.put_rollouts.is_empty()
            && self.delete_rollouts.is_empty()
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
            tx.open_table(NODE_LABELS).map_err(db_err("create table"))?;
            tx.open_table(NOT_READY_SINCE)
                .map_err(db_err("create table"))?;
            tx.open_table(REVISIONS).map_err(db_err("create table"))?;
            tx.open_table(ROLLOUTS).map_err(db_err("create table"))?;
            tx.open_table(SECRETS).map_err(db_err("create table"))?;
            tx.open_table(NAMESPACES).map_err(db_err("create table"))?;
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
            snap.status
                .insert(name.value().to_string(), frame.value().to_vec());
        }

        let table = tx
            .open_table(NOT_READY_SINCE)
            .map_err(db_err("open not_ready_since"))?;
        for row in table.iter().map_err(db_err("read not_ready_since"))? {
            let (name, ms) = row.map_err(db_err("read not_ready_since"))?;
            snap.not_ready_since
                .insert(name.value().to_string(), ms.value());
        }

        let table = tx.open_table(LAST_SEEN).map_err(db_err("open last_seen"))?;
        for row in table.iter().map_err(db_err("read last_seen"))? {
            let (name, ms) = row.map_err(db_err("read last_seen"))?;
            snap.last_seen.insert(name.value().to_string(), ms.value());
        }

        let table = tx
            .open_table(NODE_LABELS)
            .map_err(db_err("open node_labels"))?;
        for row in table.iter().map_err(db_err("read node_labels"))? {
            let (name, text) = row.map_err(db_err("read node_labels"))?;
            let labels = parse_labels(text.value()).map_err(|reason| StoreError::Corrupt {
                what: format!("labels of node {}", name.value()),
                reason,
            })?;
            snap.node_labels.insert(name.value().to_string(), labels);
        }

        let table = tx.open_table(REVISIONS).map_err(db_err("open revisions"))?;
        for row in table.iter().map_err(db_err("read revisions"))? {
            let (key, text) = row.map_err(db_err("read revisions"))?;
            let (name, number) = key.value();
            let revision =
                parse_revision(number, text.value()).map_err(|reason| StoreError::Corrupt {
                    what: format!("revision {number} of workload {name}"),
                    reason,
                })?;
            snap.revisions.push(revision);
        }

        let table = tx.open_table(ROLLOUTS).map_err(db_err("open rollouts"))?;
        for row in table.iter().map_err(db_err("read rollouts"))? {
            let (name, text) = row.map_err(db_err("read rollouts"))?;
            let corrupt = |reason: String| StoreError::Corrupt {
                what: format!("rollout of workload {}", name.value()),
                reason,
            };
            let v: serde_json::Value =
                serde_json::from_str(text.value()).map_err(|e| corrupt(e.to_string()))?;
            snap.rollouts.push(Rollout::from_json(&v).map_err(corrupt)?);
        }

        let table = tx.open_table(SECRETS).map_err(db_err("open secrets"))?;
        for row in table.iter().map_err(db_err("read secrets"))? {
            let (name, sealed) = row.map_err(db_err("read secrets"))?;
            snap.secrets
                .insert(name.value().to_string(), sealed.value().to_vec());
        }

        let table = tx
            .open_table(NAMESPACES)
            .map_err(db_err("open namespaces"))?;
        for row in table.iter().map_err(db_err("read namespaces"))? {
            let (name, text) = row.map_err(db_err("read namespaces"))?;
            let ns = parse_namespace(text.value()).map_err(|reason| StoreError::Corrupt {
                what: format!("namespace {}", name.value()),
                reason,
            })?;
            snap.namespaces.insert(ns.name.clone(), ns);
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
            for (node, frame) in &batch.put_desired {
                table
                    .insert(node.as_str(), frame.as_slice())
                    .map_err(db_err("write desired"))?;
            }
            let mut table = tx.open_table(STATUS).map_err(db_err("open status"))?;
            for (node, frame) in &batch.put_status {
                table
                    .insert(node.as_str(), frame.as_slice())
                    .map_err(db_err("write status"))?;
            }
            let mut table = tx
                .open_table(NOT_READY_SINCE)
                .map_err(db_err("open not_ready_since"))?;
            for (node, since) in &batch.put_not_ready_since {
                match since {
                    Some(ms) => table.insert(node.as_str(), ms).map(drop),
                    None => table.remove(node.as_str()).map(drop),
                }
                .map_err(db_err("write not_ready_since"))?;
            }
            let mut table = tx.open_table(LAST_SEEN).map_err(db_err("open last_seen"))?;
            for (name, ms) in &batch.put_last_seen {
                table
                    .insert(name.as_str(), ms)
                    .map_err(db_err("write last_seen"))?;
            }
            let mut table = tx.open_table(REVISIONS).map_err(db_err("open revisions"))?;
            for r in &batch.put_revisions {
                let text = serde_json::json!({
                    "createdMs": r.created_ms,
                    "cause": r.cause,
                    "manifest": r.workload.to_json(),
                })
                .to_string();
                table
                    .insert((r.workload.name.as_str(), r.number), text.as_str())
                    .map_err(db_err("write revision"))?;
            }
            for (name, number) in &batch.delete_revisions {
                table
                    .remove((name.as_str(), *number))
                    .map_err(db_err("delete revision"))?;
            }
            let mut table = tx.open_table(SECRETS).map_err(db_err("open secrets"))?;
            for (name, sealed) in &batch.put_secrets {
                table
                    .insert(name.as_str(), sealed.as_slice())
                    .map_err(db_err("write secret"))?;
            }
            for name in &batch.delete_secrets {
                table
                    .remove(name.as_str())
                    .map_err(db_err("delete secret"))?;
            }
            let mut table = tx
                .open_table(NAMESPACES)
                .map_err(db_err("open namespaces"))?;
            for ns in &batch.put_namespaces {
                let text = ns.to_json().to_string();
                table
                    .insert(ns.name.as_str(), text.as_str())
                    .map_err(db_err("write namespace"))?;
            }
            for name in &batch.delete_namespaces {
                table
                    .remove(name.as_str())
                    .map_err(db_err("delete namespace"))?;
            }
            let mut table = tx.open_table(ROLLOUTS).map_err(db_err("open rollouts"))?;
            for r in &batch.put_rollouts {
                let text = r.to_json().to_string();
                table
                    .insert(r.workload.as_str(), text.as_str())
                    .map_err(db_err("write rollout"))?;
            }
            for name in &batch.delete_rollouts {
                table
                    .remove(name.as_str())
                    .map_err(db_err("delete rollout"))?;
            }
            let mut table = tx
                .open_table(NODE_LABELS)
                .map_err(db_err("open node_labels"))?;
            for (name, labels) in &batch.put_node_labels {
                if labels.is_empty() {
                    table
                        .remove(name.as_str())
                        .map_err(db_err("delete node labels"))?;
                } else {
                    let text = serde_json::to_string(labels).map_err(|e| StoreError::Corrupt {
                        what: format!("labels of node {name}"),
                        reason: e.to_string(),
                    })?;
                    table
                        .insert(name.as_str(), text.as_str())
                        .map_err(db_err("write node labels"))?;
                }
            }
        }
        tx.commit().map_err(db_err("commit"))
    }
}

/// A revision read back from the store; its manifest is validated again.
fn parse_revision(number: u64, text: &str) -> Result<Revision, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let created_ms = v["createdMs"]
        .as_u64()
        .ok_or("createdMs: expected a number")?;
    let cause = v["cause"].as_str().ok_or("cause: expected a string")?;
    let mut parsed = manifest::parse(&v["manifest"].to_string()).map_err(|e| e.to_string())?;
    match (parsed.pop(), parsed.is_empty()) {
        (Some(workload), true) => Ok(Revision {
            number,
            created_ms,
            cause: cause.to_owned(),
            workload,
        }),
        _ => Err("expected exactly one manifest".into()),
    }
}

/// A namespace read back from the store, validated again as at apply.
fn parse_namespace(text: &str) -> Result<Namespace, String> {
    let mut objects = manifest::parse_objects(text).map_err(|e| e.to_string())?;
    match (objects.namespaces.pop(), objects.namespaces.is_empty()) {
        (Some(ns), true) if objects.workloads.is_empty() && objects.secrets.is_empty() => Ok(ns),
        _ => Err("expected exactly one namespace".into()),
    }
}

/// Labels read back from the store, checked again as any input is.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let labels: BTreeMap<String, String> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    for (k, v) in &labels {
        check_label_key(k).map_err(|e| format!("label key {k:?}: {e}"))?;
        check_label_value(v).map_err(|e| format!("label value {v:?}: {e}"))?;
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{NodeInfo, NodeStatus, encode};

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
                prefetch: Vec::new(),
                prefetch_pull_secrets: Vec::new(),
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
                prefetch: Vec::new(),
            };
            store
                .write(&Batch {
                    put_workloads: vec![workload("web", "oci:/a"), workload("db", "oci:/b")],
                    put_desired: vec![("pi-1".into(), encode(&desired).unwrap())],
                    put_status: vec![("pi-1".into(), encode(&status).unwrap())],
                    put_not_ready_since: vec![("pi-1".into(), Some(77)), ("pi-2".into(), Some(78))],
                    put_last_seen: vec![("pi-1".into(), 99)],
                    put_revisions: (1..=3)
                        .map(|number| Revision {
                            number,
                            created_ms: 100 + number,
                            cause: "apply".into(),
                            workload: workload("web", &format!("oci:/a{number}")),
                        })
                        .collect(),
                    put_node_labels: vec![
                        ("pi-1".into(), [("tier".into(), "gold".into())].into()),
                        ("pi-2".into(), [("x".into(), "y".into())].into()),
                    ],
                    put_namespaces: vec![net(), Namespace::empty("gone")],
                    ..Batch::default()
                })
                .unwrap();
            store
                .write(&Batch {
                    delete_workloads: vec!["db".into()],
                    put_node_labels: vec![("pi-2".into(), BTreeMap::new())],
                    put_not_ready_since: vec![("pi-2".into(), None)],
                    delete_revisions: vec![("web".into(), 1)],
                    put_rollouts: vec![Rollout::new("web", 2, 3, vec!["pi-1".into()], 5)],
                    delete_namespaces: vec!["gone".into()],
                    ..Batch::default()
                })
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.workloads.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(snap.workloads["web"], workload("web", "oci:/a"));
        assert_eq!(snap.desired["pi-1"].generation, 4);
        assert_eq!(decode::<NodeStatus>(&snap.status["pi-1"]).unwrap().seq, 2);
        assert_eq!(format!("{:?}", snap.not_ready_since), r#"{"pi-1": 77}"#);
        assert_eq!(snap.last_seen["pi-1"], 99);
        let kept: Vec<(u64, u64, &str)> = snap
            .revisions
            .iter()
            .map(|r| {
                (
                    r.number,
                    r.created_ms,
                    r.workload.spec.containers[0].image.as_str(),
                )
            })
            .collect();
        assert_eq!(kept, [(2, 102, "oci:/a2"), (3, 103, "oci:/a3")]);
        assert_eq!(
            snap.rollouts,
            [Rollout::new("web", 2, 3, vec!["pi-1".into()], 5)]
        );
        assert_eq!(
            format!("{:?}", snap.node_labels),
            r#"{"pi-1": {"tier": "gold"}}"#
        );
        assert_eq!(snap.namespaces.into_values().collect::<Vec<_>>(), [net()]);
    }

    fn net() -> Namespace {
        Namespace {
            allow_privileged: false,
            allowed_capabilities: vec!["NET_ADMIN".into()],
            allow_unconfined_seccomp: true,
            ..Namespace::empty("net")
        }
    }
}
