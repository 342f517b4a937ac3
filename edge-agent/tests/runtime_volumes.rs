//! Real containers through `YoukiRuntime` with bind mounts (host paths,
//! read-only and read-write, directories and files, agent-owned ones with
//! `nosuid,nodev`) and commands run inside them with `exec` (exit codes,
//! the container's user, environment and filesystem, timeouts).
//! Needs root, namespaces, overlayfs and cgroups, as the agent does.

// Helpers outside `#[test]` functions panic on purpose: they are test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_agent::runtime::youki::YoukiRuntime;
use flotilla_agent::runtime::{ContainerConfig, Exit, Mount, Runtime, RuntimeError};
use flotilla_proto::Resources;
use tempfile::TempDir;

mod common;
use common::{busybox_rootfs, unique_cgroup_parent, youki_runtime};

const DEADLINE: Duration = Duration::from_secs(30);

/// A runtime in its own directories and cgroup parent; its containers are
/// deleted when the test ends, however it ends.
struct Fixture {
    rt: YoukiRuntime,
    dir: TempDir,
    image: PathBuf,
    ids: std::sync::Mutex<Vec<String>>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = busybox_rootfs(dir.path());
        let cgroup_parent = unique_cgroup_parent("vol");
        let rt = youki_runtime(dir.path(), &cgroup_parent);
        Self {
            rt,
            dir,
            image,
            ids: Default::default(),
        }
    }

    fn config(&self, id: &str, script: &str, mounts: Vec<Mount>) -> ContainerConfig {
        ContainerConfig {
            id: id.into(),
            image_rootfs: self.image.clone(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["GREETING=hello".into()],
            cwd: "/tmp".into(),
            uid: 65534,
            gid: 65534,
            hostname: "box".into(),
            resources: Resources {
                pids: Some(32),
                ..Resources::default()
            },
            log_path: self.dir.path().join("logs").join(format!("{id}.log")),
            mounts,
            security: Default::default(),
        }
    }

    fn start(&self, config: &ContainerConfig) {
        self.ids.lock().unwrap().push(config.id.clone());
        self.rt.start(config).unwrap();
    }

    async fn wait(&self, id: &str) -> Exit {
        tokio::time::timeout(DEADLINE, self.rt.wait(id))
            .await
            .unwrap_or_else(|_| panic!("container {id} still runs after {DEADLINE:?}"))
            .unwrap()
    }

    fn log(&self, config: &ContainerConfig) -> String {
        std::fs::read_to_string(&config.log_path).unwrap_or_default()
    }

    /// `exec` on a blocking thread, as the agent calls it.
    async fn exec(&self, id: &str, script: &str, timeout: Duration) -> Result<i32, RuntimeError> {
        let (rt, id) = (self.rt.clone(), id.to_owned());
        let argv = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];
        tokio::task::spawn_blocking(move || rt.exec(&id, &argv, timeout))
            .await
            .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for id in self.ids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Err(e) = self.rt.delete(id) {
                eprintln!("cleanup of {id} failed: {e}");
            }
        }
    }
}

/// Processes with command line `cmdline` still there after `within`: a
/// killed process leaves /proc a moment after the kill.
async fn processes_left(cmdline: &[u8], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = processes_running(cmdline);
        if n == 0 || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Processes on the host whose command line is `cmdline` (NUL-separated).
fn processes_running(cmdline: &[u8]) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == cmdline))
        .count()
}

fn mount(source: &Path, destination: &str, read_only: bool, agent_owned: bool) -> Mount {
    Mount {
        source: source.to_path_buf(),
        destination: destination.into(),
        read_only,
        agent_owned,
    }
}

/// A host directory anyone can write, as a container's user needs.
fn open_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    path.to_path_buf()
}

