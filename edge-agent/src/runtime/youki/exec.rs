//! Commands run inside a running container (exec probes): libcontainer's
//! tenant builder joins the container's namespaces and cgroup with the
//! container's own user, environment and working directory; the process is
//! the agent's child, watched through a pidfd and killed at its deadline.
//! libcontainer makes it a session (and process group) leader, so whatever
//! it started is killed with it: a probe never leaves processes behind.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use oci_spec::runtime::Spec;

use super::process::{InitProcess, Reaped};
use super::{KILL_PATIENCE, helper, seccomp, serial};
use crate::runtime::RuntimeError;

/// Prefix of the sockets the tenant builder leaves in the container's state
/// directory, one per exec.
const NOTIFY_PREFIX: &str = "tenant-notify-";

/// Cap on a command's argv, as for a container's own process.
const MAX_ARGV_BYTES: usize = 64 * 1024;

/// Runs `argv` in container `id` (whose libcontainer state is under
/// `state_root` and bundle at `bundle`); its exit code, 128 + signal when a
/// signal ended it.
pub(super) fn run(
    helper: &Path,
    state_root: &Path,
    bundle: &Path,
    id: &str,
    argv: &[String],
    timeout: Duration,
) -> Result<i32, RuntimeError> {
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
    // The container's own process settings: probes run as it does.
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

    let pid = {
        let request = helper::Request::Exec {
            state_root,
            id,
            cwd: &cwd,
            uid,
            gid,
            seccomp: filter,
            argv,
        };
        let pid = helper::call(helper, &request);
        // libcontainer leaves the tenant's notify socket behind; no other
        // exec of this container uses it once its process runs.
        let _serial = serial();
        remove_notify_sockets(&state_root.join(id));
        pid.map_err(other)?
    };
    let process = InitProcess::open(pid, None)
        .map_err(|e| other(e.to_string()))?
        .ok_or_else(|| other(format!("process {pid} vanished before it could be watched")))?;
    let left = deadline.saturating_duration_since(Instant::now());
    let exited = process.wait_exit(left).map_err(|e| other(e.to_string()))?;
    // The leader is not reaped yet, so its pid (the group's id) cannot have
    // been reused: the group is still the command's. An empty group (ESRCH)
    // is the usual case.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    if !exited {
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
        return Err(RuntimeError::Timeout {
            id: id.to_owned(),
            op: "exec",
            after: timeout,
        });
    }
    match process.reap().map_err(|e| other(e.to_string()))? {
        Reaped::Exited(code) => Ok(code),
        Reaped::Signaled(signal) => Ok(128 + signal),
        Reaped::NotChild => Err(other(format!("the exit status of process {pid} was lost"))),
    }
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
