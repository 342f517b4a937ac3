//! The agent with real containers (youki runtime, real image store, a
//! busybox image), with no broker: it runs what is stored, and on the next
//! start removes what is no longer desired — processes, cgroups and logs.
//! Needs root, namespaces, overlayfs and cgroups, as the agent does.

// Helpers outside #[test] fns panic on setup failures too: that fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_agent::config::{Config, RuntimeKind};
use flotilla_proto::{ContainerSpec, DesiredState, PodSpec, RestartPolicy, encode};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);
const NODE: &str = "agent-youki-test";

fn container(name: &str, image: &str, script: &str) -> ContainerSpec {
    ContainerSpec {
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..ContainerSpec::new(name, image)
    }
}

fn pod(name: &str, c: ContainerSpec) -> PodSpec {
    PodSpec {
        name: name.into(),
        workload: name.into(),
        restart_policy: RestartPolicy::Always,
        termination_grace_secs: 30,
        volumes: vec![],
        containers: vec![c],
        image_pull_secrets: Vec::new(),
    }
}

/// The ids of the containers with a cgroup under [`NODE`]'s parent.
fn cgroups() -> Vec<String> {
    let mut ids: Vec<String> = cgroup_dirs()
        .iter()
        .filter_map(|d| Some(d.file_name()?.to_str()?.to_owned()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The container cgroup directories of [`NODE`] in every hierarchy.
fn cgroup_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for root in ["memory", "pids", "cpu", "cpu,cpuacct", "unified", ""] {
        let dir = Path::new("/sys/fs/cgroup")
            .join(root)
            .join("flotilla")
            .join(NODE);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            out.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Kills and removes whatever a failed or crashed run left in the node's
/// cgroups, at the start and at the end of the test.
struct Cleanup;

impl Cleanup {
    fn sweep() {
        for dir in cgroup_dirs() {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let t0 = Instant::now();
            // rmdir fails with EBUSY until the killed processes are gone.
            while std::fs::remove_dir(&dir).is_err() && t0.elapsed() < DEADLINE {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        Self::sweep();
    }
}

/// Runs the agent (youki runtime, no reachable broker) with `desired`
/// stored, until `done` holds, then shuts it down.
async fn run_with_stored(dir: &Path, desired: &DesiredState, what: &str, done: impl Fn() -> bool) {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("state")).unwrap();
    std::fs::write(data.join("state/desired.bin"), encode(desired).unwrap()).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = Config::new(&format!("mqtt://127.0.0.1:{port}"), NODE, data).unwrap();
    config.runtime = RuntimeKind::Youki;
    config.runtime_helper = Some(env!("CARGO_BIN_EXE_flotilla-agent").into());
    config.run_dir = dir.join("run");
    config.stop_grace = Duration::from_secs(1);
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(flotilla_agent::run(config, shutdown.clone()));
    let t0 = Instant::now();
    while !done() {
        assert!(
            !agent.is_finished(),
            "the agent ended early: {:?}",
            agent.await
        );
        assert!(t0.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let result = tokio::time::timeout(DEADLINE, agent)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_containers_run_from_stored_state_and_are_removed_when_undesired() {
    Cleanup::sweep();
    let _cleanup = Cleanup;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("busybox");
    flotilla_testkit::oci::busybox()
        .write_layout(&layout, "latest")
        .unwrap();
    let image = format!("oci:{}:latest", layout.display());
    let logs = dir.path().join("data/logs");
    let log = |pod: &str| std::fs::read_to_string(logs.join(pod).join("c.log")).unwrap_or_default();

    // Generation 1: one pod, which writes to its log and keeps running.
    let hello = pod(
        "hello",
        container("c", &image, "echo hello from $(hostname); exec sleep 1000"),
    );
    let d1 = DesiredState {
        node: NODE.into(),
        generation: 1,
        pods: vec![hello],
        prefetch: Vec::new(),
        prefetch_pull_secrets: Vec::new(),
    };
    run_with_stored(dir.path(), &d1, "hello's output", || {
        log("hello").contains("hello from hello")
    })
    .await;
    assert_eq!(
        cgroups().len(),
        1,
        "the container outlives the agent: {:?}",
        cgroups()
    );

    // Generation 2, found at the next start: hello is gone, second is new.
    let second = pod(
        "second",
        container("c", &image, "echo second; exec sleep 1000"),
    );
    let d2 = DesiredState {
        node: NODE.into(),
        generation: 2,
        pods: vec![second],
        prefetch: Vec::new(),
        prefetch_pull_secrets: Vec::new(),
    };
    run_with_stored(dir.path(), &d2, "hello removed and second running", || {
        let ids = cgroups();
        log("second").contains("second")
            && !logs.join("hello").exists()
            && ids.len() == 1
            && ids[0].starts_with("second.c.")
    })
    .await;

    // Generation 3: nothing at all.
    let d3 = DesiredState {
        node: NODE.into(),
        generation: 3,
        pods: vec![],
        prefetch: Vec::new(),
        prefetch_pull_secrets: Vec::new(),
    };
    run_with_stored(dir.path(), &d3, "everything removed", || {
        cgroups().is_empty() && !logs.join("second").exists()
    })
    .await;
}
