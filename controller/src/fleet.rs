//! The fleet as the controller knows it: one record per node, fed by the
//! nodes' presence and status messages, with the rules for which message wins
//! and for when a node counts as gone.
//!
//! A node is NotReady when its presence says `Offline`: its own clean
//! goodbye, or its last will, which the broker publishes when the link
//! closes or when keepalives stop (1.5 keepalive intervals). As a safety net
//! for a will that never comes (a broker that lost the session), a node not
//! heard from for the node timeout is NotReady too, until it speaks again.

use std::collections::BTreeMap;

use flotilla_proto::{NodeStatus, Presence};

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

/// One node.
#[derive(Debug, Clone)]
pub struct Node {
    /// Connected or not.
    pub readiness: Readiness,
    /// The newest status it reported.
    pub status: Option<NodeStatus>,
    /// Last time it was heard from (ms since the epoch, controller clock).
    pub last_seen_ms: u64,
    /// NotReady because nothing was heard for too long, not because it said so.
    expired: bool,
    /// When it last became NotReady (ms since the epoch); the scheduler moves
    /// replicas off a node NotReady for longer than their toleration.
    pub not_ready_since_ms: Option<u64>,
    /// Labels set at the controller (`flotilla label node`), over the agent's.
    pub controller_labels: BTreeMap<String, String>,
}

impl Node {
    fn new() -> Self {
        Self {
            readiness: Readiness::Unknown,
            status: None,
            last_seen_ms: 0,
            expired: false,
            not_ready_since_ms: None,
            controller_labels: BTreeMap::new(),
        }
    }

    fn set_readiness(&mut self, readiness: Readiness, now_ms: u64) {
        if readiness == Readiness::NotReady {
            if self.readiness != Readiness::NotReady {
                self.not_ready_since_ms = Some(now_ms);
            }
        } else {
            self.not_ready_since_ms = None;
        }
        self.readiness = readiness;
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

    /// Its labels: those its agent reported, with those set at the
    /// controller over them.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = self
            .status
            .iter()
            .flat_map(|s| &s.info.labels)
            .map(|l| (l.key.clone(), l.value.clone()))
            .collect();
        out.extend(
            self.controller_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        out
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

/// Every node by name.
#[derive(Debug, Default)]
pub struct Fleet {
    nodes: BTreeMap<String, Node>,
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

    /// Restores a node from the store at start (readiness unknown until it speaks).
    pub fn restore(&mut self, status: NodeStatus, last_seen_ms: u64) {
        let node = self
            .nodes
            .entry(status.node.clone())
            .or_insert_with(Node::new);
        node.status = Some(status);
        node.last_seen_ms = last_seen_ms;
    }

    /// Applies a status. A status from the same agent process (same
    /// `instance`) with a `seq` not above the one held is stale; a new
    /// instance means the agent restarted and always wins.
    pub fn ingest_status(&mut self, status: NodeStatus, now_ms: u64) -> StatusOutcome {
        let node = self
            .nodes
            .entry(status.node.clone())
            .or_insert_with(Node::new);
        if let Some(old) = &node.status
            && old.instance == status.instance
            && old.seq >= status.seq
        {
            return StatusOutcome::Stale;
        }
        let relabelled = node
            .status
            .as_ref()
            .is_none_or(|old| old.info.labels != status.info.labels);
        node.status = Some(status);
        node.last_seen_ms = now_ms;
        // Speaking is being connected; an explicit Offline stands, though
        // (its retained status is replayed after it on every reconnect).
        if node.expired {
            node.expired = false;
            node.set_readiness(Readiness::Ready, now_ms);
        }
        if relabelled {
            StatusOutcome::Relabelled
        } else {
            StatusOutcome::Updated
        }
    }

    /// Sets the controller's labels of a node (restored from the store, or
    /// changed by `flotilla label node`), creating its record if needed.
    pub fn set_controller_labels(&mut self, name: &str, labels: BTreeMap<String, String>) {
        let node = self.nodes.entry(name.to_string()).or_insert_with(Node::new);
        node.controller_labels = labels;
    }

    /// Applies a presence message.
    pub fn ingest_presence(&mut self, name: &str, presence: &Presence, now_ms: u64) {
        let node = self.nodes.entry(name.to_string()).or_insert_with(Node::new);
        let readiness = match presence {
            Presence::Online { .. } => Readiness::Ready,
            Presence::Offline => Readiness::NotReady,
        };
        node.set_readiness(readiness, now_ms);
        node.expired = false;
        node.last_seen_ms = now_ms;
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
        out
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
