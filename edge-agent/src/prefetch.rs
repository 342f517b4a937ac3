//! Images downloaded ahead of a switch (`DesiredState::prefetch`, a staged
//! rollout's next revision): one at a time, in the background and behind
//! the pods' own pulls — a prefetch yields as soon as a pod pulls, keeping
//! what it downloaded — and never starting anything. A failure is retried
//! with back-off; how far each image is goes into `NodeStatus::prefetch`.
//! The reconciler hands over each desired state's list; garbage collection
//! keeps listed images (the reconciler puts them in its keep list).
//!
//! An image's pull secrets (`DesiredState::prefetch_pull_secrets`, sealed
//! for this node) are opened in memory for each try, as a pod's are, and
//! tried before the registries file's credentials. One that cannot be
//! opened fails the entry, naming the secret: the operator asked for these
//! credentials, so a quiet pull with others would hide why the pod's own
//! pull later fails.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_proto::{DesiredState, PrefetchState, PrefetchStatus, PullProgress, SealedSecret};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::image::{Image, ImageError, Images, PullObserver};
use crate::report::ReportHandle;
use crate::secrets::{Keyring, MAX_PULL_SECRETS};

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
    tx: Arc<watch::Sender<Vec<Wanted>>>,
}

impl PrefetchHandle {
    /// Makes `desired`'s prefetch list the images to have on the device,
    /// each with the pull secrets listed for it; images no longer listed
    /// are dropped (a download under way stops, keeping its part).
    pub fn set(&self, desired: &DesiredState) {
        let images = wanted(desired);
        self.tx.send_if_modified(|current| {
            let changed = *current != images;
            *current = images;
            changed
        });
    }
}

/// One image to have on the device, and the sealed pull secrets to try
/// (their `Debug` shows ciphertext only).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    image: String,
    pull_secrets: Vec<SealedSecret>,
}

/// The first [`MAX_PREFETCH`] distinct images of `desired`'s list, each
/// with the pull secrets of every entry naming it (once per Secret).
fn wanted(desired: &DesiredState) -> Vec<Wanted> {
    let mut out: Vec<Wanted> = Vec::new();
    for image in &desired.prefetch {
        if image.len() > MAX_REFERENCE || out.iter().any(|w| w.image == *image) {
            continue;
        }
        if out.len() == MAX_PREFETCH {
            tracing::warn!(
                listed = desired.prefetch.len(),
                "prefetching only the first {MAX_PREFETCH} images"
            );
            break;
        }
        let mut pull_secrets: Vec<SealedSecret> = Vec::new();
        // Capped so that a list too long still shows as one (the keyring
        // names it) without every entry being read.
        let listed = desired
            .prefetch_pull_secrets
            .iter()
            .take(MAX_PREFETCH)
            .filter(|p| p.images.iter().take(MAX_PREFETCH).any(|i| i == image))
            .flat_map(|p| p.pull_secrets.iter().take(MAX_PULL_SECRETS + 1));
        for s in listed {
            if pull_secrets.len() > MAX_PULL_SECRETS {
                break;
            }
            if !pull_secrets.iter().any(|p| p.name == s.name) {
                pull_secrets.push(s.clone());
            }
        }
        out.push(Wanted {
            image: image.clone(),
            pull_secrets,
        });
    }
    out
}

/// Whether two lists of sealed secrets stand for the same Secrets and
/// contents (each seal's bytes differ, their names and digests do not).
fn same_secrets(a: &[SealedSecret], b: &[SealedSecret]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.name == b.name && a.digest == b.digest && a.problem == b.problem)
}

