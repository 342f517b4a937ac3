//! The reconciler on the fake runtime and fake images, with its reporter:
//! what the reconciler and probe tests drive, under paused time; or with a
//! runtime, images and sealing key of the test's choosing.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use flotilla_agent::image::{FakeImages, Images};
use flotilla_agent::reconciler::{self, ReconcilerHandle, Settings};
use flotilla_agent::report::{self, ReportTiming};
use flotilla_agent::runtime::Runtime;
use flotilla_agent::runtime::fake::FakeRuntime;
use flotilla_agent::secrets::{Keyring, SealingKey};
use flotilla_proto::{DesiredState, NodeInfo, NodeStatus, PodSpec, PodStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long (in paused time) a wait may last before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(3600);

pub fn desired(generation: u64, pods: Vec<PodSpec>) -> DesiredState {
    DesiredState {
        node: "n1".into(),
        generation,
        pods,
        prefetch: Vec::new(),
        prefetch_pull_secrets: Vec::new(),
    }
}

pub struct Harness<R = FakeRuntime> {
    pub runtime: Arc<R>,
    pub reconciler: ReconcilerHandle,
    pub status: watch::Receiver<NodeStatus>,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn start(runtime: FakeRuntime, initial: Option<DesiredState>) -> Self {
        Self::start_with_images(runtime, Arc::new(FakeImages), initial)
    }

    /// [`Harness::start`] with images of the test's choosing.
    pub fn start_with_images<I: Images>(
        runtime: FakeRuntime,
        images: Arc<I>,
        initial: Option<DesiredState>,
    ) -> Self {
        Harness::start_custom(Arc::new(runtime), images, None, initial)
    }

    /// The fake runtime with a real image store under `dir` that reaches
    /// `hosts` (test registries and proxies) over plain HTTP, with no
    /// free-space floor.
    pub fn with_registry_store(dir: &std::path::Path, hosts: &[String]) -> Self {
        Self::with_registry_store_keyed(dir, hosts, None)
    }

    /// [`Harness::with_registry_store`] for a node with this sealing key,
    /// so that it opens the pull secrets tests seal for `n1`.
    pub fn with_registry_store_keyed(
        dir: &std::path::Path,
        hosts: &[String],
        key: Option<SealingKey>,
    ) -> Self {
        use flotilla_agent::image::{ImageStore, PullSettings, RegistrySettings};
        let mut settings = PullSettings::default();
        settings.min_free = 0;
        for host in hosts {
            let insecure = RegistrySettings {
                insecure: true,
                ..RegistrySettings::default()
            };
            settings = settings.with_registry(host, insecure);
        }
        let store = ImageStore::with_settings(dir.join("images"), settings).unwrap();
        Harness::start_custom(Arc::new(FakeRuntime::new()), Arc::new(store), key, None)
    }
}

impl<R: Runtime> Harness<R> {
    /// The reconciler of node `n1` with this runtime, these images and this
    /// sealing key.
    pub fn start_custom<I: Images>(
        runtime: Arc<R>,
        images: Arc<I>,
        key: Option<SealingKey>,
        initial: Option<DesiredState>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let timing = ReportTiming {
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(1800),
        };
        let (reports, status) = report::spawn(
            "n1".into(),
            1,
            NodeInfo::default(),
            0,
            timing,
            &tracker,
            shutdown.clone(),
        );
        let settings = Settings {
            data_dir: dir.path().to_path_buf(),
            stop_grace: Duration::from_secs(10),
            secrets: Keyring::new("n1", &dir.path().join("run"), key),
        };
        let reconciler = reconciler::spawn(
            runtime.clone(),
            images,
            settings,
            initial,
            reports,
            &tracker,
            shutdown.clone(),
        );
        Self {
            runtime,
            reconciler,
            status,
            tracker,
            shutdown,
            dir,
        }
    }

    pub async fn apply(&self, d: DesiredState) {
        self.reconciler.apply(d).await.unwrap();
    }

    /// Waits (in paused time) until the status satisfies `pred`.
    pub async fn status_where(
        &mut self,
        what: &str,
        pred: impl Fn(&NodeStatus) -> bool,
    ) -> NodeStatus {
        let rx = &mut self.status;
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if pred(&s) {
                        return s.clone();
                    }
                }
                rx.changed().await.unwrap();
            }
        })
        .await;
        match found {
            Ok(s) => s,
            Err(_) => panic!(
                "timed out waiting for {what}; last status: {:#?}",
                *rx.borrow()
            ),
        }
    }

    pub async fn pod_where(
        &mut self,
        name: &str,
        what: &str,
        pred: impl Fn(&PodStatus) -> bool,
    ) -> PodStatus {
        let s = self
            .status_where(what, |s| s.pods.iter().any(|p| p.name == name && pred(p)))
            .await;
        s.pods.into_iter().find(|p| p.name == name).unwrap()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .expect("every task ends after shutdown");
    }
}

/// Polls `cond` every 10 ms (of paused time) until it holds.
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    let ok = tokio::time::timeout(PATIENCE, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out waiting for {what}");
}
