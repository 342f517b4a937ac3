//! A container slot of a pod: its run state (a pull of its image included),
//! back-off, the outgoing container it replaces, and the tasks that watch
//! its container.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_proto::{ContainerSpec, ContainerState, RestartPolicy, Volume};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::Ctx;
use super::super::process::container_id_with_volumes;
use super::PodEvent;
use crate::image::{Image, Images, PullProgress};
use crate::probe::{self, ContainerCheck, Probes};
use crate::runtime::Runtime;

/// First delay before a container is started again; doubles per attempt.
pub(super) const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// A container that ran this long starts its back-off afresh.
pub(super) const BACKOFF_RESET: Duration = Duration::from_secs(10 * 60);

/// Where a container slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Run {
    /// To be started at (or after) this instant: its image is pulled first.
    Start { at: Instant },
    /// Its image is being pulled by the pod's pull job `job`.
    Pulling { job: u64 },
    /// Its image is here (`Slot::image`); it starts once the containers
    /// before it in the spec have.
    Pulled,
    /// Its process runs.
    Running { since: Instant },
    /// Exited, and the restart policy says it stays so.
    Finished,
}

/// One container of the pod, as desired now.
pub(super) struct Slot {
    pub(super) spec: ContainerSpec,
    pub(super) id: String,
    pub(super) run: Run,
    pub(super) state: ContainerState,
    pub(super) restarts: u32,
    pub(super) backoff: Duration,
    pub(super) ever_started: bool,
    /// The next start follows an exit, so it counts as a restart.
    pub(super) restarting: bool,
    pub(super) last_exit: Option<i32>,
    /// The last start failed: the runtime may hold leftovers of that id.
    pub(super) failed_start: bool,
    /// Cancels the tasks of this run of the container: the one waiting for
    /// its exit, its probes, a kill under way.
    pub(super) waiter: Option<CancellationToken>,
    /// Which run of the container its probe events are about.
    pub(super) run_number: u64,
    /// Its probes pass (or it has none); reported only while it runs.
    pub(super) ready: bool,
    /// Why the agent is killing it (a failed probe), for its exit message.
    pub(super) kill_reason: Option<String>,
    /// How far the download of its image is, while one runs.
    pub(super) pull: Option<PullProgress>,
    /// Cancels the pull job of its image, while one runs.
    pub(super) pull_cancel: Option<CancellationToken>,
    /// Its image, once pulled and until it is started.
    pub(super) image: Option<Image>,
    /// The running container of the previous spec this one replaces, kept
    /// until this one's image is ready.
    pub(super) outgoing: Option<Outgoing>,
}

/// A container of an earlier spec that keeps running while its replacement's
/// image is pulled, restarted by the pod's restart policy if it exits.
pub(super) struct Outgoing {
    pub(super) slot: Box<Slot>,
    /// The grace period it was started with.
    pub(super) grace: Duration,
    /// The pod's volumes it was started with, to start it again; `None`
    /// when it was adopted at start, its spec unknown: then it is not
    /// restarted.
    pub(super) volumes: Option<Vec<Volume>>,
}

impl Slot {
    pub(super) fn new(pod: &str, spec: ContainerSpec, volumes: &[Volume]) -> Self {
        Self {
            id: container_id_with_volumes(pod, &spec, volumes),
            spec,
            run: Run::Start { at: Instant::now() },
            state: ContainerState::Waiting {
                reason: "ContainerCreating".to_owned(),
                message: None,
                retry_at_ms: None,
            },
            restarts: 0,
            backoff: BACKOFF_MIN,
            ever_started: false,
            restarting: false,
            last_exit: None,
            failed_start: false,
            waiter: None,
            run_number: 0,
            ready: false,
            kill_reason: None,
            pull: None,
            pull_cancel: None,
            image: None,
            outgoing: None,
        }
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let d = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        d
    }

    pub(super) fn stop_watching(&mut self) {
        if let Some(w) = self.waiter.take() {
            w.cancel();
        }
    }

