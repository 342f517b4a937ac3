//! Pulls do not hold a pod up: the reconciler with the fake runtime and the
//! real image store, pulling from a real registry through a proxy that
//! throttles it to a crawl, as a bad 4G link does. A delete or a new spec
//! during such a pull takes effect at once; another pod pulling the same
//! image keeps its pull.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::reconciler::{Harness, desired};
use flotilla_agent::reconciler::container_id;
use flotilla_proto::{ContainerSpec, ContainerState, PodPhase, PodSpec, PodStatus, RestartPolicy};
use flotilla_testkit::oci;
use flotilla_testkit::registry::{CutProxy, Registry};

/// Bytes a second the stalled link carries: a busybox layer (about 1 MB)
/// would take a minute, and the proxy's pauses stay short.
const CRAWL: u64 = 16 * 1024;
/// What "at once" means here: the pod task's round trip plus the report's
/// debounce, with room for a loaded machine.
const PROMPT: Duration = Duration::from_secs(2);

struct Setup {
    registry: Registry,
    proxy: CutProxy,
    h: Harness,
    /// The busybox layer of `app:1`.
    layer: String,
    _images: tempfile::TempDir,
}

impl Setup {
    /// A registry with `app:1` and `app:2`, a throttled proxy in front, and
    /// the reconciler with an image store that may use both.
    fn start() -> Self {
        let registry = Registry::start().unwrap();
        let mut layers = Vec::new();
        for (tag, marker) in [("app:1", "one"), ("app:2", "two")] {
            let layout = tempfile::tempdir().unwrap();
            let written = oci::busybox()
                .layer(oci::Compression::Gzip)
                .file("etc/marker", marker, 0o644)
                .write_layout(layout.path(), "t")
                .unwrap();
            registry.push(layout.path(), "t", tag).unwrap();
            layers.push(written.layers[0].clone());
        }
        let proxy = CutProxy::throttled(registry.addr(), CRAWL).unwrap();
        let images = tempfile::tempdir().unwrap();
        let h = Harness::with_registry_store(images.path(), &[registry.host(), proxy.host()]);
        Self {
            registry,
            proxy,
            h,
            layer: layers.swap_remove(0),
            _images: images,
        }
    }

    /// The image `tag` through the crawling proxy.
    fn slow(&self, tag: &str) -> String {
        format!("{}/{tag}", self.proxy.host())
    }

    /// The image `tag` straight from the registry.
    fn fast(&self, tag: &str) -> String {
        format!("{}/{tag}", self.registry.host())
    }

    /// Lets abandoned pulls finish quickly, then stops the reconciler.
    async fn stop(self) {
        self.proxy.set_rate(0);
        self.h.stop().await;
    }
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

/// The layers are coming in: the container shows `Pulling` with progress.
fn pulling(p: &PodStatus) -> bool {
    let c = &p.containers[0];
    p.phase == PodPhase::Pending
        && c.pull.is_some_and(|pr| pr.total_bytes > 500_000)
        && matches!(&c.state, ContainerState::Waiting { reason, .. } if reason == "Pulling")
}

fn running(p: &PodStatus) -> bool {
    p.phase == PodPhase::Running && matches!(p.containers[0].state, ContainerState::Running { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_stalled_pull_removes_the_pod_at_once() {
    let mut s = Setup::start();
    let image = s.slow("app:1");
    s.h.apply(desired(1, vec![pod("shop", &image), pod("till", &image)]))
        .await;
    s.h.pod_where("shop", "shop pulling", pulling).await;
    s.h.pod_where("till", "till pulling", pulling).await;

    // One of the two pods goes while both wait on the crawling download.
    let t0 = Instant::now();
    s.h.apply(desired(2, vec![pod("till", &image)])).await;
    s.h.status_where("shop gone", |st| st.pods.iter().all(|p| p.name != "shop"))
        .await;
    let took = t0.elapsed();
    assert!(took < PROMPT, "the delete took {took:?}");
    let st = s.h.status.borrow().clone();
    assert_eq!(st.pods.len(), 1);
    assert!(pulling(&st.pods[0]), "{:#?}", st.pods[0]);

    // The other pod's pull was not cancelled under it: once the link is
    // back, it completes and the pod runs, the layer sent about once.
    s.proxy.set_rate(0);
    s.h.pod_where("till", "till running", running).await;
    assert_eq!(
        s.h.runtime.running_ids(),
        [container_id("till", &app(&image))]
    );
    let layer = s.registry.blob_file(&s.layer);
    let layer_size = std::fs::metadata(layer).unwrap().len();
    assert!(
        s.proxy.sent() < layer_size + layer_size / 2,
        "{} bytes through the proxy for a {layer_size}-byte layer",
        s.proxy.sent()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_spec_during_a_stalled_pull_switches_to_the_new_image() {
    let mut s = Setup::start();
    let stalled = s.slow("app:1");
    s.h.apply(desired(1, vec![pod("shop", &stalled)])).await;
    s.h.pod_where("shop", "pulling", pulling).await;

    // The fix: another image, from a registry that answers.
    let fixed = s.fast("app:2");
    let t0 = Instant::now();
    s.h.apply(desired(2, vec![pod("shop", &fixed)])).await;
    let p =
        s.h.pod_where("shop", "the new image running", |p| {
            p.generation == 2 && running(p)
        })
        .await;
    let took = t0.elapsed();
    assert!(took < PROMPT, "the switch took {took:?}");
    assert_eq!(p.containers[0].pull, None);
    assert_eq!(s.h.runtime.all_ids(), [container_id("shop", &app(&fixed))]);
    assert_eq!(
        s.h.runtime
            .start_count(&container_id("shop", &app(&stalled))),
        0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_that_keeps_the_image_keeps_its_pull() {
    let mut s = Setup::start();
    let image = s.slow("app:1");
    s.h.apply(desired(1, vec![pod("shop", &image)])).await;
    s.h.pod_where("shop", "pulling", pulling).await;
    let hex = s.layer.strip_prefix("sha256:").unwrap().to_owned();
    let layer_gets =
        |proxy: &CutProxy| proxy.requests().iter().filter(|r| r.contains(&hex)).count();
    assert_eq!(layer_gets(&s.proxy), 1);

    // Only the command changes: a new container, the same image, whose
    // download goes on where it is rather than starting over.
    let changed = ContainerSpec {
        command: vec!["serve".into(), "--fixed".into()],
        ..ContainerSpec::new("app", &image)
    };
    let spec = PodSpec {
        containers: vec![changed.clone()],
        ..pod("shop", &image)
    };
    s.h.apply(desired(2, vec![spec])).await;
    s.h.pod_where("shop", "still pulling", |p| p.generation == 2 && pulling(p))
        .await;
    s.proxy.set_rate(0);
    s.h.pod_where("shop", "running", |p| p.generation == 2 && running(p))
        .await;
    assert_eq!(s.h.runtime.all_ids(), [container_id("shop", &changed)]);
    assert_eq!(
        s.h.runtime.start_count(&container_id("shop", &app(&image))),
        0
    );
    assert_eq!(layer_gets(&s.proxy), 1, "{:#?}", s.proxy.requests());
    s.stop().await;
}
