//! What a pod task reports: each container's state (the outgoing one's
//! while its replacement waits for its image, with the replacement as
//! `next`) and the pod's phase.

use flotilla_proto::{ContainerState, ContainerStatus, PodPhase, PodStatus};

use super::PodTask;
use super::slot::Run;
use crate::image::Images;
use crate::runtime::Runtime;

impl<R: Runtime, I: Images> PodTask<R, I> {
    pub(super) async fn report(&self) {
        let _ = self.ctx.reports.pod(self.status()).await;
    }

    fn status(&self) -> PodStatus {
        let (phase, message) = self.phase();
        PodStatus {
            name: self.name.clone(),
            workload: self.workload.clone(),
            generation: self.generation,
            phase,
            message,
            containers: self
                .slots
                .iter()
                .map(|s| {
                    // While it waits for its image, the old container is
                    // the one that runs.
                    let (shown, next) = match &s.outgoing {
                        Some(o) => (&*o.slot, Some(s.state.clone())),
                        None => (s, None),
                    };
                    ContainerStatus {
                        name: s.spec.name.clone(),
                        state: shown.state.clone(),
                        restarts: shown.restarts,
                        ready: shown.ready && matches!(shown.state, ContainerState::Running { .. }),
                        pull: s.pull,
                        next,
                    }
                })
                .collect(),
        }
    }

    fn phase(&self) -> (PodPhase, Option<String>) {
        if self.terminating {
            return (PodPhase::Terminating, None);
        }
        let waiting = self.slots.iter().find_map(|s| match &s.state {
            ContainerState::Waiting {
                reason,
                message: Some(m),
                ..
            } => Some(format!("container {}: {reason}: {m}", s.spec.name)),
            _ => None,
        });
        if self
            .slots
            .iter()
            .any(|s| !s.ever_started && s.outgoing.is_none())
        {
            return (PodPhase::Pending, waiting);
        }
        if self.slots.iter().any(|s| {
            matches!(s.run, Run::Running { .. })
                || s.outgoing
                    .as_ref()
                    .is_some_and(|o| matches!(o.slot.run, Run::Running { .. }))
        }) {
            return (PodPhase::Running, None);
        }
        if let Some(s) = self
            .slots
            .iter()
            .find(|s| s.to_start() || s.outgoing.as_ref().is_some_and(|o| o.slot.to_start()))
        {
            let message = waiting.unwrap_or_else(|| {
                format!(
                    "container {}: waiting to restart after back-off",
                    s.spec.name
                )
            });
            return (PodPhase::Pending, Some(message));
        }
        match self.slots.iter().find(|s| s.last_exit != Some(0)) {
            None => (PodPhase::Succeeded, None),
            Some(s) => (
                PodPhase::Failed,
                Some(format!(
                    "container {} exited with code {}",
                    s.spec.name,
                    s.last_exit.unwrap_or(-1)
                )),
            ),
        }
    }
}
