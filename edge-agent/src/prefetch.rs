//! Images downloaded ahead of a switch (`DesiredState::prefetch`, a staged
//! rollout's next revision): one at a time, in the background and behind
//! the pods' own pulls — a prefetch yields as soon as a pod pulls, keeping
//! what it downloaded — and never starting anything. A failure is retried
//! with back-off; how far each image is goes into `NodeStatus::prefetch`.
//! The reconciler hands over each desired state's list; garbage collection
//! keeps listed images (the reconciler puts them in its keep list).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_proto::{PrefetchState, PrefetchStatus, PullProgress};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::image::{ImageError, Images, PullObserver};
use crate::report::ReportHandle;

/// Most images taken from one list; the rest are ignored (a desired state
/// is capped, but its status echo should stay small too).
pub const MAX_PREFETCH: usize = 32;
/// Longest reference taken.
const MAX_REFERENCE: usize = 512;
/// How often a prefetch waiting behind pods' pulls looks again.
const YIELD_POLL: Duration = Duration::from_millis(500);
/// First delay after a failure, doubled per failure in a row.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest delay after a failure.
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Download progress is reported at most this often: it rides on the
/// status, over what may be a slow link.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Hands the prefetch list of each desired state to the prefetcher. Cheap
/// to clone.
#[derive(Debug, Clone)]
pub struct PrefetchHandle {
    tx: Arc<watch::Sender<Vec<String>>>,
}

impl PrefetchHandle {
    /// Makes `images` the list to have on the device; images no longer
    /// listed are dropped (a download under way stops, keeping its part).
    pub fn set(&self, images: Vec<String>) {
        self.tx.send_if_modified(|current| {
            let changed = *current != images;
            *current = images;
            changed
        });
    }
}

/// Starts the prefetcher; it ends with `shutdown`.
pub fn spawn<I: Images>(
    images: Arc<I>,
    reports: ReportHandle,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> PrefetchHandle {
    let (tx, rx) = watch::channel(Vec::new());
    let prefetcher = Prefetcher {
        images,
        reports,
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        entries: Vec::new(),
        reported: Vec::new(),
    };
    tracker.spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = prefetcher.run(rx) => {}
        }
    });
    PrefetchHandle { tx: Arc::new(tx) }
}

/// One listed image.
struct Entry {
    image: String,
    state: PrefetchState,
    /// Failures in a row.
    failures: u32,
    /// Not tried again before this (after a failure).
    retry_at: Option<Instant>,
}

struct Prefetcher<I> {
    images: Arc<I>,
    reports: ReportHandle,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The current list, in its order.
    entries: Vec<Entry>,
    /// What the status shows now.
    reported: Vec<PrefetchStatus>,
}

impl<I: Images> Prefetcher<I> {
    async fn run(mut self, mut list: watch::Receiver<Vec<String>>) {
        loop {
            let wanted = list.borrow_and_update().clone();
            self.sync(&wanted);
            self.report().await;
            let now = Instant::now();
            let next = self
                .entries
                .iter()
                .find(|e| e.state != PrefetchState::Ready && e.retry_at.is_none_or(|t| t <= now))
                .map(|e| e.image.clone());
            let Some(image) = next else {
                let wake = self.entries.iter().filter_map(|e| e.retry_at).min();
                tokio::select! {
                    changed = list.changed() => if changed.is_err() { return },
                    () = sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
                }
                continue;
            };
            if self.images.foreground_pulls() > 0 {
                // Pods first: their pulls are what a switch waits for.
                // (A failure stays shown until its retry is under way.)
                self.report().await;
                tokio::select! {
                    changed = list.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(YIELD_POLL) => {}
                }
                continue;
            }
            if !self.fetch(&image, &mut list).await {
                return;
            }
        }
    }

    /// Takes `wanted` as the list, keeping what is known of images still
    /// on it.
    fn sync(&mut self, wanted: &[String]) {
        let mut old = std::mem::take(&mut self.entries);
        for image in wanted {
            if image.len() > MAX_REFERENCE || self.entries.iter().any(|e| e.image == *image) {
                continue;
            }
            if self.entries.len() == MAX_PREFETCH {
                tracing::warn!(
                    listed = wanted.len(),
                    "prefetching only the first {MAX_PREFETCH} images"
                );
                break;
            }
            let entry = match old.iter().position(|e| e.image == *image) {
                Some(i) => old.swap_remove(i),
                None => Entry {
                    image: image.clone(),
                    state: PrefetchState::Queued,
                    failures: 0,
                    retry_at: None,
                },
            };
            self.entries.push(entry);
        }
    }

