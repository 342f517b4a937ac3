//! Real containers through youki's libcontainer: each container's bundle and
//! root filesystem, its libcontainer state, its cgroup, its init process and
//! its exit status.
//!
//! Layout: libcontainer keeps its state in `{state_root}/{id}` (under /run:
//! gone after a reboot); the bundle is `{work_root}/{id}` with `config.json`,
//! the writable layer `upper/` + `work/`, the mounted `rootfs/`, the init's
//! identity `init` and, once reaped, its exit status `exit`. The cgroup is
//! `/{cgroup_parent}/{id}` in every hierarchy.

mod cgroup;
pub mod devices_v2;
mod exec;
pub mod helper;
mod process;
mod program_file;
mod rootfs;
mod seccomp;
mod spec;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use self::spec::{capability_mask, default_capabilities};
use flotilla_proto::{ExecEnd, ExecResult};
use libcontainer::container::{Container, ContainerStatus};
pub use oci_spec::runtime::Capability;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use self::cgroup::Hierarchies;
use self::process::{InitProcess, Reaped};
use super::{ContainerConfig, Existing, Exit, Runtime, RuntimeError};

/// Longest container id accepted: ids name directories and cgroups.
const MAX_ID_LEN: usize = 128;
/// Longest `cgroup_parent` accepted.
const MAX_CGROUP_PARENT_LEN: usize = 512;
/// How long `delete` waits for a SIGKILLed init to go.
const KILL_PATIENCE: Duration = Duration::from_secs(10);
/// Exit code reported when the real one is lost (a process that was not the
/// agent's child, i.e. adopted after an agent restart).
const UNKNOWN_EXIT: i32 = 255;

/// libcontainer changes the whole process's working directory while it
/// binds and connects a container's notify socket, and creates cgroup
/// parents that `delete` removes: creates, starts and cgroup removals are
/// serialised across every runtime in the process.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs containers through libcontainer. Cheap to clone; clones share state.
///
/// Two process-wide effects come with libcontainer: it briefly changes the
/// process's working directory while starting a container (so the rest of
/// the agent must use absolute paths), and it marks the process
/// non-dumpable. A `wait` racing a `delete` of the same container may
/// resolve with the unknown-exit code 255.
#[derive(Clone)]
pub struct YoukiRuntime {
    inner: Arc<Inner>,
    capabilities: Arc<[Capability]>,
    /// The binary that makes libcontainer's clones (see [`helper`]).
    helper: Arc<Path>,
}

struct Inner {
    state_root: PathBuf,
    work_root: PathBuf,
    /// Relative to each hierarchy root, e.g. `flotilla/node-a`.
    cgroup_parent: PathBuf,
    hierarchies: Hierarchies,
    /// Exit statuses already reaped, so that every `wait` sees the same one.
    exits: Mutex<HashMap<String, Exit>>,
}

