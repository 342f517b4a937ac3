//! Commands run inside a running container (exec probes, `flotilla exec`):
//! libcontainer's tenant builder joins the container's namespaces and
//! cgroup with the container's own user, environment and working directory;
//! the process is the agent's child, watched through a pidfd and killed at
//! its deadline. libcontainer makes it a session (and process group) leader,
//! so whatever it started is killed with it: an exec never leaves processes
//! behind. Output is discarded (probes) or read through pipes into capped
//! buffers, in memory only.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_proto::{ExecEnd, ExecResult};
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, pipe2};
use oci_spec::runtime::Spec;

use super::process::{InitProcess, Reaped};
use super::{KILL_PATIENCE, YoukiRuntime, check_id, helper, seccomp, serial};
use crate::runtime::RuntimeError;

/// Prefix of the sockets the tenant builder leaves in the container's state
/// directory, one per exec.
const NOTIFY_PREFIX: &str = "tenant-notify-";

/// Cap on a command's argv, as for a container's own process.
const MAX_ARGV_BYTES: usize = 64 * 1024;

impl YoukiRuntime {
    /// Runs `argv` in the running container `id` ([`run`]).
    pub(super) fn exec_in(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
        capture: Option<usize>,
    ) -> Result<ExecResult, RuntimeError> {
        check_id(id).map_err(|_| RuntimeError::NotFound { id: id.to_owned() })?;
        let loaded = self
            .inner
            .load(id)?
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_owned() })?;
        let init = match loaded.pid {
            Some(pid) if loaded.started => self.inner.open_init(id, pid)?,
            _ => None,
        };
        if !init.is_some_and(|i| i.is_running().unwrap_or(false)) {
            return Err(RuntimeError::Other {
                id: id.to_owned(),
                op: "exec",
                reason: "the container is not running".into(),
            });
        }
        run(
            &self.helper,
            &self.inner.state_root,
            &self.inner.bundle(id),
            id,
            argv,
            timeout,
            capture,
        )
    }
}

/// Runs `argv` in container `id` (whose libcontainer state is under
/// `state_root` and bundle at `bundle`) until it exits or `timeout` passes
/// (then it is killed, with its process group). With `capture`, its stdout
/// and stderr are read through pipes, at most that many bytes of each kept;
/// without, they go to `/dev/null` and the result holds no output.
fn run(
    helper: &Path,
    state_root: &Path,
    bundle: &Path,
    id: &str,
    argv: &[String],
    timeout: Duration,
    capture: Option<usize>,
) -> Result<ExecResult, RuntimeError> {
    let deadline = Instant::now() + timeout;
    let other = |reason: String| RuntimeError::Other {
        id: id.to_owned(),
        op: "exec",
        reason,
    };
    if argv.first().is_none_or(String::is_empty) {
        return Err(other("empty command".into()));
    }
    let bytes: usize = argv.iter().map(|a| a.len() + 1).sum();
    if bytes > MAX_ARGV_BYTES {
        return Err(other(format!(
            "command of {bytes} bytes, over the {MAX_ARGV_BYTES}-byte limit"
        )));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(other("command contains a NUL byte".into()));
    }
    // The container's own process settings: execs run as it does.
    let spec = Spec::load(bundle.join("config.json"))
        .map_err(|e| other(format!("reading the container's config.json: {e}")))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| other("config.json has no process".into()))?;
    let (uid, gid) = (process.user().uid(), process.user().gid());
    let cwd = process.cwd().clone();
    // The container's own filter, or none if it runs without one.
    let filter = bundle.join(seccomp::FILE_NAME);
    let filter = filter.exists().then_some(filter.as_path());
    let pipes = match capture {
        Some(_) => {
            let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| other(format!("making a pipe: {e}")));
            Some((pipe()?, pipe()?))
        }
        None => None,
    };

    let pid = {
        let request = helper::Request::Exec {
            state_root,
            id,
            cwd: &cwd,
            uid,
            gid,
            seccomp: filter,
            argv,
            output: pipes
                .as_ref()
                .map(|((_, out), (_, err))| (out.as_fd(), err.as_fd())),
        };
        let pid = helper::call(helper, &request);
        // libcontainer leaves the tenant's notify socket behind; no other
        // exec of this container uses it once its process runs.
        let _serial = serial();
        remove_notify_sockets(&state_root.join(id));
        pid.map_err(other)?
    };
    // The command holds the write ends now (the helper has exited): ours
    // must go, or the pipes would never reach their end.
    let readers = pipes.map(|((out, _), (err, _))| [out, err]);
    let process = InitProcess::open(pid, None)
        .map_err(|e| other(e.to_string()))?
        .ok_or_else(|| other(format!("process {pid} vanished before it could be watched")))?;
    let mut streams = readers.map(|fds| fds.map(|fd| Stream::new(fd, capture.unwrap_or(0))));
    let exited = match &mut streams {
        Some(streams) => read_until_exit(&process, streams, deadline).map_err(other)?,
        None => {
            let left = deadline.saturating_duration_since(Instant::now());
            process.wait_exit(left).map_err(|e| other(e.to_string()))?
        }
    };
    // The leader is not reaped yet, so its pid (the group's id) cannot have
    // been reused: the group is still the command's. An empty group (ESRCH)
    // is the usual case.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let end = if exited {
        match process.reap().map_err(|e| other(e.to_string()))? {
            Reaped::Exited(code) => ExecEnd::Exited(code),
            Reaped::Signaled(signal) => ExecEnd::Signaled(signal),
            Reaped::NotChild => {
                return Err(other(format!("the exit status of process {pid} was lost")));
            }
        }
    } else {
        process
            .signal(libc::SIGKILL)
            .map_err(|e| other(e.to_string()))?;
        if !process
            .wait_exit(KILL_PATIENCE)
            .map_err(|e| other(e.to_string()))?
        {
            return Err(other(format!(
                "process {pid} still runs {KILL_PATIENCE:?} after SIGKILL"
            )));
        }
        // Reaped so that no zombie is left; its status no longer matters.
        let _ = process.reap();
        ExecEnd::TimedOut
    };
    let mut result = ExecResult {
        end,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_cut: 0,
        stderr_cut: 0,
    };
    if let Some(mut streams) = streams {
        // What the killed group wrote last is still in the pipes; a
        // process that left the group may hold them open: not waited for
        // past a moment.
        drain(&mut streams, Instant::now() + DRAIN).map_err(other)?;
        let [out, err] = streams;
        (result.stdout, result.stdout_cut) = (out.kept, out.cut);
        (result.stderr, result.stderr_cut) = (err.kept, err.cut);
    }
    Ok(result)
}

