//! Real containers through `YoukiRuntime`: a busybox root filesystem built in
//! a temp dir, run with libcontainer, checked through their exit status,
//! their log file, their cgroup files and what `delete` leaves behind.
//! Needs root, namespaces, overlayfs and cgroups, as the agent does.

// Helpers outside `#[test]` functions panic on purpose: they are test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use flotilla_agent::runtime::youki::{Capability, YoukiRuntime};
use flotilla_agent::runtime::{ContainerConfig, Exit, Runtime, RuntimeError};
use flotilla_proto::Resources;
use tempfile::TempDir;

mod common;
use common::{busybox_rootfs, unique_cgroup_parent, youki_runtime};

const DEADLINE: Duration = Duration::from_secs(30);

/// One runtime with its own directories and cgroup parent, and the
/// containers started through it, deleted when the test ends however it ends.
struct Fixture {
    rt: YoukiRuntime,
    dir: TempDir,
    image: PathBuf,
    cgroup_parent: String,
    ids: std::sync::Mutex<Vec<String>>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = busybox_rootfs(dir.path());
        let cgroup_parent = unique_cgroup_parent("rt");
        let rt = youki_runtime(dir.path(), &cgroup_parent);
        Self {
            rt,
            dir,
            image,
            cgroup_parent,
            ids: Default::default(),
        }
    }

    fn config(&self, id: &str, args: &[&str]) -> ContainerConfig {
        ContainerConfig {
            id: id.into(),
            image_rootfs: self.image.clone(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["GREETING=hello".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "box".into(),
            resources: Resources::default(),
            log_path: self.dir.path().join("logs").join(format!("{id}.log")),
            mounts: vec![],
            security: Default::default(),
        }
    }

    fn start(&self, config: &ContainerConfig) -> Result<(), RuntimeError> {
        self.ids.lock().unwrap().push(config.id.clone());
        self.rt.start(config)
    }

    fn log(&self, config: &ContainerConfig) -> String {
        std::fs::read_to_string(&config.log_path).unwrap_or_default()
    }

    async fn wait(&self, id: &str) -> Exit {
        tokio::time::timeout(DEADLINE, self.rt.wait(id))
            .await
            .unwrap_or_else(|_| panic!("container {id} still runs after {DEADLINE:?}"))
            .unwrap()
    }

    /// Every place a container `id` could leave a trace.
    fn traces(&self, id: &str) -> Vec<String> {
        let mut found = Vec::new();
        for root in cgroup_roots() {
            let dir = root.join(&self.cgroup_parent).join(id);
            if dir.exists() {
                found.push(format!("cgroup {}", dir.display()));
            }
        }
        let bundle = self.rt.bundle_of(id);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let bundle_text = bundle.to_string_lossy().into_owned();
        for line in mountinfo.lines().filter(|l| l.contains(&bundle_text)) {
            found.push(format!("mount {line}"));
        }
        if bundle.exists() {
            found.push(format!("bundle {}", bundle.display()));
        }
        let state = self.dir.path().join("state").join(id);
        if state.exists() {
            found.push(format!("state {}", state.display()));
        }
        found
    }

    /// The top of this fixture's cgroup parent in any hierarchy.
    fn parent_cgroups(&self) -> Vec<PathBuf> {
        let top = self.cgroup_parent.split('/').next().unwrap();
        cgroup_roots()
            .into_iter()
            .map(|r| r.join(top))
            .filter(|p| p.exists())
            .collect()
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

/// Every mounted cgroup hierarchy (v1 and v2).
fn cgroup_roots() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| PathBuf::from(left.split(' ').nth(4).unwrap()))
        })
        .collect()
}

/// The mount point of the v1 hierarchy with `controller`, if any.
fn v1_hierarchy(controller: &str) -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let opts = r.nth(1)?;
            (fstype == "cgroup" && opts.split(',').any(|o| o == controller))
                .then(|| PathBuf::from(left.split(' ').nth(4).unwrap()))
        })
}

/// Polls `cond` until it holds or the deadline passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn is_running(rt: &YoukiRuntime, id: &str) -> bool {
    rt.list().unwrap().iter().any(|e| e.id == id && e.running)
}

