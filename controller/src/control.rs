//! The control loop: one actor that owns the cluster's state (workloads, the
//! fleet, the desired state last published to each node), applies changes
//! from the API, ingests what the nodes report, and publishes each node's
//! desired state when — and only when — it changed.
//!
//! Order of a change: validate → compute new desired states → persist
//! (workloads and desired states in one transaction) → update memory →
//! publish. A crash at any point leaves the store consistent, and the
//! republish at start covers a publish that never happened.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_proto::{DesiredState, NodeStatus, PodSpec, Presence, decode, encode};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, StatusOutcome};
use crate::manifest::Workload;
use crate::mqtt::{Incoming, MqttHandle};
use crate::store::{Batch, Snapshot, Store, StoreError};

/// How often reported statuses are written to the store, in one transaction.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Errors the control loop returns to the API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The store refused the change; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A node's desired state would exceed the wire limit; nothing changed.
    #[error("desired state of node {node} would be too large: {reason}")]
    TooLarge { node: String, reason: String },
    /// The control loop has stopped (the server is shutting down).
    #[error("the control loop has stopped")]
    Stopped,
}

/// What applying one workload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It did not exist.
    Created,
    /// It existed and changed.
    Configured,
    /// It existed and is the same.
    Unchanged,
}

impl Applied {
    /// The word shown to users, as kubectl does.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
        }
    }
}

/// The state the control loop owns. Read-only access is given to API
/// handlers through [`ControlHandle::read`].
#[derive(Debug, Default)]
pub struct Cluster {
    /// Workloads by name.
    pub workloads: BTreeMap<String, Workload>,
    /// Nodes and what they reported.
    pub fleet: Fleet,
    /// The desired state last published to each node.
    pub desired: BTreeMap<String, DesiredState>,
}

impl Cluster {
    fn from_snapshot(snap: Snapshot) -> Self {
        let mut fleet = Fleet::default();
        for (name, status) in snap.status {
            let seen = snap.last_seen.get(&name).copied().unwrap_or(0);
            fleet.restore(status, seen);
        }
        Self {
            workloads: snap.workloads,
            fleet,
            desired: snap.desired,
        }
    }

    /// The pods `node` should run under `workloads`: one per workload whose
    /// selector matches the node's labels, named after the workload.
    fn placement(
        workloads: &BTreeMap<String, Workload>,
        fleet: &Fleet,
        node: &str,
    ) -> Vec<PodSpec> {
        let Some(labels) = fleet
            .get(node)
            .filter(|n| n.status.is_some())
            .map(|n| n.labels())
        else {
            return Vec::new();
        };
        workloads
            .values()
            .filter(|w| w.matches(&labels))
            .map(|w| w.pod_spec(&w.name))
            .collect()
    }

    /// New desired states for the nodes in `nodes` whose pods differ from
    /// what was last published (or whose agent holds a newer generation than
    /// the store remembers), with the generation bumped.
    fn changed_desired(
        &self,
        workloads: &BTreeMap<String, Workload>,
        nodes: impl IntoIterator<Item = String>,
    ) -> Vec<DesiredState> {
        let mut out = Vec::new();
        for node in nodes {
            let pods = Self::placement(workloads, &self.fleet, &node);
            let last = self.desired.get(&node);
            let published = last.map_or(0, |d| d.generation);
            let observed = self
                .fleet
                .get(&node)
                .and_then(|n| n.status.as_ref())
                .map_or(0, |s| s.observed_generation);
            let same = last.is_some_and(|d| d.pods == pods);
            if same && observed <= published {
                continue;
            }
            if last.is_none() && pods.is_empty() && observed == 0 {
                continue;
            }
            out.push(DesiredState {
                node,
                generation: published.max(observed) + 1,
                pods,
            });
        }
        out
    }
}

enum Command {
    Apply {
        workloads: Vec<Workload>,
        reply: oneshot::Sender<Result<Vec<(String, Applied)>, ControlError>>,
    },
    Delete {
        name: String,
        reply: oneshot::Sender<Result<bool, ControlError>>,
    },
    Read(Box<dyn FnOnce(&Cluster) + Send>),
}

/// A cloneable handle to the control loop.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Command>,
}

impl ControlHandle {
    /// Creates or replaces `workloads`, all or none.
    pub async fn apply(
        &self,
        workloads: Vec<Workload>,
    ) -> Result<Vec<(String, Applied)>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Apply { workloads, reply })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Deletes a workload; `false` if there was none of that name.
    pub async fn delete(&self, name: String) -> Result<bool, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Delete { name, reply })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Runs `f` on the cluster state inside the control loop and returns its result.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Cluster) -> T + Send + 'static,
    ) -> Result<T, ControlError> {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(move |c: &Cluster| {
            let _ = reply.send(f(c));
        });
        self.tx
            .send(Command::Read(job))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)
    }
}