/// How long the pipes are still read after the command ended.
const DRAIN: Duration = Duration::from_secs(1);
/// Bytes read from a pipe at a time.
const CHUNK: usize = 16 * 1024;

/// One output pipe: what is kept of it, and what was read past the cap.
struct Stream {
    file: Option<File>,
    max: usize,
    kept: Vec<u8>,
    cut: u64,
}

impl Stream {
    fn new(fd: OwnedFd, max: usize) -> Self {
        Self {
            file: Some(File::from(fd)),
            max,
            kept: Vec::new(),
            cut: 0,
        }
    }

    /// Reads what the pipe holds (it polled readable, so this does not
    /// block); at its end, the pipe is closed.
    fn read(&mut self) -> Result<(), String> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let mut buf = [0u8; CHUNK];
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(format!("reading the command's output: {e}")),
        };
        if n == 0 {
            self.file = None;
        }
        let room = self.max.saturating_sub(self.kept.len()).min(n);
        self.kept.extend_from_slice(&buf[..room]);
        self.cut += (n - room) as u64;
        Ok(())
    }
}

/// Reads both pipes while the command runs; true once it has exited,
/// false when `deadline` came first.
fn read_until_exit(
    process: &InitProcess,
    streams: &mut [Stream; 2],
    deadline: Instant,
) -> Result<bool, String> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        if poll(Some(process), streams, deadline - now)? {
            return Ok(true);
        }
    }
}

/// Reads the pipes to their end, or until `deadline`.
fn drain(streams: &mut [Stream; 2], deadline: Instant) -> Result<(), String> {
    while streams.iter().any(|s| s.file.is_some()) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        poll(None, streams, deadline - now)?;
    }
    Ok(())
}

/// One `poll` over the open pipes and, when given, the process's pidfd, for
/// at most `timeout`; reads what is ready. Returns whether the process has
/// exited.
fn poll(
    process: Option<&InitProcess>,
    streams: &mut [Stream; 2],
    timeout: Duration,
) -> Result<bool, String> {
    let mut fds = Vec::with_capacity(3);
    let mut which = Vec::with_capacity(3);
    for (i, s) in streams.iter().enumerate() {
        if let Some(f) = &s.file {
            fds.push(libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            which.push(Some(i));
        }
    }
    if let Some(p) = process {
        fds.push(libc::pollfd {
            fd: p.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        which.push(None);
    }
    if fds.is_empty() {
        return Ok(false);
    }
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    let count = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: `fds` is a valid array of `count` pollfds; the kernel writes
    // only their `revents`.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), count, millis) };
    if ret < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(format!("polling the command's output: {err}"));
    }
    let mut exited = false;
    for (pfd, which) in fds.iter().zip(which) {
        if pfd.revents == 0 {
            continue;
        }
        match which {
            Some(i) => streams[i].read()?,
            None => exited = true,
        }
    }
    Ok(exited)
}

/// Removes the notify sockets of finished tenant builds, which libcontainer
/// leaves behind: one per probe run would pile up. Called under the serial
/// lock, so no build is using one; the process they served is already
/// running.
fn remove_notify_sockets(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(NOTIFY_PREFIX) {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), "removing a tenant socket: {e}");
            }
        }
    }
}