#[tokio::test]
async fn output_goes_to_the_log_and_the_exit_code_is_reported() {
    let f = Fixture::new();
    let c = f.config(
        "echo.main.1",
        &[
            "sh",
            "-c",
            "echo $GREETING from $(cat /proc/sys/kernel/hostname); echo to-stderr >&2; exit 3",
        ],
    );
    f.start(&c).unwrap();
    let exit = f.wait("echo.main.1").await;
    assert_eq!(
        exit,
        Exit {
            code: 3,
            signal: None,
            oom_killed: false
        }
    );
    // A second wait gives the same answer.
    assert_eq!(f.wait("echo.main.1").await, exit);
    let log = f.log(&c);
    assert!(log.contains("hello from box\n"), "log: {log:?}");
    assert!(log.contains("to-stderr\n"), "log: {log:?}");
    assert_eq!(
        f.rt.list()
            .unwrap()
            .iter()
            .map(|e| (e.id.as_str(), e.running))
            .collect::<Vec<_>>(),
        [("echo.main.1", false)]
    );

    // Restarting under the same id appends to the same log.
    f.rt.delete("echo.main.1").unwrap();
    f.start(&c).unwrap();
    assert_eq!(f.wait("echo.main.1").await.code, 3);
    assert_eq!(f.log(&c).matches("hello from box").count(), 2);

    f.rt.delete("echo.main.1").unwrap();
    assert_eq!(f.traces("echo.main.1"), Vec::<String>::new());
    assert_eq!(f.parent_cgroups(), Vec::<PathBuf>::new());
    // Deleting what does not exist is fine.
    f.rt.delete("echo.main.1").unwrap();
}

#[tokio::test]
async fn sigterm_ends_a_trapping_init_and_sigkill_any_init() {
    let f = Fixture::new();
    let trapping = f.config(
        "term.main.1",
        &[
            "sh",
            "-c",
            "trap 'exit 143' TERM; echo ready; sleep 1000 & wait",
        ],
    );
    // As PID 1 of its namespace, a process without a handler ignores
    // SIGTERM from outside: only SIGKILL ends it.
    let plain = f.config("plain.main.1", &["sleep", "1000"]);
    f.start(&trapping).unwrap();
    f.start(&plain).unwrap();
    assert!(is_running(&f.rt, "term.main.1"));
    assert!(is_running(&f.rt, "plain.main.1"));
    eventually("the trap to be set", || f.log(&trapping).contains("ready")).await;

    f.rt.kill("term.main.1", libc::SIGTERM).unwrap();
    let exit = f.wait("term.main.1").await;
    assert_eq!(
        (exit.code, exit.signal, exit.oom_killed),
        (143, None, false)
    );
    assert!(!is_running(&f.rt, "term.main.1"));

    f.rt.kill("plain.main.1", libc::SIGTERM).unwrap();
    let ignored = tokio::time::timeout(Duration::from_millis(300), f.rt.wait("plain.main.1")).await;
    assert!(
        ignored.is_err(),
        "SIGTERM ended a handler-less PID 1: {ignored:?}"
    );
    f.rt.kill("plain.main.1", libc::SIGKILL).unwrap();
    let exit = f.wait("plain.main.1").await;
    assert_eq!(
        (exit.code, exit.signal, exit.oom_killed),
        (137, Some(9), false)
    );

    // Killing what has exited is not an error.
    f.rt.kill("plain.main.1", libc::SIGKILL).unwrap();
    for id in ["term.main.1", "plain.main.1"] {
        f.rt.delete(id).unwrap();
        assert_eq!(f.traces(id), Vec::<String>::new());
    }
}

