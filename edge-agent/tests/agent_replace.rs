//! Replacing a running container pulls the new image first, under paused
//! time with the fake runtime: a failing pull leaves the old container
//! running and names the failure (the restart policy keeps it running if it
//! exits meanwhile); the switch happens once the image is here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::reconciler::{Harness, desired, until};
use flotilla_agent::image::{FakeImages, Image, ImageError, Images, PullObserver, PullSecrets};
use flotilla_agent::reconciler::container_id;
use flotilla_agent::runtime::Runtime;
use flotilla_agent::runtime::fake::FakeRuntime;
use flotilla_proto::{ContainerSpec, ContainerState, PodPhase, PodSpec, PodStatus, RestartPolicy};

/// Fake images whose pulls fail, as an unreachable registry would, for the
/// references in `failing`; every pull is counted.
#[derive(Default)]
struct FlakyImages {
    failing: Mutex<HashSet<String>>,
    pulls: Mutex<Vec<String>>,
}

impl FlakyImages {
    fn fail(&self, reference: &str, fail: bool) {
        let mut failing = self.failing.lock().unwrap();
        if fail {
            failing.insert(reference.to_owned());
        } else {
            failing.remove(reference);
        }
    }

    fn pulls_of(&self, reference: &str) -> usize {
        self.pulls
            .lock()
            .unwrap()
            .iter()
            .filter(|r| *r == reference)
            .count()
    }
}

impl Images for FlakyImages {
    fn pull_with(
        &self,
        reference: &str,
        _: &PullSecrets,
        observer: &dyn PullObserver,
    ) -> Result<Image, ImageError> {
        self.pulls.lock().unwrap().push(reference.to_owned());
        if self.failing.lock().unwrap().contains(reference) {
            return Err(ImageError::Pull {
                reference: reference.to_owned(),
                what: "registry 127.0.0.1:9 cannot be reached: connection refused".to_owned(),
            });
        }
        FakeImages.pull(reference, observer)
    }
}

const V1: &str = "registry.local:5000/shop/app:v1";
const V2: &str = "registry.local:5000/shop/app:v2";

fn app(image: &str) -> ContainerSpec {
    ContainerSpec {
        command: vec!["serve".into()],
        ..ContainerSpec::new("app", image)
    }
}

fn pod(containers: Vec<ContainerSpec>) -> PodSpec {
    PodSpec {
        name: "shop".into(),
        workload: "shop".into(),
        restart_policy: RestartPolicy::Always,
        termination_grace_secs: 5,
        volumes: vec![],
        containers,
        image_pull_secrets: Vec::new(),
    }
}

fn running(p: &PodStatus) -> bool {
    p.phase == PodPhase::Running
        && p.containers
            .iter()
            .all(|c| matches!(c.state, ContainerState::Running { .. }) && c.next.is_none())
}

/// The pod runs, and the container's next version waits with `reason`.
fn serving_while_next(p: &PodStatus, reason: &str) -> bool {
    let c = &p.containers[0];
    p.phase == PodPhase::Running
        && c.ready
        && matches!(c.state, ContainerState::Running { .. })
        && matches!(&c.next, Some(ContainerState::Waiting { reason: r, .. }) if r == reason)
}

