//! One pod's task: starts its containers in spec order (their volumes made
//! ready first), watches them and their probes, applies the restart policy
//! with back-off (a failed liveness probe counts as a crash), replaces
//! containers whose spec or mounted volumes changed, and on `Stop` removes
//! everything, each container getting the pod's grace period between
//! SIGTERM and SIGKILL. It reports the pod's status after every change.
//!
//! Images are pulled by jobs of their own (`pull`), so commands are served
//! while a pull runs: a delete or a new spec does not wait for a slow or
//! failing download, which is then abandoned.
//!
//! A replaced container that runs keeps running until its successor's image
//! is pulled (and fits the device's platform): a registry that is down or a
//! wrong tag leaves the old version serving, with the failure shown as the
//! container's `next` state and retried with the usual back-off. If the old
//! container exits meanwhile, the restart policy applies to it as to any.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{ContainerSpec, ContainerState, PodSpec, RestartPolicy, SealedSecret, Volume};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::Ctx;
use super::process::{self, StartFailure, container_id_with_volumes};
use super::volumes;
use crate::image::{Image, Images};
use crate::probe::ProbeEvent;
use crate::runtime::{Existing, Exit, Runtime, RuntimeError};

mod pull;
mod slot;
mod status;

use pull::{PullEvent, retry_later};
use slot::{
    BACKOFF_MIN, BACKOFF_RESET, Outgoing, Run, Slot, container_name, find_slot, now_ms, slot_at,
    watch_slot, will_restart,
};

/// What the reconciler tells a pod task. Boxed: a channel allocates room for
/// 32 messages when it is made, and a pod task lives as long as its pod.
#[derive(Debug)]
pub(super) enum PodCommand {
    /// Run this spec, from this desired generation.
    Update(Box<PodSpec>, u64),
    /// The pod is no longer desired: stop and delete its containers, then end.
    Stop,
}

pub(super) type ExitReport = (String, Result<Exit, RuntimeError>);
/// A probe outcome for the container of that id, in that run.
pub(super) type ProbeReport = (String, u64, ProbeEvent);

/// What the pod's own tasks tell it: its exit watchers, probes and pull
/// jobs. One channel of boxed messages rather than one per kind, since each
/// channel allocates room for 32 messages up front (about 0.6 KiB here, ten
/// times that for three channels of these messages unboxed).
#[derive(Debug)]
pub(super) enum PodEvent {
    /// A container's process ended (or waiting for it failed).
    Exit(Box<ExitReport>),
    /// A probe outcome.
    Probe(Box<ProbeReport>),
    /// A pull job's progress or result.
    Pull(Box<PullEvent>),
}

pub(super) struct PodTask<R, I> {
    ctx: Arc<Ctx<R, I>>,
    name: String,
    workload: String,
    generation: u64,
    policy: RestartPolicy,
    /// Time between SIGTERM and SIGKILL when a container is stopped.
    grace: Duration,
    volumes: Vec<Volume>,
    /// Opened for each pull, so credentials are in the clear only while
    /// one runs.
    pull_secrets: Vec<SealedSecret>,
    slots: Vec<Slot>,
    terminating: bool,
    events_tx: mpsc::Sender<PodEvent>,
    events_rx: mpsc::Receiver<PodEvent>,
    /// Numbers the runs of containers, for their probe events.
    runs: u64,
    /// Numbers the pull jobs, for their events.
    jobs: u64,
    /// Parent of the waiters' and pulls' tokens; cancelled when the task ends.
    token: CancellationToken,
}

/// A container of the spec being replaced, while `update` sorts them out.
struct Old {
    slot: Slot,
    /// The grace period it was started with.
    grace: Duration,
    /// The pod's volumes it was started with (`None`: unknown, adopted).
    volumes: Option<Vec<Volume>>,
    /// It was already serving for a replacement whose image is not ready.
    outgoing: bool,
}

