//! Runs containers. The reconciler sees only the [`Runtime`] trait: `youki`
//! runs real containers through libcontainer; `fake` runs nothing and is for
//! reconciler tests and simulated fleets.
//!
//! Every method but [`Runtime::wait`] may block (libcontainer forks): callers
//! run them on `spawn_blocking`, never on the async workers.

pub mod fake;
pub mod youki;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

#[cfg(doc)]
use flotilla_proto::ExecEnd;
use flotilla_proto::{ExecResult, Resources, SecurityContext};

/// Everything needed to create and start one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Runtime id, unique on the node: `{pod}.{container}.{spec hash}`.
    pub id: String,
    /// The image's root filesystem, shared read-only by every container of
    /// that image (its layer list in the image store, or a plain
    /// directory); the runtime gives each container its own writable layer
    /// on top.
    pub image_rootfs: PathBuf,
    /// The process: argv (never empty), environment as `KEY=value`, working
    /// directory (absolute), and user.
    pub args: Vec<String>,
    /// Environment as `KEY=value`.
    pub env: Vec<String>,
    /// Absolute working directory inside the container.
    pub cwd: String,
    /// User and group ids the process runs as.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Hostname inside the container.
    pub hostname: String,
    /// Limits enforced through the container's own cgroup.
    pub resources: Resources,
    /// File the container's stdout and stderr are appended to.
    pub log_path: PathBuf,
    /// Host files and directories bind-mounted into the container, in order.
    pub mounts: Vec<Mount>,
    /// Privileges beyond the hardened default (none by default).
    pub security: SecurityContext,
}

/// A host file or directory bind-mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Absolute path on the host.
    pub source: PathBuf,
    /// Absolute path inside the container (created if missing).
    pub destination: String,
    /// Mounted read-only; such a mount is not recursive, so that no
    /// writable mount below the source shows through.
    pub read_only: bool,
    /// A directory the agent made (scratch or config): mounted `nosuid` and
    /// `nodev`. Host paths are mounted as they are.
    pub agent_owned: bool,
}

/// A container the runtime knows about (found at start, for adoption).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    /// Runtime id.
    pub id: String,
    /// Whether its init process still runs.
    pub running: bool,
}

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal number when killed by a signal.
    pub code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it.
    pub oom_killed: bool,
}

/// Errors from a runtime. Messages name the container and what failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container could not be created (bad command, missing binary, rootfs problem, cgroup).
    #[error("container {id}: create failed: {reason}")]
    Create { id: String, reason: String },
    /// The container was created but its process could not be started.
    #[error("container {id}: start failed: {reason}")]
    Start { id: String, reason: String },
    /// No container with this id.
    #[error("container {id}: not found")]
    NotFound { id: String },
    /// The runtime itself could not be set up (its directories, the host's
    /// cgroups); no container is involved.
    #[error("runtime setup: {reason}")]
    Setup { reason: String },
    /// A command run in the container did not finish in time (and was killed).
    #[error("container {id}: {op}: no result after {after:?}")]
    Timeout {
        id: String,
        op: &'static str,
        after: Duration,
    },
    /// Any other failure, named.
    #[error("container {id}: {op}: {reason}")]
    Other {
        id: String,
        op: &'static str,
        reason: String,
    },
}

/// A container runtime.
pub trait Runtime: Send + Sync + 'static {
    /// Creates and starts a container; returns once its process runs.
    /// An existing container with the same id is an error.
    fn start(&self, config: &ContainerConfig) -> Result<(), RuntimeError>;

    /// Resolves when the container's process has exited (at once if it
    /// already has). Works for containers adopted after an agent restart; the
    /// exit code of a process that is not the agent's child may be unknown,
    /// then reported as code 255 with no signal.
    fn wait(&self, id: &str) -> impl Future<Output = Result<Exit, RuntimeError>> + Send;

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the container's init process.
    /// Not an error if the process has already exited.
    fn kill(&self, id: &str, signal: i32) -> Result<(), RuntimeError>;

    /// Removes a container whose process has exited (or kills it first):
    /// its runtime state, its cgroup, its writable layer. Not an error if it
    /// does not exist.
    fn delete(&self, id: &str) -> Result<(), RuntimeError>;

    /// Every container this runtime manages on the node.
    fn list(&self) -> Result<Vec<Existing>, RuntimeError>;

    /// Runs `argv` inside the running container `id` — its namespaces,
    /// cgroup, user, environment and working directory — with no input and
    /// its output discarded, and returns its exit code (128 + signal number
    /// when a signal ended it). Past `timeout` the process is killed and the
    /// result is [`RuntimeError::Timeout`].
    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<i32, RuntimeError>;

    /// [`Runtime::exec`] that keeps what the command writes (`flotilla
    /// exec`): the first `max_output` bytes of its stdout and of its stderr,
    /// in memory only, the rest read and counted. Past `timeout` the command
    /// and what it started are killed (SIGKILL): the end is
    /// [`ExecEnd::TimedOut`], with what it wrote until then.
    fn exec_output(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
        max_output: usize,
    ) -> Result<ExecResult, RuntimeError>;
}
