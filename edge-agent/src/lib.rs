//! The Flotilla device agent: keeps the node's desired state on disk, runs its
//! containers through libcontainer, and reports status over MQTT.
//!
//! [`run`] wires the parts: the state on disk is loaded and reconciled
//! before the broker is reachable (offline autonomy); the MQTT session hands
//! in desired-state frames, which are judged ([`state::judge`]), stored and
//! given to the reconciler; pods report to the coalescing reporter, whose
//! newest status the session publishes. Beside them run the log rotation,
//! the health sampler, and the rpc server that answers the controller's
//! requests (container logs; commands run in containers, [`exec`]) from
//! the session.

pub mod config;
pub mod enroll;
pub mod exec;
pub mod image;
pub mod join_tls;
pub mod logs;
pub mod node_info;
pub mod prefetch;
pub mod private_file;
pub mod probe;
pub mod reconciler;
pub mod report;
pub mod runtime;
pub mod secrets;
pub mod session;
pub mod state;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_proto::{Message, RpcCall, RpcRequest, RpcResponse, RpcResult, Topics, WIRE_VERSION};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, RuntimeKind};
use crate::image::Images;
use crate::logs::Logs;
use crate::report::{ReportHandle, ReportTiming};
use crate::runtime::Runtime;
use crate::state::{StateStore, Verdict};

/// A burst of changes within this window gives one status message.
const STATUS_DEBOUNCE: Duration = Duration::from_millis(100);
/// Rpc requests waiting for the server; more are dropped (the caller times out).
const RPC_QUEUE: usize = 8;

/// Runs the agent until `shutdown` is cancelled (or a fatal error). When it
/// returns, every task it started has ended. Containers are not stopped:
/// the next start adopts them.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    match config.runtime {
        RuntimeKind::Youki => {
            // libcontainer's state is volatile like the containers it
            // describes; bundles hold writable layers, which belong on disk
            // rather than in the RAM of a tmpfs (the runtime removes bundles
            // a reboot left without state).
            let state_root = config.run_dir.join("state");
            let work_root = config.data_dir.join("containers");
            let cgroup_parent = format!("flotilla/{}", config.node);
            let images_dir = config.data_dir.join("images");
            let pull = config.pull.clone();
            let helper = config.runtime_helper.clone();
            let (runtime, images) = tokio::task::spawn_blocking(move || {
                let mut runtime =
                    runtime::youki::YoukiRuntime::new(state_root.clone(), work_root, cgroup_parent)
                        .with_context(|| {
                            format!("container runtime in {}", state_root.display())
                        })?;
                if let Some(helper) = helper {
                    runtime = runtime.with_helper(helper);
                }
                let images = image::ImageStore::with_settings(images_dir.clone(), pull)
                    .with_context(|| format!("image store in {}", images_dir.display()))?;
                anyhow::Ok((runtime, images))
            })
            .await
            .context("setting up the runtime")??;
            run_with(config, Arc::new(runtime), Arc::new(images), shutdown).await
        }
        RuntimeKind::Fake => {
            let runtime = runtime::fake::FakeRuntime::new();
            let images = image::FakeImages;
            run_with(config, Arc::new(runtime), Arc::new(images), shutdown).await
        }
    }
}