impl YoukiRuntime {
    /// A runtime keeping libcontainer state in `state_root`, bundles in
    /// `work_root` and cgroups under `/{cgroup_parent}`. Creates the two
    /// directories, and removes bundles left without state by a reboot or a
    /// crash in the middle of a start.
    pub fn new(
        state_root: PathBuf,
        work_root: PathBuf,
        cgroup_parent: String,
    ) -> Result<Self, RuntimeError> {
        let parent = check_cgroup_parent(&cgroup_parent).map_err(setup)?;
        let state_root = create_private_dir(&state_root)?;
        let work_root = create_private_dir(&work_root)?;
        let hierarchies = Hierarchies::detect().map_err(|e| setup(e.to_string()))?;
        let helper = std::env::current_exe().map_err(|e| {
            setup(format!(
                "finding the agent binary for the runtime helper: {e}"
            ))
        })?;
        // Containers are created by the helper process, so their inits start
        // as its children; as a subreaper this process inherits them when the
        // helper exits, and waits for and reaps them as before.
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integers.
        let set = unsafe {
            libc::prctl(
                libc::PR_SET_CHILD_SUBREAPER,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if set != 0 {
            return Err(setup(format!(
                "becoming a child subreaper: {}",
                io::Error::last_os_error()
            )));
        }
        let runtime = Self {
            inner: Arc::new(Inner {
                state_root,
                work_root,
                cgroup_parent: parent,
                hierarchies,
                exits: Mutex::new(HashMap::new()),
            }),
            capabilities: spec::default_capabilities().into(),
            helper: helper.into(),
        };
        runtime.remove_orphan_bundles()?;
        Ok(runtime)
    }

    /// Replaces the capability set every container gets unless its security
    /// context changes it (Docker's default set unless changed).
    /// Capabilities outside the host's bounding set make `start` fail naming
    /// them.
    pub fn with_capabilities(mut self, capabilities: Vec<Capability>) -> Self {
        self.capabilities = capabilities.into();
        self
    }

    /// Uses `helper` (the agent binary) for creates and execs instead of
    /// this process's own executable: for tests, whose executable is not the
    /// agent.
    pub fn with_helper(mut self, helper: PathBuf) -> Self {
        self.helper = helper.into();
        self
    }

    /// The cgroup of container `id`, relative to each hierarchy root.
    pub fn cgroup_of(&self, id: &str) -> PathBuf {
        self.inner.cgroup_parent.join(id)
    }

    /// The bundle directory of container `id`.
    pub fn bundle_of(&self, id: &str) -> PathBuf {
        self.inner.work_root.join(id)
    }

    fn remove_orphan_bundles(&self) -> Result<(), RuntimeError> {
        let entries = std::fs::read_dir(&self.inner.work_root).map_err(|e| {
            setup(format!(
                "reading work root {}: {e}",
                self.inner.work_root.display()
            ))
        })?;
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if check_id(&id).is_err() || self.inner.state_root.join(&id).exists() {
                continue;
            }
            tracing::warn!(%id, "removing a container bundle that has no runtime state");
            if let Err(e) = self.delete(&id) {
                tracing::warn!(%id, error = %e, "could not remove orphan bundle");
            }
        }
        Ok(())
    }

    fn start_in_bundle(
        &self,
        config: &ContainerConfig,
        caps: &[Capability],
        bundle: &Path,
    ) -> Result<(), RuntimeError> {
        let id = config.id.as_str();
        let create = |reason: &dyn std::fmt::Display| RuntimeError::Create {
            id: id.to_owned(),
            reason: reason.to_string(),
        };
        let kind = rootfs::prepare(&config.image_rootfs, bundle).map_err(|e| create(&e))?;
        tracing::debug!(%id, ?kind, "container rootfs ready");
        let root = bundle.join("rootfs");
        let env = spec::process_env(&config.env);
        rootfs::check_cwd(&root, &config.cwd).map_err(|e| create(&e))?;
        let argv0 = config.args.first().map(String::as_str).unwrap_or_default();
        rootfs::check_executable(&root, argv0, &config.cwd, spec::path_of(&env))
            .map_err(|e| create(&e))?;

        let cgroup = self.cgroup_of(id);
        let host = spec::Host {
            swap_accounting: self.inner.hierarchies.swap_accounting(),
        };
        let cgroups_path = format!("/{}", cgroup.display());
        let spec = spec::build(config, &cgroups_path, caps, host).map_err(|e| create(&e))?;
        spec.save(bundle.join("config.json"))
            .map_err(|e| create(&format!("writing config.json: {e}")))?;
        // libcontainer without libseccomp ignores `linux.seccomp`: the
        // profile is compiled here, for this container's capabilities, and
        // installed by the helper's executor.
        let security = &config.security;
        let seccomp = if security.privileged || security.seccomp_unconfined {
            None
        } else {
            let path = bundle.join(seccomp::FILE_NAME);
            seccomp::compile(spec::capability_mask(caps))
                .and_then(|program| program.save(&path))
                .map_err(|e| create(&e))?;
            Some(path)
        };
        // Likewise the device allowlist on cgroup v2 (libcontainer's needs
        // libbpf): compiled here, attached by the helper before the start.
        let devices = devices_v2::prepare(&self.inner.hierarchies, &spec, bundle, &cgroup)
            .map_err(|e| create(&e))?;

        if let Some(dir) = config.log_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| create(&format!("creating log directory {}: {e}", dir.display())))?;
        }
        let pid = helper::call(
            &self.helper,
            &helper::Request::Create {
                state_root: &self.inner.state_root,
                id,
                bundle,
                log: &config.log_path,
                seccomp: seccomp.as_deref(),
                devices: devices.as_ref(),
            },
        )
        .map_err(|e| create(&e))?;
        // Pid plus start time identify the init even after its pid is reused.
        let stat = process::stat(pid)
            .ok()
            .flatten()
            .ok_or_else(|| create(&format!("init process {pid} vanished before start")))?;
        write_file(
            &bundle.join("init"),
            &format!("{pid} {}\n", stat.start_time),
        )
        .map_err(|e| create(&format!("recording init identity: {e}")))?;
        if config.resources.memory_bytes.is_some() {
            self.inner
                .hierarchies
                .forbid_swap_v2(&cgroup)
                .map_err(|e| create(&e))?;
        }
        let start = |reason: String| RuntimeError::Start {
            id: id.to_owned(),
            reason,
        };
        // Starting only signals the init through its notify socket (no
        // clone), but libcontainer changes directory to reach it.
        let _serial = serial();
        let mut container =
            Container::load(self.inner.state_root.join(id)).map_err(|e| start(chain(&e)))?;
        container.start().map_err(|e| start(chain(&e)))?;
        Ok(())
    }
}