impl<R: Runtime, I: Images> PodTask<R, I> {
    pub(super) fn new(
        ctx: Arc<Ctx<R, I>>,
        spec: &PodSpec,
        generation: u64,
        token: CancellationToken,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::channel(32);
        Self {
            ctx,
            name: spec.name.clone(),
            workload: spec.workload.clone(),
            generation,
            policy: spec.restart_policy,
            grace: Duration::from_secs(u64::from(spec.termination_grace_secs)),
            volumes: spec.volumes.clone(),
            pull_secrets: spec.image_pull_secrets.clone(),
            slots: spec
                .containers
                .iter()
                .map(|c| Slot::new(&spec.name, c.clone(), &spec.volumes))
                .collect(),
            terminating: false,
            events_tx,
            events_rx,
            runs: 0,
            jobs: 0,
            token,
        }
    }

    /// Runs the pod until `Stop` (or until the reconciler is gone, at
    /// shutdown, when the containers are left running for the next start to
    /// adopt). `prev` is a task of the same pod name still removing its
    /// containers; `existing` are this pod's containers found at start.
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<PodCommand>,
        prev: Option<JoinHandle<()>>,
        existing: Vec<Existing>,
    ) {
        let _cancel_waiters = self.token.clone().drop_guard();
        if let Some(prev) = prev {
            // Its end (or panic) is all that matters here.
            let _ = prev.await;
        }
        // Rare and large futures are boxed where they are awaited, so the
        // task's own future (allocated for the pod's whole life) stays the
        // size of its idle loop.
        Box::pin(self.adopt(existing)).await;
        loop {
            self.start_due().await;
            self.report().await;
            let next = self.next_start();
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(mut cmd) = cmd else { return };
                    // Specs are whole: only the newest queued one matters.
                    while let Ok(newer) = rx.try_recv() {
                        cmd = newer;
                    }
                    match cmd {
                        PodCommand::Update(spec, generation) => {
                            Box::pin(self.update(*spec, generation)).await;
                        }
                        PodCommand::Stop => {
                            Box::pin(self.terminate()).await;
                            return;
                        }
                    }
                }
                Some(event) = self.events_rx.recv() => match event {
                    PodEvent::Pull(event) => self.on_pull(*event).await,
                    PodEvent::Exit(exit) => {
                        let (id, result) = *exit;
                        Box::pin(self.on_exit(&id, result)).await;
                    }
                    PodEvent::Probe(probe) => {
                        let (id, run, event) = *probe;
                        self.on_probe(&id, run, event);
                    }
                },
                () = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
            }
        }
    }

    /// Takes over this pod's containers found at start.
    async fn adopt(&mut self, existing: Vec<Existing>) {
        let (mut stop, mut dead, mut others) = (Vec::new(), Vec::new(), Vec::new());
        for e in existing {
            match self.slots.iter().position(|s| s.id == e.id) {
                Some(i) if e.running => {
                    tracing::info!(pod = %self.name, container = %e.id, "adopted running container");
                    let slot = &mut self.slots[i];
                    slot.run = Run::Running {
                        since: Instant::now(),
                    };
                    slot.state = ContainerState::Running {
                        started_at_ms: now_ms(),
                    };
                    slot.ever_started = true;
                    self.watch_at(i, false);
                }
                // Desired but dead: deleted here, started afresh by the loop.
                Some(_) => dead.push(e.id),
                None if e.running => others.push(e.id),
                None => dead.push(e.id),
            }
        }
        // A running container of an earlier spec (the agent restarted while
        // its replacement's image was not ready) serves until it is. Its
        // spec is not known here, so it is not restarted if it exits.
        for id in others {
            let name = container_name(&self.name, &id);
            let Some(i) = self.slots.iter().position(|s| {
                Some(s.spec.name.as_str()) == name
                    && s.outgoing.is_none()
                    && !matches!(s.run, Run::Running { .. })
            }) else {
                stop.push(id);
                continue;
            };
            tracing::info!(pod = %self.name, container = %id, "adopted running container, to be replaced once its new image is ready");
            let mut old = Slot::new(&self.name, self.slots[i].spec.clone(), &[]);
            old.id = id;
            old.run = Run::Running {
                since: Instant::now(),
            };
            old.state = ContainerState::Running {
                started_at_ms: now_ms(),
            };
            old.ever_started = true;
            self.slots[i].outgoing = Some(Outgoing {
                slot: Box::new(old),
                grace: self.grace,
                volumes: None,
            });
            self.watch_at(i, true);
        }
        if !stop.is_empty() || !dead.is_empty() {
            self.ctx.stop_and_delete(stop, dead, self.grace).await;
        }
    }

    fn next_start(&self) -> Option<Instant> {
        self.slots
            .iter()
            .flat_map(|s| [Some(s), s.outgoing.as_ref().map(|o| &*o.slot)])
            .flatten()
            .filter_map(|s| match s.run {
                Run::Start { at } => Some(at),
                _ => None,
            })
            .min()
    }

    /// Starts the pulls of every container whose start time has come, and,
    /// in spec order, the containers whose image is here: one waits for
    /// those before it that are still pulling. An outgoing container being
    /// started again waits for nothing.
    async fn start_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if matches!(self.slots[i].run, Run::Start { at } if at <= now) {
                self.begin_pull(i, false);
            }
            let old = self.slots[i].outgoing.as_ref().map(|o| o.slot.run);
            if matches!(old, Some(Run::Start { at }) if at <= now) {
                self.begin_pull(i, true);
            }
        }
        let mut blocked = false;
        for i in 0..self.slots.len() {
            let old = self.slots[i].outgoing.as_ref().map(|o| o.slot.run);
            if old == Some(Run::Pulled) {
                Box::pin(self.start_pulled(i, true)).await;
            }
            match self.slots[i].run {
                Run::Pulled if !blocked => Box::pin(self.start_pulled(i, false)).await,
                Run::Pulling { .. } | Run::Pulled => blocked = true,
                _ => {}
            }
        }
    }

    /// Starts slot `i`'s container (or its outgoing one) from the image its
    /// pull left; a replacement first stops the container it replaces.
    async fn start_pulled(&mut self, i: usize, outgoing: bool) {
        if !outgoing {
            self.switch_over(i).await;
        }
        let volumes = match outgoing {
            true => self.slots[i]
                .outgoing
                .as_ref()
                .and_then(|o| o.volumes.clone()),
            false => Some(self.volumes.clone()),
        };
        let Some(slot) = slot_at(&mut self.slots, i, outgoing) else {
            return;
        };
        let (Some(image), Some(volumes)) = (slot.image.take(), volumes) else {
            slot.run = Run::Start { at: Instant::now() };
            return;
        };
        let (spec, id, clean_first) = (slot.spec.clone(), slot.id.clone(), slot.failed_start);
        let result = self
            .start_blocking(spec, id.clone(), clean_first, image, volumes)
            .await;
        let pod = self.name.clone();
        let Some(slot) = slot_at(&mut self.slots, i, outgoing) else {
            return;
        };
        match result {
            Ok(()) => {
                tracing::info!(pod = %pod, container = %id, "container started");
                slot.run = Run::Running {
                    since: Instant::now(),
                };
                slot.state = ContainerState::Running {
                    started_at_ms: now_ms(),
                };
                if slot.restarting {
                    slot.restarts = slot.restarts.saturating_add(1);
                }
                slot.restarting = false;
                slot.ever_started = true;
                slot.failed_start = false;
                self.watch_at(i, outgoing);
            }
            Err(f) => retry_later(&pod, slot, f, true, None),
        }
    }

    /// Slot `i`'s image is ready: its outgoing container stops now.
    async fn switch_over(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(outgoing) = slot.outgoing.take() else {
            return;
        };
        let mut old = *outgoing.slot;
        old.stop_watching();
        old.abandon_pull();
        slot.state = ContainerState::Waiting {
            reason: "ContainerCreating".to_owned(),
            message: None,
            retry_at_ms: None,
        };
        tracing::info!(pod = %self.name, old = %old.id, new = %slot.id, "image ready, replacing the container");
        self.report().await;
        if matches!(old.run, Run::Running { .. }) {
            self.ctx
                .stop_and_delete(vec![old.id], Vec::new(), outgoing.grace)
                .await;
        } else if old.failed_start {
            self.ctx.delete(&old.id).await;
        }
    }

    /// Volumes, process, log directory, start: all of it blocks. The image
    /// is already here.
    async fn start_blocking(
        &self,
        spec: ContainerSpec,
        id: String,
        clean_first: bool,
        image: Image,
        pod_volumes: Vec<Volume>,
    ) -> Result<(), StartFailure> {
        let runtime = self.ctx.runtime.clone();
        let pod = self.name.clone();
        let data_dir = self.ctx.settings.data_dir.clone();
        let keyring = self.ctx.settings.secrets.clone();
        let log_path = process::log_path(&data_dir, &pod, &spec.name);
        let work = move || -> Result<(), StartFailure> {
            let mounts =
                volumes::prepare(&data_dir, &keyring, &pod, &pod_volumes, &spec.volume_mounts)
                    .map_err(|e| StartFailure::create(e.to_string()))?;
            let config = process::container_config(&pod, &id, &spec, &image, log_path, mounts)?;
            if let Some(dir) = config.log_path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StartFailure::create(format!("creating {}: {e}", dir.display()))
                })?;
            }
            if clean_first {
                runtime
                    .delete(&id)
                    .map_err(|e| StartFailure::create(e.to_string()))?;
            }
            runtime.start(&config).map_err(|e| match e {
                RuntimeError::Start { .. } => StartFailure {
                    reason: "StartFailed",
                    message: e.to_string(),
                },
                other => StartFailure::create(other.to_string()),
            })
        };
        match self.ctx.blocking("start", work).await {
            Ok(r) => r,
            Err(e) => Err(StartFailure::create(e.to_string())),
        }
    }

    /// Watches slot `i`'s container (or its outgoing one) for its exit.
    fn watch_at(&mut self, i: usize, outgoing: bool) {
        self.runs += 1;
        if let Some(slot) = slot_at(&mut self.slots, i, outgoing) {
            watch_slot(&self.ctx, &self.token, &self.events_tx, self.runs, slot);
        }
    }

    /// A probe outcome: readiness is recorded; a failed startup or
    /// liveness probe has the container killed (gracefully), and its exit
    /// then goes through the restart policy like any other.
    fn on_probe(&mut self, id: &str, run: u64, event: ProbeEvent) {
        let Some(slot) = find_slot(&mut self.slots, id)
            .filter(|s| s.run_number == run && matches!(s.run, Run::Running { .. }))
        else {
            return;
        };
        match event {
            ProbeEvent::Ready(ready) => {
                if slot.ready != ready {
                    tracing::info!(pod = %self.name, container = %id, ready, "readiness changed");
                }
                slot.ready = ready;
            }
            ProbeEvent::Failed { kind, message } => {
                tracing::warn!(
                    pod = %self.name,
                    container = %id,
                    "{kind} probe failed, restarting the container: {message}"
                );
                slot.ready = false;
                slot.kill_reason = Some(format!("{kind} probe failed: {message}"));
                if let Some(token) = &slot.waiter {
                    self.ctx
                        .kill_gracefully(id, self.grace, token.child_token());
                }
            }
        }
    }

    /// A container exited: the restart policy decides, with back-off. An
    /// outgoing one (its replacement's image not ready) is restarted too,
    /// so the old version keeps serving; one adopted at start, whose spec
    /// is unknown, is not.
    async fn on_exit(&mut self, id: &str, result: Result<Exit, RuntimeError>) {
        let running = |s: &Slot| s.id == id && matches!(s.run, Run::Running { .. });
        let Some((i, outgoing)) = self.slots.iter().enumerate().find_map(|(i, s)| {
            if running(s) {
                Some((i, false))
            } else if s.outgoing.as_ref().is_some_and(|o| running(&o.slot)) {
                Some((i, true))
            } else {
                None
            }
        }) else {
            return;
        };
        let (exit, wait_error) = match result {
            Ok(exit) => (exit, None),
            Err(e) => {
                tracing::warn!(pod = %self.name, "waiting for a container: {e}");
                let exit = Exit {
                    code: 255,
                    signal: None,
                    oom_killed: false,
                };
                (exit, Some(e.to_string()))
            }
        };
        let restartable = !outgoing
            || self.slots[i]
                .outgoing
                .as_ref()
                .is_some_and(|o| o.volumes.is_some());
        let restart = restartable && will_restart(self.policy, exit.code);
        if outgoing && !restart {
            // Not started again: its replacement starts when its image is
            // ready.
            if let Some(o) = self.slots[i].outgoing.take() {
                let mut old = *o.slot;
                old.stop_watching();
            }
            tracing::warn!(pod = %self.name, container = %id, code = exit.code, "container exited while its replacement's image is not ready; not restarted");
            self.ctx.delete(id).await;
            return;
        }
        let reason = if exit.oom_killed {
            "OOMKilled"
        } else if exit.code == 0 {
            "Completed"
        } else {
            "Error"
        };
        tracing::info!(
            pod = %self.name,
            container = %id,
            code = exit.code,
            reason,
            restart,
            replaced = outgoing,
            "container exited"
        );
        if let Some(slot) = slot_at(&mut self.slots, i, outgoing) {
            record_exit(slot, exit, reason, wait_error, restart);
        }
        // An exited container still holds its cgroup and writable layer.
        self.ctx.delete(id).await;
    }

    async fn update(&mut self, spec: PodSpec, generation: u64) {
        self.generation = generation;
        self.workload = spec.workload;
        self.policy = spec.restart_policy;
        // Replaced containers get the grace period they were started with.
        let old_grace = self.grace;
        self.grace = Duration::from_secs(u64::from(spec.termination_grace_secs));
        let old_volumes = std::mem::replace(&mut self.volumes, spec.volumes);
        self.pull_secrets = spec.image_pull_secrets;
        // Every container of the previous spec, and those still serving
        // while their replacement's image is not ready.
        let mut old: Vec<Old> = Vec::new();
        for mut slot in std::mem::take(&mut self.slots) {
            if let Some(o) = slot.outgoing.take() {
                old.push(Old {
                    slot: *o.slot,
                    grace: o.grace,
                    volumes: o.volumes,
                    outgoing: true,
                });
            }
            old.push(Old {
                slot,
                grace: old_grace,
                volumes: Some(old_volumes.clone()),
                outgoing: false,
            });
        }
        for c in spec.containers {
            let id = container_id_with_volumes(&self.name, &c, &self.volumes);
            let (mut slot, fresh) = match old.iter().position(|o| o.slot.id == id) {
                Some(pos) => (old.remove(pos).slot, false),
                None => (Slot::new(&self.name, c, &self.volumes), true),
            };
            if !matches!(slot.run, Run::Running { .. }) {
                // The container of that name that serves (or served, and
                // waits to start again) goes on until this one's image is
                // ready.
                let serving = old.iter().position(|o| {
                    o.slot.spec.name == slot.spec.name
                        && (matches!(o.slot.run, Run::Running { .. })
                            || (o.outgoing && o.slot.to_start()))
                });
                if let Some(pos) = serving {
                    let o = old.remove(pos);
                    slot.outgoing = Some(Outgoing {
                        slot: Box::new(o.slot),
                        grace: o.grace,
                        volumes: o.volumes,
                    });
                }
            }
            if fresh {
                // A pull of the same image for a replaced container (a spec
                // change that kept the image) carries on for this one.
                let pulling = old.iter().position(|o| {
                    !o.outgoing && o.slot.pulling() && o.slot.spec.image == slot.spec.image
                });
                if let Some(pos) = pulling {
                    let o = &mut old[pos].slot;
                    slot.run = o.run;
                    slot.pull = o.pull.take();
                    slot.pull_cancel = o.pull_cancel.take();
                    slot.image = o.image.take();
                    slot.state = o.state.clone();
                    o.run = Run::Finished;
                }
            }
            self.slots.push(slot);
        }
        // A policy change can revive a finished container or settle one
        // waiting to restart, outgoing ones included.
        for slot in &mut self.slots {
            if let Some(code) = slot.last_exit {
                let restart = will_restart(self.policy, code);
                match slot.run {
                    Run::Finished if restart => {
                        slot.restarting = true;
                        slot.run = Run::Start { at: Instant::now() };
                    }
                    _ if slot.to_start() && slot.restarting && !restart => {
                        slot.abandon_pull();
                        slot.run = Run::Finished;
                    }
                    _ => {}
                }
            }
            let settled = slot.outgoing.as_ref().is_some_and(|o| {
                o.slot.to_start()
                    && o.slot
                        .last_exit
                        .is_some_and(|code| !will_restart(self.policy, code))
            });
            if settled {
                if let Some(o) = slot.outgoing.take() {
                    old.push(Old {
                        slot: *o.slot,
                        grace: o.grace,
                        volumes: o.volumes,
                        outgoing: true,
                    });
                }
            }
        }
        let (mut running, mut dead) = (Vec::new(), Vec::new());
        let mut grace = Duration::ZERO;
        for o in old {
            let mut slot = o.slot;
            slot.stop_watching();
            slot.abandon_pull();
            match slot.run {
                Run::Running { .. } => {
                    running.push(slot.id);
                    grace = grace.max(o.grace);
                }
                _ if slot.failed_start => dead.push(slot.id),
                _ => {}
            }
        }
        if !running.is_empty() || !dead.is_empty() {
            tracing::info!(pod = %self.name, removed = ?running, "removing containers no longer desired");
            self.report().await;
            self.ctx.stop_and_delete(running, dead, grace).await;
        }
    }

    async fn terminate(&mut self) {
        self.terminating = true;
        self.report().await;
        let (mut running, mut dead) = (Vec::new(), Vec::new());
        let outgoing: Vec<Slot> = self
            .slots
            .iter_mut()
            .filter_map(|s| s.outgoing.take().map(|o| *o.slot))
            .collect();
        self.slots.extend(outgoing);
        for slot in &mut self.slots {
            slot.stop_watching();
            // Pulls in flight are left behind: removing the pod does not
            // wait for the network.
            slot.abandon_pull();
            match slot.run {
                Run::Running { .. } => running.push(slot.id.clone()),
                _ if slot.failed_start => dead.push(slot.id.clone()),
                _ => {}
            }
        }
        self.ctx.stop_and_delete(running, dead, self.grace).await;
        self.ctx.remove_logs(&self.name).await;
        self.ctx.remove_volumes(&self.name).await;
        tracing::info!(pod = %self.name, "pod removed");
        // An error means the agent is shutting down; nothing to report to.
        let _ = self.ctx.reports.pod_gone(self.name.clone()).await;
    }
}