/// [`run`] with a given runtime and image source (tests pass fakes they
/// keep a handle on).
pub async fn run_with<R: Runtime, I: Images>(
    config: Config,
    runtime: Arc<R>,
    images: Arc<I>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    // A child token: an error here stops our tasks without cancelling the
    // caller's token.
    let token = shutdown.child_token();
    let result = agent(config, runtime, images, &tracker, token.clone()).await;
    token.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

async fn agent<R: Runtime, I: Images>(
    config: Config,
    runtime: Arc<R>,
    images: Arc<I>,
    tracker: &TaskTracker,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let node = config.node.as_str().to_owned();
    let (store, loaded, info, keyring) = {
        let data_dir = config.data_dir.clone();
        let run_dir = config.run_dir.clone();
        let labels = config.labels.clone();
        let node = node.clone();
        tokio::task::spawn_blocking(move || {
            let store = StateStore::open(&data_dir)
                .with_context(|| format!("data directory {}", data_dir.display()))?;
            let loaded = store.load(&node);
            // A broken key file must not stop the pods that need no secret.
            let keyring = secrets::Keyring::load(&node, &data_dir, &run_dir).unwrap_or_else(|e| {
                tracing::error!("{e}: secret volumes and pull secrets cannot be opened");
                secrets::Keyring::new(&node, &run_dir, None)
            });
            anyhow::Ok((store, loaded, node_info::gather(&labels), keyring))
        })
        .await
        .context("loading the stored state")??
    };
    if loaded.is_none() {
        tracing::info!("no stored desired state; waiting for the controller");
    }
    let memory_total = info.memory_bytes;
    let mut accepted = loaded.as_ref().map(|d| d.generation);
    let instance: u64 = rand::random();

    let timing = ReportTiming {
        debounce: STATUS_DEBOUNCE,
        resync: config.resync,
    };
    let (reports, status) = report::spawn(
        node.clone(),
        instance,
        info,
        accepted.unwrap_or(0),
        timing,
        tracker,
        token.clone(),
    );
    node_info::spawn_health(
        config.data_dir.clone(),
        memory_total,
        reports.clone(),
        tracker,
        token.clone(),
    );
    let logs = Arc::new(Logs::new(&config.data_dir, config.logs));
    logs::spawn_rotation(Arc::clone(&logs), tracker, token.clone());
    let settings = reconciler::Settings {
        data_dir: config.data_dir.clone(),
        stop_grace: config.stop_grace,
        secrets: keyring,
    };
    let execs = Arc::new(exec::Execs::new(Arc::clone(&runtime), &node, &config.trust));
    let reconciler = reconciler::spawn(
        runtime,
        images,
        settings,
        loaded,
        reports.clone(),
        tracker,
        token.clone(),
    );

    let (desired_tx, mut desired_rx) = mpsc::channel(4);
    let (request_tx, request_rx) = mpsc::channel(RPC_QUEUE);
    let (response_tx, response_rx) = mpsc::channel(RPC_QUEUE);
    let rpc = session::RpcChannels {
        requests: request_tx,
        responses: response_rx,
    };
    tracker.spawn(serve_rpc(
        logs,
        execs,
        request_rx,
        response_tx,
        tracker.clone(),
        token.clone(),
    ));
    let session = session::SessionConfig {
        broker: config.broker.clone(),
        node: node.clone(),
        topics: Topics::new(&config.topic_prefix),
        keepalive: config.keepalive,
        instance,
        password: config.password.clone(),
    };
    session::spawn(session, status, desired_tx, rpc, tracker, token.clone())
        .context("starting the mqtt session")?;
    tracing::info!(node = %node, instance, "agent started");

    loop {
        let frame = tokio::select! {
            () = token.cancelled() => return Ok(()),
            frame = desired_rx.recv() => frame,
        };
        let Some(frame) = frame else {
            // The session ends only at shutdown.
            return Ok(());
        };
        let (verdict, frame) = state::judge_signed(&frame, &node, accepted, &config.trust);
        match verdict {
            Verdict::Refuse(e) => {
                tracing::warn!("refused desired state: {e}");
                report(&reports, None, Some(e.to_string())).await;
            }
            Verdict::Unchanged => {
                tracing::debug!(generation = ?accepted, "desired state unchanged");
                report(&reports, None, None).await;
            }
            Verdict::Stale { generation } => {
                // The controller only moves forward and the broker retains
                // its latest state: an older one is a replay, worth telling.
                let e = format!(
                    "refused desired state generation {generation}: older than the accepted generation {}",
                    accepted.unwrap_or_default()
                );
                tracing::warn!("{e}");
                report(&reports, None, Some(e)).await;
            }
            Verdict::Accept(desired) => {
                let generation = desired.generation;
                tracing::info!(
                    generation,
                    pods = desired.pods.len(),
                    "accepted desired state"
                );
                let store = store.clone();
                let saved = tokio::task::spawn_blocking(move || store.save(&frame)).await;
                match saved {
                    Ok(Ok(())) => {}
                    // Running the new state matters more than remembering
                    // it; the controller sends it again after a restart.
                    Ok(Err(e)) => tracing::error!("storing desired state: {e}; running it anyway"),
                    Err(e) => tracing::error!("storing desired state: {e}; running it anyway"),
                }
                accepted = Some(generation);
                reconciler
                    .apply(desired)
                    .await
                    .context("handing the desired state to the reconciler")?;
                report(&reports, Some(generation), None).await;
            }
        }
    }
}

/// Answers rpc requests until `shutdown`: log reads one at a time, each on
/// a blocking thread (they read files); execs each in a task of their own
/// (they last up to their timeout), [`exec`] bounding how many run.
async fn serve_rpc<R: Runtime>(
    logs: Arc<Logs>,
    execs: Arc<exec::Execs<R>>,
    mut requests: mpsc::Receiver<Vec<u8>>,
    responses: mpsc::Sender<Vec<u8>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            () = shutdown.cancelled() => return,
            frame = requests.recv() => frame,
        };
        let Some(frame) = frame else { return };
        let answer = match flotilla_proto::decode::<RpcRequest>(&frame) {
            Ok(RpcRequest {
                id,
                call: RpcCall::Exec(signed),
            }) => {
                let execs = Arc::clone(&execs);
                let responses = responses.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    let response = tokio::select! {
                        // The command is killed at its own deadline.
                        () = shutdown.cancelled() => return,
                        r = exec::serve(execs, id, signed) => r,
                    };
                    if let Some(frame) = encode_response(response) {
                        let _ = responses.send(frame).await;
                    }
                });
                continue;
            }
            Ok(RpcRequest {
                id,
                call: RpcCall::Logs(request),
            }) => {
                let logs = Arc::clone(&logs);
                let read = tokio::task::spawn_blocking(move || logs.read(&request)).await;
                let Ok(read) = read else { return };
                let result = match read {
                    Ok(chunk) => RpcResult::Logs {
                        data: chunk.data,
                        next: chunk.next,
                    },
                    Err(e) => RpcResult::Error {
                        message: e.to_string(),
                    },
                };
                encode_response(RpcResponse { id, result })
            }
            Err(e) => refusal(&frame, &e).and_then(encode_response),
        };
        if let Some(answer) = answer
            && responses.send(answer).await.is_err()
        {
            return;
        }
    }
}

