//! The image store under `{data_dir}/images`: verified blobs shared by all
//! images (`blobs/sha256/`), what each reference resolved to (`refs/`),
//! unpacked layers shared by all images (`layers/`, see `layers`), and one
//! directory per image manifest, `sha256-<hex>/{layers,config.json}`. Layers
//! and images are made in temp directories and renamed into place whole, so
//! a crash never leaves a half layer or image under its final name.
//!
//! Every pull, import and local unpack holds a shared `flock` on
//! `{images}/.lock`; garbage collection takes it exclusively, or, when pulls
//! are running, is left pending until the last one ends.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use flate2::read::MultiGzDecoder;
use nix::fcntl::{Flock, FlockArg};

use super::archive;
use super::blobs::Blobs;
use super::layers;
use super::layout::{self, Compression, LayerDesc, Layout, Resolved};
use super::reference::{Reference, Source};
use super::refs::Refs;
use super::registry::Client;
use super::settings::PullSettings;
use super::unpack::{self, UnpackError};
use super::{Image, ImageError, Images, PullObserver, PullSecrets, pull};

/// Prefix of work directories; anything named so is scratch.
const TMP_PREFIX: &str = ".tmp-";
/// The store's lock file.
const LOCK: &str = ".lock";

/// Images on the device: blobs, refs and unpacked images. One store per
/// root: [`ImageStore::new`] removes scratch directories left by dead
/// processes.
pub struct ImageStore {
    root: PathBuf,
    pub(crate) blobs: Blobs,
    pub(crate) refs: Refs,
    pub(crate) client: Client,
    /// The keep list of a collection that found pulls running.
    pub(crate) pending_gc: Mutex<Option<Vec<String>>>,
    /// Pulls running other than background ones (prefetches wait for them).
    foreground: AtomicUsize,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .finish()
    }
}

impl ImageStore {
    /// Opens the store at `root` (`{data_dir}/images`) with default pull
    /// settings, creating it if missing, and removes work directories a
    /// crashed agent left behind.
    pub fn new(root: PathBuf) -> Result<Self, ImageError> {
        Self::with_settings(root, PullSettings::default())
    }