impl Inner {
    fn bundle(&self, id: &str) -> PathBuf {
        self.work_root.join(id)
    }

    fn exits(&self) -> MutexGuard<'_, HashMap<String, Exit>> {
        self.exits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What libcontainer's state says of the container, if it has state.
    fn load(&self, id: &str) -> Result<Option<Loaded>, RuntimeError> {
        let dir = self.state_root.join(id);
        if !dir.join("state.json").exists() {
            return Ok(None);
        }
        let container = Container::load(dir).map_err(|e| RuntimeError::Other {
            id: id.to_owned(),
            op: "load state",
            reason: chain(&e),
        })?;
        Ok(Some(Loaded {
            pid: container.pid().map(|p| p.as_raw()),
            started: !matches!(
                container.status(),
                ContainerStatus::Creating | ContainerStatus::Created
            ),
        }))
    }

    /// Opens the init process if it is still the one this runtime started.
    fn open_init(&self, id: &str, pid: i32) -> Result<Option<InitProcess>, RuntimeError> {
        let start_time = std::fs::read_to_string(self.bundle(id).join("init"))
            .ok()
            .and_then(|s| {
                let (p, t) = s.trim().split_once(' ')?;
                (p.parse::<i32>().ok()? == pid).then(|| t.parse::<u64>().ok())?
            });
        InitProcess::open(pid, start_time).map_err(|e| RuntimeError::Other {
            id: id.to_owned(),
            op: "open init process",
            reason: e.to_string(),
        })
    }

