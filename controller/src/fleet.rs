//! The fleet as the controller knows it: one compact record per node, fed by
//! the nodes' presence and status messages, with the rules for which message
//! wins and for when a node counts as gone.
//!
//! A node is NotReady when its presence says `Offline`: its own clean
//! goodbye, or its last will, which the broker publishes when the link
//! closes or when keepalives stop (1.5 keepalive intervals). As a safety net
//! for a will that never comes (a broker that lost the session), a node not
//! heard from for the node timeout is NotReady too, until it speaks again.
//!
//! Memory: a fleet of 10,000 nodes is held in a few MiB. Of a node's newest
//! status only what placement and message ordering read on every event is
//! kept decoded; the rest (pods, containers, health, strings) stays as the
//! received frame and is decoded when the API shows it. Label sets and
//! architectures are interned: nodes with the same labels share one map.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use flotilla_proto::{DecodeError, NodeStatus, Presence, decode, encode};

/// A node's labels, shared by every node with the same set.
pub type Labels = Arc<BTreeMap<String, String>>;

/// Whether a node is connected, as far as the controller knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Its agent is connected.
    Ready,
    /// Its agent disconnected (last will or clean shutdown).
    NotReady,
    /// Not heard from since the controller started.
    Unknown,
}

impl Readiness {
    /// The name shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::NotReady => "NotReady",
            Self::Unknown => "Unknown",
        }
    }
}

/// What is kept of a node's newest status.
#[derive(Debug, Clone)]
pub struct Reported {
    /// The agent process that sent it (see [`NodeStatus::instance`]).
    pub instance: u64,
    /// Its sequence number in that process.
    pub seq: u64,
    /// The newest desired generation the agent accepted.
    pub observed_generation: u64,
    /// CPU architecture (OCI name), interned.
    pub arch: Arc<str>,
    /// Number of CPUs.
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// The labels its agent reported, interned.
    agent_labels: Labels,
    /// The status as received, for what the API shows.
    frame: Box<[u8]>,
}

impl Reported {
    /// The status frame as received (version byte, then postcard).
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }

    /// The whole status. It decoded when it arrived, so this fails only if
    /// memory was corrupted; the caller shows nothing rather than panic.
    pub fn decode(&self) -> Option<NodeStatus> {
        decode(&self.frame).ok()
    }
}

/// One node.
#[derive(Debug, Clone)]
pub struct Node {
    /// Connected or not.
    pub readiness: Readiness,
    /// The newest status it reported.
    reported: Option<Reported>,
    /// Last time it was heard from (ms since the epoch, controller clock).
    pub last_seen_ms: u64,
    /// NotReady because nothing was heard for too long, not because it said so.
    expired: bool,
    /// When it last became NotReady (ms since the epoch); the scheduler moves
    /// replicas off a node NotReady for longer than their toleration. Stored,
    /// so that a restarted controller keeps counting from the same instant.
    pub not_ready_since_ms: Option<u64>,
    /// Labels set at the controller (`flotilla label node`), over the agent's.
    pub controller_labels: BTreeMap<String, String>,
    /// The agent's labels with the controller's over them, interned.
    labels: Labels,
}

impl Node {
    fn new(labels: Labels) -> Self {
        Self {
            readiness: Readiness::Unknown,
            reported: None,
            last_seen_ms: 0,
            expired: false,
            not_ready_since_ms: None,
            controller_labels: BTreeMap::new(),
            labels,
        }
    }

    /// Sets the readiness; returns whether `not_ready_since_ms` changed.
    fn set_readiness(&mut self, readiness: Readiness, now_ms: u64) -> bool {
        let since = match readiness {
            Readiness::NotReady if self.readiness == Readiness::NotReady => self.not_ready_since_ms,
            Readiness::NotReady => Some(now_ms),
            Readiness::Ready | Readiness::Unknown => None,
        };
        self.readiness = readiness;
        let changed = since != self.not_ready_since_ms;
        self.not_ready_since_ms = since;
        changed
    }

    /// The condition the scheduler sees.
    pub fn condition(&self) -> crate::scheduler::Condition {
        use crate::scheduler::Condition;
        match (self.readiness, self.not_ready_since_ms) {
            (Readiness::Ready, _) => Condition::Ready,
            (Readiness::NotReady, Some(since_ms)) => Condition::NotReady { since_ms },
            _ => Condition::Unknown,
        }
    }

    /// NotReady because nothing was heard from it for the node timeout
    /// (rather than because it disconnected).
    pub fn expired(&self) -> bool {
        self.expired
    }

    /// What is kept of its newest status, if it reported one.
    pub fn reported(&self) -> Option<&Reported> {
        self.reported.as_ref()
    }

    /// Its newest status, decoded.
    pub fn status(&self) -> Option<NodeStatus> {
        self.reported.as_ref()?.decode()
    }

