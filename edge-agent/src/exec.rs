//! `flotilla exec` on the device: an exec request is judged — signed by the
//! pinned controller key, meant for this node, issued within a window of
//! this node's clock, its nonce never seen within that window — and only
//! then run in the container, through the runtime's exec path (the
//! container's user, seccomp filter and capabilities), at most
//! [`MAX_RUNNING`] at once, on blocking threads, its output kept in memory
//! up to a cap. A refused request runs nothing and is logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_proto::{
    DecodeError, ExecRequest, ExecResult, NameError, RpcResponse, RpcResult, SignedExec,
    check_name, decode,
};
use ring::signature::{ED25519, UnparsedPublicKey};

use crate::config::Trust;
use crate::runtime::{Runtime, RuntimeError};

/// Commands running at once on this node; more are refused as busy.
pub const MAX_RUNNING: usize = 4;
/// How far a request's issue time may be from this node's clock, either way.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Nonces remembered at once. A nonce is kept twice the window (a request
/// accepted now could be replayed while the clock is within the window of
/// its issue time); past this many, requests are refused rather than a
/// nonce forgotten early.
pub const MAX_SEEN: usize = 1024;
/// How much earlier than this agent's start a request may be issued: the
/// start is known to the millisecond, the issue time to the controller's.
const START_SLACK: Duration = Duration::from_secs(1);

/// Why an exec request was refused or could not run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The agent runs with `--insecure-unsigned`: nothing can prove a request.
    #[error(
        "refused exec request: this agent has no pinned controller key (--insecure-unsigned), so it runs no commands"
    )]
    NoKey,
    /// The payload is not an exec request.
    #[error("refused exec request: {0}")]
    Decode(#[from] DecodeError),
    /// Not signed by the pinned controller key.
    #[error("refused exec request: bad signature (not signed by the pinned controller key)")]
    BadSignature,
    /// Signed for another node.
    #[error("refused exec request: meant for node {got:?}, this is {expected:?}")]
    WrongNode { got: String, expected: String },
    /// Issued too long ago, or in the future, by this node's clock.
    #[error(
        "refused exec request: issued {skew_secs} s {when} this node's clock, over the {} s allowed (expired, or the clocks differ)",
        WINDOW.as_secs()
    )]
    OutsideWindow { skew_secs: u64, when: &'static str },
    /// Its nonce ran already.
    #[error("refused exec request: already seen (a replay)")]
    Replay,
    /// Issued before this agent started: its nonces were not kept across
    /// the restart, so it may have run already.
    #[error(
        "refused exec request: issued before this agent started (it may have run before the restart); send it again"
    )]
    BeforeStart,
    /// Too many nonces to remember.
    #[error(
        "refused exec request: more than {MAX_SEEN} exec requests in the last {} minutes",
        2 * WINDOW.as_secs() / 60
    )]
    TooMany,
    /// A pod or container name that breaks the name rules.
    #[error("refused exec request: {what} {name:?}: {error}")]
    BadName {
        what: &'static str,
        name: String,
        error: NameError,
    },
    /// The command breaks the caps.
    #[error("refused exec request: command: {0}")]
    BadCommand(&'static str),
    /// A timeout of zero or over the cap.
    #[error(
        "refused exec request: timeout of {ms} ms (expected 1 to {max} ms)",
        max = ExecRequest::MAX_TIMEOUT_MS
    )]
    BadTimeout { ms: u32 },
    /// Too many commands running already.
    #[error("busy: {MAX_RUNNING} commands already run on this node; try again")]
    Busy,
    /// No container of that name in that pod on this node.
    #[error("pod {pod} has no container {container} on this node")]
    NoContainer { pod: String, container: String },
    /// The command is not in the container's image.
    #[error(
        "command {command:?} not found in container {container} of pod {pod} (not in the image's $PATH)"
    )]
    CommandNotFound {
        command: String,
        pod: String,
        container: String,
    },
    /// The container exists but its process does not run.
    #[error("container {container} of pod {pod} is not running")]
    NotRunning { pod: String, container: String },
    /// The runtime could not run the command.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// The exec side of the agent: the key, the nonces seen, the commands running.
pub struct Execs<R> {
    runtime: Arc<R>,
    node: String,
    key: Option<[u8; 32]>,
    /// Nonce → when it may be forgotten.
    seen: Mutex<HashMap<[u8; 16], Instant>>,
    running: Arc<AtomicUsize>,
    /// When this agent started (monotonic): nonces live in memory only.
    started: Instant,
}