/// Starts the prefetcher; it ends with `shutdown`.
pub fn spawn<I: Images>(
    images: Arc<I>,
    keyring: Keyring,
    reports: ReportHandle,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> PrefetchHandle {
    let (tx, rx) = watch::channel(Vec::new());
    let prefetcher = Prefetcher {
        images,
        keyring,
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
    /// Sealed; opened only for each try, on the pull's thread.
    pull_secrets: Vec<SealedSecret>,
    state: PrefetchState,
    /// Failures in a row.
    failures: u32,
    /// Not tried again before this (after a failure).
    retry_at: Option<Instant>,
}

struct Prefetcher<I> {
    images: Arc<I>,
    keyring: Keyring,
    reports: ReportHandle,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The current list, in its order.
    entries: Vec<Entry>,
    /// What the status shows now.
    reported: Vec<PrefetchStatus>,
}

impl<I: Images> Prefetcher<I> {
    async fn run(mut self, mut list: watch::Receiver<Vec<Wanted>>) {
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
    /// on it; an image whose pull secrets changed is tried again at once.
    fn sync(&mut self, wanted: &[Wanted]) {
        let mut old = std::mem::take(&mut self.entries);
        for w in wanted {
            let entry = match old.iter().position(|e| e.image == w.image) {
                Some(i) => {
                    let mut e = old.swap_remove(i);
                    if !same_secrets(&e.pull_secrets, &w.pull_secrets) {
                        (e.failures, e.retry_at) = (0, None);
                        if matches!(e.state, PrefetchState::Failed { .. }) {
                            e.state = PrefetchState::Queued;
                        }
                    }
                    e.pull_secrets = w.pull_secrets.clone();
                    e
                }
                None => Entry {
                    image: w.image.clone(),
                    pull_secrets: w.pull_secrets.clone(),
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
    async fn fetch(&mut self, image: &str, list: &mut watch::Receiver<Vec<Wanted>>) -> bool {
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
        let keyring = self.keyring.clone();
        let reference = image.to_owned();
        let sealed = self
            .entries
            .iter()
            .find(|e| e.image == image)
            .map(|e| e.pull_secrets.clone())
            .unwrap_or_default();
        let mut job = self
            .tracker
            .spawn_blocking(move || pull(&*images, &keyring, &reference, &sealed, &observer));
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
                    let listed = changed.is_ok() && list.borrow().iter().any(|w| w.image == image);
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

/// Opens `sealed` (in memory, for this try only) and pulls `reference` in
/// the background with those credentials first. Blocking.
fn pull<I: Images>(
    images: &I,
    keyring: &Keyring,
    reference: &str,
    sealed: &[SealedSecret],
    observer: &Background<I>,
) -> Result<Image, ImageError> {
    // As for a pod's pull: a secret that cannot be opened is skipped, and
    // named in the error only if the pull then fails (the registries file
    // may well cover the registry; failing here would hold the node back
    // until the rollout's prefetch timeout for nothing).
    let secrets = keyring.pull_secrets(reference, sealed);
    images.pull_background(reference, &secrets, observer)
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

#[cfg(test)]
mod tests {
    use flotilla_proto::PrefetchPullSecrets;

    use super::*;

    fn group(images: &[&str], secrets: &[&str]) -> PrefetchPullSecrets {
        PrefetchPullSecrets {
            images: images.iter().map(|i| (*i).to_owned()).collect(),
            pull_secrets: secrets.iter().map(|s| SealedSecret::unsealed(*s)).collect(),
        }
    }

    #[test]
    fn each_image_gets_the_pull_secrets_of_the_entries_naming_it() {
        let desired = DesiredState {
            node: "n1".into(),
            generation: 1,
            pods: Vec::new(),
            prefetch: vec!["a:2".into(), "b:2".into(), "c:2".into(), "a:2".into()],
            prefetch_pull_secrets: vec![
                group(&["a:2", "b:2"], &["shop"]),
                group(&["b:2"], &["till", "shop"]),
            ],
        };
        let got: Vec<(String, Vec<String>)> = wanted(&desired)
            .into_iter()
            .map(|w| {
                let names = w.pull_secrets.into_iter().map(|s| s.name).collect();
                (w.image, names)
            })
            .collect();
        let want =
            |i: &str, s: &[&str]| (i.to_owned(), s.iter().map(|s| (*s).to_owned()).collect());
        assert_eq!(
            got,
            [
                want("a:2", &["shop"]),
                want("b:2", &["shop", "till"]),
                want("c:2", &[]),
            ]
        );
    }

    #[test]
    fn a_new_seal_of_the_same_contents_is_the_same_secrets() {
        let a = SealedSecret::unsealed("shop");
        let resealed = SealedSecret {
            nonce: [1; 12],
            ciphertext: vec![1, 2, 3],
            ..a.clone()
        };
        assert!(same_secrets(std::slice::from_ref(&a), &[resealed]));
        let changed = SealedSecret {
            digest: [1; 32],
            ..a.clone()
        };
        assert!(!same_secrets(std::slice::from_ref(&a), &[changed]));
        assert!(!same_secrets(&[a], &[]));
    }
}
