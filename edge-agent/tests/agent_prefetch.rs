//! Prefetch: images a desired state lists in `prefetch` are downloaded in
//! the background while the pods keep running what they run, reported in
//! the status, kept by garbage collection, and make the later switch need
//! no download. Pods' own pulls come first; a failing prefetch is retried.
//! The reconciler with the fake runtime and the real image store, pulling
//! from a real registry through a proxy that throttles it like a 4G link;
//! and from one that asks for a login (htpasswd), with the sealed pull
//! secrets listed for the image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::reconciler::{Harness, desired};
use common::sealing::{docker_config, seal};
use flotilla_agent::reconciler::container_id;
use flotilla_agent::secrets::SealingKey;
use flotilla_proto::{
    ContainerSpec, ContainerState, DesiredState, NodeStatus, PodPhase, PodSpec, PodStatus,
    PrefetchPullSecrets, PrefetchState, RestartPolicy, SealedSecret,
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

/// The private registry's login.
const USER: &str = "robot";
const PASSWORD: &str = "s3cret-prefetch";
/// How long a pull from the local registry may take on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(120);

/// A registry that asks for a login, holding `shop/app:2`, and the
/// reconciler of a node with a sealing key whose registries file has no
/// credentials for it.
struct Private {
    registry: Registry,
    h: Harness,
    public: [u8; 32],
    images: tempfile::TempDir,
}

impl Private {
    fn start() -> Self {
        let registry = Registry::builder()
            .basic_auth(USER, PASSWORD)
            .start()
            .unwrap();
        push(&registry, "shop/app:2", b"private two");
        let key = SealingKey::generate().unwrap();
        let public = key.public();
        let images = tempfile::tempdir().unwrap();
        let h = Harness::with_registry_store_keyed(images.path(), &[registry.host()], Some(key));
        Self {
            registry,
            h,
            public,
            images,
        }
    }

    fn image(&self) -> String {
        format!("{}/shop/app:2", self.registry.host())
    }

    /// Pull secret `name` with `password` for the registry, sealed for n1.
    fn secret(&self, name: &str, password: &str) -> SealedSecret {
        let config = docker_config(&self.registry.host(), USER, password);
        seal("n1", &self.public, name, config)
    }
}

/// `d` prefetching `image` with `secrets` listed for it.
fn with_secrets(d: DesiredState, image: &str, secrets: Vec<SealedSecret>) -> DesiredState {
    let mut d = with_prefetch(d, &[image]);
    d.prefetch_pull_secrets = vec![PrefetchPullSecrets {
        images: vec![image.to_owned()],
        pull_secrets: secrets,
    }];
    d
}

/// The reason and message of `image`'s failed prefetch.
fn failed<'a>(s: &'a NodeStatus, image: &str) -> Option<(&'a str, &'a str)> {
    match prefetch_of(s, image) {
        Some(PrefetchState::Failed {
            reason, message, ..
        }) => Some((reason.as_str(), message.as_str())),
        _ => None,
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Regular files under `dir` whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if meta.is_dir() {
                todo.push(e.path());
            } else if meta.is_file()
                && std::fs::read(e.path())
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(e.path());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_is_prefetched_with_the_sealed_pull_secret_listed_for_it() {
    let mut p = Private::start();
    let image = p.image();

    // Listed without a secret: the registry refuses, and the state says so.
    p.h.apply(with_prefetch(desired(1, vec![]), &[&image]))
        .await;
    let st = within(
        "the prefetch refused",
        p.h.status_where("refused", |s| failed(s, &image).is_some()),
    )
    .await;
    let (reason, message) = failed(&st, &image).unwrap();
    assert_eq!(reason, "Unauthorized", "{message}");
    assert!(message.contains("none are configured"), "{message}");

    // With the new revision's pull secret listed for it: opened, used, and
    // the image comes (tried again at once: its secrets changed).
    let regcred = p.secret("regcred", PASSWORD);
    p.h.apply(with_secrets(desired(2, vec![]), &image, vec![regcred]))
        .await;
    within(
        "the private image prefetched",
        p.h.status_where("ready", |s| {
            prefetch_of(s, &image) == Some(&PrefetchState::Ready)
        }),
    )
    .await;

    // It is on the device: the switched pod starts with no secret of its
    // own, which the registry would refuse.
    p.h.apply(desired(3, vec![pod("shop", &image)])).await;
    within(
        "the pod running on the prefetched image",
        p.h.pod_where("shop", "running", |p| p.generation == 3 && running(p)),
    )
    .await;

    // The login never reached the device's disk, in any spelling.
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for needle in [PASSWORD, auth.as_str()] {
        for dir in [p.h.dir.path(), p.images.path()] {
            let found = files_holding(dir, needle.as_bytes());
            assert!(found.is_empty(), "{needle:?} written to {found:?}");
        }
    }
    p.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_unopenable_prefetch_pull_secret_is_named_in_the_prefetch_state() {
    let mut p = Private::start();
    let image = p.image();

    // A wrong password: refused by the registry, the secret named, its
    // values not.
    let wrong = p.secret("wrong", "guess");
    p.h.apply(with_secrets(desired(1, vec![]), &image, vec![wrong]))
        .await;
    let st = within(
        "the wrong password refused",
        p.h.status_where("refused", |s| failed(s, &image).is_some()),
    )
    .await;
    let (reason, message) = failed(&st, &image).unwrap();
    assert_eq!(reason, "Unauthorized", "{message}");
    assert!(
        message.contains("credentials were refused (pull secret \"wrong\")"),
        "{message}"
    );
    assert!(!message.contains("guess"), "{message}");

    // Sealed for another node's key: skipped, as a pod's pull skips it; the
    // registries file has no login for this registry either, so the pull
    // is refused and the entry names the secret and why.
    let stranger = seal(
        "n1",
        &SealingKey::generate().unwrap().public(),
        "stranger",
        docker_config(&p.registry.host(), USER, PASSWORD),
    );
    p.h.apply(with_secrets(desired(2, vec![]), &image, vec![stranger]))
        .await;
    let st = within(
        "the unopenable secret named",
        p.h.status_where("unusable", |s| {
            failed(s, &image).is_some_and(|(r, m)| r == "Unauthorized" && m.contains("stranger"))
        }),
    )
    .await;
    let (_, message) = failed(&st, &image).unwrap();
    assert!(
        message.contains("pull secret \"stranger\" could not be used")
            && message.contains("cannot be opened with this node's sealing key"),
        "{message}"
    );
    assert!(message.contains(&image), "{message}");
    assert!(!message.contains(PASSWORD), "{message}");

    // The right one: the same entry recovers.
    let regcred = p.secret("regcred", PASSWORD);
    p.h.apply(with_secrets(desired(3, vec![]), &image, vec![regcred]))
        .await;
    within(
        "prefetched with the right secret",
        p.h.status_where("ready", |s| {
            prefetch_of(s, &image) == Some(&PrefetchState::Ready)
        }),
    )
    .await;
    p.h.stop().await;
}
