//! Container init processes seen from the agent: pidfds pinned to one process
//! (pid plus kernel start time, so a recycled pid is never mistaken for it),
//! signals, and reaping.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Errors from handling an init process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// `pidfd_open` failed for a reason other than the process being gone.
    #[error("pidfd_open of pid {pid}: {source}")]
    Open { pid: i32, source: io::Error },
    /// The signal could not be sent.
    #[error("sending signal {signal} to pid {pid}: {source}")]
    Signal {
        pid: i32,
        signal: i32,
        source: io::Error,
    },
    /// `poll` on the pidfd failed.
    #[error("polling pidfd of pid {pid}: {source}")]
    Poll { pid: i32, source: io::Error },
    /// `waitpid` failed for a reason other than the process not being our child.
    #[error("waitpid of pid {pid}: {source}")]
    Wait { pid: i32, source: Errno },
}

/// An open pidfd on a container's init process, verified to be the process
/// the runtime started (not a later process that reused its pid).
#[derive(Debug)]
pub struct InitProcess {
    pid: i32,
    fd: OwnedFd,
}

/// The pidfd, for the async reactor: it turns readable when the process exits.
impl AsRawFd for InitProcess {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// How a reaped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// It called `exit` with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
    /// It is not a child of this process (adopted after an agent restart),
    /// or it was already reaped: its status is lost.
    NotChild,
}

impl InitProcess {
    /// Opens the process `pid` if it exists (running or a zombie) and, when
    /// `start_time` is known, started at that time. `None` when it is gone.
    pub fn open(pid: i32, start_time: Option<u64>) -> Result<Option<Self>, ProcessError> {
        if pid <= 0 {
            return Ok(None);
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
        // no memory is shared with the kernel.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(ProcessError::Open { pid, source: err }),
            };
        }
        let raw = RawFd::try_from(ret).map_err(|_| ProcessError::Open {
            pid,
            source: io::Error::other("pidfd out of range"),
        })?;
        // SAFETY: `raw` is a fresh fd returned by pidfd_open that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // The pidfd now pins the process: its pid cannot be reused while it
        // stays unreaped, so checking the start time after opening is race-free.
        if let Some(expected) = start_time {
            match stat(pid) {
                Ok(Some(s)) if s.start_time == expected => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(Self { pid, fd }))
    }

    /// The process id in the agent's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the process still runs (a zombie does not).
    pub fn is_running(&self) -> Result<bool, ProcessError> {
        Ok(!self.wait_exit(Duration::ZERO)?)
    }

    /// Sends `signal`. A process that has already exited is not an error.
    pub fn signal(&self, signal: i32) -> Result<(), ProcessError> {
        // SAFETY: pidfd_send_signal reads only its integer arguments; a null
        // siginfo means "as kill(2) would send it".
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(ProcessError::Signal {
                    pid: self.pid,
                    signal,
                    source: err,
                });
            }
        }
        Ok(())
    }

    /// Blocks up to `timeout` for the process to exit; true once it has.
    pub fn wait_exit(&self, timeout: Duration) -> Result<bool, ProcessError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let millis = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1; the kernel writes only `revents`.
            let ret = unsafe { libc::poll(&mut pfd, 1, millis) };
            if ret >= 0 {
                return Ok(ret > 0);
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(ProcessError::Poll {
                    pid: self.pid,
                    source: err,
                });
            }
        }
    }

    /// Collects the exit status of the process once it has exited. Only to
    /// be called after [`InitProcess::wait_exit`] or the pidfd turned
    /// readable: the process is then a zombie whose pid cannot have been
    /// reused.
    pub fn reap(&self) -> Result<Reaped, ProcessError> {
        // libcontainer clones the init with CLONE_PARENT and no exit signal,
        // which makes it a "clone" child that plain waitpid does not see:
        // __WALL is needed.
        let flags = WaitPidFlag::WNOHANG | WaitPidFlag::__WALL;
        // The pidfd can turn readable a moment before the zombie is waitable.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            match waitpid(Pid::from_raw(self.pid), Some(flags)) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(Reaped::Exited(code)),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(Reaped::Signaled(sig as i32)),
                Ok(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(_) => return Ok(Reaped::NotChild),
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => return Ok(Reaped::NotChild),
                Err(source) => {
                    return Err(ProcessError::Wait {
                        pid: self.pid,
                        source,
                    });
                }
            }
        }
    }
}

/// The fields of `/proc/{pid}/stat` the runtime needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// One-letter state (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Start time in clock ticks after boot: with the pid, a process's identity.
    pub start_time: u64,
}

/// Reads `/proc/{pid}/stat`; `None` when the process does not exist.
pub fn stat(pid: i32) -> io::Result<Option<Stat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_stat(&text)
            .map(Some)
            .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: unexpected format"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses a `/proc/{pid}/stat` line. The command name may hold spaces and
/// parentheses, so fields are counted from its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // starttime is field 22 of stat(5); `state` was field 3.
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(Stat { state, start_time })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (we(ir)d name) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("12 (x) Z 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_running_and_identified_by_start_time() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let me = stat(pid).unwrap().unwrap();
        let p = InitProcess::open(pid, Some(me.start_time))
            .unwrap()
            .unwrap();
        assert!(p.is_running().unwrap());
        assert!(
            InitProcess::open(pid, Some(me.start_time + 1))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    // The child is reaped through `InitProcess::reap`, which is under test.
    #[allow(clippy::zombie_processes)]
    fn child_exit_is_seen_and_reaped() {
        let child = std::process::Command::new("/bin/busybox")
            .args(["sh", "-c", "exit 7"])
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let p = InitProcess::open(pid, None).unwrap().unwrap();
        assert!(p.wait_exit(Duration::from_secs(10)).unwrap());
        assert_eq!(p.reap().unwrap(), Reaped::Exited(7));
        // Reaped: the status is gone, and so is the process.
        assert_eq!(p.reap().unwrap(), Reaped::NotChild);
        assert!(stat(pid).unwrap().is_none());
    }
}