    /// [`ImageStore::new`] with registry settings.
    pub fn with_settings(root: PathBuf, settings: PullSettings) -> Result<Self, ImageError> {
        let io_err = |op, path: &Path, source| ImageError::Store {
            op,
            path: path.to_owned(),
            source,
        };
        fs::create_dir_all(&root).map_err(|e| io_err("creating", &root, e))?;
        for entry in fs::read_dir(&root).map_err(|e| io_err("reading", &root, e))? {
            let entry = entry.map_err(|e| io_err("reading", &root, e))?;
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TMP_PREFIX)) else {
                continue;
            };
            // `.tmp-{pid}-…`: a live process may still be writing it.
            let pid = rest.split('-').next().unwrap_or_default();
            if pid == std::process::id().to_string() || Path::new("/proc").join(pid).exists() {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing leftover image work directory");
            fs::remove_dir_all(&path).map_err(|e| io_err("removing", &path, e))?;
        }
        let blobs = Blobs::open(&root).map_err(|e| match e {
            super::blobs::BlobError::Io { op, path, source } => io_err(op, &path, source),
            e @ super::blobs::BlobError::Mismatch { .. } => {
                io_err("opening", &root, io::Error::other(e.to_string()))
            }
        })?;
        let refs = Refs::open(&root).map_err(|e| io_err("creating", &root.join("refs"), e))?;
        Ok(Self {
            root,
            blobs,
            refs,
            client: Client::new(settings),
            pending_gc: Mutex::new(None),
            foreground: AtomicUsize::new(0),
        })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the store's lock, shared (pulls) or exclusive (garbage
    /// collection; `None` when pulls hold it).
    pub(crate) fn lock(&self, exclusive: bool) -> Result<Option<Flock<fs::File>>, ImageError> {
        let path = self.root.join(LOCK);
        let io_err = |source| ImageError::Store {
            op: "locking",
            path: path.clone(),
            source,
        };
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err)?;
        let arg = if exclusive {
            FlockArg::LockExclusiveNonblock
        } else {
            FlockArg::LockShared
        };
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if exclusive => Ok(None),
            Err((_, e)) => Err(io_err(e.into())),
        }
    }

    fn ensure_local(
        &self,
        r: &Reference,
        dir: &Path,
        source: &Path,
        archive: bool,
        tag: Option<&str>,
    ) -> Result<Image, ImageError> {
        let layout = Layout::open(&r.text, dir, source, archive)?;
        let resolved = layout.resolve(tag)?;
        let image = self.materialize(&r.text, &layout, &resolved)?;
        if let Err(e) = self.refs.set(&r.text, &resolved.manifest, false) {
            tracing::warn!(image = %r.text, "recording the image's digest: {e}");
        }
        Ok(image)
    }

    /// The unpacked image of `resolved`, unpacking the layers it does not
    /// share with images already here from `layout`.
    pub(crate) fn materialize(
        &self,
        reference: &str,
        layout: &Layout<'_>,
        resolved: &Resolved,
    ) -> Result<Image, ImageError> {
        if let Some(image) = self.unpacked(&resolved.manifest) {
            return Ok(image);
        }
        if resolved.layers.len() > layers::MAX_LAYERS {
            return Err(ImageError::Invalid {
                reference: reference.to_owned(),
                what: format!(
                    "{} layers, more than the {} this agent runs",
                    resolved.layers.len(),
                    layers::MAX_LAYERS
                ),
            });
        }
        let digest = resolved.manifest.to_string();
        let final_dir = self.image_dir(&resolved.manifest);
        let started = Instant::now();
        let mut list = String::new();
        let mut unpacked = 0;
        for layer in &resolved.layers {
            unpacked += usize::from(self.ensure_layer(reference, layout, layer)?);
            list.push_str(layers::short_name(&layer.digest));
            list.push('\n');
        }
        let work = WorkDir::create(&self.root, resolved.manifest.hex(), reference)?;
        let config = work.path().join("config.json");
        fs::write(&config, &resolved.config_bytes)
            .map_err(|e| io(reference, "writing", &config, e))?;
        let list_path = work.path().join(layers::LIST_FILE);
        fs::write(&list_path, list).map_err(|e| io(reference, "writing", &list_path, e))?;
        syncfs(reference, work.path())?;
        match fs::rename(work.path(), &final_dir) {
            Ok(()) => {
                work.keep();
                sync_dir(&self.root).map_err(|e| io(reference, "syncing", &self.root, e))?;
                tracing::info!(
                    image = %reference, %digest,
                    layers = resolved.layers.len(),
                    unpacked,
                    ms = started.elapsed().as_millis() as u64,
                    "image unpacked"
                );
            }
            // Another ensure of the same image renamed its copy first; ours
            // is dropped (and removed) with `work`.
            Err(_) if final_dir.join(layers::LIST_FILE).is_file() => {}
            Err(e) => return Err(io(reference, "renaming into place", &final_dir, e)),
        }
        Ok(Image {
            digest,
            rootfs: final_dir.join(layers::LIST_FILE),
            config: resolved.config.clone(),
        })
    }

    /// Unpacks `layer` into `layers/` unless it is there; true when it was
    /// unpacked now.
    fn ensure_layer(
        &self,
        reference: &str,
        layout: &Layout<'_>,
        layer: &LayerDesc,
    ) -> Result<bool, ImageError> {
        let dir = layers::layer_dir(&self.root, &layer.digest);
        let present = |dir: &Path| {
            layers::layer_present(dir, &layer.digest).map_err(|e| io(reference, "checking", dir, e))
        };
        if present(&dir)? {
            return Ok(false);
        }
        let parent = self.root.join(layers::LAYERS_DIR);
        fs::create_dir_all(&parent).map_err(|e| io(reference, "creating", &parent, e))?;
        let work = WorkDir::create(&self.root, "layer", reference)?;
        let root = work.path().join(layers::ROOT);
        fs::create_dir(&root).map_err(|e| io(reference, "creating", &root, e))?;
        let file = layout.open_layer(layer)?;
        let reader = io::BufReader::new(file);
        let result = match layer.compression {
            Compression::Plain => unpack::unpack_layer(reader, &root),
            Compression::Gzip => unpack::unpack_layer(MultiGzDecoder::new(reader), &root),
        };
        result.map_err(|e| match e {
            UnpackError::Unsafe { entry, why } => ImageError::UnsafeLayer {
                reference: reference.to_owned(),
                layer: layer.digest.to_string(),
                entry,
                why,
            },
            UnpackError::Io { op, path, source } => io(reference, op, &path, source),
            e @ (UnpackError::Invalid { .. } | UnpackError::Corrupt(_)) => ImageError::Invalid {
                reference: reference.to_owned(),
                what: format!("layer {}: {e}", layer.digest),
            },
        })?;
        let digest_file = work.path().join(layers::DIGEST_FILE);
        fs::write(&digest_file, layer.digest.to_string())
            .map_err(|e| io(reference, "writing", &digest_file, e))?;
        syncfs(reference, work.path())?;
        match fs::rename(work.path(), &dir) {
            Ok(()) => {
                work.keep();
                sync_dir(&parent).map_err(|e| io(reference, "syncing", &parent, e))?;
                Ok(true)
            }
            // Another pull unpacked it at the same time; ours goes.
            Err(_) if present(&dir)? => Ok(false),
            Err(e) => Err(io(reference, "renaming into place", &dir, e)),
        }
    }

    /// The unpacked image of manifest `digest`, if it is there with all its
    /// layers, without reading any blob. An image unpacked whole by an older
    /// agent (`rootfs/`) is used as it is.
    pub(crate) fn unpacked(&self, digest: &layout::Digest) -> Option<Image> {
        let dir = self.image_dir(digest);
        let list = dir.join(layers::LIST_FILE);
        let old = dir.join("rootfs");
        let rootfs = if list.is_file() {
            // A layer removed behind the store's back: unpacked again.
            layers::lower_dirs(&list).ok()?;
            list
        } else if old.is_dir() {
            old
        } else {
            return None;
        };
        let bytes = fs::read(dir.join("config.json")).ok()?;
        let config = layout::parse_config(&bytes).ok()?;
        Some(Image {
            digest: digest.to_string(),
            rootfs,
            config,
        })
    }

    pub(crate) fn image_dir(&self, digest: &layout::Digest) -> PathBuf {
        self.root.join(format!("sha256-{}", digest.hex()))
    }

    fn ensure_any(
        &self,
        r: &Reference,
        secrets: &PullSecrets,
        observer: &dyn PullObserver,
    ) -> Result<Image, ImageError> {
        match &r.source {
            Source::Layout { path, tag } => self.ensure_local(r, path, path, false, tag.as_deref()),
            Source::Archive { path, tag } => {
                let work = WorkDir::create(&self.root, "archive", &r.text)?;
                archive::extract_archive(&r.text, path, work.path())?;
                self.ensure_local(r, work.path(), path, true, tag.as_deref())
            }
            Source::Registry(name) => pull::pull(self, r, name, secrets, observer),
        }
    }
}

