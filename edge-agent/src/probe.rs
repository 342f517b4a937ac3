//! Container probes: each check (`exec` inside the container through the
//! runtime; `tcp` and `http` to 127.0.0.1, since pods share the host's
//! network), and the schedule of a container's probes with Kubernetes'
//! rules — the startup probe first, alone; then liveness and readiness, each
//! on its own period, with consecutive-success and -failure thresholds. The
//! pod task hears only outcomes ([`ProbeEvent`]).

use std::fmt;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{ContainerSpec, Probe, ProbeAction};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::task::TaskTracker;

use crate::runtime::{Runtime, RuntimeError};

/// Bytes of an HTTP answer read to find its status line.
const MAX_STATUS_LINE: usize = 1024;

/// Which probe an outcome is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// Holds the other two back until it passes once.
    Startup,
    /// Restarts the container when it fails.
    Liveness,
    /// Decides whether the container is ready.
    Readiness,
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Startup => "startup",
            Self::Liveness => "liveness",
            Self::Readiness => "readiness",
        })
    }
}

/// What the probes of one container run tell its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEvent {
    /// The container became ready, or stopped being ready.
    Ready(bool),
    /// The startup or liveness probe failed `failure_threshold` times in a
    /// row: the container is to be restarted. Probing has stopped.
    Failed {
        /// Startup or liveness.
        kind: ProbeKind,
        /// The last check's failure.
        message: String,
    },
}

/// The probes of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probes {
    /// Startup probe.
    pub startup: Option<Probe>,
    /// Liveness probe.
    pub liveness: Option<Probe>,
    /// Readiness probe.
    pub readiness: Option<Probe>,
}

impl Probes {
    /// The probes of `spec`.
    pub fn of(spec: &ContainerSpec) -> Self {
        Self {
            startup: spec.startup_probe.clone(),
            liveness: spec.liveness_probe.clone(),
            readiness: spec.readiness_probe.clone(),
        }
    }

    /// Whether there is none (the container is ready once it runs).
    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.liveness.is_none() && self.readiness.is_none()
    }
}

/// Performs one check.
pub trait Check: Send + Sync + 'static {
    /// `Ok` when the check passes; else why not, for people.
    fn check(
        &self,
        action: &ProbeAction,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// Checks of one container: exec through the runtime, tcp and http on the
/// loopback.
pub struct ContainerCheck<R> {
    runtime: Arc<R>,
    id: String,
    tracker: TaskTracker,
}

impl<R: Runtime> ContainerCheck<R> {
    /// Checks for container `id`; exec runs on blocking threads of `tracker`.
    pub fn new(runtime: Arc<R>, id: String, tracker: TaskTracker) -> Self {
        Self {
            runtime,
            id,
            tracker,
        }
    }
}

impl<R: Runtime> Check for ContainerCheck<R> {
    async fn check(&self, action: &ProbeAction, timeout: Duration) -> Result<(), String> {
        match action {
            ProbeAction::Exec { command } => {
                let (runtime, id, argv) = (self.runtime.clone(), self.id.clone(), command.clone());
                // The runtime kills the command at the timeout itself.
                let result = self
                    .tracker
                    .spawn_blocking(move || runtime.exec(&id, &argv, timeout))
                    .await
                    .map_err(|e| format!("exec task failed: {e}"))?;
                match result {
                    Ok(0) => Ok(()),
                    Ok(code) => Err(format!("command exited with code {code}")),
                    Err(RuntimeError::Timeout { after, .. }) => {
                        Err(format!("command timed out after {after:?}"))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            ProbeAction::Tcp { port } => {
                match tokio::time::timeout(
                    timeout,
                    TcpStream::connect((Ipv4Addr::LOCALHOST, *port)),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("connecting to 127.0.0.1:{port}: {e}")),
                    Err(_) => Err(format!(
                        "connecting to 127.0.0.1:{port}: timed out after {timeout:?}"
                    )),
                }
            }
            ProbeAction::Http { port, path } => {
                match tokio::time::timeout(timeout, http_status(*port, path)).await {
                    Ok(Ok(status)) if (200..400).contains(&status) => Ok(()),
                    Ok(Ok(status)) => Err(format!("GET {path} on port {port}: status {status}")),
                    Ok(Err(e)) => Err(format!("GET {path} on port {port}: {e}")),
                    Err(_) => Err(format!(
                        "GET {path} on port {port}: timed out after {timeout:?}"
                    )),
                }
            }
        }
    }
}

/// The status code of `GET {path}` on 127.0.0.1:`port` (HTTP/1.1, the
/// connection closed after the answer).
pub async fn http_status(port: u16, path: &str) -> Result<u16, String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: flotilla-probe/1\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    let line_end = loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Err(format!(
                "no status line in the first {MAX_STATUS_LINE} bytes"
            ));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            // A status line cut by the end of the stream still counts.
            break buf.len();
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    parse_status_line(&buf[..line_end]).ok_or_else(|| {
        format!(
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&buf[..line_end.min(80)])
        )
    })
}

/// `HTTP/1.x NNN reason` → NNN.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    let version = parts.next()?;
    let code = parts.next()?;
    (version.starts_with("HTTP/") && code.len() == 3)
        .then(|| code.parse().ok())
        .flatten()
        .filter(|c| (100..600).contains(c))
}