    /// First half of `wait`: an exit already known, or the running init.
    fn prepare_wait(&self, id: &str) -> Result<Waiting, RuntimeError> {
        if let Some(exit) = self.known_exit(id) {
            return Ok(Waiting::Done(exit));
        }
        let loaded = self
            .load(id)?
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_owned() })?;
        if !loaded.started {
            // Created but never started (the agent died in between): its
            // init waits for a start that will not come. Not recorded, in
            // case a start is in fact under way.
            return Ok(Waiting::Done(exit_from(Reaped::NotChild, false)));
        }
        let init = match loaded.pid {
            Some(pid) => self.open_init(id, pid)?,
            None => None,
        };
        match init {
            Some(init) => Ok(Waiting::Running(init)),
            None => Ok(Waiting::Done(self.record_exit(id, None))),
        }
    }

    fn known_exit(&self, id: &str) -> Option<Exit> {
        if let Some(exit) = self.exits().get(id) {
            return Some(*exit);
        }
        let text = std::fs::read_to_string(self.bundle(id).join("exit")).ok()?;
        let exit = parse_exit(&text)?;
        self.exits().insert(id.to_owned(), exit);
        Some(exit)
    }

    /// Reaps the exited init (when it is the agent's child), reads the OOM
    /// counter before anything deletes the cgroup, and records the exit.
    fn record_exit(&self, id: &str, init: Option<&InitProcess>) -> Exit {
        let mut exits = self.exits();
        if let Some(exit) = exits.get(id) {
            return *exit;
        }
        let reaped = match init.map(InitProcess::reap) {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                tracing::warn!(%id, error = %e, "could not reap init process");
                Reaped::NotChild
            }
            None => Reaped::NotChild,
        };
        let oom = self
            .hierarchies
            .oom_kills(&self.cgroup_parent.join(id))
            .is_some_and(|n| n > 0);
        let exit = exit_from(reaped, oom);
        if let Err(e) = write_file(&self.bundle(id).join("exit"), &format_exit(&exit)) {
            tracing::warn!(%id, error = %e, "could not record exit status");
        }
        exits.insert(id.to_owned(), exit);
        exit
    }

    fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        let other = |op: &'static str, reason: String| RuntimeError::Other {
            id: id.to_owned(),
            op,
            reason,
        };
        let state_dir = self.state_root.join(id);
        if let Ok(Some(Loaded { pid: Some(pid), .. })) = self.load(id) {
            if let Some(init) = self.open_init(id, pid)? {
                init.signal(libc::SIGKILL)
                    .map_err(|e| other("kill", e.to_string()))?;
                if !init
                    .wait_exit(KILL_PATIENCE)
                    .map_err(|e| other("kill", e.to_string()))?
                {
                    return Err(other(
                        "delete",
                        format!("init process {pid} still runs {KILL_PATIENCE:?} after SIGKILL"),
                    ));
                }
                // Reap it so no zombie is left behind.
                self.record_exit(id, Some(&init));
            }
        }
        let _serial = serial();
        if state_dir.exists() {
            match Container::load(state_dir.clone()) {
                Ok(mut container) => {
                    if let Err(e) = container.delete(true) {
                        tracing::warn!(%id, error = %chain(&e), "libcontainer delete failed; cleaning up directly");
                    }
                }
                Err(e) => {
                    tracing::warn!(%id, error = %chain(&e), "unreadable container state; cleaning up directly")
                }
            }
            remove_dir_all(&state_dir).map_err(|e| other("remove state", e.to_string()))?;
        }
        let bundle = self.bundle(id);
        rootfs::release(&bundle).map_err(|e| other("unmount rootfs", e.to_string()))?;
        remove_dir_all(&bundle)
            .map_err(|e| other("remove bundle", format!("{}: {e}", bundle.display())))?;
        self.hierarchies
            .remove(&self.cgroup_parent, id)
            .map_err(|e| other("remove cgroup", e.to_string()))?;
        self.exits().remove(id);
        Ok(())
    }

    fn list(&self) -> Result<Vec<Existing>, RuntimeError> {
        let entries = match std::fs::read_dir(&self.state_root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(setup(format!(
                    "reading state root {}: {e}",
                    self.state_root.display()
                )));
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if check_id(&id).is_err() {
                continue;
            }
            let running = match self.load(&id) {
                Ok(Some(Loaded {
                    pid: Some(pid),
                    started: true,
                })) => match self.open_init(&id, pid)? {
                    Some(init) => init.is_running().unwrap_or(false),
                    None => false,
                },
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(%id, error = %e, "unreadable container state");
                    false
                }
            };
            out.push(Existing { id, running });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

struct Loaded {
    pid: Option<i32>,
    /// libcontainer started the process (it is past `Created`).
    started: bool,
}

enum Waiting {
    Done(Exit),
    Running(InitProcess),
}

impl Runtime for YoukiRuntime {
    fn start(&self, config: &ContainerConfig) -> Result<(), RuntimeError> {
        let id = config.id.as_str();
        let create = |reason: String| RuntimeError::Create {
            id: id.to_owned(),
            reason,
        };
        check_id(id).map_err(create)?;
        spec::validate(config).map_err(|e| create(e.to_string()))?;
        spec::check_mount_sources(config).map_err(|e| create(e.to_string()))?;
        let bounding = spec::host_bounding_set().map_err(|e| create(e.to_string()))?;
        let caps = spec::container_capabilities(&self.capabilities, &config.security, bounding)
            .map_err(|e| create(e.to_string()))?;
        spec::check_capabilities(&caps, bounding).map_err(|e| create(e.to_string()))?;
        if self.inner.state_root.join(id).exists() {
            return Err(create("a container with this id already exists".into()));
        }
        let bundle = self.inner.bundle(id);
        if bundle.symlink_metadata().is_ok() {
            // A start interrupted before libcontainer saved any state.
            tracing::warn!(%id, "removing the leftovers of an interrupted start");
            self.inner.delete(id)?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&bundle)
            .map_err(|e| create(format!("creating bundle {}: {e}", bundle.display())))?;
        self.inner.exits().remove(id);
        if let Err(err) = self.start_in_bundle(config, &caps, &bundle) {
            if let Err(cleanup) = self.inner.delete(id) {
                tracing::warn!(%id, error = %cleanup, "cleanup after a failed start failed");
            }
            return Err(err);
        }
        Ok(())
    }

    async fn wait(&self, id: &str) -> Result<Exit, RuntimeError> {
        check_id(id).map_err(|_| RuntimeError::NotFound { id: id.to_owned() })?;
        let inner = Arc::clone(&self.inner);
        let owned = id.to_owned();
        let waiting = blocking(id, move || inner.prepare_wait(&owned)).await?;
        let init = match waiting {
            Waiting::Done(exit) => return Ok(exit),
            Waiting::Running(init) => init,
        };
        let pid = init.pid();
        let io_err = |e: io::Error| RuntimeError::Other {
            id: id.to_owned(),
            op: "wait",
            reason: format!("watching pidfd of pid {pid}: {e}"),
        };
        // A pidfd turns readable when its process exits: no thread is
        // parked per container.
        // SAFETY: `InitProcess` owns its pidfd for its whole life and
        // `as_raw_fd` always returns that same descriptor.
        let watched = unsafe { AsyncFd::register_with_interest(init, Interest::READABLE) }
            .map_err(|e| io_err(e.into()))?;
        drop(watched.readable().await.map_err(io_err)?);
        let init = watched.into_inner();
        let inner = Arc::clone(&self.inner);
        let owned = id.to_owned();
        blocking(id, move || Ok(inner.record_exit(&owned, Some(&init)))).await
    }

    fn kill(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        check_id(id).map_err(|_| RuntimeError::NotFound { id: id.to_owned() })?;
        let loaded = self
            .inner
            .load(id)?
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_owned() })?;
        let Some(pid) = loaded.pid else {
            return Ok(());
        };
        match self.inner.open_init(id, pid)? {
            Some(init) => init.signal(signal).map_err(|e| RuntimeError::Other {
                id: id.to_owned(),
                op: "kill",
                reason: e.to_string(),
            }),
            None => Ok(()),
        }
    }

    fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        check_id(id).map_err(|reason| RuntimeError::Other {
            id: id.to_owned(),
            op: "delete",
            reason,
        })?;
        self.inner.delete(id)
    }

    fn list(&self) -> Result<Vec<Existing>, RuntimeError> {
        self.inner.list()
    }

    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        match self.exec_in(id, argv, timeout, None)?.end {
            ExecEnd::Exited(code) => Ok(code),
            ExecEnd::Signaled(signal) => Ok(128 + signal),
            ExecEnd::TimedOut => Err(RuntimeError::Timeout {
                id: id.to_owned(),
                op: "exec",
                after: timeout,
            }),
        }
    }

    fn exec_output(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
        max_output: usize,
    ) -> Result<ExecResult, RuntimeError> {
        self.exec_in(id, argv, timeout, Some(max_output))
    }
}

