//! A pod's image pulls, each a job of its own so that the pod task keeps
//! serving its commands (a delete, a fixed spec) while one runs on a slow
//! or failing link. A job pulls on a blocking thread and sends its
//! progress and result back as [`PullEvent`]s; a slot that no longer wants
//! the image cancels it, and a result that arrives for no slot is dropped.

use tokio::sync::watch;
use tokio::time::Instant;

use super::super::process::StartFailure;
use super::slot::{Run, Slot, find_job, now_ms, slot_at};
use super::{PodEvent, PodTask};
use crate::image::{Image, Images, PullProgress, WatchObserver};
use crate::runtime::Runtime;

/// What a pull job tells its pod task. Jobs are numbered per pod, so an
/// event names its slot whatever happened to the spec meanwhile.
#[derive(Debug)]
pub(in crate::reconciler) enum PullEvent {
    /// How far the download is.
    Progress { job: u64, progress: PullProgress },
    /// The image is ready, or why it is not.
    Done {
        job: u64,
        result: Result<Image, StartFailure>,
    },
}

impl<R: Runtime, I: Images> PodTask<R, I> {
    /// Starts pulling the image of slot `i` (or of its outgoing container,
    /// to start it again), with the pod's pull secrets.
    pub(super) fn begin_pull(&mut self, i: usize, outgoing: bool) {
        self.jobs += 1;
        let job = self.jobs;
        let cancel = self.token.child_token();
        let Some(slot) = slot_at(&mut self.slots, i, outgoing) else {
            return;
        };
        slot.abandon_pull();
        slot.pull_cancel = Some(cancel.clone());
        slot.run = Run::Pulling { job };
        let (progress_tx, mut progress_rx) = watch::channel(None);
        let observer = WatchObserver {
            progress: progress_tx,
            cancel: cancel.clone(),
        };
        let image = slot.spec.image.clone();
        let images = self.ctx.images.clone();
        let keyring = self.ctx.settings.secrets.clone();
        let (pod, sealed) = (self.name.clone(), self.pull_secrets.clone());
        let work = move || {
            let secrets = keyring.pull_secrets(&pod, &sealed);
            images
                .pull_with(&image, &secrets, &observer)
                .map_err(|e| StartFailure {
                    reason: e.reason(),
                    message: e.to_string(),
                })
        };
        let ctx = self.ctx.clone();
        let tx = self.events_tx.clone();
        self.ctx.tracker.spawn(async move {
            let pulled = ctx.blocking("pull", work);
            tokio::pin!(pulled);
            let result = loop {
                tokio::select! {
                    r = &mut pulled => break r,
                    Ok(()) = progress_rx.changed() => {
                        let progress = *progress_rx.borrow_and_update();
                        if let Some(progress) = progress {
                            // The pod task gone: nothing to tell.
                            let event = PullEvent::Progress { job, progress };
                            let _ = tx.send(PodEvent::Pull(Box::new(event))).await;
                        }
                    }
                    // Abandoned: the blocking pull sees the token soon, or
                    // ends on its own; nobody waits for it.
                    () = cancel.cancelled() => return,
                }
            };
            let result = result.unwrap_or_else(|e| Err(StartFailure::create(e.to_string())));
            let _ = tx
                .send(PodEvent::Pull(Box::new(PullEvent::Done { job, result })))
                .await;
        });
    }

    pub(super) async fn on_pull(&mut self, event: PullEvent) {
        match event {
            PullEvent::Progress { job, progress } => {
                if let Some(slot) = find_job(&mut self.slots, job) {
                    show_pull(slot, progress);
                    self.report().await;
                }
            }
            PullEvent::Done { job, result } => {
                let pod = self.name.clone();
                let Some(slot) = find_job(&mut self.slots, job) else {
                    return;
                };
                slot.pull = None;
                slot.pull_cancel = None;
                match result {
                    Ok(image) => {
                        slot.image = Some(image);
                        slot.run = Run::Pulled;
                    }
                    Err(f) => {
                        let still = slot.outgoing.as_ref().map(|o| o.slot.id.clone());
                        retry_later(&pod, slot, f, false, still.as_deref());
                    }
                }
            }
        }
    }
}

/// Shows a running download as the slot's `Pulling` state.
fn show_pull(slot: &mut Slot, progress: PullProgress) {
    slot.pull = Some(progress);
    slot.state = flotilla_proto::ContainerState::Waiting {
        reason: "Pulling".to_owned(),
        message: Some(format!(
            "pulling image {}: {:.1} of {:.1} MiB",
            slot.spec.image,
            progress.done_bytes as f64 / 1048576.0,
            progress.total_bytes as f64 / 1048576.0
        )),
        retry_at_ms: None,
    };
}

/// Schedules `slot`'s next attempt after back-off. `leftovers`: the
/// runtime may hold parts of the container, removed before the next try.
/// `still`: the container that keeps running meanwhile.
pub(super) fn retry_later(
    pod: &str,
    slot: &mut Slot,
    f: StartFailure,
    leftovers: bool,
    still: Option<&str>,
) {
    let delay = slot.next_delay();
    let still = still.map_or_else(String::new, |id| format!(", {id} keeps running"));
    tracing::warn!(
        pod,
        container = %slot.id,
        reason = f.reason,
        "container not started{still}, retrying in {} s: {}",
        delay.as_secs(),
        f.message
    );
    slot.run = Run::Start {
        at: Instant::now() + delay,
    };
    slot.state = flotilla_proto::ContainerState::Waiting {
        reason: f.reason.to_owned(),
        message: Some(f.message),
        retry_at_ms: Some(now_ms() + delay.as_millis() as u64),
    };
    slot.failed_start |= leftovers;
}
