//! The single-threaded helper process that makes libcontainer's clones.
//!
//! libcontainer creates a container's processes with a raw `clone3`, which
//! skips libc's fork handlers: in a multi-threaded process the child can
//! deadlock on a lock another thread held at that instant (musl's malloc
//! lock; seen as a create that never finished in the emulated aarch64
//! machine under load). So every create and exec runs in a short-lived
//! helper — the agent binary itself, re-executed with [`ARG`] — which has
//! one thread. libcontainer clones with `CLONE_PARENT`, so the container's
//! processes are still the agent's children: it watches and reaps them as
//! before.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;

use super::chain;
use super::devices_v2::{self, Attach};
use super::seccomp::{FilteredExecutor, Program};

/// First argument that makes the agent binary act as the helper.
pub const ARG: &str = "__runtime-helper";

/// The seccomp (or device program) argument that means none.
const NO_SECCOMP: &str = "-";

/// Most bytes of the helper's error output kept for the error message.
const MAX_ERROR_BYTES: usize = 4096;

/// What the helper is asked to do.
#[derive(Debug)]
pub(super) enum Request<'a> {
    /// Create (not start) container `id` from `bundle`, output appended to
    /// `log`, its process confined by the seccomp program in `seccomp`,
    /// its cgroup v2 given the device program in `devices` before this
    /// returns (and so before the container can start).
    Create {
        state_root: &'a Path,
        id: &'a str,
        bundle: &'a Path,
        log: &'a Path,
        seccomp: Option<&'a Path>,
        devices: Option<&'a Attach>,
    },
    /// Start `argv` inside running container `id`, under the seccomp
    /// program in `seccomp` (the container's own), its stdout and stderr
    /// the write ends in `output` (else `/dev/null`).
    Exec {
        state_root: &'a Path,
        id: &'a str,
        cwd: &'a Path,
        uid: u32,
        gid: u32,
        seccomp: Option<&'a Path>,
        argv: &'a [String],
        output: Option<(BorrowedFd<'a>, BorrowedFd<'a>)>,
    },
}

/// Where the helper finds an exec's stdout and stderr pipes when asked to
/// capture them: the agent places them at these descriptors.
const CAPTURE_FDS: [RawFd; 2] = [3, 4];
/// The argument that says the exec's output goes to [`CAPTURE_FDS`].
const CAPTURE: &str = "capture";

/// In the agent: runs the helper for `request` and returns the pid of the
/// process it created (the container's init, or the exec'd command), or the
/// helper's error message.
pub(super) fn call(helper: &Path, request: &Request<'_>) -> Result<i32, String> {
    let mut cmd = Command::new(helper);
    // libcontainer reads and restores the working directory around its
    // notify sockets; the agent's may be a container's state directory that
    // a concurrent start moved into and a delete then removed. The helper
    // uses absolute paths only.
    cmd.arg(ARG).current_dir("/");
    match request {
        Request::Create {
            state_root,
            id,
            bundle,
            log,
            seccomp,
            devices,
        } => {
            let none = Path::new(NO_SECCOMP);
            cmd.arg("create")
                .arg(state_root)
                .arg(id)
                .arg(bundle)
                .arg(log)
                .arg(seccomp.map_or(none, |p| p))
                .arg(devices.map_or(none, |d| &d.program))
                .arg(devices.map_or(none, |d| &d.cgroup));
        }
        Request::Exec {
            state_root,
            id,
            cwd,
            uid,
            gid,
            seccomp,
            argv,
            output,
        } => {
            cmd.arg("exec")
                .arg(state_root)
                .arg(id)
                .arg(cwd)
                .arg(uid.to_string())
                .arg(gid.to_string())
                .arg(seccomp.map_or(Path::new(NO_SECCOMP), |p| p))
                .arg(if output.is_some() {
                    CAPTURE
                } else {
                    NO_SECCOMP
                })
                .arg("--")
                .args(argv.iter());
            if let Some((out, err)) = output {
                let fds = [out.as_raw_fd(), err.as_raw_fd()];
                // SAFETY: the closure runs in the forked child before exec
                // and calls only fcntl, dup2 and close, which are
                // async-signal-safe and allocate nothing.
                unsafe { cmd.pre_exec(move || place_fds(fds)) };
            }
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running the runtime helper {}: {e}", helper.display()))?;
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        return text
            .trim()
            .parse::<i32>()
            .map_err(|_| format!("the runtime helper printed {:?}, not a pid", text.trim()));
    }
    let mut err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if err.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !err.is_char_boundary(end) {
            end -= 1;
        }
        err.truncate(end);
    }
    if err.is_empty() {
        err = format!("the runtime helper failed ({})", out.status);
    }
    Err(err)
}

/// In the forked child: puts `fds` (the pipes' write ends, close-on-exec in
/// the agent) at [`CAPTURE_FDS`], open across the exec. Copied above them
/// first, so that neither overwrites the other whatever their numbers.
fn place_fds(fds: [RawFd; 2]) -> std::io::Result<()> {
    let check = |ret: libc::c_int| {
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    };
    let mut high = [0; 2];
    for (slot, fd) in high.iter_mut().zip(fds) {
        // SAFETY: plain integer arguments; F_DUPFD makes a new descriptor.
        *slot = check(unsafe { libc::fcntl(fd, libc::F_DUPFD, 10) })?;
    }
    for (high, target) in high.into_iter().zip(CAPTURE_FDS) {
        // SAFETY: plain integer arguments; dup2's copy has no close-on-exec.
        check(unsafe { libc::dup2(high, target) })?;
        // SAFETY: `high` is the copy made above, used by nothing else.
        check(unsafe { libc::close(high) })?;
    }
    Ok(())
}

