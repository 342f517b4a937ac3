//! One pod's task: starts its containers in spec order (their volumes made
//! ready first), watches them and their probes, applies the restart policy
//! with back-off (a failed liveness probe counts as a crash), replaces
//! containers whose spec or mounted volumes changed, and on `Stop` removes
//! everything, each container getting the pod's grace period between
//! SIGTERM and SIGKILL. It reports the pod's status after every change.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_proto::{
    ContainerSpec, ContainerState, ContainerStatus, PodPhase, PodSpec, PodStatus, RestartPolicy,
    Volume,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::Ctx;
use super::process::{self, StartFailure, container_id_with_volumes};
use super::volumes;
use crate::image::{Images, PullProgress, WatchObserver};
use crate::probe::{self, ContainerCheck, ProbeEvent, Probes};
use crate::runtime::{Existing, Exit, Runtime, RuntimeError};

/// First delay before a container is started again; doubles per attempt.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// A container that ran this long starts its back-off afresh.
const BACKOFF_RESET: Duration = Duration::from_secs(10 * 60);

/// What the reconciler tells a pod task.
#[derive(Debug)]
pub(super) enum PodCommand {
    /// Run this spec, from this desired generation.
    Update(PodSpec, u64),
    /// The pod is no longer desired: stop and delete its containers, then end.
    Stop,
}

/// Where a container slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// To be started at (or after) this instant.
    Start { at: Instant },
    /// Its process runs.
    Running { since: Instant },
    /// Exited, and the restart policy says it stays so.
    Finished,
}

/// One container of the pod, as desired now.
struct Slot {
    spec: ContainerSpec,
    id: String,
    run: Run,
    state: ContainerState,
    restarts: u32,
    backoff: Duration,
    ever_started: bool,
    /// The next start follows an exit, so it counts as a restart.
    restarting: bool,
    last_exit: Option<i32>,
    /// The last start failed: the runtime may hold leftovers of that id.
    failed_start: bool,
    /// Cancels the tasks of this run of the container: the one waiting for
    /// its exit, its probes, a kill under way.
    waiter: Option<CancellationToken>,
    /// Which run of the container its probe events are about.
    run_number: u64,
    /// Its probes pass (or it has none); reported only while it runs.
    ready: bool,
    /// Why the agent is killing it (a failed probe), for its exit message.
    kill_reason: Option<String>,
    /// How far the download of its image is, while one runs.
    pull: Option<PullProgress>,
}

impl Slot {
    fn new(pod: &str, spec: ContainerSpec, volumes: &[Volume]) -> Self {
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
        }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        d
    }

    fn stop_watching(&mut self) {
        if let Some(w) = self.waiter.take() {
            w.cancel();
        }
    }
}

fn will_restart(policy: RestartPolicy, code: i32) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => code != 0,
        RestartPolicy::Never => false,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

type ExitReport = (String, Result<Exit, RuntimeError>);
/// A probe outcome for the container of that id, in that run.
type ProbeReport = (String, u64, ProbeEvent);

pub(super) struct PodTask<R, I> {
    ctx: Arc<Ctx<R, I>>,
    name: String,
    workload: String,
    generation: u64,
    policy: RestartPolicy,
    /// Time between SIGTERM and SIGKILL when a container is stopped.
    grace: Duration,
    volumes: Vec<Volume>,
    slots: Vec<Slot>,
    terminating: bool,
    exits_tx: mpsc::Sender<ExitReport>,
    exits_rx: mpsc::Receiver<ExitReport>,
    probes_tx: mpsc::Sender<ProbeReport>,
    probes_rx: mpsc::Receiver<ProbeReport>,
    /// Numbers the runs of containers, for their probe events.
    runs: u64,
    /// Parent of the waiters' tokens; cancelled when the task ends.
    token: CancellationToken,
}