    /// Cancels the pull of its image, if one runs; the blocking pull stops
    /// at its next check or is left to end on its own, its result ignored.
    /// Another pod's pull of the same image goes on (see `Images`).
    pub(super) fn abandon_pull(&mut self) {
        if let Some(c) = self.pull_cancel.take() {
            c.cancel();
        }
        self.pull = None;
        self.image = None;
    }

    /// Its image is being pulled or waits to be started with.
    pub(super) fn pulling(&self) -> bool {
        matches!(self.run, Run::Pulling { .. } | Run::Pulled)
    }

    /// Not running, but due to start or on its way there.
    pub(super) fn to_start(&self) -> bool {
        matches!(self.run, Run::Start { .. }) || self.pulling()
    }
}

pub(super) fn will_restart(policy: RestartPolicy, code: i32) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => code != 0,
        RestartPolicy::Never => false,
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The slot of container `id`, outgoing ones included.
pub(super) fn find_slot<'a>(slots: &'a mut [Slot], id: &str) -> Option<&'a mut Slot> {
    slots.iter_mut().find_map(|s| {
        if s.id == id {
            Some(s)
        } else {
            s.outgoing
                .as_mut()
                .map(|o| &mut *o.slot)
                .filter(|o| o.id == id)
        }
    })
}

/// Slot `i`, or its outgoing container's slot.
pub(super) fn slot_at(slots: &mut [Slot], i: usize, outgoing: bool) -> Option<&mut Slot> {
    let slot = slots.get_mut(i)?;
    if outgoing {
        slot.outgoing.as_mut().map(|o| &mut *o.slot)
    } else {
        Some(slot)
    }
}

/// The slot (outgoing ones included) whose image pull job `job` runs.
pub(super) fn find_job(slots: &mut [Slot], job: u64) -> Option<&mut Slot> {
    slots.iter_mut().find_map(|s| {
        if s.run == (Run::Pulling { job }) {
            Some(s)
        } else {
            s.outgoing
                .as_mut()
                .map(|o| &mut *o.slot)
                .filter(|o| o.run == Run::Pulling { job })
        }
    })
}

/// The container name in a container id `{pod}.{container}.{hash}`.
pub(super) fn container_name<'a>(pod: &str, id: &'a str) -> Option<&'a str> {
    let rest = id.strip_prefix(pod)?.strip_prefix('.')?;
    rest.rsplit_once('.').map(|(name, _)| name)
}

/// Watches `slot`'s container, in its run number `run`, for its exit and
/// its probes' outcomes.
pub(super) fn watch_slot<R: Runtime, I: Images>(
    ctx: &Arc<Ctx<R, I>>,
    parent: &CancellationToken,
    events: &mpsc::Sender<PodEvent>,
    run: u64,
    slot: &mut Slot,
) {
    slot.stop_watching();
    let token = parent.child_token();
    slot.waiter = Some(token.clone());
    let runtime = ctx.runtime.clone();
    let tx = events.clone();
    let id = slot.id.clone();
    let probes = Probes::of(&slot.spec);
    slot.ready = probes.is_empty();
    slot.run_number = run;
    let probe_token = token.clone();
    ctx.tracker.spawn(async move {
        tokio::select! {
            () = token.cancelled() => {}
            result = runtime.wait(&id) => {
                let _ = tx.send(PodEvent::Exit(Box::new((id, result)))).await;
            }
        }
    });
    if !probes.is_empty() {
        let check = ContainerCheck::new(ctx.runtime.clone(), slot.id.clone(), ctx.tracker.clone());
        let id = slot.id.clone();
        let tx = events.clone();
        ctx.tracker.spawn(async move {
            let wrap = move |event| PodEvent::Probe(Box::new((id.clone(), run, event)));
            tokio::select! {
                () = probe_token.cancelled() => {}
                () = probe::run(probes, check, Instant::now(), tx, wrap) => {}
            }
        });
    }
}