/// In the helper: takes the capture pipes the agent placed at
/// [`CAPTURE_FDS`], checking that they are open.
fn capture_fds() -> Result<(File, File), String> {
    let take = |fd: RawFd| {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("runtime helper: no output pipe at descriptor {fd}"));
        }
        // SAFETY: the agent placed this pipe here for this process alone,
        // and nothing in this single-threaded process has taken it yet.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    };
    Ok((take(CAPTURE_FDS[0])?, take(CAPTURE_FDS[1])?))
}

/// In the helper process: does what `args` (after [`ARG`]) ask, prints the
/// new process's pid, and exits. Nothing else runs in this process.
pub fn main(args: Vec<OsString>) -> ExitCode {
    // Rust's runtime made this process ignore SIGPIPE, and an ignored signal
    // stays ignored across exec: every container process would inherit it
    // (`yes | head` would never end). Reset, as std's `Command` does for the
    // children it spawns.
    // SAFETY: signal(2) with SIG_DFL installs no handler.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match serve(args) {
        Ok(pid) => {
            println!("{pid}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: Vec<OsString>) -> Result<i32, String> {
    let mut args = args.into_iter();
    let mut next = |what: &str| {
        args.next()
            .ok_or_else(|| format!("runtime helper: missing {what}"))
    };
    let op = next("operation")?;
    let state_root = PathBuf::from(next("state root")?);
    let id = next("container id")?
        .into_string()
        .map_err(|_| "runtime helper: container id is not UTF-8".to_owned())?;
    let null = |write: bool| {
        OpenOptions::new()
            .read(!write)
            .write(write)
            .open("/dev/null")
            .map_err(|e| format!("opening /dev/null: {e}"))
    };
    // The program is read before anything is cloned: the executor only
    // installs it, in the container's process.
    let executor = |arg: OsString| -> Result<FilteredExecutor, String> {
        if arg == NO_SECCOMP {
            return Ok(FilteredExecutor::new(None));
        }
        let program = Program::load(Path::new(&arg)).map_err(|e| e.to_string())?;
        Ok(FilteredExecutor::new(Some(program)))
    };
    match op.to_str() {
        Some("create") => {
            let bundle = PathBuf::from(next("bundle")?);
            let log = PathBuf::from(next("log path")?);
            let executor = executor(next("seccomp program")?)?;
            let devices = match (next("device program")?, next("cgroup")?) {
                (program, _) if program == NO_SECCOMP => None,
                (program, cgroup) => {
                    let program = devices_v2::Program::load(Path::new(&program))
                        .map_err(|e| e.to_string())?;
                    Some((program, PathBuf::from(cgroup)))
                }
            };
            let out = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(&log)
                .map_err(|e| format!("opening log file {}: {e}", log.display()))?;
            let err: File = out
                .try_clone()
                .map_err(|e| format!("opening log file {}: {e}", log.display()))?;
            let container = ContainerBuilder::new(id, SyscallType::default())
                .with_root_path(&state_root)
                .and_then(ContainerBuilder::validate_id)
                .map_err(|e| chain(&e))?
                .with_stdin(null(false)?)
                .with_stdout(out)
                .with_stderr(err)
                .with_executor(executor)
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| chain(&e))?;
            // The init waits for the start, which the agent sends only once
            // this succeeded: nothing runs in the container unconfined. On a
            // failure the agent deletes the created container.
            if let Some((program, cgroup)) = devices {
                program.attach(&cgroup).map_err(|e| e.to_string())?;
            }
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "libcontainer recorded no init pid".to_owned())
        }
        Some("exec") => {
            let cwd = PathBuf::from(next("working directory")?);
            let number = |s: OsString, what: &str| {
                s.to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                    .ok_or_else(|| format!("runtime helper: bad {what}"))
            };
            let uid = number(next("uid")?, "uid")?;
            let gid = number(next("gid")?, "gid")?;
            let executor = executor(next("seccomp program")?)?;
            let (stdout, stderr) = match next("output")? {
                o if o == CAPTURE => capture_fds()?,
                _ => (null(true)?, null(true)?),
            };
            if next("--")? != "--" {
                return Err("runtime helper: expected -- before the command".into());
            }
            let argv: Vec<String> = args
                .map(|a| a.into_string())
                .collect::<Result<_, _>>()
                .map_err(|_| "runtime helper: command is not UTF-8".to_owned())?;
            let pid = ContainerBuilder::new(id, SyscallType::default())
                .with_root_path(&state_root)
                .map_err(|e| chain(&e))?
                .with_stdin(null(false)?)
                .with_stdout(stdout)
                .with_stderr(stderr)
                .with_executor(executor)
                .as_tenant()
                .with_container_args(argv)
                .with_cwd(Some(cwd))
                .with_user(Some(uid))
                .with_group(Some(gid))
                .with_detach(true)
                .build()
                .map_err(|e| chain(&e))?;
            Ok(pid.as_raw())
        }
        _ => Err(format!("runtime helper: unknown operation {op:?}")),
    }
}
