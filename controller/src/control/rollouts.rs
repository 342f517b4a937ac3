//! The control loop's side of staged rollouts: every tick, each running
//! rollout looks at its switched nodes, switches more as its strategy
//! allows, and is stored after every change; too many failures roll the
//! workload back to the revision the rollout started from, at once.

use std::collections::BTreeSet;

use crate::fleet::Readiness;
use crate::rollout::{self, Fetched, RolloutError, Seen, Step};
use crate::store::Batch;

use super::{ControlError, ControlLoop};

impl ControlLoop {
    /// Advances every running rollout by one step.
    pub(super) async fn advance_rollouts(&mut self, now: u64) {
        let running: Vec<String> = self
            .cluster
            .rollouts
            .iter()
            .filter(|(_, r)| r.rollout.phase.active())
            .map(|(name, _)| name.clone())
            .collect();
        for name in running {
            self.advance(&name, now).await;
        }
    }

    async fn advance(&mut self, name: &str, now: u64) {
        let Some(strategy) = self
            .cluster
            .workloads
            .get(name)
            .and_then(|w| w.spec.strategy.clone())
        else {
            return;
        };
        let placed: BTreeSet<String> = self
            .cluster
            .desired
            .iter()
            .filter(|(_, d)| d.pods.iter().any(|p| p.workload() == name))
            .map(|(node, _)| node.clone())
            .collect();
        let fleet = &self.cluster.fleet;
        let template = self.cluster.templates.get(name).cloned();
        let Some(state) = self.cluster.rollouts.get_mut(name) else {
            return;
        };
        let images = match (&template, strategy.prefetch) {
            (Some(t), true) => rollout::prefetch_images(t, &state.stable),
            _ => Vec::new(),
        };
        let before = state.rollout.clone();
        state.rollout.follow(&placed);
        let seen = |node: &str, switch: &rollout::Switch| {
            let n = fleet.get(node);
            if n.is_none_or(|n| n.readiness == Readiness::Unknown) {
                return Seen::Unknown;
            }
            let connected = n.is_some_and(|n| n.readiness == Readiness::Ready);
            rollout::seen(n.and_then(|n| n.status()).as_ref(), connected, name, switch)
        };
        let fetched = |node: &str| {
            if images.is_empty() {
                return Fetched::Ready;
            }
            match fleet.get(node) {
                None => Fetched::Unknown,
                Some(n) if n.readiness == Readiness::Unknown => Fetched::Unknown,
                Some(n) if n.readiness != Readiness::Ready => Fetched::Offline,
                Some(n) => match rollout::prefetched(n.status().as_ref(), &images) {
                    true => Fetched::Ready,
                    false => Fetched::NotYet,
                },
            }
        };
        let step = state.rollout.step_with(&strategy, now, seen, fetched);
        if step == Step::Idle && state.rollout == before {
            return;
        }
        let (from, to, wave) = (state.rollout.from, state.rollout.to, state.rollout.wave);
        match step {
            Step::RollBack(why) => {
                tracing::warn!(workload = %name, %why, "rollout failed: rolling back");
                self.save_rollout(name).await;
                let back = self
                    .cluster
                    .workloads
                    .get(name)
                    .map(|w| self.cluster.history.undo(w, Some(from)));
                let result = match back {
                    Some(Ok(w)) => self
                        .apply(vec![w], &format!("rollback: {why}"), false)
                        .await
                        .map(|_| ()),
                    Some(Err(e)) => Err(e.into()),
                    None => Ok(()),
                };
                if let Err(e) = result {
                    tracing::error!(workload = %name, "rolling back: {e}");
                }
            }
            Step::Prefetching => {
                let nodes = self
                    .cluster
                    .rollouts
                    .get(name)
                    .map(|s| s.rollout.prefetching.len());
                tracing::info!(workload = %name, to, wave, ?nodes, "nodes prefetching the new revision's images");
                self.save_rollout(name).await;
                self.reschedule().await;
            }
            Step::Switched | Step::Complete => {
                tracing::info!(workload = %name, from, to, wave, complete = step == Step::Complete, "rollout moving");
                self.save_rollout(name).await;
                self.reschedule().await;
                // The generation that carries the new revision to each newly
                // switched node: its pods report it once they run it.
                if let Some(state) = self.cluster.rollouts.get_mut(name) {
                    for (node, switch) in &mut state.rollout.switched {
                        if switch.generation == 0 {
                            switch.generation =
                                self.cluster.desired.get(node).map_or(0, |d| d.generation);
                        }
                    }
                }
                self.save_rollout(name).await;
            }
            Step::Changed | Step::Idle => self.save_rollout(name).await,
        }
    }

    async fn save_rollout(&self, name: &str) {
        let Some(state) = self.cluster.rollouts.get(name) else {
            return;
        };
        let batch = Batch {
            put_rollouts: vec![state.rollout.clone()],
            ..Batch::default()
        };
        if let Err(e) = self.write(batch).await {
            tracing::error!(workload = %name, "saving rollout: {e}");
        }
    }

    /// `rollout pause|resume`.
    pub(super) async fn hold(&mut self, name: String, pause: bool) -> Result<(), ControlError> {
        let state = self
            .cluster
            .rollouts
            .get(&name)
            .ok_or_else(|| RolloutError::NotRunning(name.clone()))?;
        let mut next = state.rollout.clone();
        let done = if pause { next.pause() } else { next.resume() };
        if !done {
            // Pausing a paused rollout (or resuming a running one) is done
            // already; a finished one cannot be held.
            return match next.phase.active() {
                true => Ok(()),
                false => Err(RolloutError::NotRunning(name).into()),
            };
        }
        self.write(Batch {
            put_rollouts: vec![next.clone()],
            ..Batch::default()
        })
        .await?;
        tracing::info!(workload = %name, phase = next.phase.as_str(), "rollout held or resumed");
        if let Some(state) = self.cluster.rollouts.get_mut(&name) {
            state.rollout = next;
        }
        Ok(())
    }
}
