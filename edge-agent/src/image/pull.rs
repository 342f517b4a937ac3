//! One registry pull: resolves the reference (locally when this device has
//! resolved it before, so a known image starts with no network), picks the
//! device's platform, checks free space against the floor, downloads missing
//! blobs with resume (HTTP Range into the partial file) and back-off, and
//! unpacks. Mirrors are asked before the origin.

use std::cell::{Cell, RefCell};
use std::io::{self, Read};
use std::time::{Duration, Instant};

use super::blobs::BlobError;
use super::layout::{BlobKind, Digest, Fetch, Layout, Resolved};
use super::reference::{ImageName, Reference};
use super::registry::{Connections, Endpoint, HttpError};
use super::store::{ImageStore, io};
use super::{Image, ImageError, PullObserver, PullProgress, PullSecrets};

/// Attempts in a row that bring no new byte before a pull gives up (the
/// pod's back-off tries again later, resuming).
const MAX_FAILURES: u32 = 5;
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Progress is reported at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Unpacked layers take about this many times their compressed size.
const UNPACK_FACTOR: u64 = 2;

/// Makes registry image `name` ready to run.
pub(crate) fn pull(
    store: &ImageStore,
    r: &Reference,
    name: &ImageName,
    secrets: &PullSecrets,
    observer: &dyn PullObserver,
) -> Result<Image, ImageError> {
    let canonical = name.to_string();
    let connections = Connections::default();
    let _watch = close_on_cancel(observer, &connections);
    let p = Pull {
        store,
        reference: &r.text,
        name,
        observer,
        endpoints: store
            .client
            .endpoints(&name.registry, secrets, &connections),
        preferred: Cell::new(0),
        progress: RefCell::new(Progress::default()),
    };
    // Known here: resolved from local blobs, fetching only what is missing.
    if let Some(entry) = store.refs.get(&canonical) {
        let path = store.blobs.path(&entry.digest);
        if let Ok(meta) = std::fs::metadata(&path) {
            match p.finish(entry.digest.clone(), meta.len(), None) {
                Ok(image) => return Ok(image),
                Err(
                    e @ (ImageError::Cancelled { .. } | ImageError::InsufficientStorage { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(image = %r.text, "stored copy unusable, asking the registry: {e}")
                }
            }
        }
    }
    let (digest, size, media_type) = p.top()?;
    let image = p.finish(digest.clone(), size, media_type)?;
    if let Err(e) = store.refs.set(&canonical, &digest, false) {
        tracing::warn!(image = %r.text, "recording the image's digest: {e}");
    }
    Ok(image)
}

/// Closes `connections` the moment `observer` is cancelled, when it has a
/// cancel token and a runtime runs: a request waiting on a slow link would
/// otherwise see the cancel only once it returns, its response crossing the
/// link meanwhile for nobody, and the blob it holds locked from the pull
/// that takes it over. Watches until the guard is dropped.
fn close_on_cancel(
    observer: &dyn PullObserver,
    connections: &Connections,
) -> Option<tokio_util::sync::DropGuard> {
    let cancel = observer.cancel_token()?.clone();
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let done = tokio_util::sync::CancellationToken::new();
    let (finished, connections) = (done.clone(), connections.clone());
    runtime.spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => connections.close(),
            () = finished.cancelled() => {}
        }
    });
    Some(done.drop_guard())
}

#[derive(Default)]
struct Progress {
    done: u64,
    total: u64,
    last: Option<Instant>,
    /// Layers are being downloaded (progress is worth showing).
    active: bool,
}

struct Pull<'a> {
    store: &'a ImageStore,
    reference: &'a str,
    name: &'a ImageName,
    observer: &'a dyn PullObserver,
    endpoints: Vec<Endpoint>,
    /// The endpoint that served the manifest; blobs are asked there first.
    preferred: Cell<usize>,
    progress: RefCell<Progress>,
}

