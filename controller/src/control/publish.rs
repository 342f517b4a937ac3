//! The control loop's way out: persisting a change with the desired
//! states it leads to, then publishing them (each frame encoded once, for
//! the store and the broker); placing again; republishing everything after
//! a reconnect; and flushing reported statuses to the store.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_proto::encode;

use crate::manifest::Workload;
use crate::secrets::{Sealer, Secret};
use crate::store::{Batch, StoreError};

use super::{ControlError, ControlLoop, NodeDesired, RolloutState, now_ms, templates_for};

impl ControlLoop {
    /// Persists `batch` with the desired states `workloads` leads to, then
    /// makes it the current state and publishes what changed.
    pub(super) async fn commit(
        &mut self,
        workloads: BTreeMap<String, Workload>,
        mut batch: Batch,
        rollouts: BTreeMap<String, RolloutState>,
    ) -> Result<(), ControlError> {
        let staged = self.staged.take().unwrap_or_default();
        let secrets = staged.applied_to(&self.cluster.secrets);
        let templates = templates_for(&workloads, &self.cluster.templates);
        let (mut changed, unschedulable) =
            self.cluster
                .plan(&workloads, &templates, &rollouts, now_ms());
        crate::secrets::bump(&self.cluster, &staged.names(), &mut changed);
        batch.put_desired = frames(&changed, &self.sealer, &secrets)?;
        staged.into_batch(&mut batch);
        let namespaces = self.take_staged_namespaces(&mut batch);
        let batch = self.write_back(batch).await?;
        if let Some(namespaces) = namespaces {
            self.cluster.namespaces = namespaces;
        }
        self.cluster.secrets = secrets;
        self.cluster.workloads = workloads;
        self.cluster.templates = templates;
        self.cluster.rollouts = rollouts;
        self.cluster.unschedulable = unschedulable;
        self.install(changed, batch.put_desired).await;
        Ok(())
    }

    /// Records new desired states as current and publishes their frames
    /// (the ones just stored: each is encoded once).
    pub(super) async fn install(
        &mut self,
        changed: Vec<(String, NodeDesired)>,
        frames: Vec<(String, Vec<u8>)>,
    ) {
        for ((node, desired), (_, frame)) in changed.into_iter().zip(frames) {
            tracing::info!(%node, generation = desired.generation, pods = desired.pods.len(), "publishing desired state");
            if let Err(e) = self.mqtt.publish_desired(&node, frame).await {
                tracing::error!(%node, "publishing desired state: {e}");
            }
            self.cluster.desired.insert(node, desired);
        }
    }

    pub(super) async fn write(&self, batch: Batch) -> Result<(), StoreError> {
        self.write_back(batch).await.map(drop)
    }

    /// Writes `batch` and hands it back, for what is published after.
    pub(super) async fn write_back(&self, batch: Batch) -> Result<Batch, StoreError> {
        let store = Arc::clone(&self.store);
        match tokio::task::spawn_blocking(move || store.write(&batch).map(|()| batch)).await {
            Ok(result) => result,
            Err(e) => Err(StoreError::Corrupt {
                what: "store write".into(),
                reason: e.to_string(),
            }),
        }
    }

    /// Places every workload again and publishes the nodes whose pods changed.
    pub(super) async fn reschedule(&mut self) {
        let c = &self.cluster;
        let (changed, unschedulable) = c.plan(&c.workloads, &c.templates, &c.rollouts, now_ms());
        self.cluster.unschedulable = unschedulable;
        if changed.is_empty() {
            return;
        }
        let result = async {
            let batch = self
                .write_back(Batch {
                    put_desired: frames(&changed, &self.sealer, &self.cluster.secrets)?,
                    ..Batch::default()
                })
                .await?;
            Ok::<_, ControlError>(batch.put_desired)
        }
        .await;
        match result {
            Ok(frames) => self.install(changed, frames).await,
            Err(e) => tracing::error!("updating desired state: {e}"),
        }
    }

    /// After (re)connecting: the broker may have lost its retained messages.
    pub(super) async fn republish_all(&mut self) {
        tracing::info!(
            nodes = self.cluster.desired.len(),
            "republishing every node's desired state"
        );
        for (node, desired) in &self.cluster.desired {
            let mut state = desired.to_state(node);
            self.sealer.seal_state(&mut state, &self.cluster.secrets);
            match encode(&state) {
                Ok(frame) => {
                    if let Err(e) = self.mqtt.publish_desired(node, frame).await {
                        tracing::error!(%node, "republishing: {e}");
                    }
                }
                Err(e) => tracing::error!(%node, "republishing: {e}"),
            }
        }
    }

    pub(super) async fn save_not_ready_since(&mut self) {
        let changes = self.cluster.fleet.take_since_changes();
        if changes.is_empty() {
            return;
        }
        let batch = Batch {
            put_not_ready_since: changes,
            ..Batch::default()
        };
        if let Err(e) = self.write(batch).await {
            tracing::error!("saving when nodes became NotReady: {e}");
        }
    }

    pub(super) async fn flush(&mut self) {
        let mut batch = Batch {
            put_not_ready_since: self.cluster.fleet.take_since_changes(),
            ..Batch::default()
        };
        for name in std::mem::take(&mut self.dirty) {
            if let Some(node) = self.cluster.fleet.get(&name) {
                if let Some(r) = node.reported() {
                    batch.put_status.push((name.clone(), r.frame().to_vec()));
                }
                batch.put_last_seen.push((name, node.last_seen_ms));
            }
        }
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.write(batch).await {
            tracing::error!("saving node statuses: {e}");
        }
    }
}

/// The frames of `changed`, by node, or why one is too large. Each
/// node's wire state is built and encoded one at a time, so only the
/// frames are held at once.
/// Secrets are sealed for each node here, as its state is encoded.
fn frames(
    changed: &[(String, NodeDesired)],
    sealer: &Sealer,
    secrets: &BTreeMap<String, Secret>,
) -> Result<Vec<(String, Vec<u8>)>, ControlError> {
    changed
        .iter()
        .map(|(node, desired)| {
            let mut state = desired.to_state(node);
            sealer.seal_state(&mut state, secrets);
            let frame = encode(&state).map_err(|e| ControlError::TooLarge {
                node: node.clone(),
                reason: e.to_string(),
            })?;
            Ok((node.clone(), frame))
        })
        .collect()
}
