//! Probes and volumes in the reconciler, against the fake runtime (whose
//! `exec` results the tests choose) under paused time: liveness failures
//! restart, readiness toggles `ready`, the startup probe holds the others
//! back, thresholds count consecutive results; volume directories follow
//! their pod and a changed volume replaces the containers that mount it.

// Helpers outside #[test] fns panic on setup failures too: that fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::reconciler::{Harness, desired, until};
use flotilla_agent::reconciler::container_id_with_volumes;
use flotilla_agent::runtime::fake::FakeRuntime;
use flotilla_proto::{
    ConfigFile, ContainerSpec, ContainerState, PodSpec, PodStatus, Probe, ProbeAction,
    RestartPolicy, Volume, VolumeMount, VolumeSource,
};
use tokio::time::Instant;

fn container(name: &str) -> ContainerSpec {
    ContainerSpec {
        command: vec!["serve".into()],
        ..ContainerSpec::new(name, "oci:/images/fake:latest")
    }
}

/// An exec probe running `command`, every `period` seconds.
fn exec(command: &str, period_secs: u32) -> Probe {
    Probe {
        action: ProbeAction::Exec {
            command: command.split(' ').map(str::to_owned).collect(),
        },
        initial_delay_secs: 0,
        period_secs,
        timeout_secs: 1,
        success_threshold: 1,
        failure_threshold: 3,
    }
}

fn pod(name: &str, policy: RestartPolicy, containers: Vec<ContainerSpec>) -> PodSpec {
    PodSpec {
        name: name.into(),
        workload: name.into(),
        restart_policy: policy,
        termination_grace_secs: 30,
        volumes: vec![],
        containers,
        image_pull_secrets: Vec::new(),
    }
}

fn id_of(p: &PodSpec, i: usize) -> String {
    container_id_with_volumes(&p.name, &p.containers[i], &p.volumes)
}

/// The first container of pod `name`, as last reported: ready, restarts, state.
fn first(h: &Harness, name: &str) -> (bool, u32, ContainerState) {
    let s = h.status.borrow();
    let p = s.pods.iter().find(|p| p.name == name).unwrap();
    let c = &p.containers[0];
    (c.ready, c.restarts, c.state.clone())
}

fn running(p: &PodStatus) -> bool {
    matches!(p.containers[0].state, ContainerState::Running { .. })
}