impl ImageStore {
    /// A pull under the store's shared lock; a collection left pending
    /// runs after it.
    fn pull_locked(
        &self,
        reference: &str,
        secrets: &PullSecrets,
        observer: &dyn PullObserver,
    ) -> Result<Image, ImageError> {
        let r = Reference::parse(reference)?;
        let lock = self.lock(false)?;
        let result = self.ensure_any(&r, secrets, observer);
        drop(lock);
        self.run_pending_gc();
        result
    }
}

/// One foreground pull, counted while it runs (a panic included).
struct Foreground<'a>(&'a AtomicUsize);

impl<'a> Foreground<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One syncfs instead of an fsync per file: a rename must not reach the
/// disk before the files it publishes.
fn syncfs(reference: &str, dir: &Path) -> Result<(), ImageError> {
    let file = fs::File::open(dir).map_err(|e| io(reference, "opening", dir, e))?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&file))
        .map_err(|e| io(reference, "syncing", dir, e.into()))
}

pub(crate) fn io(reference: &str, op: &'static str, path: &Path, source: io::Error) -> ImageError {
    ImageError::Io {
        reference: reference.to_owned(),
        op,
        path: path.to_owned(),
        source,
    }
}

impl Images for ImageStore {
    fn pull_with(
        &self,
        reference: &str,
        secrets: &PullSecrets,
        observer: &dyn PullObserver,
    ) -> Result<Image, ImageError> {
        let _counted = Foreground::enter(&self.foreground);
        self.pull_locked(reference, secrets, observer)
    }

    fn pull_background(
        &self,
        reference: &str,
        secrets: &PullSecrets,
        observer: &dyn PullObserver,
    ) -> Result<Image, ImageError> {
        self.pull_locked(reference, secrets, observer)
    }

    fn foreground_pulls(&self) -> usize {
        self.foreground.load(Ordering::SeqCst)
    }

    fn collect_garbage(&self, keep: &[String]) {
        if let Err(e) = self.gc(keep) {
            tracing::warn!("image garbage collection: {e}");
        }
    }
}

/// A scratch directory under the store root, removed on drop unless kept.
pub(crate) struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    pub(crate) fn create(root: &Path, label: &str, reference: &str) -> Result<Self, ImageError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("{TMP_PREFIX}{}-{n}-{label}", std::process::id()));
        fs::create_dir(&path).map_err(|source| ImageError::Io {
            reference: reference.to_owned(),
            op: "creating",
            path: path.clone(),
            source,
        })?;
        Ok(Self { path, keep: false })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The directory was renamed away: nothing to remove.
    pub(crate) fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove image work directory");
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}