/// The control loop's owned parts.
struct ControlLoop {
    cluster: Cluster,
    store: Arc<Store>,
    mqtt: MqttHandle,
    /// Statuses and last-seen times not yet written to the store.
    dirty: BTreeSet<String>,
    /// A Ready node not heard from for this long is marked NotReady.
    node_timeout: Duration,
}

/// Loads the store and returns the handle and the loop to run.
pub fn start(
    store: Arc<Store>,
    mqtt: MqttHandle,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    node_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(ControlHandle, impl std::future::Future<Output = ()>), StoreError> {
    let cluster = Cluster::from_snapshot(store.load()?);
    tracing::info!(
        workloads = cluster.workloads.len(),
        nodes = cluster.fleet.nodes().len(),
        "loaded store"
    );
    let (tx, rx) = mpsc::channel(256);
    let control = ControlLoop {
        cluster,
        store,
        mqtt,
        dirty: BTreeSet::new(),
        node_timeout,
    };
    Ok((ControlHandle { tx }, control.run(rx, incoming, shutdown)))
}

impl ControlLoop {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut incoming: mpsc::UnboundedReceiver<Incoming>,
        shutdown: CancellationToken,
    ) {
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(cmd) = commands.recv() => self.command(cmd).await,
                Some(msg) = incoming.recv() => self.incoming(msg).await,
                _ = flush.tick() => {
                    for node in self.cluster.fleet.expire(now_ms(), self.node_timeout) {
                        tracing::warn!(%node, timeout = ?self.node_timeout, "nothing heard from node: NotReady");
                    }
                    self.flush().await
                }
            }
        }
        self.flush().await;
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Apply { workloads, reply } => {
                let _ = reply.send(self.apply(workloads).await);
            }
            Command::Delete { name, reply } => {
                let _ = reply.send(self.delete(name).await);
            }
            Command::Read(job) => job(&self.cluster),
        }
    }

    async fn apply(
        &mut self,
        workloads: Vec<Workload>,
    ) -> Result<Vec<(String, Applied)>, ControlError> {
        let mut next = self.cluster.workloads.clone();
        let mut outcome = Vec::new();
        let mut batch = Batch::default();
        for w in workloads {
            let applied = match next.get(&w.name) {
                None => Applied::Created,
                Some(old) if *old == w => Applied::Unchanged,
                Some(_) => Applied::Configured,
            };
            outcome.push((w.name.clone(), applied));
            if applied != Applied::Unchanged {
                batch.put_workloads.push(w.clone());
                next.insert(w.name.clone(), w);
            }
        }
        if batch.put_workloads.is_empty() {
            return Ok(outcome);
        }
        self.commit(next, batch).await?;
        Ok(outcome)
    }

    async fn delete(&mut self, name: String) -> Result<bool, ControlError> {
        let mut next = self.cluster.workloads.clone();
        if next.remove(&name).is_none() {
            return Ok(false);
        }
        let batch = Batch {
            delete_workloads: vec![name],
            ..Batch::default()
        };
        self.commit(next, batch).await?;
        Ok(true)
    }

    /// Persists `batch` with the desired states `workloads` leads to, then
    /// makes it the current state and publishes what changed.
    async fn commit(
        &mut self,
        workloads: BTreeMap<String, Workload>,
        mut batch: Batch,
    ) -> Result<(), ControlError> {
        let nodes: Vec<String> = self.cluster.fleet.nodes().keys().cloned().collect();
        let changed = self.cluster.changed_desired(&workloads, nodes);
        let frames = frames(&changed)?;
        batch.put_desired = changed.clone();
        self.write(batch).await?;
        self.cluster.workloads = workloads;
        self.install(changed, frames).await;
        Ok(())
    }

    /// Records new desired states as current and publishes them.
    async fn install(&mut self, changed: Vec<DesiredState>, frames: Vec<Vec<u8>>) {
        for (state, frame) in changed.into_iter().zip(frames) {
            tracing::info!(node = %state.node, generation = state.generation, pods = state.pods.len(), "publishing desired state");
            if let Err(e) = self.mqtt.publish_desired(&state.node, frame).await {
                tracing::error!(node = %state.node, "publishing desired state: {e}");
            }
            self.cluster.desired.insert(state.node.clone(), state);
        }
    }

    async fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let store = Arc::clone(&self.store);
        match tokio::task::spawn_blocking(move || store.write(&batch)).await {
            Ok(result) => result,
            Err(e) => Err(StoreError::Corrupt {
                what: "store write".into(),
                reason: e.to_string(),
            }),
        }
    }

    async fn incoming(&mut self, msg: Incoming) {
        let now = now_ms();
        match msg {
            Incoming::Connected => self.republish_all().await,
            Incoming::Presence { node, frame } => {
                if frame.is_empty() {
                    return; // a cleared retained message
                }
                match decode::<Presence>(&frame) {
                    Ok(p) => {
                        tracing::info!(%node, online = matches!(p, Presence::Online { .. }), "presence");
                        self.cluster.fleet.ingest_presence(&node, &p, now);
                        self.dirty.insert(node);
                    }
                    Err(e) => tracing::warn!(%node, "refusing presence: {e}"),
                }
            }
            Incoming::Status { node, frame } => {
                if frame.is_empty() {
                    return;
                }
                let status = match decode::<NodeStatus>(&frame) {
                    Ok(s) if s.node == node => s,
                    Ok(s) => {
                        tracing::warn!(%node, claimed = %s.node, "refusing status published for another node");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%node, "refusing status: {e}");
                        return;
                    }
                };
                let observed = status.observed_generation;
                let outcome = self.cluster.fleet.ingest_status(status, now);
                if outcome == StatusOutcome::Stale {
                    return;
                }
                self.dirty.insert(node.clone());
                let published = self.cluster.desired.get(&node).map_or(0, |d| d.generation);
                if outcome == StatusOutcome::Relabelled || observed > published {
                    self.replace_desired(vec![node]).await;
                }
            }
        }
    }

    /// Recomputes and publishes the desired state of `nodes`.
    async fn replace_desired(&mut self, nodes: Vec<String>) {
        let changed = self.cluster.changed_desired(&self.cluster.workloads, nodes);
        if changed.is_empty() {
            return;
        }
        let result = async {
            let frames = frames(&changed)?;
            self.write(Batch {
                put_desired: changed.clone(),
                ..Batch::default()
            })
            .await?;
            Ok::<_, ControlError>(frames)
        }
        .await;
        match result {
            Ok(frames) => self.install(changed, frames).await,
            Err(e) => tracing::error!("updating desired state: {e}"),
        }
    }

    /// After (re)connecting: the broker may have lost its retained messages.
    async fn republish_all(&mut self) {
        tracing::info!(
            nodes = self.cluster.desired.len(),
            "republishing every node's desired state"
        );
        for state in self.cluster.desired.values() {
            match encode(state) {
                Ok(frame) => {
                    if let Err(e) = self.mqtt.publish_desired(&state.node, frame).await {
                        tracing::error!(node = %state.node, "republishing: {e}");
                    }
                }
                Err(e) => tracing::error!(node = %state.node, "republishing: {e}"),
            }
        }
    }

    async fn flush(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let mut batch = Batch::default();
        for name in std::mem::take(&mut self.dirty) {
            if let Some(node) = self.cluster.fleet.get(&name) {
                if let Some(status) = &node.status {
                    batch.put_status.push(status.clone());
                }
                batch.put_last_seen.push((name, node.last_seen_ms));
            }
        }
        if let Err(e) = self.write(batch).await {
            tracing::error!("saving node statuses: {e}");
        }
    }
}