#[tokio::test]
async fn delete_kills_a_running_container_and_leaves_nothing() {
    let f = Fixture::new();
    let c = f.config("del.main.1", &["sleep", "1000"]);
    f.start(&c).unwrap();
    let bundle = f.rt.bundle_of("del.main.1");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let rootfs = bundle.join("rootfs").to_string_lossy().into_owned();
    assert!(
        mountinfo
            .lines()
            .any(|l| l.contains(&rootfs) && l.contains(" - overlay ")),
        "rootfs is not an overlay mount"
    );
    assert!(!f.traces("del.main.1").is_empty());
    f.rt.delete("del.main.1").unwrap();
    assert_eq!(f.traces("del.main.1"), Vec::<String>::new());
    assert_eq!(f.parent_cgroups(), Vec::<PathBuf>::new());
    assert!(f.rt.list().unwrap().is_empty());
}

#[tokio::test]
async fn writes_go_to_the_container_layer_not_the_image() {
    let f = Fixture::new();
    let c = f.config(
        "write.main.1",
        &["sh", "-c", "echo mine > /bin/added && cat /bin/added"],
    );
    f.start(&c).unwrap();
    assert_eq!(f.wait("write.main.1").await.code, 0);
    assert!(f.log(&c).contains("mine"));
    assert!(!f.image.join("bin/added").exists());
    assert!(
        f.rt.bundle_of("write.main.1")
            .join("upper/bin/added")
            .exists()
    );
    f.rt.delete("write.main.1").unwrap();
    assert!(
        f.image.join("bin/busybox").exists(),
        "delete damaged the image"
    );
}

#[tokio::test]
async fn memory_limit_oom_kills_with_137() {
    let f = Fixture::new();
    let mut c = f.config(
        "oom.main.1",
        &["sh", "-c", "x=aaaaaaaa; while true; do x=$x$x; done"],
    );
    c.resources.memory_bytes = Some(8 << 20);
    f.start(&c).unwrap();
    let exit = f.wait("oom.main.1").await;
    assert_eq!(
        exit,
        Exit {
            code: 137,
            signal: Some(9),
            oom_killed: true
        }
    );
    f.rt.delete("oom.main.1").unwrap();
    assert_eq!(f.traces("oom.main.1"), Vec::<String>::new());
}

#[tokio::test]
async fn pids_limit_stops_forks() {
    let f = Fixture::new();
    let script = "sleep 100 & sleep 100 & sleep 100 & sleep 100 & echo all-started";
    let mut limited = f.config("pids.main.1", &["sh", "-c", script]);
    limited.resources.pids = Some(4);
    let mut roomy = f.config("pids.main.2", &["sh", "-c", script]);
    roomy.resources.pids = Some(16);
    f.start(&limited).unwrap();
    f.start(&roomy).unwrap();
    let exit = f.wait("pids.main.1").await;
    let log = f.log(&limited);
    assert_ne!(exit.code, 0, "log: {log:?}");
    assert!(!log.contains("all-started"), "log: {log:?}");
    assert!(log.contains("fork"), "log: {log:?}");
    assert_eq!(f.wait("pids.main.2").await.code, 0);
    assert!(f.log(&roomy).contains("all-started"));
}

#[tokio::test]
async fn limits_are_written_to_the_container_cgroup() {
    let f = Fixture::new();
    let mut c = f.config("limits.main.1", &["sleep", "1000"]);
    c.resources = Resources {
        cpu_millis: Some(250),
        memory_bytes: Some(64 << 20),
        pids: Some(20),
    };
    f.start(&c).unwrap();
    let cgroup = f.rt.cgroup_of("limits.main.1");
    let read = |controller: &str, file: &str| {
        let root = v1_hierarchy(controller).unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
        std::fs::read_to_string(root.join(&cgroup).join(file))
            .unwrap_or_else(|e| panic!("{controller}/{file}: {e}"))
            .trim()
            .to_owned()
    };
    if v1_hierarchy("cpu").is_some() {
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "25000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(
            read("memory", "memory.memsw.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max"), "20");
    } else {
        assert_eq!(read("cpu", "cpu.max"), "25000 100000");
        assert_eq!(read("memory", "memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory", "memory.swap.max"), "0");
        assert_eq!(read("pids", "pids.max"), "20");
    }
    f.rt.delete("limits.main.1").unwrap();
    assert_eq!(f.traces("limits.main.1"), Vec::<String>::new());
}