#[tokio::test]
async fn bind_mounts_read_write_read_only_and_files() {
    let f = Fixture::new();
    let rw = open_dir(&f.dir.path().join("host-rw"));
    let ro = open_dir(&f.dir.path().join("host-ro"));
    std::fs::write(ro.join("in.txt"), "from the host\n").unwrap();
    let config_dir = open_dir(&f.dir.path().join("config"));
    std::fs::write(config_dir.join("app.conf"), "port = 80\n").unwrap();
    let single = f.dir.path().join("single.txt");
    std::fs::write(&single, "one file\n").unwrap();

    let script = "\
        echo written > /data/out.txt && echo rw-ok; \
        cat /ro/in.txt; \
        touch /ro/nope 2>/dev/null && echo ro-broken || echo ro-ok; \
        cat /deep/new/dir/app.conf; \
        touch /deep/new/dir/x 2>/dev/null && echo conf-broken || echo conf-ok; \
        cat /etc/single.txt; \
        grep ' /deep/new/dir ' /proc/mounts; \
        grep ' /data ' /proc/mounts";
    let c = f.config(
        "vol.main.1",
        script,
        vec![
            mount(&rw, "/data", false, false),
            mount(&ro, "/ro", true, false),
            mount(&config_dir, "/deep/new/dir", true, true),
            mount(&single, "/etc/single.txt", true, false),
        ],
    );
    f.start(&c);
    let exit = f.wait("vol.main.1").await;
    let log = f.log(&c);
    assert_eq!(exit.code, 0, "{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        &lines[..6],
        [
            "rw-ok",
            "from the host",
            "ro-ok",
            "port = 80",
            "conf-ok",
            "one file"
        ],
        "{log}"
    );
    let options = |line: &str| -> Vec<String> {
        line.split(' ')
            .nth(3)
            .unwrap()
            .split(',')
            .map(str::to_owned)
            .collect()
    };
    let conf_opts = options(lines[6]);
    for o in ["ro", "nosuid", "nodev"] {
        assert!(
            conf_opts.contains(&o.to_owned()),
            "{o} missing: {}",
            lines[6]
        );
    }
    let data_opts = options(lines[7]);
    assert!(data_opts.contains(&"rw".to_owned()), "{}", lines[7]);
    assert!(!data_opts.contains(&"nosuid".to_owned()), "{}", lines[7]);
    // The write went to the host directory, as the container's user.
    assert_eq!(
        std::fs::read_to_string(rw.join("out.txt")).unwrap(),
        "written\n"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(rw.join("out.txt")).unwrap().uid(), 65534);
    assert!(!ro.join("nope").exists());
    // The image was not touched by the mount points made in the rootfs.
    assert!(!f.image.join("deep").exists());
    f.rt.delete("vol.main.1").unwrap();
}

#[tokio::test]
async fn a_missing_host_path_fails_the_start_naming_it() {
    let f = Fixture::new();
    let c = f.config(
        "vol.missing.1",
        "true",
        vec![mount(
            &f.dir.path().join("not-there"),
            "/data",
            false,
            false,
        )],
    );
    f.ids.lock().unwrap().push(c.id.clone());
    let err = f.rt.start(&c).unwrap_err().to_string();
    assert!(
        err.starts_with("container vol.missing.1: create failed"),
        "{err}"
    );
    assert!(err.contains("not-there"), "{err}");
}

#[tokio::test]
async fn exec_runs_inside_the_container_as_its_user() {
    let f = Fixture::new();
    let scratch = open_dir(&f.dir.path().join("scratch"));
    let c = f.config(
        "exec.main.1",
        "touch /tmp/ready && exec sleep 3600",
        vec![mount(&scratch, "/scratch", false, true)],
    );
    f.start(&c);
    let t = Duration::from_secs(10);
    let deadline = Instant::now() + DEADLINE;
    // The container's own filesystem: /tmp/ready shows up there, not here.
    while f
        .exec("exec.main.1", "test -f /tmp/ready", t)
        .await
        .unwrap()
        != 0
    {
        assert!(Instant::now() < deadline, "/tmp/ready never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cases = [
        ("exit 3", 3),
        ("true", 0),
        ("test \"$GREETING\" = hello", 0),
        ("test \"$(id -u):$(id -g)\" = 65534:65534", 0),
        ("test \"$PWD\" = /tmp", 0),
        ("echo probe > /scratch/by-exec", 0),
        ("kill -9 $$", 128 + 9),
        ("no-such-command", 127),
    ];
    for (script, want) in cases {
        assert_eq!(
            f.exec("exec.main.1", script, t).await.unwrap(),
            want,
            "{script}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(scratch.join("by-exec")).unwrap(),
        "probe\n"
    );
    // Probe output is discarded, not added to the container's log.
    f.exec("exec.main.1", "echo not-in-the-log", t)
        .await
        .unwrap();
    assert!(!f.log(&c).contains("not-in-the-log"));

    // A command past its timeout is killed, with what it started: the call
    // returns soon after, and no process of it is left.
    let began = Instant::now();
    let err = f
        .exec(
            "exec.main.1",
            "sleep 31337 & sleep 31337",
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Timeout { .. }), "{err}");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(
        processes_left(b"sleep\x0031337\x00", Duration::from_secs(5)).await,
        0
    );
    // Nor does a command that exits leaving a child in the background.
    let code = f
        .exec("exec.main.1", "sleep 31338 & exit 0", t)
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert_eq!(
        processes_left(b"sleep\x0031338\x00", Duration::from_secs(5)).await,
        0
    );
    let leftovers: Vec<String> = std::fs::read_dir(f.dir.path().join("state/exec.main.1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tenant-"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());

    f.rt.kill("exec.main.1", libc::SIGKILL).unwrap();
    f.wait("exec.main.1").await;
    assert!(f.exec("exec.main.1", "true", t).await.is_err());
    f.rt.delete("exec.main.1").unwrap();
    assert!(matches!(
        f.exec("exec.main.1", "true", t).await.unwrap_err(),
        RuntimeError::NotFound { .. }
    ));
}