#[tokio::test(start_paused = true)]
async fn a_failing_pull_keeps_the_old_container_until_the_image_is_there() {
    let images = Arc::new(FlakyImages::default());
    let mut h = Harness::start_with_images(FakeRuntime::new(), images.clone(), None);
    let (id1, id2) = (
        container_id("shop", &app(V1)),
        container_id("shop", &app(V2)),
    );
    h.apply(desired(1, vec![pod(vec![app(V1)])])).await;
    h.pod_where("shop", "v1 running", running).await;
    assert_eq!(h.runtime.running_ids(), [id1.as_str()]);

    images.fail(V2, true);
    h.apply(desired(2, vec![pod(vec![app(V2)])])).await;
    let p = h
        .pod_where("shop", "v1 serving, v2 failing", |p| {
            p.generation == 2 && serving_while_next(p, "ErrImagePull")
        })
        .await;
    let Some(ContainerState::Waiting {
        message: Some(message),
        retry_at_ms: Some(_),
        ..
    }) = &p.containers[0].next
    else {
        panic!("the next state names the failure and the retry: {p:#?}");
    };
    assert!(message.contains(V2), "{message}");
    assert!(message.contains("connection refused"), "{message}");
    assert_eq!(p.message, None);
    // Nothing was stopped, nothing new was created.
    assert_eq!(h.runtime.running_ids(), [id1.as_str()]);
    assert_eq!(h.runtime.start_count(&id1), 1);
    assert_eq!(h.runtime.start_count(&id2), 0);

    // Retried with back-off (1 s, 2 s, …), the old one serving all along.
    until("three pulls of v2", || images.pulls_of(V2) >= 3).await;
    assert_eq!(h.runtime.running_ids(), [id1.as_str()]);
    assert_eq!(h.runtime.start_count(&id2), 0);

    // The registry comes back: the next attempt switches.
    images.fail(V2, false);
    let p = h
        .pod_where("shop", "v2 running", |p| running(p) && p.generation == 2)
        .await;
    assert_eq!(p.containers[0].restarts, 0);
    until("v1 gone, v2 running", || {
        h.runtime.running_ids() == [id2.clone()] && h.runtime.all_ids() == [id2.clone()]
    })
    .await;
    assert_eq!(h.runtime.start_count(&id1), 1);
    assert_eq!(h.runtime.start_count(&id2), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn going_back_while_the_pull_fails_keeps_the_running_container() {
    let images = Arc::new(FlakyImages::default());
    let mut h = Harness::start_with_images(FakeRuntime::new(), images.clone(), None);
    let id1 = container_id("shop", &app(V1));
    h.apply(desired(1, vec![pod(vec![app(V1)])])).await;
    h.pod_where("shop", "v1 running", running).await;
    images.fail(V2, true);
    h.apply(desired(2, vec![pod(vec![app(V2)])])).await;
    h.pod_where("shop", "v2 failing", |p| {
        serving_while_next(p, "ErrImagePull")
    })
    .await;
    // A third spec replaces the waiting one; v1 still serves meanwhile.
    let v3 = "registry.local:5000/shop/app:v3";
    images.fail(v3, true);
    h.apply(desired(3, vec![pod(vec![app(v3)])])).await;
    let p = h
        .pod_where("shop", "v3 failing", |p| {
            p.generation == 3 && serving_while_next(p, "ErrImagePull")
        })
        .await;
    let next = format!("{:?}", p.containers[0].next);
    assert!(next.contains(v3), "{next}");
    assert_eq!(h.runtime.running_ids(), [id1.as_str()]);
    // Back to v1: the running container is the desired one again, kept.
    h.apply(desired(4, vec![pod(vec![app(V1)])])).await;
    h.pod_where("shop", "v1 alone", |p| p.generation == 4 && running(p))
        .await;
    assert_eq!(h.runtime.running_ids(), [id1.as_str()]);
    assert_eq!(h.runtime.start_count(&id1), 1);
    h.stop().await;
}

/// The old version serves (it runs, or waits to restart after it exited),
/// and the container's next version waits with `reason`.
fn old_one_while_next(p: &PodStatus, old_state: &str, reason: &str) -> bool {
    let c = &p.containers[0];
    let state = match &c.state {
        ContainerState::Running { .. } => "Running",
        ContainerState::Waiting { reason, .. } => reason.as_str(),
        ContainerState::Terminated { .. } => "Terminated",
    };
    state == old_state
        && matches!(&c.next, Some(ContainerState::Waiting { reason: r, .. }) if r == reason)
}

#[tokio::test(start_paused = true)]
async fn an_old_container_that_exits_while_waiting_is_restarted_by_the_policy() {
    let images = Arc::new(FlakyImages::default());
    let mut h = Harness::start_with_images(FakeRuntime::new(), images.clone(), None);
    let id1 = container_id("shop", &app(V1));
    h.apply(desired(1, vec![pod(vec![app(V1)])])).await;
    h.pod_where("shop", "v1 running", running).await;
    images.fail(V2, true);
    h.apply(desired(2, vec![pod(vec![app(V2)])])).await;
    h.pod_where("shop", "v2 failing", |p| {
        serving_while_next(p, "ErrImagePull")
    })
    .await;

    // The old one crashes: the shop keeps its old app, restarted with the
    // usual back-off (1 s, then 2 s), its replacement still failing.
    h.runtime.kill(&id1, libc::SIGKILL).unwrap();
    let p = h
        .pod_where("shop", "v1 in back-off", |p| {
            old_one_while_next(p, "BackOff", "ErrImagePull")
        })
        .await;
    let ContainerState::Waiting {
        message: Some(m), ..
    } = &p.containers[0].state
    else {
        panic!("{p:#?}");
    };
    assert!(m.contains("exited with code 137"), "{m}");
    assert_eq!(p.phase, PodPhase::Pending);
    let p = h
        .pod_where("shop", "v1 restarted", |p| {
            p.containers[0].restarts == 1 && serving_while_next(p, "ErrImagePull")
        })
        .await;
    assert_eq!(p.generation, 2);
    assert_eq!(h.runtime.running_ids(), [id1.as_str()]);
    assert_eq!(h.runtime.start_count(&id1), 2);

    let t0 = tokio::time::Instant::now();
    h.runtime.kill(&id1, libc::SIGKILL).unwrap();
    h.pod_where("shop", "v1 restarted again", |p| {
        p.containers[0].restarts == 2 && serving_while_next(p, "ErrImagePull")
    })
    .await;
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // A third version, failing too, arrives while v1 waits to restart: v1
    // stays the one that serves.
    h.runtime.kill(&id1, libc::SIGKILL).unwrap();
    h.pod_where("shop", "v1 in back-off again", |p| {
        old_one_while_next(p, "BackOff", "ErrImagePull")
    })
    .await;
    let v3 = "registry.local:5000/shop/app:v3";
    images.fail(v3, true);
    h.apply(desired(3, vec![pod(vec![app(v3)])])).await;
    let p = h
        .pod_where("shop", "v1 restarted under v3", |p| {
            p.generation == 3
                && p.containers[0].restarts == 3
                && serving_while_next(p, "ErrImagePull")
        })
        .await;
    assert!(format!("{:?}", p.containers[0].next).contains(v3));
    assert_eq!(h.runtime.running_ids(), [id1.as_str()]);

    // v3's image comes: v1 is stopped and v3 runs.
    images.fail(v3, false);
    let id3 = container_id("shop", &app(v3));
    h.pod_where("shop", "v3 running", |p| running(p) && p.generation == 3)
        .await;
    until("v1 gone, v3 running", || {
        h.runtime.running_ids() == [id3.clone()] && h.runtime.all_ids() == [id3.clone()]
    })
    .await;
    assert_eq!(h.runtime.start_count(&id1), 4);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_old_container_that_exits_is_not_restarted_under_never() {
    let images = Arc::new(FlakyImages::default());
    let mut h = Harness::start_with_images(FakeRuntime::new(), images.clone(), None);
    let id1 = container_id("shop", &app(V1));
    let never = |c| PodSpec {
        restart_policy: RestartPolicy::Never,
        ..pod(vec![c])
    };
    h.apply(desired(1, vec![never(app(V1))])).await;
    h.pod_where("shop", "v1 running", running).await;
    images.fail(V2, true);
    h.apply(desired(2, vec![never(app(V2))])).await;
    h.pod_where("shop", "v2 failing", |p| {
        serving_while_next(p, "ErrImagePull")
    })
    .await;
    // The old one crashes and the policy says no restart: it is removed,
    // and the pod waits on the new image.
    h.runtime.kill(&id1, libc::SIGKILL).unwrap();
    let p = h
        .pod_where("shop", "only v2, failing", |p| {
            p.containers[0].next.is_none()
                && matches!(&p.containers[0].state, ContainerState::Waiting { reason, .. } if reason == "ErrImagePull")
        })
        .await;
    assert_eq!(p.phase, PodPhase::Pending);
    until("v1 deleted", || h.runtime.all_ids().is_empty()).await;
    let pulls = images.pulls_of(V2);
    until("two more pulls", || images.pulls_of(V2) >= pulls + 2).await;
    assert_eq!(h.runtime.start_count(&id1), 1);
    // Removing the pod leaves nothing behind.
    h.apply(desired(3, vec![])).await;
    h.status_where("pod gone", |s| s.pods.is_empty()).await;
    assert!(h.runtime.all_ids().is_empty(), "{:?}", h.runtime.all_ids());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn removing_the_pod_while_a_pull_fails_stops_the_serving_container() {
    let images = Arc::new(FlakyImages::default());
    let mut h = Harness::start_with_images(FakeRuntime::new(), images.clone(), None);
    h.apply(desired(1, vec![pod(vec![app(V1)])])).await;
    h.pod_where("shop", "v1 running", running).await;
    images.fail(V2, true);
    h.apply(desired(2, vec![pod(vec![app(V2)])])).await;
    h.pod_where("shop", "v2 failing", |p| {
        serving_while_next(p, "ErrImagePull")
    })
    .await;
    h.apply(desired(3, vec![])).await;
    h.status_where("pod gone", |s| s.pods.is_empty()).await;
    assert!(h.runtime.all_ids().is_empty(), "{:?}", h.runtime.all_ids());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_first_start_with_a_failing_pull_is_pending_as_before() {
    let images = Arc::new(FlakyImages::default());
    images.fail(V1, true);
    let mut h = Harness::start_with_images(FakeRuntime::new(), images.clone(), None);
    h.apply(desired(1, vec![pod(vec![app(V1)])])).await;
    let p = h
        .pod_where("shop", "pending on the pull", |p| {
            matches!(&p.containers[0].state, ContainerState::Waiting { reason, .. } if reason == "ErrImagePull")
        })
        .await;
    assert_eq!(p.phase, PodPhase::Pending);
    assert_eq!(p.containers[0].next, None);
    assert!(h.runtime.all_ids().is_empty());
    h.stop().await;
}