impl Pull<'_> {
    /// Resolves from the top manifest down, downloads what is missing, and
    /// unpacks.
    fn finish(
        &self,
        digest: Digest,
        size: u64,
        media_type: Option<String>,
    ) -> Result<Image, ImageError> {
        let root = self.store.root();
        let layout = Layout::blob_store(self.reference, root, Some(self));
        let resolved = layout.resolve_digest(digest, size, media_type)?;
        if let Some(image) = self.store.unpacked(&resolved.manifest) {
            return Ok(image);
        }
        self.download_layers(&resolved)?;
        let local = Layout::blob_store(self.reference, root, None);
        self.store.materialize(self.reference, &local, &resolved)
    }

    fn download_layers(&self, resolved: &Resolved) -> Result<(), ImageError> {
        let blobs = &self.store.blobs;
        let (mut done, mut total, mut missing) = (0u64, 0u64, 0u64);
        for layer in &resolved.layers {
            total = total.saturating_add(layer.size);
            if blobs.has(&layer.digest, layer.size) {
                done += layer.size;
            } else {
                let partial = blobs.partial_len(&layer.digest).min(layer.size);
                done += partial;
                missing += layer.size - partial;
            }
        }
        self.check_space(missing, total)?;
        if missing > 0 {
            tracing::info!(image = %self.reference, bytes = missing, "pulling image layers");
        }
        {
            let mut p = self.progress.borrow_mut();
            *p = Progress {
                done,
                total,
                last: None,
                active: missing > 0,
            };
        }
        self.report(true);
        for layer in &resolved.layers {
            self.fetch(&layer.digest, layer.size, BlobKind::Layer)?;
        }
        self.report(true);
        Ok(())
    }

    /// Refuses the pull while it would leave less than the floor free.
    fn check_space(&self, download: u64, layers: u64) -> Result<(), ImageError> {
        let root = self.store.root();
        let floor = self.store.client.settings().min_free;
        let stat = nix::sys::statvfs::statvfs(root)
            .map_err(|e| io(self.reference, "checking free space of", root, e.into()))?;
        // Both are 32-bit on 32-bit glibc targets.
        #[allow(clippy::useless_conversion)]
        let free =
            u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size()));
        let need = download.saturating_add(layers.saturating_mul(UNPACK_FACTOR));
        if free.saturating_sub(need) < floor {
            return Err(ImageError::InsufficientStorage {
                reference: self.reference.to_owned(),
                what: format!(
                    "not enough free space in {}: {} free, the pull needs about {} \
                     and must leave {} free; waiting for space",
                    root.display(),
                    mib(free),
                    mib(need),
                    mib(floor)
                ),
            });
        }
        Ok(())
    }

    fn report(&self, force: bool) {
        let mut p = self.progress.borrow_mut();
        if !p.active {
            return;
        }
        let now = Instant::now();
        if !force
            && p.last
                .is_some_and(|t| now.duration_since(t) < PROGRESS_EVERY)
        {
            return;
        }
        p.last = Some(now);
        self.observer.progress(PullProgress {
            done_bytes: p.done,
            total_bytes: p.total,
        });
    }

    fn add_progress(&self, bytes: u64, layer: bool) {
        if layer {
            let mut p = self.progress.borrow_mut();
            p.done = p.done.saturating_add(bytes);
        }
        self.report(false);
    }

    /// The manifest the reference names, from the first endpoint that has
    /// it, retried with back-off on transient failures.
    fn top(&self) -> Result<(Digest, u64, Option<String>), ImageError> {
        let reference = self.name.manifest_ref();
        let body = self.retrying(|| {
            self.each_endpoint(|i, ep| {
                let body = self
                    .store
                    .client
                    .manifest(ep, &self.name.repository, &reference)?;
                self.preferred.set(i);
                Ok(body)
            })
        })?;
        let digest = Digest::of(&body.bytes);
        if let Some(wanted) = &self.name.digest {
            if *wanted != digest {
                return Err(self.invalid(format!(
                    "manifest {wanted}: the registry sent content hashing to {digest}; refused"
                )));
            }
        }
        self.store
            .blobs
            .put(&digest, &body.bytes)
            .map_err(|e| self.blob_error(e))?;
        Ok((digest, body.bytes.len() as u64, body.media_type))
    }

    /// Runs `f` against the preferred endpoint, then the others: a mirror
    /// that fails or lacks the content passes the request on.
    fn each_endpoint<T>(
        &self,
        mut f: impl FnMut(usize, &Endpoint) -> Result<T, HttpError>,
    ) -> Result<T, HttpError> {
        let n = self.endpoints.len();
        let first = self.preferred.get();
        let mut last = HttpError::Fatal("no registry to ask".to_owned());
        for k in 0..n {
            let i = (first + k) % n;
            match f(i, &self.endpoints[i]) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if k + 1 < n {
                        tracing::info!(
                            image = %self.reference,
                            registry = %self.endpoints[i].host,
                            "{e}; trying the next registry"
                        );
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Runs `attempt` until it succeeds, fails for good, or fails
    /// [`MAX_FAILURES`] times in a row with no progress.
    fn retrying<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, HttpError>,
    ) -> Result<T, ImageError> {
        let mut failures = 0;
        let mut delay = RETRY_MIN;
        loop {
            self.check_cancelled()?;
            let before = self.progress.borrow().done;
            match attempt() {
                Ok(v) => return Ok(v),
                Err(HttpError::Transient(what)) => {
                    if self.progress.borrow().done > before {
                        failures = 0;
                        delay = RETRY_MIN;
                    } else {
                        failures += 1;
                    }
                    if failures >= MAX_FAILURES {
                        return Err(ImageError::Pull {
                            reference: self.reference.to_owned(),
                            what: format!("{what} (gave up after {failures} attempts)"),
                        });
                    }
                    tracing::info!(image = %self.reference, "{what}; retrying in {} ms", delay.as_millis());
                    self.sleep(delay)?;
                    delay = (delay * 2).min(RETRY_MAX);
                }
                Err(e) => {
                    // Closing a cancelled pull's connections may fail its
                    // request in any way.
                    self.check_cancelled()?;
                    return Err(self.http_error(e));
                }
            }
        }
    }

    fn sleep(&self, d: Duration) -> Result<(), ImageError> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.check_cancelled()?;
            std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
        }
        Ok(())
    }

    fn check_cancelled(&self) -> Result<(), ImageError> {
        if self.observer.cancelled() {
            return Err(ImageError::Cancelled {
                reference: self.reference.to_owned(),
            });
        }
        Ok(())
    }

    /// Downloads blob `digest` into the store, resuming a partial download.
    fn download(&self, digest: &Digest, size: u64, kind: BlobKind) -> Result<(), ImageError> {
        let blobs = &self.store.blobs;
        // A cancelled pull must not wait for the blob, nor lock it.
        self.check_cancelled()?;
        // Waits while another pull downloads the same blob.
        let Some(mut partial) = blobs.begin(digest).map_err(|e| self.blob_error(e))? else {
            return Ok(());
        };
        let layer = kind == BlobKind::Layer;
        let mut corrupt = 0;
        let result = self.retrying(|| {
            if partial.len() < size {
                self.download_rest(&mut partial, digest, size, layer)?;
            }
            match partial.commit(size) {
                Ok(()) => Ok(()),
                Err(BlobError::Mismatch { digest, what }) => {
                    corrupt += 1;
                    self.undo_progress(layer, size);
                    tracing::warn!(image = %self.reference, "blob {digest}: {what}; fetching it again");
                    let what = format!("blob {digest}: {what}");
                    if corrupt >= 2 {
                        return Err(HttpError::Fatal(format!(
                            "{what} (twice: the registry serves corrupt content)"
                        )));
                    }
                    Err(HttpError::Transient(what))
                }
                Err(e @ BlobError::Io { .. }) => Err(HttpError::Fatal(e.to_string())),
            }
        });
        match result {
            Err(ImageError::Pull { what, .. }) if corrupt >= 2 => Err(self.invalid(what)),
            other => other,
        }
    }

    /// Downloads the rest of a blob into `partial`, from its length on.
    /// `Ok` once `partial` holds `size` bytes.
    fn download_rest(
        &self,
        partial: &mut super::blobs::Partial,
        digest: &Digest,
        size: u64,
        layer: bool,
    ) -> Result<(), HttpError> {
        let offset = partial.len();
        let mut body = self.each_endpoint(|i, ep| {
            let body =
                self.store
                    .client
                    .blob(ep, &self.name.repository, &digest.to_string(), offset)?;
            self.preferred.set(i);
            Ok(body)
        })?;
        if body.start == 0 && offset > 0 {
            tracing::info!(image = %self.reference, blob = %digest, "the registry ignored the range; downloading from the start");
            self.undo_progress(layer, offset);
            partial
                .restart()
                .map_err(|e| HttpError::Fatal(e.to_string()))?;
        } else if offset > 0 {
            tracing::info!(image = %self.reference, blob = %digest, offset, "resuming download");
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if self.observer.cancelled() {
                return Err(HttpError::Transient("cancelled".to_owned()));
            }
            let n = match body.reader.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(HttpError::Transient(format!(
                        "blob {digest}: connection lost after {} of {size} bytes: {e}",
                        partial.len()
                    )));
                }
            };
            if n == 0 {
                break;
            }
            if partial.len() + n as u64 > size {
                self.undo_progress(layer, partial.len());
                partial
                    .restart()
                    .map_err(|e| HttpError::Fatal(e.to_string()))?;
                return Err(HttpError::Transient(format!(
                    "blob {digest}: the registry sent more than the {size} bytes its descriptor says"
                )));
            }
            partial
                .write(&buf[..n])
                .map_err(|e| HttpError::Fatal(e.to_string()))?;
            self.add_progress(n as u64, layer);
        }
        if partial.len() < size {
            return Err(HttpError::Transient(format!(
                "blob {digest}: connection closed after {} of {size} bytes",
                partial.len()
            )));
        }
        Ok(())
    }

    fn undo_progress(&self, layer: bool, bytes: u64) {
        if layer {
            let mut p = self.progress.borrow_mut();
            p.done = p.done.saturating_sub(bytes);
        }
    }

    fn http_error(&self, e: HttpError) -> ImageError {
        let reference = self.reference.to_owned();
        match e {
            HttpError::NotFound(what) => ImageError::NotFound { reference, what },
            HttpError::Unauthorized(what) => ImageError::Unauthorized { reference, what },
            HttpError::Transient(what) | HttpError::Fatal(what) => {
                ImageError::Pull { reference, what }
            }
        }
    }

    fn blob_error(&self, e: BlobError) -> ImageError {
        match e {
            BlobError::Mismatch { .. } => self.invalid(e.to_string()),
            BlobError::Io { op, path, source } => io(self.reference, op, &path, source),
        }
    }

    fn invalid(&self, what: String) -> ImageError {
        ImageError::Invalid {
            reference: self.reference.to_owned(),
            what,
        }
    }
}

impl Fetch for Pull<'_> {
    fn fetch(&self, digest: &Digest, size: u64, kind: BlobKind) -> Result<(), ImageError> {
        if self.store.blobs.has(digest, size) {
            return Ok(());
        }
        match kind {
            BlobKind::Manifest => {
                let reference = digest.to_string();
                let body = self.retrying(|| {
                    self.each_endpoint(|_, ep| {
                        self.store
                            .client
                            .manifest(ep, &self.name.repository, &reference)
                    })
                })?;
                if body.bytes.len() as u64 != size {
                    return Err(self.invalid(format!(
                        "manifest {digest}: the registry sent {} bytes, its descriptor says {size}",
                        body.bytes.len()
                    )));
                }
                self.store
                    .blobs
                    .put(digest, &body.bytes)
                    .map_err(|e| self.blob_error(e))
            }
            BlobKind::Config | BlobKind::Layer => self.download(digest, size, kind),
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