    /// The newest desired generation its agent accepted (0 before any).
    pub fn observed_generation(&self) -> u64 {
        self.reported.as_ref().map_or(0, |r| r.observed_generation)
    }

    /// Its labels: those its agent reported, with those set at the
    /// controller over them.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// Its labels, shared.
    pub fn shared_labels(&self) -> Labels {
        Arc::clone(&self.labels)
    }
}

/// What an incoming status did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOutcome {
    /// Older than what is held (MQTT redelivery can reorder): ignored.
    Stale,
    /// Newer, and the node's labels (so its placement) did not change.
    Updated,
    /// Newer, and the node is new or its labels changed: placement must be recomputed.
    Relabelled,
}

/// One copy of each value in use, shared. Values no longer used anywhere
/// else are dropped when the set has doubled since the last sweep, so it
/// stays in proportion to what the fleet uses.
#[derive(Debug)]
struct Interner<T: ?Sized + std::hash::Hash + Eq> {
    set: HashSet<Arc<T>>,
    swept_at: usize,
}

impl<T: ?Sized + std::hash::Hash + Eq> Default for Interner<T> {
    fn default() -> Self {
        Self {
            set: HashSet::new(),
            swept_at: 0,
        }
    }
}

impl<T: ?Sized + std::hash::Hash + Eq> Interner<T> {
    fn get(&mut self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        if let Some(v) = self.set.get(value) {
            return Arc::clone(v);
        }
        if self.set.len() >= 2 * self.swept_at.max(32) {
            self.set.retain(|v| Arc::strong_count(v) > 1);
            self.swept_at = self.set.len();
        }
        let v = make();
        self.set.insert(Arc::clone(&v));
        v
    }
}

/// Every node by name.
#[derive(Debug, Default)]
pub struct Fleet {
    nodes: BTreeMap<String, Node>,
    label_sets: Interner<BTreeMap<String, String>>,
    archs: Interner<str>,
    /// Nodes whose NotReady instant changed since [`Fleet::take_since_changes`].
    since_changed: BTreeSet<String>,
}