/// Runs the probes of a container that started at `started` until the
/// startup or liveness probe fails (after sending [`ProbeEvent::Failed`]),
/// or forever; the caller cancels it when the container stops. Sends
/// `wrap(event)` on `events`. A container that has no readiness probe is
/// reported ready once its startup probe passes.
pub async fn run<C: Check, T>(
    probes: Probes,
    check: C,
    started: Instant,
    events: mpsc::Sender<T>,
    wrap: impl Fn(ProbeEvent) -> T,
) {
    let send = |e: ProbeEvent| {
        let msg = wrap(e);
        let events = events.clone();
        async move {
            // The pod task is gone: nothing to tell.
            let _ = events.send(msg).await;
        }
    };
    if let Some(p) = &probes.startup {
        if let Err(message) = startup(p, &check, started).await {
            send(ProbeEvent::Failed {
                kind: ProbeKind::Startup,
                message,
            })
            .await;
            return;
        }
    }
    if probes.readiness.is_none() {
        send(ProbeEvent::Ready(true)).await;
    }
    let live = async {
        match &probes.liveness {
            Some(p) => {
                let message = liveness(p, &check, started).await;
                send(ProbeEvent::Failed {
                    kind: ProbeKind::Liveness,
                    message,
                })
                .await;
            }
            None => std::future::pending().await,
        }
    };
    let ready = async {
        match &probes.readiness {
            Some(p) => readiness(p, &check, started, &send).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = live => {}
        () = ready => {}
    }
}

/// When a probe first runs: its initial delay after the container started,
/// but never before now (the startup probe may have taken longer).
fn first_run(p: &Probe, started: Instant) -> Instant {
    (started + secs(p.initial_delay_secs)).max(Instant::now())
}

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

/// One check, bounded by the probe's timeout. The period counts from the
/// start of a check to the start of the next.
async fn once<C: Check>(p: &Probe, check: &C, next: &mut Instant) -> Result<(), String> {
    sleep_until(*next).await;
    let began = Instant::now();
    let timeout = secs(p.timeout_secs);
    // Exec checks are bounded by the runtime itself; the margin lets its own
    // timeout (and the killing) happen first.
    let result = match tokio::time::timeout(
        timeout + Duration::from_secs(5),
        check.check(&p.action, timeout),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(format!("no result after {timeout:?}")),
    };
    *next = began + secs(p.period_secs);
    result
}

async fn startup<C: Check>(p: &Probe, check: &C, started: Instant) -> Result<(), String> {
    let mut next = first_run(p, started);
    let mut failures = 0;
    loop {
        match once(p, check, &mut next).await {
            Ok(()) => return Ok(()),
            Err(m) => {
                failures += 1;
                tracing::debug!(failures, "startup probe failed: {m}");
                if failures >= p.failure_threshold {
                    return Err(m);
                }
            }
        }
    }
}

/// Returns the last failure once `failure_threshold` checks failed in a row.
async fn liveness<C: Check>(p: &Probe, check: &C, started: Instant) -> String {
    let mut next = first_run(p, started);
    let mut failures = 0;
    loop {
        match once(p, check, &mut next).await {
            Ok(()) => failures = 0,
            Err(m) => {
                failures += 1;
                tracing::debug!(failures, "liveness probe failed: {m}");
                if failures >= p.failure_threshold {
                    return m;
                }
            }
        }
    }
}

async fn readiness<C: Check, F: Future<Output = ()>>(
    p: &Probe,
    check: &C,
    started: Instant,
    send: &impl Fn(ProbeEvent) -> F,
) {
    let mut next = first_run(p, started);
    let (mut ready, mut successes, mut failures) = (false, 0, 0);
    loop {
        match once(p, check, &mut next).await {
            Ok(()) => {
                failures = 0;
                successes += 1;
                if !ready && successes >= p.success_threshold {
                    ready = true;
                    send(ProbeEvent::Ready(true)).await;
                }
            }
            Err(m) => {
                successes = 0;
                failures += 1;
                tracing::debug!(failures, "readiness probe failed: {m}");
                if ready && failures >= p.failure_threshold {
                    ready = false;
                    send(ProbeEvent::Ready(false)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Tcp and http checks use no runtime: the fake one stands in.
    fn loopback() -> ContainerCheck<crate::runtime::fake::FakeRuntime> {
        ContainerCheck::new(
            Arc::new(crate::runtime::fake::FakeRuntime::new()),
            "none".into(),
            TaskTracker::new(),
        )
    }

    /// Serves one connection per answer, each answered with `answer`
    /// after the request's head was read.
    async fn serve(answers: Vec<&'static str>) -> (u16, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut requests = Vec::new();
            for answer in answers {
                let (stream, _) = listener.accept().await.unwrap();
                let mut reader = tokio::io::BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                requests.push(line.trim_end().to_owned());
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).await.unwrap();
                    if header == "\r\n" || header.is_empty() {
                        break;
                    }
                }
                reader.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
            requests
        });
        (port, task)
    }

    #[tokio::test]
    async fn http_checks_pass_on_2xx_and_3xx_only() {
        let (port, server) = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.0 302 Found\r\n\r\n",
            "HTTP/1.1 503 Service Unavailable\r\n\r\n",
            "garbage\r\n",
        ])
        .await;
        let c = loopback();
        let t = Duration::from_secs(5);
        let get = |path: &str| ProbeAction::Http {
            port,
            path: path.into(),
        };
        assert_eq!(c.check(&get("/healthz"), t).await, Ok(()));
        assert_eq!(c.check(&get("/moved?x=1"), t).await, Ok(()));
        assert_eq!(
            c.check(&get("/"), t).await,
            Err(format!("GET / on port {port}: status 503"))
        );
        assert_eq!(
            c.check(&get("/"), t).await,
            Err(format!(
                "GET / on port {port}: not an HTTP answer: \"garbage\""
            ))
        );
        assert_eq!(
            server.await.unwrap(),
            [
                "GET /healthz HTTP/1.1",
                "GET /moved?x=1 HTTP/1.1",
                "GET / HTTP/1.1",
                "GET / HTTP/1.1"
            ]
        );
    }

    #[tokio::test]
    async fn http_and_tcp_checks_time_out_and_fail_on_closed_ports() {
        // Accepts but never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let c = loopback();
        let t = Duration::from_millis(200);
        assert_eq!(c.check(&ProbeAction::Tcp { port }, t).await, Ok(()));
        assert_eq!(
            c.check(
                &ProbeAction::Http {
                    port,
                    path: "/".into()
                },
                t
            )
            .await,
            Err(format!("GET / on port {port}: timed out after 200ms"))
        );
        drop(silent);
        let err = c.check(&ProbeAction::Tcp { port }, t).await.unwrap_err();
        assert!(
            err.starts_with(&format!("connecting to 127.0.0.1:{port}: ")),
            "{err}"
        );
        assert!(err.contains("refused"), "{err}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 404"), Some(404));
        for bad in [&b"HTTP/1.1 20 OK"[..], b"SSH-2.0-x", b"HTTP/1.1 999 x", b""] {
            assert_eq!(parse_status_line(bad), None, "{bad:?}");
        }
    }
}
