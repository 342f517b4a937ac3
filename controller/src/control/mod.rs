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

use flotilla_proto::{DesiredState, NodeStatus, Presence, decode, encode};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Readiness, StatusOutcome};
use crate::manifest::Workload;
use crate::mqtt::{Incoming, MqttHandle};
use crate::rollout::{Rollout, RolloutError};
use crate::store::{Batch, Store, StoreError};

mod cluster;
mod rollouts;

use cluster::templates_for;
pub use cluster::{Cluster, NodeDesired, PlacedPod, RolloutState};

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
    /// A revision command could not be done; nothing changed.
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    /// No node of that name has been heard from.
    #[error("node \"{0}\" not found")]
    NoSuchNode(String),
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

enum Command {
    Apply {
        workloads: Vec<Workload>,
        reply: oneshot::Sender<Result<Vec<(String, Applied)>, ControlError>>,
    },
    Delete {
        name: String,
        reply: oneshot::Sender<Result<bool, ControlError>>,
    },
    Undo {
        workload: String,
        to: Option<u64>,
        reply: oneshot::Sender<Result<(Applied, u64), ControlError>>,
    },
    Hold {
        workload: String,
        pause: bool,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    Label {
        node: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
        reply: oneshot::Sender<Result<BTreeMap<String, String>, ControlError>>,
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

    /// Brings back the pods of revision `to` (default: the one before the
    /// newest) as a new revision; returns whether anything changed and the
    /// workload's revision after.
    pub async fn undo(
        &self,
        workload: String,
        to: Option<u64>,
    ) -> Result<(Applied, u64), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Undo {
                workload,
                to,
                reply,
            })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Pauses (`pause`) or resumes a workload's rollout.
    pub async fn hold(&self, workload: String, pause: bool) -> Result<(), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Hold {
                workload,
                pause,
                reply,
            })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Sets and removes labels of a node at the controller; returns the
    /// node's controller labels after the change. Keys and values must
    /// have been checked (`flotilla_proto::check_label_key`, `…_value`).
    pub async fn label(
        &self,
        node: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<BTreeMap<String, String>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Label {
                node,
                set,
                remove,
                reply,
            })
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
                    let now = now_ms();
                    for node in self.cluster.fleet.expire(now, self.node_timeout) {
                        tracing::warn!(%node, timeout = ?self.node_timeout, "nothing heard from node: NotReady");
                    }
                    if self.cluster.tolerance_passed(now) {
                        tracing::warn!("a node stayed NotReady past a workload's toleration: moving its replicas");
                        self.reschedule().await;
                    }
                    self.advance_rollouts(now).await;
                    self.flush().await
                }
            }
        }
        self.flush().await;
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Apply { workloads, reply } => {
                let _ = reply.send(self.apply(workloads, "apply", true).await);
            }
            Command::Undo {
                workload,
                to,
                reply,
            } => {
                let _ = reply.send(self.undo(workload, to).await);
            }
            Command::Delete { name, reply } => {
                let _ = reply.send(self.delete(name).await);
            }
            Command::Hold {
                workload,
                pause,
                reply,
            } => {
                let _ = reply.send(self.hold(workload, pause).await);
            }
            Command::Label {
                node,
                set,
                remove,
                reply,
            } => {
                let _ = reply.send(self.label(node, set, remove).await);
            }
            Command::Read(job) => job(&self.cluster),
        }
    }

    async fn label(
        &mut self,
        node: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<BTreeMap<String, String>, ControlError> {
        let Some(known) = self.cluster.fleet.get(&node) else {
            return Err(ControlError::NoSuchNode(node));
        };
        let mut labels = known.controller_labels.clone();
        for key in &remove {
            labels.remove(key);
        }
        labels.extend(set);
        if labels == known.controller_labels {
            return Ok(labels);
        }
        self.write(Batch {
            put_node_labels: vec![(node.clone(), labels.clone())],
            ..Batch::default()
        })
        .await?;
        tracing::info!(%node, ?labels, "node labels set at the controller");
        self.cluster
            .fleet
            .set_controller_labels(&node, labels.clone());
        self.reschedule().await;
        Ok(labels)
    }

    /// Creates or replaces `workloads`; a change to what a workload's pods
    /// run is recorded as a new revision, with `cause`, and — when the
    /// workload has a strategy, runs somewhere and `staged` — rolled out in
    /// waves rather than everywhere at once.
    async fn apply(
        &mut self,
        workloads: Vec<Workload>,
        cause: &str,
        staged: bool,
    ) -> Result<Vec<(String, Applied)>, ControlError> {
        let mut next = self.cluster.workloads.clone();
        let mut rollouts = self.cluster.rollouts.clone();
        let current = self.cluster.current();
        let mut outcome = Vec::new();
        let mut batch = Batch::default();
        let now = now_ms();
        for w in workloads {
            let applied = match next.get(&w.name) {
                None => Applied::Created,
                Some(old) if *old == w => Applied::Unchanged,
                Some(_) => Applied::Configured,
            };
            outcome.push((w.name.clone(), applied));
            if applied != Applied::Unchanged {
                if let Some(revision) = self.cluster.history.next(&w, cause, now) {
                    for number in self.cluster.history.would_drop(&w.name) {
                        batch.delete_revisions.push((w.name.clone(), number));
                    }
                    let nodes: Vec<String> = current
                        .get(&w.name)
                        .map(|m| m.keys().cloned().collect())
                        .unwrap_or_default();
                    let running = rollouts.get(&w.name).filter(|r| r.rollout.phase.active());
                    let old = self.cluster.templates.get(&w.name);
                    match (old, running) {
                        (Some(old), _)
                            if staged && w.spec.strategy.is_some() && !nodes.is_empty() =>
                        {
                            // A change during a rollout starts over from
                            // the revision the untouched nodes still run.
                            let (from, stable) = match running {
                                Some(r) => (r.rollout.from, Arc::clone(&r.stable)),
                                None => {
                                    let from = self.cluster.history.current(&w.name);
                                    (from.map_or(0, |r| r.number), Arc::clone(old))
                                }
                            };
                            let rollout = Rollout::new(&w.name, from, revision.number, nodes, now);
                            tracing::info!(workload = %w.name, from, to = revision.number, "rollout started");
                            batch.put_rollouts.push(rollout.clone());
                            rollouts.insert(w.name.clone(), RolloutState { rollout, stable });
                        }
                        (_, Some(_)) => {
                            rollouts.remove(&w.name);
                            batch.delete_rollouts.push(w.name.clone());
                        }
                        _ => {}
                    }
                    batch.put_revisions.push(revision);
                }
                batch.put_workloads.push(w.clone());
                next.insert(w.name.clone(), w);
            }
        }
        if batch.put_workloads.is_empty() {
            return Ok(outcome);
        }
        let revisions = batch.put_revisions.clone();
        self.commit(next, batch, rollouts).await?;
        for r in revisions {
            self.cluster.history.push(r);
        }
        Ok(outcome)
    }

    async fn undo(
        &mut self,
        name: String,
        to: Option<u64>,
    ) -> Result<(Applied, u64), ControlError> {
        let current = self
            .cluster
            .workloads
            .get(&name)
            .ok_or_else(|| RolloutError::NoWorkload(name.clone()))?;
        let back = self.cluster.history.undo(current, to)?;
        let from = match to {
            Some(n) => n,
            None => {
                let list = self.cluster.history.list(&name);
                list.len()
                    .checked_sub(2)
                    .and_then(|i| list.get(i))
                    .map_or(0, |r| r.number)
            }
        };
        let cause = format!("undo to revision {from}");
        let outcome = self.apply(vec![back], &cause, true).await?;
        let applied = outcome.first().map_or(Applied::Unchanged, |(_, a)| *a);
        let revision = self.cluster.history.current(&name).map_or(0, |r| r.number);
        Ok((applied, revision))
    }

    async fn delete(&mut self, name: String) -> Result<bool, ControlError> {
        let mut next = self.cluster.workloads.clone();
        if next.remove(&name).is_none() {
            return Ok(false);
        }
        let numbers = self.cluster.history.list(&name).iter().map(|r| r.number);
        let batch = Batch {
            delete_revisions: numbers.map(|n| (name.clone(), n)).collect(),
            delete_workloads: vec![name.clone()],
            delete_rollouts: vec![name.clone()],
            ..Batch::default()
        };
        let mut rollouts = self.cluster.rollouts.clone();
        rollouts.remove(&name);
        self.commit(next, batch, rollouts).await?;
        self.cluster.history.remove(&name);
        Ok(true)
    }

    /// Persists `batch` with the desired states `workloads` leads to, then
    /// makes it the current state and publishes what changed.
    async fn commit(
        &mut self,
        workloads: BTreeMap<String, Workload>,
        mut batch: Batch,
        rollouts: BTreeMap<String, RolloutState>,
    ) -> Result<(), ControlError> {
        let templates = templates_for(&workloads, &self.cluster.templates);
        let (changed, unschedulable) =
            self.cluster
                .plan(&workloads, &templates, &rollouts, now_ms());
        let (states, frames) = frames(&changed)?;
        batch.put_desired = states;
        self.write(batch).await?;
        self.cluster.workloads = workloads;
        self.cluster.templates = templates;
        self.cluster.rollouts = rollouts;
        self.cluster.unschedulable = unschedulable;
        self.install(changed, frames).await;
        Ok(())
    }

    /// Records new desired states as current and publishes them.
    async fn install(&mut self, changed: Vec<(String, NodeDesired)>, frames: Vec<Vec<u8>>) {
        for ((node, desired), frame) in changed.into_iter().zip(frames) {
            tracing::info!(%node, generation = desired.generation, pods = desired.pods.len(), "publishing desired state");
            if let Err(e) = self.mqtt.publish_desired(&node, frame).await {
                tracing::error!(%node, "publishing desired state: {e}");
            }
            self.cluster.desired.insert(node, desired);
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
                        let was = self.cluster.fleet.get(&node).map(|n| n.readiness);
                        self.cluster.fleet.ingest_presence(&node, &p, now);
                        let back =
                            was != Some(Readiness::Ready) && matches!(p, Presence::Online { .. });
                        self.dirty.insert(node);
                        // Replicas waiting for a Ready node may fit now.
                        if back && !self.cluster.unschedulable.is_empty() {
                            self.reschedule().await;
                        }
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
                    self.reschedule().await;
                }
            }
        }
    }

    /// Places every workload again and publishes the nodes whose pods changed.
    async fn reschedule(&mut self) {
        let c = &self.cluster;
        let (changed, unschedulable) = c.plan(&c.workloads, &c.templates, &c.rollouts, now_ms());
        self.cluster.unschedulable = unschedulable;
        if changed.is_empty() {
            return;
        }
        let result = async {
            let (states, frames) = frames(&changed)?;
            self.write(Batch {
                put_desired: states,
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
        for (node, desired) in &self.cluster.desired {
            match encode(&desired.to_state(node)) {
                Ok(frame) => {
                    if let Err(e) = self.mqtt.publish_desired(node, frame).await {
                        tracing::error!(%node, "republishing: {e}");
                    }
                }
                Err(e) => tracing::error!(%node, "republishing: {e}"),
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

/// The wire states of `changed` and their frames, or why one is too large.
fn frames(
    changed: &[(String, NodeDesired)],
) -> Result<(Vec<DesiredState>, Vec<Vec<u8>>), ControlError> {
    let mut states = Vec::with_capacity(changed.len());
    let mut frames = Vec::with_capacity(changed.len());
    for (node, desired) in changed {
        let state = desired.to_state(node);
        let frame = encode(&state).map_err(|e| ControlError::TooLarge {
            node: node.clone(),
            reason: e.to_string(),
        })?;
        states.push(state);
        frames.push(frame);
    }
    Ok((states, frames))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