impl Fleet {
    /// Every node, by name.
    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }

    /// One node.
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    fn intern_labels(&mut self, labels: BTreeMap<String, String>) -> Labels {
        self.label_sets.get(&labels, || Arc::new(labels.clone()))
    }

    fn entry(&mut self, name: &str) -> &mut Node {
        let empty = self.intern_labels(BTreeMap::new());
        self.nodes
            .entry(name.to_owned())
            .or_insert_with(|| Node::new(empty))
    }

    /// Recomputes a node's merged labels from its agent's and the controller's.
    fn merge_labels(&mut self, name: &str) {
        let Some(node) = self.nodes.get(name) else {
            return;
        };
        let mut merged = node
            .reported
            .as_ref()
            .map(|r| (*r.agent_labels).clone())
            .unwrap_or_default();
        merged.extend(
            node.controller_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let labels = self.intern_labels(merged);
        if let Some(node) = self.nodes.get_mut(name) {
            node.labels = labels;
        }
    }

    /// Restores a node from the store at start (readiness unknown until it
    /// speaks): its last status frame, checked again, and when it was last
    /// heard from.
    pub fn restore(&mut self, frame: Vec<u8>, last_seen_ms: u64) -> Result<(), DecodeError> {
        let status = decode::<NodeStatus>(&frame)?;
        self.ingest_frame(&status, frame, last_seen_ms);
        let node = self.entry(&status.node);
        node.readiness = Readiness::Unknown;
        Ok(())
    }

    /// Restores when a node became NotReady, from the store at start: it is
    /// NotReady until it is heard from, even if the broker lost its last
    /// will (an embedded broker restarts with the controller).
    pub fn restore_not_ready_since(&mut self, name: &str, since_ms: u64) {
        let node = self.entry(name);
        node.readiness = Readiness::NotReady;
        node.not_ready_since_ms = Some(since_ms);
    }

    /// Applies a status (for tests and benchmarks; the control loop has
    /// the frame already and calls [`Fleet::ingest_frame`]).
    pub fn ingest_status(&mut self, status: NodeStatus, now_ms: u64) -> StatusOutcome {
        let frame = encode(&status).unwrap_or_default();
        self.ingest_frame(&status, frame, now_ms)
    }

    /// Applies a status decoded from `frame`. A status from the same agent
    /// process (same `instance`) with a `seq` not above the one held is
    /// stale; a new instance means the agent restarted and always wins.
    pub fn ingest_frame(
        &mut self,
        status: &NodeStatus,
        frame: Vec<u8>,
        now_ms: u64,
    ) -> StatusOutcome {
        let agent_labels = self.intern_labels(
            status
                .info
                .labels
                .iter()
                .map(|l| (l.key.clone(), l.value.clone()))
                .collect(),
        );
        let arch = self.archs.get(status.info.arch.as_str(), || {
            Arc::from(status.info.arch.as_str())
        });
        let node = self.entry(&status.node);
        if let Some(old) = &node.reported
            && old.instance == status.instance
            && old.seq >= status.seq
        {
            return StatusOutcome::Stale;
        }
        let relabelled = node
            .reported
            .as_ref()
            .is_none_or(|old| !Arc::ptr_eq(&old.agent_labels, &agent_labels));
        node.reported = Some(Reported {
            instance: status.instance,
            seq: status.seq,
            observed_generation: status.observed_generation,
            arch,
            cpus: status.info.cpus,
            memory_bytes: status.info.memory_bytes,
            agent_labels,
            frame: frame.into_boxed_slice(),
        });
        node.last_seen_ms = now_ms;
        // Speaking is being connected; an explicit Offline stands, though
        // (its retained status is replayed after it on every reconnect).
        let mut since_changed = false;
        if node.expired {
            node.expired = false;
            since_changed = node.set_readiness(Readiness::Ready, now_ms);
        }
        if since_changed {
            self.since_changed.insert(status.node.clone());
        }
        if relabelled {
            self.merge_labels(&status.node);
            StatusOutcome::Relabelled
        } else {
            StatusOutcome::Updated
        }
    }

    /// Sets the controller's labels of a node (restored from the store, or
    /// changed by `flotilla label node`), creating its record if needed.
    pub fn set_controller_labels(&mut self, name: &str, labels: BTreeMap<String, String>) {
        self.entry(name).controller_labels = labels;
        self.merge_labels(name);
    }

    /// Applies a presence message.
    pub fn ingest_presence(&mut self, name: &str, presence: &Presence, now_ms: u64) {
        let node = self.entry(name);
        let readiness = match presence {
            Presence::Online { .. } => Readiness::Ready,
            Presence::Offline => Readiness::NotReady,
        };
        let changed = node.set_readiness(readiness, now_ms);
        node.expired = false;
        node.last_seen_ms = now_ms;
        if changed {
            self.since_changed.insert(name.to_owned());
        }
    }

    /// Marks NotReady every Ready node not heard from for `timeout`; returns
    /// their names.
    pub fn expire(&mut self, now_ms: u64, timeout: std::time::Duration) -> Vec<String> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for (name, node) in &mut self.nodes {
            if node.readiness == Readiness::Ready
                && now_ms.saturating_sub(node.last_seen_ms) > timeout_ms
            {
                node.set_readiness(Readiness::NotReady, now_ms);
                node.expired = true;
                out.push(name.clone());
            }
        }
        self.since_changed.extend(out.iter().cloned());
        out
    }

    /// The nodes whose NotReady instant changed since the last call, with
    /// the instant now (`None`: Ready or unknown), for the store.
    pub fn take_since_changes(&mut self) -> Vec<(String, Option<u64>)> {
        std::mem::take(&mut self.since_changed)
            .into_iter()
            .map(|name| {
                let since = self.nodes.get(&name).and_then(|n| n.not_ready_since_ms);
                (name, since)
            })
            .collect()
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Label, NodeInfo};

    fn status(instance: u64, seq: u64, site: &str) -> NodeStatus {
        NodeStatus {
            node: "pi-1".into(),
            instance,
            seq,
            observed_generation: 0,
            desired_error: None,
            health: Default::default(),
            info: NodeInfo {
                labels: vec![Label {
                    key: "site".into(),
                    value: site.into(),
                }],
                ..NodeInfo::default()
            },
            pods: vec![],
            prefetch: Vec::new(),
        }
    }

    #[test]
    fn newest_status_wins_whatever_the_order() {
        let mut fleet = Fleet::default();
        assert_eq!(
            fleet.ingest_status(status(1, 5, "a"), 10),
            StatusOutcome::Relabelled
        );
        assert_eq!(
            fleet.ingest_status(status(1, 4, "b"), 11),
            StatusOutcome::Stale
        );
        assert_eq!(
            fleet.ingest_status(status(1, 5, "b"), 11),
            StatusOutcome::Stale
        );
        assert_eq!(
            fleet.ingest_status(status(1, 6, "a"), 12),
            StatusOutcome::Updated
        );
        // A restarted agent starts its sequence again.
        assert_eq!(
            fleet.ingest_status(status(2, 1, "b"), 13),
            StatusOutcome::Relabelled
        );
        let node = fleet.get("pi-1").unwrap();
        assert_eq!(node.labels()["site"], "b");
        assert_eq!(node.last_seen_ms, 13);
        assert_eq!(node.readiness, Readiness::Unknown);
        fleet.ingest_presence("pi-1", &Presence::Offline, 14);
        assert_eq!(fleet.get("pi-1").unwrap().readiness, Readiness::NotReady);
    }

    #[test]
    fn a_restored_not_ready_instant_survives_the_replayed_offline_presence() {
        let mut fleet = Fleet::default();
        fleet.ingest_status(status(1, 1, "a"), 1_000);
        fleet.ingest_presence("pi-1", &Presence::Offline, 2_000);
        assert_eq!(
            fleet.take_since_changes(),
            [("pi-1".to_string(), Some(2_000))]
        );
        assert!(fleet.take_since_changes().is_empty(), "only changes");
        // A status while NotReady changes nothing to store.
        fleet.ingest_status(status(1, 2, "a"), 2_500);
        assert!(fleet.take_since_changes().is_empty());

        // A restarted controller: the record from the store, then the
        // broker's retained Offline presence.
        let frame = fleet
            .get("pi-1")
            .unwrap()
            .reported()
            .unwrap()
            .frame()
            .to_vec();
        let mut restarted = Fleet::default();
        restarted.restore(frame, 2_500).unwrap();
        restarted.restore_not_ready_since("pi-1", 2_000);
        let node = restarted.get("pi-1").unwrap();
        assert_eq!(
            node.condition(),
            crate::scheduler::Condition::NotReady { since_ms: 2_000 },
            "NotReady from the store, before any presence"
        );
        assert_eq!(node.status().unwrap().seq, 2);
        assert_eq!(node.labels()["site"], "a");
        restarted.ingest_presence("pi-1", &Presence::Offline, 9_000);
        assert_eq!(
            restarted.get("pi-1").unwrap().condition(),
            crate::scheduler::Condition::NotReady { since_ms: 2_000 },
            "the clock goes on from before the restart"
        );
        assert!(restarted.take_since_changes().is_empty());
        // Back online: the instant is cleared, and stored as cleared.
        let online = Presence::Online {
            instance: 1,
            agent_version: "0".into(),
        };
        restarted.ingest_presence("pi-1", &online, 10_000);
        assert_eq!(restarted.take_since_changes(), [("pi-1".to_string(), None)]);
        restarted.ingest_presence("pi-1", &Presence::Offline, 11_000);
        assert_eq!(
            restarted.get("pi-1").unwrap().not_ready_since_ms,
            Some(11_000),
            "a new outage starts a new clock"
        );
    }

    #[test]
    fn nodes_with_the_same_labels_share_one_map() {
        let mut fleet = Fleet::default();
        for (i, site) in ["a", "b", "a"].iter().enumerate() {
            let mut s = status(1, 1, site);
            s.node = format!("pi-{i}");
            fleet.ingest_status(s, 1);
        }
        let labels = |f: &Fleet, n: &str| f.get(n).unwrap().shared_labels();
        assert!(Arc::ptr_eq(
            &labels(&fleet, "pi-0"),
            &labels(&fleet, "pi-2")
        ));
        assert!(!Arc::ptr_eq(
            &labels(&fleet, "pi-0"),
            &labels(&fleet, "pi-1")
        ));
        // Controller labels go over the agent's, for that node only.
        fleet.set_controller_labels("pi-2", [("site".into(), "b".into())].into());
        assert!(Arc::ptr_eq(
            &labels(&fleet, "pi-2"),
            &labels(&fleet, "pi-1")
        ));
        assert_eq!(fleet.get("pi-0").unwrap().labels()["site"], "a");
    }

    #[test]
    fn silence_makes_a_node_not_ready_until_it_speaks() {
        use std::time::Duration;
        let online = Presence::Online {
            instance: 1,
            agent_version: "0".into(),
        };
        let mut fleet = Fleet::default();
        fleet.ingest_presence("pi-1", &online, 1_000);
        fleet.ingest_status(status(1, 1, "a"), 1_000);
        let timeout = Duration::from_secs(60);
        assert!(fleet.expire(61_000, timeout).is_empty(), "not yet");
        assert_eq!(fleet.expire(61_001, timeout), ["pi-1"]);
        let node = fleet.get("pi-1").unwrap();
        assert_eq!(
            (node.readiness, node.expired()),
            (Readiness::NotReady, true)
        );
        assert!(fleet.expire(90_000, timeout).is_empty(), "once");
        // A status brings it back.
        fleet.ingest_status(status(1, 2, "a"), 90_000);
        assert_eq!(fleet.get("pi-1").unwrap().readiness, Readiness::Ready);
        // After an Offline presence a (replayed) status does not.
        fleet.ingest_presence("pi-1", &Presence::Offline, 91_000);
        fleet.ingest_status(status(1, 3, "a"), 92_000);
        let node = fleet.get("pi-1").unwrap();
        assert_eq!(
            (node.readiness, node.expired()),
            (Readiness::NotReady, false)
        );
    }
}