#[tokio::test]
async fn bad_commands_fail_clearly_and_leave_nothing() {
    let f = Fixture::new();
    let cases: [(&str, ContainerConfig, &str); 4] = [
        (
            "bad.abs.1",
            f.config("bad.abs.1", &["/bin/nope"]),
            r#"container bad.abs.1: create failed: executable "/bin/nope" not found in the image"#,
        ),
        (
            "bad.path.1",
            f.config("bad.path.1", &["nope", "-x"]),
            r#"container bad.path.1: create failed: executable "nope" not found in the image (searched PATH "#,
        ),
        (
            "bad.cwd.1",
            ContainerConfig {
                cwd: "/srv/app".into(),
                ..f.config("bad.cwd.1", &["true"])
            },
            r#"container bad.cwd.1: create failed: working directory "/srv/app" not found in the image"#,
        ),
        (
            "bad.file.1",
            f.config("bad.file.1", &["/etc/passwd"]),
            r#"container bad.file.1: create failed: executable "/etc/passwd" in the image is not an executable file"#,
        ),
    ];
    for (id, config, want) in cases {
        let err = f.start(&config).unwrap_err();
        assert!(matches!(err, RuntimeError::Create { .. }), "{err}");
        assert!(err.to_string().starts_with(want), "{id}: {err}");
        assert_eq!(f.traces(id), Vec::<String>::new(), "{id}");
    }
    let mut missing_image = f.config("bad.image.1", &["true"]);
    missing_image.image_rootfs = f.dir.path().join("no-such-image");
    let err = f.start(&missing_image).unwrap_err();
    assert!(
        err.to_string()
            .contains("no-such-image: No such file or directory"),
        "{err}"
    );

    let err = f.start(&f.config("../escape", &["true"])).unwrap_err();
    assert!(err.to_string().contains("invalid id"), "{err}");
    assert!(!f.dir.path().join("escape").exists());
    assert!(f.rt.list().unwrap().is_empty());
    assert_eq!(f.parent_cgroups(), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn a_capability_outside_the_bounding_set_is_named() {
    let f = Fixture::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let candidates = [
        (Capability::SysResource, 24, "CAP_SYS_RESOURCE"),
        (Capability::SysModule, 16, "CAP_SYS_MODULE"),
        (Capability::SysTime, 25, "CAP_SYS_TIME"),
    ];
    let rt = f.rt.clone();
    match candidates
        .iter()
        .find(|(_, bit, _)| bounding & (1 << bit) == 0)
    {
        Some((cap, _, name)) => {
            let rt = rt.with_capabilities(vec![Capability::Chown, *cap]);
            let err = rt.start(&f.config("caps.main.1", &["true"])).unwrap_err();
            assert!(matches!(err, RuntimeError::Create { .. }), "{err}");
            let want = format!(
                "container caps.main.1: create failed: capability {name} is not in the host's capability bounding set"
            );
            assert_eq!(err.to_string(), want);
            assert_eq!(f.traces("caps.main.1"), Vec::<String>::new());
        }
        None => {
            // Every candidate is available here: granting one must work.
            let rt = rt.with_capabilities(vec![Capability::SysResource]);
            f.ids.lock().unwrap().push("caps.main.1".into());
            rt.start(&f.config("caps.main.1", &["true"])).unwrap();
            assert_eq!(f.wait("caps.main.1").await.code, 0);
        }
    }
}

#[tokio::test]
async fn a_restarted_agent_adopts_running_containers() {
    let f = Fixture::new();
    let c = f.config(
        "adopt.main.1",
        &["sh", "-c", "trap 'exit 7' TERM; echo up; sleep 1000 & wait"],
    );
    f.start(&c).unwrap();
    eventually("the container to be up", || f.log(&c).contains("up")).await;
    // A bundle without runtime state, as a reboot (state under /run is
    // gone) or a crash in the middle of a start leaves.
    let orphan = f.dir.path().join("work/orphan.main.1");
    std::fs::create_dir_all(orphan.join("upper/etc")).unwrap();
    std::fs::write(orphan.join("config.json"), "{}").unwrap();
    // A second runtime over the same directories, as after an agent restart.
    let again = youki_runtime(f.dir.path(), &f.cgroup_parent);
    assert!(is_running(&again, "adopt.main.1"));
    assert!(!orphan.exists(), "orphan bundle kept");
    assert!(f.rt.bundle_of("adopt.main.1").exists());
    let waiter = {
        let again = again.clone();
        tokio::spawn(async move { again.wait("adopt.main.1").await })
    };
    again.kill("adopt.main.1", libc::SIGTERM).unwrap();
    let exit = tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Still this test process's child, so the real code is known.
    assert_eq!(exit.code, 7);
    // The first runtime learns the same exit.
    assert_eq!(f.wait("adopt.main.1").await, exit);
    again.delete("adopt.main.1").unwrap();
    assert_eq!(f.traces("adopt.main.1"), Vec::<String>::new());
}

#[tokio::test]
async fn unknown_containers_are_not_found() {
    let f = Fixture::new();
    assert!(matches!(
        f.rt.wait("ghost.main.1").await.unwrap_err(),
        RuntimeError::NotFound { .. }
    ));
    assert!(matches!(
        f.rt.kill("ghost.main.1", libc::SIGTERM).unwrap_err(),
        RuntimeError::NotFound { .. }
    ));
    f.rt.delete("ghost.main.1").unwrap();
}

#[tokio::test]
async fn the_container_gets_docker_like_isolation_on_the_host_network() {
    let f = Fixture::new();
    let script = r#"
        echo "pid=$$"
        grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status
        if echo x >> /etc/hosts; then echo hosts-writable; fi
        if touch /sys/x 2>/dev/null; then echo sys-writable; fi
        if cat /proc/kcore 2>/dev/null | head -c 1 | grep -q .; then echo kcore-readable; fi
        cat /etc/hosts
        ls /dev
    "#;
    let c = f.config("iso.main.1", &["sh", "-c", script]);
    f.start(&c).unwrap();
    assert_eq!(f.wait("iso.main.1").await.code, 0, "log: {}", f.log(&c));
    let log = f.log(&c);
    assert!(log.contains("pid=1\n"), "log: {log}");
    // Docker's default capability set, and no way to gain more.
    assert!(log.contains("CapEff:\t00000000a80425fb"), "log: {log}");
    assert!(log.contains("CapBnd:\t00000000a80425fb"), "log: {log}");
    assert!(log.contains("NoNewPrivs:\t1"), "log: {log}");
    assert!(!log.contains("-writable"), "log: {log}");
    assert!(!log.contains("kcore-readable"), "log: {log}");
    for dev in ["null", "zero", "urandom", "pts", "shm", "mqueue"] {
        assert!(
            log.lines().any(|l| l == dev),
            "/dev/{dev} missing; log: {log}"
        );
    }
    if let Ok(hosts) = std::fs::read_to_string("/etc/hosts") {
        assert!(
            log.contains(&hosts),
            "host /etc/hosts not shared; log: {log}"
        );
    }
}

#[tokio::test]
async fn an_image_overlayfs_cannot_take_is_copied() {
    let f = Fixture::new();
    // A ',' cannot be passed in overlay mount options.
    let odd = f.dir.path().join("img,odd");
    std::fs::rename(&f.image, &odd).unwrap();
    let c = ContainerConfig {
        image_rootfs: odd.clone(),
        ..f.config(
            "copy.main.1",
            &["sh", "-c", "echo mine > /bin/added && cat /bin/added"],
        )
    };
    f.start(&c).unwrap();
    assert_eq!(f.wait("copy.main.1").await.code, 0);
    assert!(f.log(&c).contains("mine"));
    assert!(!odd.join("bin/added").exists());
    let rootfs = f.rt.bundle_of("copy.main.1").join("rootfs");
    assert!(rootfs.join("bin/added").exists());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(rootfs.to_string_lossy().as_ref()));
    f.rt.delete("copy.main.1").unwrap();
    assert_eq!(f.traces("copy.main.1"), Vec::<String>::new());
    assert!(odd.join("bin/busybox").exists());
}
