//! The reconciler against the fake runtime and fake images, under paused
//! time: starts, restart policies, back-off, spec changes, removal, adoption.

// Helpers outside #[test] fns panic on setup failures too: that fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::reconciler::{Harness, PATIENCE, desired, until};
use flotilla_agent::reconciler::container_id;
use flotilla_agent::runtime::fake::FakeRuntime;
use flotilla_agent::runtime::{ContainerConfig, Runtime};
use flotilla_proto::{
    ContainerSpec, ContainerState, PodPhase, PodSpec, PodStatus, Resources, RestartPolicy,
};
use tokio::time::Instant;

fn container(name: &str, command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        ..ContainerSpec::new(name, "oci:/images/fake:latest")
    }
}

fn pod(name: &str, policy: RestartPolicy, containers: Vec<ContainerSpec>) -> PodSpec {
    PodSpec {
        name: name.into(),
        workload: format!("{name}-workload"),
        restart_policy: policy,
        termination_grace_secs: 30,
        volumes: vec![],
        containers,
        image_pull_secrets: Vec::new(),
    }
}

/// Whole seconds, to the nearest: polling adds a few milliseconds.
fn round_secs(d: Duration) -> u64 {
    (d.as_millis() as u64 + 500) / 1000
}

fn running(p: &PodStatus) -> bool {
    p.phase == PodPhase::Running
        && p.containers
            .iter()
            .all(|c| matches!(c.state, ContainerState::Running { .. }))
}

#[tokio::test(start_paused = true)]
async fn starts_every_container_and_reports_running() {
    let web = pod(
        "web",
        RestartPolicy::Always,
        vec![
            container("app", &["serve"]),
            container("sidecar", &["proxy"]),
        ],
    );
    let ids: Vec<String> = web
        .containers
        .iter()
        .map(|c| container_id("web", c))
        .collect();
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.apply(desired(1, vec![web])).await;
    let p = h.pod_where("web", "web running", running).await;
    assert_eq!((p.workload.as_str(), p.generation), ("web-workload", 1));
    let names: Vec<_> = p.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "sidecar"]);
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(h.runtime.running_ids(), expected);
    assert!(h.dir.path().join("logs/web").is_dir());
    let runtime = h.runtime.clone();
    h.stop().await;
    // Shutting the agent down leaves the containers running for adoption.
    assert_eq!(runtime.running_ids(), expected);
}

