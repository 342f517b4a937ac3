//! Desired vs actual: an actor that receives whole desired states and keeps
//! one task per pod (each with a typed command channel) that starts,
//! watches, restarts, replaces and removes that pod's containers. At start it
//! adopts what the runtime already runs: desired containers that still run
//! are kept, everything else of ours is stopped and deleted, with the
//! directories of pods no longer desired.

mod pod;
mod process;
mod volumes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{DesiredState, PodSpec};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::image::Images;
use crate::report::ReportHandle;
use crate::runtime::{Existing, Runtime};

pub use process::{container_id, container_id_with_volumes, parse_id};

use pod::{PodCommand, PodTask};

/// How long a container gets after SIGKILL before it is deleted anyway.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Pause between attempts to list the runtime's containers at start.
const LIST_RETRY: Duration = Duration::from_secs(5);

/// Errors of the reconciler.
#[derive(Debug, thiserror::Error)]
pub enum ReconcilerError {
    /// The reconciler task has ended (the agent is shutting down).
    #[error("reconciler: stopped")]
    Stopped,
    /// A blocking runtime or image call panicked.
    #[error("{what}: the blocking task panicked")]
    Panicked { what: &'static str },
}

/// Fixed settings of the reconciler.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The agent's data directory (logs go to `{data_dir}/logs/{pod}/`).
    pub data_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL for containers of pods the agent no
    /// longer knows (found at start); a desired pod's containers get the
    /// pod's own termination grace period.
    pub stop_grace: Duration,
    /// The node's sealing key and where secret volumes' tmpfs mounts go.
    pub secrets: crate::secrets::Keyring,
}

/// Hands desired states to the reconciler. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReconcilerHandle {
    tx: mpsc::Sender<DesiredState>,
}

impl ReconcilerHandle {
    /// Makes `desired` the state to reach (it must have passed
    /// [`crate::state::validate`]).
    pub async fn apply(&self, desired: DesiredState) -> Result<(), ReconcilerError> {
        self.tx
            .send(desired)
            .await
            .map_err(|_| ReconcilerError::Stopped)
    }
}

/// What pod tasks share.
pub(crate) struct Ctx<R, I> {
    pub runtime: Arc<R>,
    pub images: Arc<I>,
    pub settings: Settings,
    pub reports: ReportHandle,
    pub tracker: TaskTracker,
}

impl<R: Runtime, I: Images> Ctx<R, I> {
    /// Runs blocking work off the async workers, tracked so that shutdown
    /// waits for it.
    pub async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ReconcilerError> {
        self.tracker
            .spawn_blocking(f)
            .await
            .map_err(|_| ReconcilerError::Panicked { what })
    }

    async fn kill(&self, id: &str, signal: i32) {
        let rt = self.runtime.clone();
        let owned = id.to_owned();
        match self.blocking("kill", move || rt.kill(&owned, signal)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(e) => tracing::error!(container = id, "{e}"),
        }
    }

    /// Deletes a container; failures are logged (the next start of the same
    /// id, or the next agent start, tries again).
    pub async fn delete(&self, id: &str) {
        let rt = self.runtime.clone();
        let owned = id.to_owned();
        match self.blocking("delete", move || rt.delete(&owned)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(e) => tracing::error!(container = id, "{e}"),
        }
    }

    /// Stops `running` containers (SIGTERM, `grace`, SIGKILL) and deletes
    /// them and the `dead` ones. The caller must have stopped watching
    /// them: their exits are awaited here.
    pub async fn stop_and_delete(&self, running: Vec<String>, dead: Vec<String>, grace: Duration) {
        for id in &running {
            self.kill(id, libc::SIGTERM).await;
        }
        let deadline = tokio::time::Instant::now() + grace;
        for id in &running {
            if tokio::time::timeout_at(deadline, self.runtime.wait(id))
                .await
                .is_err()
            {
                tracing::info!(container = %id, "still running after the grace period, killing");
                self.kill(id, libc::SIGKILL).await;
                if tokio::time::timeout(KILL_WAIT, self.runtime.wait(id))
                    .await
                    .is_err()
                {
                    tracing::error!(container = %id, "did not exit after SIGKILL, deleting anyway");
                }
            }
            tracing::info!(container = %id, "stopped");
        }
        for id in running.iter().chain(&dead) {
            self.delete(id).await;
        }
    }

