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

use flotilla_proto::{NodeStatus, Presence, decode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Readiness, StatusOutcome};
use crate::manifest::Workload;
use crate::mqtt::{Incoming, MqttHandle};
use crate::rollout::{Rollout, RolloutError};
use crate::secrets::{Sealer, Secret, SecretError, Staged};
use crate::store::{Batch, Store, StoreError};

mod cluster;
mod handle;
mod namespaces;
mod publish;
mod rollouts;

pub use cluster::templates_for;
pub use cluster::{Cluster, NodeDesired, PlacedPod, RolloutState};
pub use handle::ControlHandle;
pub use namespaces::{AppliedObjects, NamespaceError};

use handle::{AppliedAll, Command};

/// How often reported statuses are written to the store, in one transaction.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Most messages from the nodes taken per wake of the loop: placement runs
/// once per batch rather than once per message (a fleet-wide burst of
/// statuses after an apply or a reconnect), and a command waits at most
/// one batch.
const INGEST_BATCH: usize = 4096;

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
    /// A Secret could not be sealed for the store; nothing changed.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// A namespace's policy refused the change; nothing changed.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
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

/// The control loop's owned parts.
struct ControlLoop {
    cluster: Cluster,
    store: Arc<Store>,
    mqtt: MqttHandle,
    /// Statuses and last-seen times not yet written to the store.
    dirty: BTreeSet<String>,
    /// A Ready node not heard from for this long is marked NotReady.
    node_timeout: Duration,
    /// Seals Secrets for the store and for each node.
    sealer: Arc<Sealer>,
    /// Secret changes the next `commit` writes with the rest.
    staged: Option<Staged>,
    /// Namespace changes the next `commit` writes with the rest.
    staged_namespaces: Option<namespaces::StagedNamespaces>,
}

/// Loads the store and returns the handle and the loop to run.
pub fn start(
    store: Arc<Store>,
    mqtt: MqttHandle,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    node_timeout: Duration,
    sealer: Arc<Sealer>,
    shutdown: CancellationToken,
) -> Result<(ControlHandle, impl std::future::Future<Output = ()>), StoreError> {
    let mut snap = store.load()?;
    let stored_secrets = std::mem::take(&mut snap.secrets);
    crate::secrets::to_references(&mut snap.desired);
    let mut cluster = Cluster::from_snapshot(snap);
    cluster.secrets = sealer.open_stored(stored_secrets);
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
        sealer,
        staged: None,
        staged_namespaces: None,
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
                Some(msg) = incoming.recv() => {
                    let mut replan = self.incoming(msg).await;
                    for _ in 1..INGEST_BATCH {
                        let Ok(msg) = incoming.try_recv() else { break };
                        replan |= self.incoming(msg).await;
                    }
                    // What placement reads is stored at once (once per
                    // batch, not per message): a controller killed a moment
                    // later still knows a new node and where it may go, and
                    // counts replicas' toleration from when a node went away.
                    if replan {
                        self.flush().await;
                        self.reschedule().await;
                    } else {
                        self.save_not_ready_since().await;
                    }
                }
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
            Command::DeleteSecret { name, reply } => {
                let _ = reply.send(self.delete_secret(name).await);
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
            Command::Namespaces(cmd) => self.namespace_command(cmd).await,
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
        namespaces::admit(&self.cluster.namespaces, std::slice::from_ref(&back))?;
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

    /// Stores `secrets` and applies `workloads` in one transaction; the
    /// nodes whose pods use a changed Secret get a new generation.
    async fn apply_all(
        &mut self,
        workloads: Vec<Workload>,
        secrets: Vec<Secret>,
    ) -> Result<AppliedAll, ControlError> {
        let (staged, outcome) = Staged::new(&self.cluster.secrets, secrets, self.sealer.vault())?;
        self.staged = (!staged.is_empty()).then_some(staged);
        let result = match self.apply(workloads, "apply", true).await {
            // No workload changed: the Secrets are committed on their own.
            Ok(applied) if self.staged.is_some() => {
                let (w, r) = (
                    self.cluster.workloads.clone(),
                    self.cluster.rollouts.clone(),
                );
                self.commit(w, Batch::default(), r).await.map(|()| applied)
            }
            other => other,
        };
        self.staged = None;
        Ok((result?, outcome))
    }

    async fn delete_secret(&mut self, name: String) -> Result<bool, ControlError> {
        if !self.cluster.secrets.contains_key(&name) {
            return Ok(false);
        }
        self.staged = Some(Staged::delete(name));
        let (w, r) = (
            self.cluster.workloads.clone(),
            self.cluster.rollouts.clone(),
        );
        let result = self.commit(w, Batch::default(), r).await;
        self.staged = None;
        result.map(|()| true)
    }

    /// Takes in one message from the nodes; returns whether placement must
    /// run again (the caller does it once per batch).
    async fn incoming(&mut self, msg: Incoming) -> bool {
        let now = now_ms();
        match msg {
            Incoming::Connected => {
                self.republish_all().await;
                false
            }
            Incoming::Presence { node, frame } => {
                if frame.is_empty() {
                    return false; // a cleared retained message
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
                        back && !self.cluster.unschedulable.is_empty()
                    }
                    Err(e) => {
                        tracing::warn!(%node, "refusing presence: {e}");
                        false
                    }
                }
            }
            Incoming::Status { node, frame } => {
                if frame.is_empty() {
                    return false;
                }
                let status = match decode::<NodeStatus>(&frame) {
                    Ok(s) if s.node == node => s,
                    Ok(s) => {
                        tracing::warn!(%node, claimed = %s.node, "refusing status published for another node");
                        return false;
                    }
                    Err(e) => {
                        tracing::warn!(%node, "refusing status: {e}");
                        return false;
                    }
                };
                let observed = status.observed_generation;
                let outcome = self.cluster.fleet.ingest_frame(&status, frame, now);
                if outcome == StatusOutcome::Stale {
                    return false;
                }
                self.dirty.insert(node.clone());
                let published = self.cluster.desired.get(&node).map_or(0, |d| d.generation);
                outcome == StatusOutcome::Relabelled || observed > published
            }
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