/// Records a container's exit in its slot: terminated, or waiting to
/// restart after back-off.
fn record_exit(
    slot: &mut Slot,
    exit: Exit,
    reason: &str,
    wait_error: Option<String>,
    restart: bool,
) {
    let killed_for = slot.kill_reason.take();
    let message = killed_for
        .clone()
        .or(wait_error)
        .or_else(|| exit.signal.map(|s| format!("killed by signal {s}")));
    // Ends this run's probes and any kill under way.
    slot.stop_watching();
    slot.ready = false;
    if let Run::Running { since } = slot.run {
        if since.elapsed() >= BACKOFF_RESET {
            slot.backoff = BACKOFF_MIN;
        }
    }
    slot.state = ContainerState::Terminated {
        exit_code: exit.code,
        reason: reason.to_owned(),
        message,
        finished_at_ms: now_ms(),
    };
    slot.last_exit = Some(exit.code);
    slot.run = if restart {
        slot.restarting = true;
        let delay = slot.next_delay();
        // Shown as Kubernetes shows CrashLoopBackOff: waiting, with why
        // and when the next start is due.
        slot.state = ContainerState::Waiting {
            reason: "BackOff".to_owned(),
            message: Some(match &killed_for {
                Some(why) => format!(
                    "{why}; exited with code {}; restarting in {} s",
                    exit.code,
                    delay.as_secs()
                ),
                None => format!(
                    "exited with code {} ({reason}); restarting in {} s",
                    exit.code,
                    delay.as_secs()
                ),
            }),
            retry_at_ms: Some(now_ms() + delay.as_millis() as u64),
        };
        Run::Start {
            at: Instant::now() + delay,
        }
    } else {
        Run::Finished
    };
}
