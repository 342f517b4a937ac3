//! Offline autonomy: with no broker reachable, the agent runs the desired
//! state it stored last — from the previous copy when the current file is
//! corrupt — and shuts down cleanly, leaving its containers running.

// Helpers outside #[test] fns panic on setup failures too: that fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::config::Config;
use flotilla_agent::image::FakeImages;
use flotilla_agent::reconciler::container_id;
use flotilla_agent::runtime::fake::FakeRuntime;
use flotilla_proto::{ContainerSpec, DesiredState, PodSpec, RestartPolicy, encode};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(15);

fn state(node: &str, generation: u64, pod: &str) -> DesiredState {
    DesiredState {
        node: node.into(),
        generation,
        pods: vec![PodSpec {
            name: pod.into(),
            workload: pod.into(),
            restart_policy: RestartPolicy::Always,
            termination_grace_secs: 30,
            volumes: vec![],
            containers: vec![spec()],
            image_pull_secrets: Vec::new(),
        }],
        prefetch: Vec::new(),
        prefetch_pull_secrets: Vec::new(),
    }
}

fn spec() -> ContainerSpec {
    ContainerSpec {
        command: vec!["serve".into()],
        ..ContainerSpec::new("c", "oci:/images/app:latest")
    }
}

/// A port with nothing listening on it.
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn run_offline(files: &[(&str, Vec<u8>)], expect_running: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("state")).unwrap();
    for (name, bytes) in files {
        std::fs::write(data.join("state").join(name), bytes).unwrap();
    }
    let config = Config::new(
        &format!("mqtt://127.0.0.1:{}", dead_port()),
        "edge-off",
        data,
    )
    .unwrap();
    let runtime = FakeRuntime::new();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(flotilla_agent::run_with(
        config,
        Arc::new(runtime.clone()),
        Arc::new(FakeImages),
        shutdown.clone(),
    ));
    let t0 = Instant::now();
    while runtime.running_ids() != expect_running {
        assert!(
            t0.elapsed() < DEADLINE,
            "running {:?}, expected {expect_running:?}",
            runtime.running_ids()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let result = tokio::time::timeout(DEADLINE, agent)
        .await
        .expect("run returns after shutdown while the broker is unreachable")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        runtime.running_ids(),
        expect_running,
        "containers outlive the agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_the_stored_state_with_no_broker() {
    let frame = encode(&state("edge-off", 4, "current")).unwrap();
    run_offline(
        &[("desired.bin", frame)],
        &[container_id("current", &spec())],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_falls_back_to_the_previous_copy() {
    let prev = encode(&state("edge-off", 3, "previous")).unwrap();
    let mut torn = encode(&state("edge-off", 4, "current")).unwrap();
    torn.truncate(torn.len() - 5);
    run_offline(
        &[("desired.bin", torn), ("desired.prev.bin", prev)],
        &[container_id("previous", &spec())],
    )
    .await;
}