impl<R: Runtime, I: Images> PodTask<R, I> {
    pub(super) fn new(
        ctx: Arc<Ctx<R, I>>,
        spec: &PodSpec,
        generation: u64,
        token: CancellationToken,
    ) -> Self {
        let (exits_tx, exits_rx) = mpsc::channel(16);
        let (probes_tx, probes_rx) = mpsc::channel(16);
        Self {
            ctx,
            name: spec.name.clone(),
            workload: spec.workload.clone(),
            generation,
            policy: spec.restart_policy,
            grace: Duration::from_secs(u64::from(spec.termination_grace_secs)),
            volumes: spec.volumes.clone(),
            slots: spec
                .containers
                .iter()
                .map(|c| Slot::new(&spec.name, c.clone(), &spec.volumes))
                .collect(),
            terminating: false,
            exits_tx,
            exits_rx,
            probes_tx,
            probes_rx,
            runs: 0,
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
        self.adopt(existing).await;
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
                        PodCommand::Update(spec, generation) => self.update(spec, generation).await,
                        PodCommand::Stop => {
                            self.terminate().await;
                            return;
                        }
                    }
                }
                Some((id, result)) = self.exits_rx.recv() => self.on_exit(&id, result).await,
                Some((id, run, event)) = self.probes_rx.recv() => self.on_probe(&id, run, event),
                () = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
            }
        }
    }

    /// Takes over this pod's containers found at start.
    async fn adopt(&mut self, existing: Vec<Existing>) {
        let (mut stop, mut dead) = (Vec::new(), Vec::new());
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
                    self.watch(i);
                }
                // Desired but dead: deleted here, started afresh by the loop.
                Some(_) => dead.push(e.id),
                None if e.running => stop.push(e.id),
                None => dead.push(e.id),
            }
        }
        if !stop.is_empty() || !dead.is_empty() {
            self.ctx.stop_and_delete(stop, dead, self.grace).await;
        }
    }

    fn next_start(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s.run {
                Run::Start { at } => Some(at),
                _ => None,
            })
            .min()
    }

    /// Starts, in spec order, every container whose start time has come.
    async fn start_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if matches!(self.slots[i].run, Run::Start { at } if at <= now) {
                self.start(i).await;
            }
        }
    }

    async fn start(&mut self, i: usize) {
        let slot = &self.slots[i];
        let (spec, id, clean_first) = (slot.spec.clone(), slot.id.clone(), slot.failed_start);
        let (pull_tx, mut pull_rx) = tokio::sync::watch::channel(None);
        let started = self.start_blocking(spec, id.clone(), clean_first, pull_tx);
        tokio::pin!(started);
        // While the image downloads, its progress shows as `Pulling`.
        let result = loop {
            tokio::select! {
                r = &mut started => break r,
                Ok(()) = pull_rx.changed() => {
                    let progress = *pull_rx.borrow_and_update();
                    self.show_pull(i, progress).await;
                }
            }
        };
        let slot = &mut self.slots[i];
        slot.pull = None;
        match result {
            Ok(()) => {
                tracing::info!(pod = %self.name, container = %id, "container started");
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
                self.watch(i);
            }
            Err(f) => {
                let delay = slot.next_delay();
                tracing::warn!(
                    pod = %self.name,
                    container = %id,
                    reason = f.reason,
                    "container not started, retrying in {} s: {}",
                    delay.as_secs(),
                    f.message
                );
                slot.run = Run::Start {
                    at: Instant::now() + delay,
                };
                slot.state = ContainerState::Waiting {
                    reason: f.reason.to_owned(),
                    message: Some(f.message),
                    retry_at_ms: Some(now_ms() + delay.as_millis() as u64),
                };
                slot.failed_start = true;
            }
        }
    }

    async fn show_pull(&mut self, i: usize, progress: Option<PullProgress>) {
        let slot = &mut self.slots[i];
        slot.pull = progress;
        if let Some(p) = progress {
            slot.state = ContainerState::Waiting {
                reason: "Pulling".to_owned(),
                message: Some(format!(
                    "pulling image {}: {:.1} of {:.1} MiB",
                    slot.spec.image,
                    p.done_bytes as f64 / 1048576.0,
                    p.total_bytes as f64 / 1048576.0
                )),
                retry_at_ms: None,
            };
        }
        self.report().await;
    }

    /// Image, process, log directory, start: all of it blocks. The future
    /// does not borrow the task, so the task can show pull progress.
    fn start_blocking(
        &self,
        spec: ContainerSpec,
        id: String,
        clean_first: bool,
        pull_tx: tokio::sync::watch::Sender<Option<PullProgress>>,
    ) -> impl Future<Output = Result<(), StartFailure>> + use<R, I> {
        let observer = WatchObserver {
            progress: pull_tx,
            cancel: self.token.clone(),
        };
        let runtime = self.ctx.runtime.clone();
        let images = self.ctx.images.clone();
        let pod = self.name.clone();
        let data_dir = self.ctx.settings.data_dir.clone();
        let log_path = process::log_path(&data_dir, &pod, &spec.name);
        let pod_volumes = self.volumes.clone();
        let work = move || -> Result<(), StartFailure> {
            let image = images
                .pull(&spec.image, &observer)
                .map_err(|e| StartFailure {
                    reason: e.reason(),
                    message: e.to_string(),
                })?;
            let mounts = volumes::prepare(&data_dir, &pod, &pod_volumes, &spec.volume_mounts)
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
        let ctx = self.ctx.clone();
        async move {
            match ctx.blocking("start", work).await {
                Ok(r) => r,
                Err(e) => Err(StartFailure::create(e.to_string())),
            }
        }
    }

    /// Watches slot `i`'s container for its exit.
    fn watch(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.stop_watching();
        let token = self.token.child_token();
        slot.waiter = Some(token.clone());
        let runtime = self.ctx.runtime.clone();
        let tx = self.exits_tx.clone();
        let id = slot.id.clone();
        let probes = Probes::of(&slot.spec);
        slot.ready = probes.is_empty();
        self.runs += 1;
        slot.run_number = self.runs;
        let probe_token = token.clone();
        self.ctx.tracker.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                result = runtime.wait(&id) => {
                    let _ = tx.send((id, result)).await;
                }
            }
        });
        if !probes.is_empty() {
            let check = ContainerCheck::new(
                self.ctx.runtime.clone(),
                slot.id.clone(),
                self.ctx.tracker.clone(),
            );
            let (id, run) = (slot.id.clone(), slot.run_number);
            let tx = self.probes_tx.clone();
            self.ctx.tracker.spawn(async move {
                let wrap = move |event| (id.clone(), run, event);
                tokio::select! {
                    () = probe_token.cancelled() => {}
                    () = probe::run(probes, check, Instant::now(), tx, wrap) => {}
                }
            });
        }
    }

    /// A probe outcome: readiness is recorded; a failed startup or
    /// liveness probe has the container killed (gracefully), and its exit
    /// then goes through the restart policy like any other.
    fn on_probe(&mut self, id: &str, run: u64, event: ProbeEvent) {
        let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| s.id == id && s.run_number == run && matches!(s.run, Run::Running { .. }))
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

    async fn on_exit(&mut self, id: &str, result: Result<Exit, RuntimeError>) {
        let Some(i) = self
            .slots
            .iter()
            .position(|s| s.id == id && matches!(s.run, Run::Running { .. }))
        else {
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
        let reason = if exit.oom_killed {
            "OOMKilled"
        } else if exit.code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let killed_for = self.slots[i].kill_reason.take();
        let message = killed_for
            .clone()
            .or(wait_error)
            .or_else(|| exit.signal.map(|s| format!("killed by signal {s}")));
        let restart = will_restart(self.policy, exit.code);
        tracing::info!(
            pod = %self.name,
            container = %id,
            code = exit.code,
            reason,
            restart,
            "container exited"
        );
        let slot = &mut self.slots[i];
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
        self.volumes = spec.volumes;
        let mut old = std::mem::take(&mut self.slots);
        for c in spec.containers {
            let id = container_id_with_volumes(&self.name, &c, &self.volumes);
            match old.iter().position(|s| s.id == id) {
                Some(pos) => self.slots.push(old.remove(pos)),
                None => self.slots.push(Slot::new(&self.name, c, &self.volumes)),
            }
        }
        // A policy change can revive a finished container or settle one
        // waiting to restart.
        for slot in &mut self.slots {
            let Some(code) = slot.last_exit else { continue };
            let restart = will_restart(self.policy, code);
            match slot.run {
                Run::Finished if restart => {
                    slot.restarting = true;
                    slot.run = Run::Start { at: Instant::now() };
                }
                Run::Start { .. } if slot.restarting && !restart => slot.run = Run::Finished,
                _ => {}
            }
        }
        let (mut running, mut dead) = (Vec::new(), Vec::new());
        for mut slot in old {
            slot.stop_watching();
            match slot.run {
                Run::Running { .. } => running.push(slot.id),
                _ if slot.failed_start => dead.push(slot.id),
                _ => {}
            }
        }
        if !running.is_empty() || !dead.is_empty() {
            tracing::info!(pod = %self.name, replaced = ?running, "replacing changed containers");
            self.report().await;
            self.ctx.stop_and_delete(running, dead, old_grace).await;
        }
    }

    async fn terminate(&mut self) {
        self.terminating = true;
        self.report().await;
        let (mut running, mut dead) = (Vec::new(), Vec::new());
        for slot in &mut self.slots {
            slot.stop_watching();
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

    async fn report(&self) {
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
                .map(|s| ContainerStatus {
                    name: s.spec.name.clone(),
                    state: s.state.clone(),
                    restarts: s.restarts,
                    ready: s.ready && matches!(s.state, ContainerState::Running { .. }),
                    pull: s.pull,
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
        if self.slots.iter().any(|s| !s.ever_started) {
            return (PodPhase::Pending, waiting);
        }
        if self
            .slots
            .iter()
            .any(|s| matches!(s.run, Run::Running { .. }))
        {
            return (PodPhase::Running, None);
        }
        if let Some(s) = self
            .slots
            .iter()
            .find(|s| matches!(s.run, Run::Start { .. }))
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
