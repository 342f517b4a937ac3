//! Prefetch: images a desired state lists in `prefetch` are downloaded in
//! the background while the pods keep running what they run, reported in
//! the status, kept by garbage collection, and make the later switch need
//! no download. Pods' own pulls come first; a failing prefetch is retried.
//! The reconciler with the fake runtime and the real image store, pulling
//! from a real registry through a proxy that throttles it like a 4G link.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::reconciler::{Harness, desired};
use flotilla_agent::reconciler::container_id;
use flotilla_proto::{
    ContainerSpec, ContainerState, DesiredState, NodeStatus, PodPhase, PodSpec, PodStatus,
    PrefetchState, RestartPolicy,
};
use flotilla_testkit::oci;
use flotilla_testkit::registry::{CutProxy, Registry};

/// Bytes a second through the slow link: app:2's own layer takes about a
/// minute.
const CRAWL: u64 = 16 * 1024;
/// A switch to a prefetched image: the pod task's round trip and the
/// report's debounce, with room for a loaded machine.
const PROMPT: Duration = Duration::from_secs(2);

struct Setup {
    registry: Registry,
    proxy: CutProxy,
    h: Harness,
    images: tempfile::TempDir,
}

impl Setup {
    /// `app:1` and `app:2` in a registry, a throttled proxy in front, and
    /// the reconciler with an image store that may use both.
    fn start() -> Self {
        let registry = Registry::start().unwrap();
        push(&registry, "app:1", b"one");
        // Its own layer, incompressible, so that it takes the slow link a
        // while (busybox is shared with app:1).
        let payload: Vec<u8> = (0..768 * 1024).map(|_| rand::random::<u8>()).collect();
        push(&registry, "app:2", &payload);
        let proxy = CutProxy::throttled(registry.addr(), CRAWL).unwrap();
        let images = tempfile::tempdir().unwrap();
        let h = Harness::with_registry_store(images.path(), &[registry.host(), proxy.host()]);
        Self {
            registry,
            proxy,
            h,
            images,
        }
    }

    fn slow(&self, tag: &str) -> String {
        format!("{}/{tag}", self.proxy.host())
    }

    fn fast(&self, tag: &str) -> String {
        format!("{}/{tag}", self.registry.host())
    }

    /// The garbage collector's keep list as last written.
    fn keep_list(&self) -> String {
        std::fs::read_to_string(self.images.path().join("images/gc-keep")).unwrap_or_default()
    }

    async fn stop(self) {
        self.proxy.set_rate(0);
        self.h.stop().await;
    }
}

fn push(registry: &Registry, tag: &str, marker: &[u8]) {
    let layout = tempfile::tempdir().unwrap();
    oci::busybox()
        .layer(oci::Compression::Gzip)
        .file("etc/marker", marker, 0o644)
        .write_layout(layout.path(), "t")
        .unwrap();
    registry.push(layout.path(), "t", tag).unwrap();
}

fn app(image: &str) -> ContainerSpec {
    ContainerSpec {
        command: vec!["serve".into()],
        ..ContainerSpec::new("app", image)
    }
}

fn pod(name: &str, image: &str) -> PodSpec {
    PodSpec {
        name: name.into(),
        workload: name.into(),
        restart_policy: RestartPolicy::Always,
        termination_grace_secs: 5,
        volumes: vec![],
        containers: vec![app(image)],
        image_pull_secrets: Vec::new(),
    }
}

fn with_prefetch(mut d: DesiredState, images: &[&str]) -> DesiredState {
    d.prefetch = images.iter().map(|i| (*i).to_owned()).collect();
    d
}

fn running(p: &PodStatus) -> bool {
    p.phase == PodPhase::Running && matches!(p.containers[0].state, ContainerState::Running { .. })
}

/// The prefetch state the status shows for `image`.
fn prefetch_of<'a>(s: &'a NodeStatus, image: &str) -> Option<&'a PrefetchState> {
    s.prefetch
        .iter()
        .find(|p| p.image == image)
        .map(|p| &p.state)
}