/// The answer to a request frame that did not decode; `None` when it is too
/// broken to say which request it was.
fn refusal(frame: &[u8], e: &flotilla_proto::DecodeError) -> Option<RpcResponse> {
    // The id comes first: answering a request whose call is malformed
    // spares its caller the timeout.
    let id = match frame.split_first() {
        Some((&WIRE_VERSION, body)) if frame.len() <= RpcRequest::MAX_BYTES => {
            postcard::take_from_bytes::<u64>(body)
                .ok()
                .map(|(id, _)| id)
        }
        _ => None,
    };
    tracing::warn!(?id, "refused an rpc request: {e}");
    Some(RpcResponse {
        id: id?,
        result: RpcResult::Error {
            message: format!("refused: {e}"),
        },
    })
}

/// The response's frame; an error in its place when it does not fit.
fn encode_response(response: RpcResponse) -> Option<Vec<u8>> {
    let id = response.id;
    match flotilla_proto::encode(&response) {
        Ok(frame) => Some(frame),
        Err(e) => {
            tracing::error!(id, "rpc response: {e}");
            let error = RpcResponse {
                id,
                result: RpcResult::Error {
                    message: format!("the answer could not be sent: {e}"),
                },
            };
            flotilla_proto::encode(&error).ok()
        }
    }
}

async fn report(reports: &ReportHandle, generation: Option<u64>, error: Option<String>) {
    if let Err(e) = reports.desired(generation, error).await {
        tracing::debug!("{e}");
    }
}