#[tokio::test(start_paused = true)]
async fn without_probes_a_running_container_is_ready() {
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.apply(desired(
        1,
        vec![pod("plain", RestartPolicy::Always, vec![container("c")])],
    ))
    .await;
    let p = h.pod_where("plain", "running", running).await;
    assert!(p.containers[0].ready);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn liveness_failures_restart_the_container() {
    let mut c = container("c");
    c.liveness_probe = Some(Probe {
        initial_delay_secs: 15,
        ..exec("live", 10)
    });
    let p = pod("web", RestartPolicy::Always, vec![c]);
    let id = id_of(&p, 0);
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.runtime.set_exec("live", Some(0));
    let t0 = Instant::now();
    h.apply(desired(1, vec![p])).await;
    h.pod_where("web", "running", running).await;
    // No check before the initial delay; one per period after it.
    until("first check", || h.runtime.exec_count("live") == 1).await;
    assert_eq!(t0.elapsed().as_secs(), 15);
    until("second check", || h.runtime.exec_count("live") == 2).await;
    assert_eq!(t0.elapsed().as_secs(), 25);
    assert!(
        first(&h, "web").0,
        "a container without readiness probe is ready"
    );

    // Three failures in a row: killed at the third, then restarted after
    // the 1 s back-off.
    h.runtime.set_exec("live", Some(1));
    let failing = Instant::now();
    let p = h
        .pod_where("web", "restart after liveness failure", |p| {
            p.containers[0].restarts == 1 && running(p)
        })
        .await;
    assert_eq!(failing.elapsed().as_secs(), 30 + 1);
    assert_eq!(h.runtime.exec_count("live"), 5);
    assert_eq!(h.runtime.start_count(&id), 2);
    assert!(p.containers[0].ready);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn liveness_failure_is_shown_and_follows_the_restart_policy() {
    let mut c = container("c");
    c.liveness_probe = Some(Probe {
        failure_threshold: 1,
        ..exec("dead", 5)
    });
    let p = pod("never", RestartPolicy::Never, vec![c]);
    let id = id_of(&p, 0);
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.runtime.set_exec("dead", Some(2));
    h.apply(desired(1, vec![p])).await;
    let p = h
        .pod_where("never", "terminated", |p| {
            matches!(p.containers[0].state, ContainerState::Terminated { .. })
        })
        .await;
    match &p.containers[0].state {
        ContainerState::Terminated {
            exit_code, message, ..
        } => {
            assert_eq!(*exit_code, 128 + libc::SIGTERM);
            assert_eq!(
                message.as_deref(),
                Some("liveness probe failed: command exited with code 2")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!p.containers[0].ready);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.runtime.start_count(&id), 1, "Never: not restarted");
    assert_eq!(h.runtime.exec_count("dead"), 1, "probing stopped with it");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn readiness_toggles_ready_with_both_thresholds() {
    let mut c = container("c");
    c.readiness_probe = Some(Probe {
        success_threshold: 2,
        failure_threshold: 2,
        ..exec("ready", 5)
    });
    let p = pod("web", RestartPolicy::Always, vec![c]);
    let id = id_of(&p, 0);
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.runtime.set_exec("ready", Some(1));
    h.apply(desired(1, vec![p])).await;
    h.pod_where("web", "running", running).await;
    until("two checks", || h.runtime.exec_count("ready") == 2).await;
    assert!(!first(&h, "web").0, "not ready while the probe fails");

    // One success is not enough; the second makes it ready.
    h.runtime.set_exec("ready", Some(0));
    until("one success", || h.runtime.exec_count("ready") == 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!first(&h, "web").0, "ready after a single success");
    h.pod_where("web", "ready", |p| p.containers[0].ready).await;
    assert_eq!(h.runtime.exec_count("ready"), 4);

    // One failure is not enough either; the second makes it unready.
    h.runtime.set_exec("ready", Some(1));
    until("one failure", || h.runtime.exec_count("ready") == 5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(first(&h, "web").0, "unready after a single failure");
    let p = h
        .pod_where("web", "unready", |p| !p.containers[0].ready)
        .await;
    assert_eq!(h.runtime.exec_count("ready"), 6);
    // Readiness never restarts anything.
    assert!(running(&p));
    assert_eq!(p.containers[0].restarts, 0);
    assert_eq!(h.runtime.start_count(&id), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn startup_probe_holds_the_others_back() {
    let mut c = container("c");
    c.startup_probe = Some(Probe {
        failure_threshold: 30,
        ..exec("started", 1)
    });
    c.liveness_probe = Some(exec("live", 10));
    c.readiness_probe = Some(exec("ready", 10));
    let p = pod("slow", RestartPolicy::Always, vec![c]);
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.runtime.set_exec("started", Some(1));
    h.runtime.set_exec("live", Some(1));
    h.runtime.set_exec("ready", Some(0));
    h.apply(desired(1, vec![p])).await;
    h.pod_where("slow", "running", running).await;
    until("ten startup checks", || {
        h.runtime.exec_count("started") == 10
    })
    .await;
    assert_eq!(h.runtime.exec_count("live"), 0);
    assert_eq!(h.runtime.exec_count("ready"), 0);
    assert!(!first(&h, "slow").0, "not ready before startup passes");

    // Once it passes it stops; the others start at once (their initial
    // delay is long past).
    h.runtime.set_exec("started", Some(0));
    h.runtime.set_exec("live", Some(0));
    h.pod_where("slow", "ready", |p| p.containers[0].ready)
        .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.runtime.exec_count("started"), 11);
    assert_eq!(h.runtime.exec_count("ready"), 7);
    assert_eq!(h.runtime.exec_count("live"), 7);
    assert_eq!(first(&h, "slow").1, 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_startup_probe_that_never_passes_restarts_the_container() {
    let mut c = container("c");
    c.startup_probe = Some(Probe {
        failure_threshold: 4,
        ..exec("started", 2)
    });
    c.liveness_probe = Some(exec("live", 1));
    let p = pod("stuck", RestartPolicy::Always, vec![c]);
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.runtime.set_exec("started", Some(1));
    h.runtime.set_exec("live", Some(0));
    let t0 = Instant::now();
    h.apply(desired(1, vec![p])).await;
    let p = h
        .pod_where("stuck", "back-off", |p| {
            matches!(&p.containers[0].state, ContainerState::Waiting { reason, .. } if reason == "BackOff")
        })
        .await;
    // Checks at 0, 2, 4 and 6 s, killed at the fourth failure.
    assert_eq!(t0.elapsed().as_secs(), 6);
    assert_eq!(h.runtime.exec_count("started"), 4);
    assert_eq!(h.runtime.exec_count("live"), 0);
    match &p.containers[0].state {
        ContainerState::Waiting {
            reason, message, ..
        } => {
            assert_eq!(reason, "BackOff");
            assert!(
                message
                    .as_deref()
                    .unwrap()
                    .starts_with("startup probe failed: command exited with code 1;"),
                "{message:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn liveness_counts_only_consecutive_failures() {
    let mut c = container("c");
    c.liveness_probe = Some(exec("live", 10));
    let p = pod("flaky", RestartPolicy::Always, vec![c]);
    let id = id_of(&p, 0);
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.runtime.set_exec("live", Some(1));
    h.apply(desired(1, vec![p])).await;
    h.pod_where("flaky", "running", running).await;
    // fail, fail, pass, fail, fail: never three in a row.
    for (n, code) in [(1, 1), (2, 1), (3, 0), (4, 1), (5, 1), (6, 0)] {
        h.runtime.set_exec("live", Some(code));
        until(&format!("check {n}"), || h.runtime.exec_count("live") == n).await;
    }
    // A timed-out check counts as a failure: three in a row now.
    h.runtime.set_exec("live", None);
    until("three timeouts", || h.runtime.exec_count("live") == 9).await;
    h.pod_where("flaky", "restarted", |p| p.containers[0].restarts == 1)
        .await;
    assert_eq!(h.runtime.start_count(&id), 2);
    h.stop().await;
}

fn conf(text: &str) -> Volume {
    Volume {
        name: "conf".into(),
        source: VolumeSource::Config {
            files: vec![ConfigFile {
                path: "app/settings.conf".into(),
                data: text.as_bytes().to_vec(),
                mode: 0o644,
            }],
        },
    }
}

#[tokio::test(start_paused = true)]
async fn volumes_follow_their_pod_and_changes_replace_mounting_containers() {
    let mut reader = container("reader");
    reader.volume_mounts = vec![
        VolumeMount {
            name: "conf".into(),
            mount_path: "/etc/app".into(),
            read_only: true,
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            read_only: false,
        },
    ];
    let mut v1 = pod(
        "vols",
        RestartPolicy::Always,
        vec![reader, container("other")],
    );
    v1.volumes = vec![
        conf("one"),
        Volume {
            name: "tmp".into(),
            source: VolumeSource::Scratch,
        },
    ];
    let mut v2 = v1.clone();
    v2.volumes[0] = conf("two");
    let (reader1, reader2, other) = (id_of(&v1, 0), id_of(&v2, 0), id_of(&v1, 1));
    assert_ne!(reader1, reader2);
    assert_eq!(other, id_of(&v2, 1));

    let mut h = Harness::start(FakeRuntime::new(), None);
    let pod_dir = h.dir.path().join("pods/vols");
    let file = pod_dir.join("config/conf/app/settings.conf");
    h.apply(desired(1, vec![v1])).await;
    h.pod_where("vols", "running", |p| p.containers.iter().all(|c| c.ready))
        .await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "one");
    assert!(pod_dir.join("scratch/tmp").is_dir());
    std::fs::write(pod_dir.join("scratch/tmp/kept"), "x").unwrap();

    h.apply(desired(2, vec![v2])).await;
    until("reader replaced", || {
        let mut want = vec![reader2.clone(), other.clone()];
        want.sort();
        h.runtime.running_ids() == want
    })
    .await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "two");
    assert!(
        pod_dir.join("scratch/tmp/kept").exists(),
        "scratch survives"
    );
    assert_eq!(h.runtime.start_count(&other), 1, "other does not mount it");

    h.apply(desired(3, vec![])).await;
    until("pod directory removed", || !pod_dir.exists()).await;
    h.stop().await;
}