/// Runs blocking work off the async workers.
async fn blocking<T: Send + 'static>(
    id: &str,
    f: impl FnOnce() -> Result<T, RuntimeError> + Send + 'static,
) -> Result<T, RuntimeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RuntimeError::Other {
            id: id.to_owned(),
            op: "wait",
            reason: format!("blocking task failed: {e}"),
        })?
}

fn exit_from(reaped: Reaped, oom: bool) -> Exit {
    let (code, signal) = match reaped {
        Reaped::Exited(code) => (code, None),
        Reaped::Signaled(sig) => (128 + sig, Some(sig)),
        Reaped::NotChild => (UNKNOWN_EXIT, None),
    };
    // The OOM killer sends SIGKILL; an init that lost a child to it and
    // passed the 137 on counts too. A lost status with OOM kills recorded is
    // taken as one.
    let oom_killed =
        oom && (signal == Some(libc::SIGKILL) || code == 137 || reaped == Reaped::NotChild);
    Exit {
        code: if oom_killed { 137 } else { code },
        signal,
        oom_killed,
    }
}

fn format_exit(exit: &Exit) -> String {
    format!(
        "{} {} {}\n",
        exit.code,
        exit.signal.unwrap_or(0),
        u8::from(exit.oom_killed)
    )
}

fn parse_exit(text: &str) -> Option<Exit> {
    let mut it = text.split_whitespace().map(str::parse::<i32>);
    let code = it.next()?.ok()?;
    let signal = it.next()?.ok()?;
    let oom = it.next()?.ok()?;
    Some(Exit {
        code,
        signal: (signal != 0).then_some(signal),
        oom_killed: oom != 0,
    })
}