#[tokio::test(start_paused = true)]
async fn restart_policies() {
    let cases = [
        ("always-ok", RestartPolicy::Always, 0, true),
        ("always-err", RestartPolicy::Always, 3, true),
        ("onfail-ok", RestartPolicy::OnFailure, 0, false),
        ("onfail-err", RestartPolicy::OnFailure, 3, true),
        ("never-ok", RestartPolicy::Never, 0, false),
        ("never-err", RestartPolicy::Never, 3, false),
    ];
    let pods: Vec<PodSpec> = cases
        .iter()
        .map(|(name, policy, code, _)| {
            pod(
                name,
                *policy,
                vec![container("c", &["fake-exit", &code.to_string()])],
            )
        })
        .collect();
    let ids: Vec<String> = pods
        .iter()
        .map(|p| container_id(&p.name, &p.containers[0]))
        .collect();
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.apply(desired(1, pods)).await;

    // Back-off 1 s, 2 s, 4 s: a restarting container is started 4 times in 8 s.
    for ((name, _, _, restarts), id) in cases.iter().zip(&ids) {
        if *restarts {
            until(&format!("{name} restarted three times"), || {
                h.runtime.start_count(id) >= 4
            })
            .await;
        }
    }
    for ((name, _, code, restarts), id) in cases.iter().zip(&ids) {
        if *restarts {
            let p = h
                .pod_where(name, "restart count", |p| p.containers[0].restarts >= 3)
                .await;
            assert_ne!(p.phase, PodPhase::Succeeded);
            continue;
        }
        let phase = if *code == 0 {
            PodPhase::Succeeded
        } else {
            PodPhase::Failed
        };
        let p = h.pod_where(name, "final phase", |p| p.phase == phase).await;
        assert_eq!(h.runtime.start_count(id), 1, "{name} must not restart");
        match &p.containers[0].state {
            ContainerState::Terminated {
                exit_code, reason, ..
            } => {
                assert_eq!(*exit_code, *code);
                assert_eq!(reason, if *code == 0 { "Completed" } else { "Error" });
            }
            other => panic!("{name}: expected terminated, got {other:?}"),
        }
        assert_eq!(p.containers[0].restarts, 0);
    }
    // Exited containers are deleted; only restarting ones may exist.
    for ((name, _, _, restarts), id) in cases.iter().zip(&ids) {
        if !restarts {
            assert!(!h.runtime.all_ids().contains(id), "{name} left behind");
        }
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn back_off_doubles_to_five_minutes() {
    let crash = pod(
        "crash",
        RestartPolicy::Always,
        vec![container("c", &["fake-exit", "1"])],
    );
    let id = container_id("crash", &crash.containers[0]);
    let h = Harness::start(FakeRuntime::new(), None);
    let t0 = Instant::now();
    h.apply(desired(1, vec![crash])).await;
    let mut starts = Vec::new();
    let mut seen = 0;
    while starts.len() < 12 {
        let n = h.runtime.start_count(&id);
        if n > seen {
            seen = n;
            starts.push(t0.elapsed());
        }
        assert!(t0.elapsed() < PATIENCE, "only {} starts", starts.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gaps: Vec<u64> = starts.windows(2).map(|w| round_secs(w[1] - w[0])).collect();
    assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn back_off_resets_after_ten_minutes_running() {
    let svc = pod(
        "svc",
        RestartPolicy::Always,
        vec![container("c", &["serve"])],
    );
    let id = container_id("svc", &svc.containers[0]);
    let h = Harness::start(FakeRuntime::new(), None);
    h.apply(desired(1, vec![svc])).await;
    until("started", || h.runtime.running_ids() == [id.clone()]).await;

    // Killed twice in quick succession: 1 s, then 2 s before the restart.
    let mut delays = Vec::new();
    for n in 2..=3 {
        h.runtime.kill(&id, libc::SIGKILL).unwrap();
        let t = Instant::now();
        until("restarted", || {
            h.runtime.start_count(&id) == n && h.runtime.running_ids().len() == 1
        })
        .await;
        delays.push(round_secs(t.elapsed()));
    }
    // After ten minutes of running the next restart waits 1 s again.
    tokio::time::sleep(Duration::from_secs(601)).await;
    h.runtime.kill(&id, libc::SIGKILL).unwrap();
    let t = Instant::now();
    until("restarted after a long run", || {
        h.runtime.start_count(&id) == 4
    })
    .await;
    delays.push(round_secs(t.elapsed()));
    assert_eq!(delays, [1, 2, 1]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn start_failures_wait_with_a_reason_and_retry() {
    let bad = pod(
        "bad",
        RestartPolicy::Never,
        vec![
            container("refused", &["fake-fail"]),
            ContainerSpec {
                image: "No-Transport".into(),
                ..container("noimage", &["serve"])
            },
            container("nocmd", &[]),
            container("fine", &["serve"]),
        ],
    );
    let refused = container_id("bad", &bad.containers[0]);
    let fine = container_id("bad", &bad.containers[3]);
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.apply(desired(1, vec![bad])).await;
    let p = h
        .pod_where("bad", "waiting reasons", |p| {
            matches!(p.containers[3].state, ContainerState::Running { .. })
        })
        .await;
    let reasons: Vec<_> = p
        .containers
        .iter()
        .map(|c| match &c.state {
            ContainerState::Waiting {
                reason, message, ..
            } => {
                assert!(message.is_some(), "{} has no message", c.name);
                reason.as_str()
            }
            _ => "-",
        })
        .collect();
    assert_eq!(
        reasons,
        ["CreateFailed", "InvalidImageName", "CreateFailed", "-"]
    );
    assert_eq!(p.phase, PodPhase::Pending);
    assert!(
        p.message
            .as_deref()
            .unwrap()
            .starts_with("container refused: CreateFailed")
    );
    // Retried with back-off even under the Never policy.
    until("retries", || h.runtime.start_count(&refused) >= 3).await;
    assert_eq!(h.runtime.start_count(&fine), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_changed_spec_replaces_only_that_container() {
    let v1 = pod(
        "web",
        RestartPolicy::Always,
        vec![
            container("app", &["serve", "v1"]),
            container("sidecar", &["proxy"]),
        ],
    );
    let mut v2 = v1.clone();
    v2.containers[0].command = vec!["serve".into(), "v2".into()];
    let (app1, app2) = (
        container_id("web", &v1.containers[0]),
        container_id("web", &v2.containers[0]),
    );
    let sidecar = container_id("web", &v1.containers[1]);
    assert_ne!(app1, app2);

    let mut h = Harness::start(FakeRuntime::new(), None);
    h.apply(desired(1, vec![v1.clone()])).await;
    h.pod_where("web", "v1 running", running).await;

    // The same generation again changes nothing.
    h.apply(desired(1, vec![v1])).await;
    h.apply(desired(2, vec![v2])).await;
    h.pod_where("web", "v2 running", |p| p.generation == 2 && running(p))
        .await;
    let mut expected = vec![app2.clone(), sidecar.clone()];
    expected.sort();
    until("old app deleted", || h.runtime.all_ids() == expected).await;
    assert_eq!(h.runtime.start_count(&app1), 1);
    assert_eq!(h.runtime.start_count(&app2), 1);
    assert_eq!(
        h.runtime.start_count(&sidecar),
        1,
        "the unchanged sidecar kept running"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_removed_pod_terminates_and_leaves_the_status() {
    let keep = pod(
        "keep",
        RestartPolicy::Always,
        vec![container("c", &["serve"])],
    );
    let gone = pod(
        "gone",
        RestartPolicy::Always,
        vec![container("c", &["serve"])],
    );
    let keep_id = container_id("keep", &keep.containers[0]);
    let mut h = Harness::start(FakeRuntime::new(), None);
    h.apply(desired(1, vec![keep.clone(), gone.clone()])).await;
    h.status_where("both running", |s| {
        s.pods.len() == 2 && s.pods.iter().all(running)
    })
    .await;
    assert!(h.dir.path().join("logs/gone").is_dir());

    h.apply(desired(2, vec![keep.clone()])).await;
    let s = h
        .status_where("gone removed", |s| s.pods.iter().all(|p| p.name != "gone"))
        .await;
    assert_eq!(s.pods.len(), 1);
    assert_eq!(h.runtime.all_ids(), std::slice::from_ref(&keep_id));
    assert!(!h.dir.path().join("logs/gone").exists());

    // Removed and wanted again at once: it comes back after the removal.
    h.apply(desired(3, vec![keep, gone.clone()])).await;
    h.apply(desired(4, vec![])).await;
    h.apply(desired(5, vec![gone.clone()])).await;
    h.pod_where("gone", "gone back", |p| p.generation == 5 && running(p))
        .await;
    let gone_id = container_id("gone", &gone.containers[0]);
    until("only gone runs", || {
        h.runtime.all_ids() == [gone_id.clone()]
    })
    .await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn adoption_keeps_running_desired_containers_and_removes_the_rest() {
    let web = pod(
        "web",
        RestartPolicy::Always,
        vec![container("app", &["serve"]), container("worker", &["work"])],
    );
    let app = container_id("web", &web.containers[0]);
    let worker = container_id("web", &web.containers[1]);
    let old_app = container_id("web", &container("app", &["serve", "old"]));
    let orphan = container_id("olds", &container("c", &["serve"]));

    let runtime = FakeRuntime::new();
    let start = |id: &str, args: &[&str]| {
        runtime
            .start(&ContainerConfig {
                id: id.into(),
                image_rootfs: Path::new("/").into(),
                args: args.iter().map(|s| (*s).to_owned()).collect(),
                env: vec![],
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                hostname: "x".into(),
                resources: Resources::default(),
                log_path: Path::new("/dev/null").into(),
                mounts: vec![],
                security: Default::default(),
            })
            .unwrap();
    };
    start(&app, &["serve"]);
    start(&worker, &["fake-exit", "0"]); // desired, but dead
    start(&old_app, &["serve"]); // this pod's container of an older spec
    start(&orphan, &["serve"]); // a pod no longer desired
    start("someone-else", &["serve"]); // not ours

    let mut h = Harness::start(runtime, Some(desired(7, vec![web])));
    h.pod_where("web", "web running", running).await;
    let mut expected = vec![app.clone(), worker.clone(), "someone-else".to_owned()];
    expected.sort();
    until("undesired removed", || h.runtime.all_ids() == expected).await;
    assert_eq!(h.runtime.running_ids(), expected);
    assert_eq!(
        h.runtime.start_count(&app),
        1,
        "a running desired container is kept"
    );
    assert_eq!(
        h.runtime.start_count(&worker),
        2,
        "a dead desired container is restarted"
    );
    h.stop().await;
}