    fn set(&mut self, image: &str, state: PrefetchState) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.image == image) {
            e.state = state;
        }
    }

    /// Downloads `image` until it is ready, fails, yields to a pod's pull
    /// or leaves the list; false at shutdown.
    async fn fetch(&mut self, image: &str, list: &mut watch::Receiver<Vec<String>>) -> bool {
        let progress = Arc::new(Mutex::new(None));
        let cancel = self.shutdown.child_token();
        let observer = Background {
            progress: Arc::clone(&progress),
            cancel: cancel.clone(),
            images: Arc::clone(&self.images),
        };
        let started = PullProgress {
            done_bytes: 0,
            total_bytes: 0,
        };
        self.set(image, PrefetchState::Pulling { progress: started });
        self.report().await;
        tracing::info!(image, "prefetching");
        let images = Arc::clone(&self.images);
        let reference = image.to_owned();
        let mut job = self
            .tracker
            .spawn_blocking(move || images.pull_background(&reference, &observer));
        let mut tick = tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let mut listening = true;
        let result = loop {
            tokio::select! {
                result = &mut job => break result,
                _ = tick.tick() => {
                    let p = progress.lock().ok().and_then(|p| *p);
                    if let Some(progress) = p {
                        self.set(image, PrefetchState::Pulling { progress });
                        self.report().await;
                    }
                }
                changed = list.changed(), if listening => {
                    let listed = changed.is_ok() && list.borrow().iter().any(|i| i == image);
                    listening = changed.is_ok();
                    if !listed {
                        cancel.cancel();
                    }
                }
            }
        };
        match result {
            Ok(Ok(_)) => {
                tracing::info!(image, "prefetched");
                if let Some(e) = self.entries.iter_mut().find(|e| e.image == image) {
                    (e.state, e.failures, e.retry_at) = (PrefetchState::Ready, 0, None);
                }
            }
            // Yielded to a pod's pull, or no longer listed: not a failure.
            Ok(Err(ImageError::Cancelled { .. })) => {
                if self.shutdown.is_cancelled() {
                    return false;
                }
                self.set(image, PrefetchState::Queued);
            }
            Ok(Err(e)) => self.failed(image, e.reason(), e.to_string()),
            Err(e) => self.failed(image, "PrefetchFailed", format!("prefetch {image}: {e}")),
        }
        true
    }

    fn failed(&mut self, image: &str, reason: &str, message: String) {
        let Some(e) = self.entries.iter_mut().find(|e| e.image == image) else {
            return;
        };
        e.failures = e.failures.saturating_add(1);
        let delay = BACKOFF_MIN
            .saturating_mul(1 << e.failures.saturating_sub(1).min(16))
            .min(BACKOFF_MAX);
        tracing::warn!(image, retry_in = ?delay, "prefetch failed: {message}");
        e.retry_at = Some(Instant::now() + delay);
        let retry_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| (d + delay).as_millis() as u64);
        e.state = PrefetchState::Failed {
            reason: reason.to_owned(),
            message,
            retry_at_ms,
        };
    }

    /// Sends the list's state when it differs from what the status shows.
    async fn report(&mut self) {
        let now: Vec<PrefetchStatus> = self
            .entries
            .iter()
            .map(|e| PrefetchStatus {
                image: e.image.clone(),
                state: e.state.clone(),
            })
            .collect();
        if now == self.reported {
            return;
        }
        self.reported = now.clone();
        if let Err(e) = self.reports.prefetch(now).await {
            tracing::debug!("{e}");
        }
    }
}

/// What a background pull reports to, and when it stops: at shutdown,
/// when its image leaves the list, or as soon as a pod pulls.
struct Background<I> {
    progress: Arc<Mutex<Option<PullProgress>>>,
    cancel: CancellationToken,
    images: Arc<I>,
}

impl<I: Images> PullObserver for Background<I> {
    fn progress(&self, progress: PullProgress) {
        if let Ok(mut p) = self.progress.lock() {
            *p = Some(progress);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.images.foreground_pulls() > 0
    }
}
