//! Image pull secrets, end to end on the device: a real registry with
//! basic authentication (Debian's `docker-registry`, htpasswd), the real
//! image store and real containers (youki), pods whose sealed
//! `.dockerconfigjson` secrets the agent opens for their own pulls only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::reconciler::{Harness, desired};
use common::sealing::{docker_config, seal};
use flotilla_agent::image::{ImageStore, PullSettings, RegistrySettings};
use flotilla_agent::runtime::Runtime;
use flotilla_agent::secrets::SealingKey;
use flotilla_proto::{
    ContainerSpec, ContainerState, PodPhase, PodSpec, PodStatus, RestartPolicy, SealedSecret,
};
use flotilla_testkit::oci;
use flotilla_testkit::registry::Registry;

/// How long a real pull and start may take here.
const DEADLINE: Duration = Duration::from_secs(120);

/// A busybox image with a layer holding `marker` in `/etc/marker`, pushed
/// (with the registry's credentials) as `dest`.
fn push_busybox(registry: &Registry, dest: &str, marker: &str) {
    let layout = tempfile::tempdir().unwrap();
    oci::busybox()
        .layer(oci::Compression::Gzip)
        .file("etc/marker", marker, 0o644)
        .write_layout(layout.path(), "t")
        .unwrap();
    registry.push(layout.path(), "t", dest).unwrap();
}

fn pod(name: &str, image: &str, secrets: Vec<SealedSecret>) -> PodSpec {
    let main = ContainerSpec {
        command: vec![
            "sh".into(),
            "-c".into(),
            "cat /etc/marker; echo; exec sleep 3600".into(),
        ],
        ..ContainerSpec::new("main", image)
    };
    PodSpec {
        name: name.into(),
        workload: name.into(),
        restart_policy: RestartPolicy::Always,
        termination_grace_secs: 1,
        volumes: vec![],
        containers: vec![main],
        image_pull_secrets: secrets,
    }
}

fn running(p: &PodStatus) -> bool {
    p.phase == PodPhase::Running
        && p.containers
            .iter()
            .all(|c| matches!(c.state, ContainerState::Running { .. }))
}

/// The waiting reason and message of a pod's only container.
fn waiting(p: &PodStatus) -> Option<(&str, &str)> {
    match &p.containers[0].state {
        ContainerState::Waiting {
            reason,
            message: Some(m),
            ..
        } => Some((reason.as_str(), m.as_str())),
        _ => None,
    }
}

fn started_at(p: &PodStatus) -> u64 {
    match p.containers[0].state {
        ContainerState::Running { started_at_ms } => started_at_ms,
        ref other => panic!("not running: {other:?}"),
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn log_of(h: &Harness<impl Runtime>, pod: &str) -> String {
    let path = h.dir.path().join("logs").join(pod).join("main.log");
    std::fs::read_to_string(Path::new(&path)).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_pulls_with_its_own_pull_secret_and_a_wrong_one_is_refused() {
    let registry = Registry::builder()
        .basic_auth("robot", "s3cret")
        .start()
        .unwrap();
    let host = registry.host();
    push_busybox(&registry, "shop/app:1", "private one");
    push_busybox(&registry, "shop/app:2", "private two");

    let key = SealingKey::generate().unwrap();
    let public = key.public();
    let good = |name: &str| seal("n1", &public, name, docker_config(&host, "robot", "s3cret"));
    let wrong = seal(
        "n1",
        &public,
        "wrong",
        docker_config(&host, "robot", "guess"),
    );
    // Docker Hub's spelling of another registry's key matches nothing here.
    let elsewhere = seal(
        "n1",
        &public,
        "hub",
        docker_config("https://index.docker.io/v1/", "robot", "s3cret"),
    );

    // The registries file only says the registry is plain HTTP: no
    // credentials of its own.
    let images_dir = tempfile::tempdir().unwrap();
    let mut settings = PullSettings::default();
    settings.min_free = 0;
    let settings = settings.with_registry(
        &host,
        RegistrySettings {
            insecure: true,
            ..RegistrySettings::default()
        },
    );
    let store = ImageStore::with_settings(images_dir.path().join("images"), settings).unwrap();
    let rt_dir = tempfile::tempdir().unwrap();
    let runtime = common::youki_runtime(rt_dir.path(), &common::unique_cgroup_parent("pullsecret"));
    let mut h = Harness::start_custom(Arc::new(runtime), Arc::new(store), Some(key), None);

    let app1 = format!("{host}/shop/app:1");
    let app2 = format!("{host}/shop/app:2");
    h.apply(desired(1, vec![pod("good", &app1, vec![good("regcred")])]))
        .await;
    let first = within(
        "the pod with the pull secret running",
        h.pod_where("good", "running", running),
    )
    .await;
    let since = started_at(&first);
    within("its output", async {
        while !log_of(&h, "good").contains("private one") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // The same repository, another tag not on the device yet: a wrong
    // password is refused; no secret at all (or one for another registry)
    // gets nothing from the first pod's login.
    h.apply(desired(
        2,
        vec![
            pod("good", &app1, vec![good("regcred")]),
            pod("bad", &app2, vec![wrong]),
            pod("none", &app2, vec![elsewhere]),
        ],
    ))
    .await;
    let bad = within(
        "the wrong password refused",
        h.pod_where("bad", "Unauthorized", |p| {
            waiting(p).is_some_and(|(r, _)| r == "Unauthorized")
        }),
    )
    .await;
    let (_, message) = waiting(&bad).unwrap();
    assert!(
        message.contains("credentials were refused (pull secret \"wrong\")"),
        "{message}"
    );
    assert!(message.contains(&app2), "{message}");
    assert!(!message.contains("guess"), "{message}");
    assert_eq!(bad.phase, PodPhase::Pending);
    let none = within(
        "no credentials for the other pod",
        h.pod_where("none", "Unauthorized", |p| {
            waiting(p).is_some_and(|(r, _)| r == "Unauthorized")
        }),
    )
    .await;
    let (_, message) = waiting(&none).unwrap();
    assert!(message.contains("none are configured"), "{message}");

    // The pod that pulled is untouched: same run, no restart.
    let s = h.status.borrow().clone();
    let still = s.pods.iter().find(|p| p.name == "good").unwrap();
    assert!(running(still), "{still:#?}");
    assert_eq!(started_at(still), since);
    assert_eq!(still.containers[0].restarts, 0);
    assert_eq!(
        h.runtime
            .list()
            .unwrap()
            .iter()
            .filter(|e| e.running)
            .count(),
        1
    );

    // The right secret for the refused pod: it pulls and runs.
    h.apply(desired(
        3,
        vec![
            pod("good", &app1, vec![good("regcred")]),
            pod("bad", &app2, vec![good("regcred2")]),
        ],
    ))
    .await;
    within(
        "the fixed pod running",
        h.pod_where("bad", "running", |p| p.generation == 3 && running(p)),
    )
    .await;
    within("its output", async {
        while !log_of(&h, "bad").contains("private two") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // Nothing is left running: the pods go before the reconciler stops.
    h.apply(desired(4, vec![])).await;
    within(
        "every pod gone",
        h.status_where("no pods", |s| s.pods.is_empty()),
    )
    .await;
    assert!(h.runtime.list().unwrap().is_empty());
    h.stop().await;
}