/// A slot among the [`MAX_RUNNING`]; freed when dropped.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<R: Runtime> Execs<R> {
    /// Execs for `node`, checked against `trust`.
    pub fn new(runtime: Arc<R>, node: &str, trust: &Trust) -> Self {
        Self {
            runtime,
            node: node.to_owned(),
            key: match trust {
                Trust::Pinned(key) => Some(*key),
                Trust::Unverified => None,
            },
            seen: Mutex::new(HashMap::new()),
            running: Arc::new(AtomicUsize::new(0)),
            started: Instant::now(),
        }
    }

    /// Judges `signed` at wall-clock time `now` (monotonic `mono`): the
    /// request, once it passed every check and its nonce is recorded. The
    /// signature is checked before anything in the payload is read.
    pub fn judge(
        &self,
        signed: &SignedExec,
        now: SystemTime,
        mono: Instant,
    ) -> Result<ExecRequest, ExecError> {
        let key = self.key.ok_or(ExecError::NoKey)?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(
                &SignedExec::signed_bytes(&signed.payload),
                &signed.signature.0,
            )
            .map_err(|_| ExecError::BadSignature)?;
        let request = decode::<ExecRequest>(&signed.payload)?;
        if request.node != self.node {
            return Err(ExecError::WrongNode {
                got: request.node,
                expected: self.node.clone(),
            });
        }
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let (skew, when) = if request.issued_at_ms > now_ms {
            (request.issued_at_ms - now_ms, "ahead of")
        } else {
            (now_ms - request.issued_at_ms, "behind")
        };
        if u128::from(skew) > WINDOW.as_millis() {
            return Err(ExecError::OutsideWindow {
                skew_secs: skew / 1000,
                when,
            });
        }
        // The nonces seen before a restart are gone: a request issued
        // before this agent started could be a replay of one that ran.
        // The start is reckoned on the wall clock of now (now minus the
        // monotonic uptime), so a clock stepped since start moves it too.
        let up = mono.saturating_duration_since(self.started) + START_SLACK;
        let started_ms = now_ms.saturating_sub(u64::try_from(up.as_millis()).unwrap_or(u64::MAX));
        if request.issued_at_ms < started_ms {
            return Err(ExecError::BeforeStart);
        }
        for (what, name) in [("pod", &request.pod), ("container", &request.container)] {
            check_name(name).map_err(|error| ExecError::BadName {
                what,
                name: name.clone(),
                error,
            })?;
        }
        if let Some(problem) = ExecRequest::argv_problem(&request.argv) {
            return Err(ExecError::BadCommand(problem));
        }
        if request.timeout_ms == 0 || request.timeout_ms > ExecRequest::MAX_TIMEOUT_MS {
            return Err(ExecError::BadTimeout {
                ms: request.timeout_ms,
            });
        }
        self.remember(request.nonce, mono)?;
        Ok(request)
    }

    /// Records `nonce` as seen at `mono`; refuses one seen already.
    fn remember(&self, nonce: [u8; 16], mono: Instant) -> Result<(), ExecError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, until| *until > mono);
        if seen.contains_key(&nonce) {
            return Err(ExecError::Replay);
        }
        if seen.len() >= MAX_SEEN {
            return Err(ExecError::TooMany);
        }
        seen.insert(nonce, mono + 2 * WINDOW);
        Ok(())
    }

    /// Takes one of the [`MAX_RUNNING`] slots.
    pub fn slot(&self) -> Result<Slot, ExecError> {
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_RUNNING).then_some(n + 1)
            })
            .map_err(|_| ExecError::Busy)?;
        Ok(Slot(Arc::clone(&self.running)))
    }

    /// Runs a judged request in its container. Blocking: call it on a
    /// blocking thread.
    pub fn run(&self, request: &ExecRequest) -> Result<ExecResult, ExecError> {
        let id = self.container_id(&request.pod, &request.container)?;
        let timeout = Duration::from_millis(u64::from(request.timeout_ms));
        let ran = self
            .runtime
            .exec_output(&id, &request.argv, timeout, ExecRequest::MAX_OUTPUT);
        match ran {
            Ok(result) => Ok(result),
            // libcontainer checks the command against the image's $PATH
            // before it execs: say so plainly rather than through its chain.
            Err(RuntimeError::Other { reason, .. }) if reason.contains("not found in $PATH") => {
                Err(ExecError::CommandNotFound {
                    command: request.argv.first().cloned().unwrap_or_default(),
                    pod: request.pod.clone(),
                    container: request.container.clone(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The runtime id of the running container `container` of `pod`
    /// (`{pod}.{container}.{hash}`; names hold no dots).
    fn container_id(&self, pod: &str, container: &str) -> Result<String, ExecError> {
        let prefix = format!("{pod}.{container}.");
        let found: Vec<_> = self
            .runtime
            .list()?
            .into_iter()
            .filter(|c| c.id.starts_with(&prefix))
            .collect();
        let names = || (pod.to_owned(), container.to_owned());
        match found.iter().find(|c| c.running) {
            Some(c) => Ok(c.id.clone()),
            None if found.is_empty() => {
                let (pod, container) = names();
                Err(ExecError::NoContainer { pod, container })
            }
            None => {
                let (pod, container) = names();
                Err(ExecError::NotRunning { pod, container })
            }
        }
    }
}

/// Serves one exec request `id` to completion: judged, run on a blocking
/// thread in a slot, answered. Every request is logged (never its output).
pub async fn serve<R: Runtime>(execs: Arc<Execs<R>>, id: u64, signed: SignedExec) -> RpcResponse {
    let judged = execs
        .judge(&signed, SystemTime::now(), Instant::now())
        .and_then(|request| Ok((execs.slot()?, request)));
    let (slot, request) = match judged {
        Ok(judged) => judged,
        Err(e) => {
            tracing::warn!(id, "{e}");
            return error(id, e.to_string());
        }
    };
    tracing::info!(
        id,
        pod = %request.pod,
        container = %request.container,
        command = %request.argv.first().map_or("", String::as_str),
        timeout_ms = request.timeout_ms,
        "exec"
    );
    let ran = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        execs.run(&request)
    })
    .await;
    match ran {
        Ok(Ok(result)) => {
            tracing::info!(id, end = ?result.end, "exec finished");
            RpcResponse {
                id,
                result: RpcResult::Exec(result),
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(id, "exec failed: {e}");
            error(id, e.to_string())
        }
        Err(e) => {
            tracing::error!(id, "exec task: {e}");
            error(id, format!("exec task failed: {e}"))
        }
    }
}

fn error(id: u64, message: String) -> RpcResponse {
    RpcResponse {
        id,
        result: RpcResult::Error { message },
    }
}

#[cfg(test)]
mod tests;