/// libcontainer's id rules (letters, digits, `_+-.`; not `.` or `..`), which
/// also keep `{work_root}/{id}` inside `work_root`.
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "invalid id {id:?}: expected 1 to {MAX_ID_LEN} characters"
        ));
    }
    if id == "." || id == ".." {
        return Err(format!("invalid id {id:?}: not a file name"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.')))
    {
        return Err(format!(
            "invalid id {id:?}: character {c:?} is not a letter, digit, '_', '+', '-' or '.'"
        ));
    }
    Ok(())
}

/// `flotilla/node-a` → a relative path whose every component is a valid id.
fn check_cgroup_parent(parent: &str) -> Result<PathBuf, String> {
    let trimmed = parent.trim_matches('/');
    if trimmed.is_empty() || trimmed.len() > MAX_CGROUP_PARENT_LEN {
        return Err(format!(
            "cgroup parent {parent:?}: expected 1 to {MAX_CGROUP_PARENT_LEN} characters"
        ));
    }
    for part in trimmed.split('/') {
        check_id(part).map_err(|e| format!("cgroup parent {parent:?}: {e}"))?;
    }
    Ok(PathBuf::from(trimmed))
}

fn setup(reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Setup {
        reason: reason.into(),
    }
}

fn create_private_dir(dir: &Path) -> Result<PathBuf, RuntimeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| dir.canonicalize())
        .map_err(|e| setup(format!("creating {}: {e}", dir.display())))
}

/// Writes a small file whole: a temp file renamed over it.
fn write_file(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn remove_dir_all(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// An error with its sources, which carry libcontainer's actual reason.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_libcontainer_rules() {
        for ok in ["web.app.3f2a", "a", "A_b+c-d.e"] {
            check_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é", &"x".repeat(129)] {
            assert!(check_id(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(
            check_cgroup_parent("/flotilla/node-a/").unwrap(),
            PathBuf::from("flotilla/node-a")
        );
        for bad in ["", "/", "flotilla/../x", "a//b", "a/ b"] {
            assert!(
                check_cgroup_parent(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn exit_statuses_map_like_docker() {
        let e = exit_from(Reaped::Exited(3), false);
        assert_eq!((e.code, e.signal, e.oom_killed), (3, None, false));
        let e = exit_from(Reaped::Signaled(libc::SIGTERM), false);
        assert_eq!((e.code, e.signal, e.oom_killed), (143, Some(15), false));
        let e = exit_from(Reaped::Signaled(libc::SIGKILL), true);
        assert_eq!((e.code, e.signal, e.oom_killed), (137, Some(9), true));
        let e = exit_from(Reaped::Exited(1), true);
        assert_eq!((e.code, e.oom_killed), (1, false));
        let e = exit_from(Reaped::NotChild, false);
        assert_eq!((e.code, e.signal, e.oom_killed), (255, None, false));
        let e = exit_from(Reaped::NotChild, true);
        assert_eq!((e.code, e.oom_killed), (137, true));
        for exit in [
            exit_from(Reaped::Signaled(9), true),
            exit_from(Reaped::Exited(0), false),
        ] {
            assert_eq!(parse_exit(&format_exit(&exit)), Some(exit));
        }
        assert_eq!(parse_exit("garbage"), None);
    }

    #[test]
    fn errors_keep_their_sources() {
        let inner = io::Error::other("deep reason");
        let outer = io::Error::other(Wrapper(inner));
        assert_eq!(chain(&outer), "wrapper: deep reason");
    }

    #[derive(Debug)]
    struct Wrapper(io::Error);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapper")
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