    /// Removes a pod's log directory once the pod is gone.
    pub async fn remove_logs(&self, pod: &str) {
        let dir = process::pod_log_dir(&self.settings.data_dir, pod);
        let result = self
            .blocking("removing logs", move || {
                match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(format!("removing {}: {e}", dir.display()))
                    }
                    _ => Ok(()),
                }
            })
            .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// Removes a pod's directory (scratch volumes, config files) once the
    /// pod is gone.
    pub async fn remove_volumes(&self, pod: &str) {
        let data_dir = self.settings.data_dir.clone();
        let keyring = self.settings.secrets.clone();
        let owned = pod.to_owned();
        let result = self
            .blocking("removing volumes", move || {
                volumes::remove(&data_dir, &keyring, &owned)
            })
            .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// Sends SIGTERM to a container now and SIGKILL after `grace` unless it
    /// has exited by then or `token` is cancelled (its pod stopped watching
    /// it). Does not wait.
    pub fn kill_gracefully(self: &Arc<Self>, id: &str, grace: Duration, token: CancellationToken) {
        let ctx = Arc::clone(self);
        let id = id.to_owned();
        self.tracker.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = async {
                    ctx.kill(&id, libc::SIGTERM).await;
                    if tokio::time::timeout(grace, ctx.runtime.wait(&id)).await.is_err() {
                        tracing::info!(container = %id, "still running after the grace period, killing");
                        ctx.kill(&id, libc::SIGKILL).await;
                    }
                } => {}
            }
        });
    }
}

/// Starts the reconciler with the state loaded from disk (`None`: nothing is
/// desired yet). It adopts the runtime's containers before anything else.
pub fn spawn<R: Runtime, I: Images>(
    runtime: Arc<R>,
    images: Arc<I>,
    settings: Settings,
    initial: Option<DesiredState>,
    reports: ReportHandle,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> ReconcilerHandle {
    let (tx, rx) = mpsc::channel(8);
    let prefetch = crate::prefetch::spawn(
        Arc::clone(&images),
        settings.secrets.clone(),
        reports.clone(),
        tracker,
        shutdown.clone(),
    );
    let ctx = Arc::new(Ctx {
        runtime,
        images,
        settings,
        reports,
        tracker: tracker.clone(),
    });
    let actor = Actor {
        ctx,
        pods: HashMap::new(),
        terminating: HashMap::new(),
        existing: HashMap::new(),
        shutdown: shutdown.clone(),
        prefetch,
    };
    tracker.spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = actor.run(rx, initial) => {}
        }
    });
    ReconcilerHandle { tx }
}

struct PodEntry {
    tx: mpsc::Sender<PodCommand>,
    handle: JoinHandle<()>,
    /// What the spec is, to see whether the next desired state changes it;
    /// the task holds the spec itself.
    digest: [u8; 32],
    generation: u64,
}

struct Actor<R, I> {
    ctx: Arc<Ctx<R, I>>,
    pods: HashMap<String, PodEntry>,
    /// Pods being removed; a pod of the same name waits for its end.
    terminating: HashMap<String, JoinHandle<()>>,
    /// Containers found at start, by pod, until a pod task takes them.
    existing: HashMap<String, Vec<Existing>>,
    shutdown: CancellationToken,
    /// Downloads the images a staged rollout will switch to.
    prefetch: crate::prefetch::PrefetchHandle,
}

impl<R: Runtime, I: Images> Actor<R, I> {
    async fn run(mut self, mut rx: mpsc::Receiver<DesiredState>, initial: Option<DesiredState>) {
        let existing = self.list().await;
        for e in existing {
            match parse_id(&e.id) {
                Some((pod, _)) => self.existing.entry(pod.to_owned()).or_default().push(e),
                None => tracing::debug!(id = %e.id, "not a flotilla container, left alone"),
            }
        }
        let initial = initial.unwrap_or_else(|| DesiredState {
            node: String::new(),
            generation: 0,
            pods: Vec::new(),
            prefetch: Vec::new(),
            prefetch_pull_secrets: Vec::new(),
        });
        self.apply(initial).await;
        for (pod, containers) in std::mem::take(&mut self.existing) {
            tracing::info!(pod = %pod, "removing containers of a pod that is not desired");
            let ctx = self.ctx.clone();
            let name = pod.clone();
            let handle = self.ctx.tracker.spawn(async move {
                let running = containers
                    .iter()
                    .filter(|e| e.running)
                    .map(|e| e.id.clone());
                let dead = containers
                    .iter()
                    .filter(|e| !e.running)
                    .map(|e| e.id.clone());
                let grace = ctx.settings.stop_grace;
                ctx.stop_and_delete(running.collect(), dead.collect(), grace)
                    .await;
                ctx.remove_logs(&name).await;
                ctx.remove_volumes(&name).await;
            });
            self.terminating.insert(pod, handle);
        }
        self.remove_stale_pod_dirs().await;
        while let Some(desired) = rx.recv().await {
            self.apply(desired).await;
        }
    }