fn pulling_some(s: &NodeStatus, image: &str) -> bool {
    matches!(prefetch_of(s, image), Some(PrefetchState::Pulling { progress })
        if progress.done_bytes > 0 && progress.total_bytes > 500_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetched_image_is_there_before_the_switch_and_the_pod_never_waits() {
    let mut s = Setup::start();
    let v1 = s.fast("app:1");
    let v2 = s.slow("app:2");
    s.h.apply(desired(1, vec![pod("shop", &v1)])).await;
    s.h.pod_where("shop", "v1 running", running).await;
    let old = container_id("shop", &app(&v1));

    // The next revision's image is listed: it comes in over the slow link,
    // progress shown, while v1 keeps running untouched.
    s.h.apply(with_prefetch(desired(2, vec![pod("shop", &v1)]), &[&v2]))
        .await;
    let st =
        s.h.status_where("v2 downloading", |st| pulling_some(st, &v2))
            .await;
    assert_eq!(st.prefetch.len(), 1);
    assert_eq!(s.h.runtime.running_ids(), [old.as_str()]);
    assert_eq!(s.h.runtime.start_count(&old), 1);
    assert!(running(&st.pods[0]) && st.pods[0].generation == 2);

    // Link back: the image is reported present; still nothing restarted.
    s.proxy.set_rate(0);
    s.h.status_where("v2 prefetched", |st| {
        prefetch_of(st, &v2) == Some(&PrefetchState::Ready)
    })
    .await;
    assert_eq!(s.h.runtime.all_ids(), [old.as_str()]);

    // Another state listing it: garbage collection keeps it.
    s.h.apply(with_prefetch(desired(3, vec![pod("shop", &v1)]), &[&v2]))
        .await;
    common::reconciler::until("the keep list names v2", || {
        s.keep_list()
            .split("[previous]")
            .next()
            .is_some_and(|current| current.contains("/app:2"))
    })
    .await;

    // The switch: no byte more through the link, and prompt.
    s.proxy.set_rate(1);
    let sent = s.proxy.sent();
    let t0 = Instant::now();
    s.h.apply(desired(4, vec![pod("shop", &v2)])).await;
    s.h.pod_where("shop", "v2 running", |p| p.generation == 4 && running(p))
        .await;
    let took = t0.elapsed();
    assert!(took < PROMPT, "the switch took {took:?}");
    assert_eq!(s.proxy.sent(), sent, "the switch downloaded again");
    assert_eq!(s.h.runtime.running_ids(), [container_id("shop", &app(&v2))]);
    let st = s.h.status.borrow().clone();
    assert!(st.prefetch.is_empty(), "{:?}", st.prefetch);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_pull_goes_first_and_a_failed_prefetch_is_retried() {
    let mut s = Setup::start();
    let v2 = s.slow("app:2");
    let missing = s.fast("later:1");
    s.h.apply(with_prefetch(desired(1, vec![]), &[&missing, &v2]))
        .await;
    // A tag the registry does not have: reported with why, then tried again.
    let st =
        s.h.status_where("later:1 failed", |st| {
            matches!(
                prefetch_of(st, &missing),
                Some(PrefetchState::Failed { .. })
            )
        })
        .await;
    let Some(PrefetchState::Failed {
        reason,
        message,
        retry_at_ms,
    }) = prefetch_of(&st, &missing)
    else {
        unreachable!()
    };
    assert_eq!(reason, "ImageNotFound", "{message}");
    assert!(message.contains("later"), "{message}");
    assert!(*retry_at_ms > 0);
    s.h.status_where("v2 downloading", |st| pulling_some(st, &v2))
        .await;

    // A pod pulls (over the same slow link): the prefetch steps aside.
    let v1 = s.slow("app:1");
    s.h.apply(with_prefetch(
        desired(2, vec![pod("till", &v1)]),
        &[&missing, &v2],
    ))
    .await;
    s.h.status_where("the prefetch yields to the pod", |st| {
        prefetch_of(st, &v2) == Some(&PrefetchState::Queued)
            && st.pods.iter().any(|p| p.containers[0].pull.is_some())
    })
    .await;

    // The tag appears and the link comes back: the pod runs, both
    // prefetches complete (the failed one at its retry).
    push(&s.registry, "later:1", b"later");
    s.proxy.set_rate(0);
    s.h.pod_where("till", "till running", running).await;
    s.h.status_where("both prefetched", |st| {
        st.prefetch.len() == 2 && st.prefetch.iter().all(|p| p.state == PrefetchState::Ready)
    })
    .await;
    assert_eq!(s.h.runtime.running_ids(), [container_id("till", &app(&v1))]);
    s.stop().await;
}