fn frames(states: &[DesiredState]) -> Result<Vec<Vec<u8>>, ControlError> {
    states
        .iter()
        .map(|s| {
            encode(s).map_err(|e| ControlError::TooLarge {
                node: s.node.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Label, NodeInfo};

    fn workload(text: &str) -> Workload {
        crate::manifest::parse(text).unwrap().remove(0)
    }

    fn status(node: &str, site: &str, observed: u64) -> NodeStatus {
        NodeStatus {
            node: node.into(),
            instance: 1,
            seq: observed + 1,
            observed_generation: observed,
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

    const WEB: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: web}\n\
                       spec:\n  nodeSelector: {site: a}\n  containers: [{name: main, image: oci:/x}]\n";

    #[test]
    fn placement_follows_selectors_and_generations_only_grow() {
        let mut cluster = Cluster::default();
        cluster.fleet.ingest_status(status("n1", "a", 0), 1);
        cluster.fleet.ingest_status(status("n2", "b", 0), 1);
        let mut workloads = BTreeMap::new();
        workloads.insert("web".to_string(), workload(WEB));

        let changed = cluster.changed_desired(&workloads, ["n1".to_string(), "n2".to_string()]);
        assert_eq!(
            changed.len(),
            1,
            "n2 does not match and had nothing: no message"
        );
        assert_eq!(changed[0].node, "n1");
        assert_eq!(changed[0].generation, 1);
        assert_eq!(changed[0].pods[0].name, "web");
        cluster.desired.insert("n1".into(), changed[0].clone());

        // Same inputs: nothing to publish.
        assert!(
            cluster
                .changed_desired(&workloads, ["n1".to_string()])
                .is_empty()
        );

        // The agent holds a newer generation than the store (store lost):
        // the next generation goes above it.
        cluster.fleet.ingest_status(status("n1", "a", 40), 2);
        let changed = cluster.changed_desired(&workloads, ["n1".to_string()]);
        assert_eq!(changed[0].generation, 41);

        // Removing the workload empties the node's pods with a new generation.
        let changed = cluster.changed_desired(&BTreeMap::new(), ["n1".to_string()]);
        assert_eq!(changed[0].generation, 41);
        assert!(changed[0].pods.is_empty());
    }
}