    /// Removes the directories of pods that are neither desired nor being
    /// removed (their containers were already gone when the agent started).
    async fn remove_stale_pod_dirs(&self) {
        let data_dir = self.ctx.settings.data_dir.clone();
        let keyring = self.ctx.settings.secrets.clone();
        let Ok(on_disk) = self
            .ctx
            .blocking("listing pod directories", move || {
                volumes::pods_on_disk(&data_dir, &keyring)
            })
            .await
        else {
            return;
        };
        for pod in on_disk {
            if !self.pods.contains_key(&pod) && !self.terminating.contains_key(&pod) {
                tracing::info!(pod = %pod, "removing the directory of a pod that is not desired");
                self.ctx.remove_volumes(&pod).await;
            }
        }
    }

    /// The runtime's containers. Adoption needs them, so a failure is
    /// retried rather than risking a duplicate of a running container.
    async fn list(&self) -> Vec<Existing> {
        loop {
            let rt = self.ctx.runtime.clone();
            match self.ctx.blocking("list", move || rt.list()).await {
                Ok(Ok(list)) => return list,
                Ok(Err(e)) => tracing::error!("listing containers for adoption: {e}; retrying"),
                Err(e) => tracing::error!("listing containers for adoption: {e}; retrying"),
            }
            tokio::time::sleep(LIST_RETRY).await;
        }
    }

    async fn apply(&mut self, desired: DesiredState) {
        let generation = desired.generation;
        self.prefetch.set(&desired);
        if generation > 0 {
            // Images no desired pod names and no prefetch lists go; the
            // store keeps the previous set too, for rollbacks. In the
            // background: it deletes files.
            let keep: Vec<String> = desired
                .pods
                .iter()
                .flat_map(|p| p.containers.iter().map(|c| c.image.clone()))
                .chain(desired.prefetch.iter().cloned())
                .collect();
            let images = self.ctx.images.clone();
            self.ctx
                .tracker
                .spawn_blocking(move || images.collect_garbage(&keep));
        }
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|name| !desired.pods.iter().any(|p| &p.name == *name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(entry) = self.pods.remove(&name) {
                tracing::info!(pod = %name, "pod no longer desired, removing");
                // A send error means the task has already ended.
                let _ = entry.tx.send(PodCommand::Stop).await;
                self.terminating.insert(name, entry.handle);
            }
        }
        for spec in desired.pods {
            let name = spec.name.clone();
            let digest = process::spec_digest(&spec);
            let entry = self.pods.remove(&spec.name);
            let entry = match entry {
                Some(e) if e.digest == digest && e.generation == generation => e,
                Some(mut e) => {
                    let update = PodCommand::Update(Box::new(spec.clone()), generation);
                    if e.tx.send(update).await.is_ok() {
                        e.digest = digest;
                        e.generation = generation;
                        e
                    } else {
                        tracing::error!(pod = %spec.name, "pod task ended unexpectedly, starting it again");
                        self.spawn_pod(spec, generation, Some(e.handle))
                    }
                }
                None => {
                    let prev = self.terminating.remove(&spec.name);
                    self.spawn_pod(spec, generation, prev)
                }
            };
            self.pods.insert(name, entry);
        }
        self.terminating.retain(|_, h| !h.is_finished());
    }

    fn spawn_pod(
        &mut self,
        spec: PodSpec,
        generation: u64,
        prev: Option<JoinHandle<()>>,
    ) -> PodEntry {
        let (tx, rx) = mpsc::channel(16);
        let existing = self.existing.remove(&spec.name).unwrap_or_default();
        let task = PodTask::new(
            self.ctx.clone(),
            &spec,
            generation,
            self.shutdown.child_token(),
        );
        let token = self.shutdown.clone();
        let handle = self.ctx.tracker.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = task.run(rx, prev, existing) => {}
            }
        });
        PodEntry {
            tx,
            handle,
            digest: process::spec_digest(&spec),
            generation,
        }
    }
}
