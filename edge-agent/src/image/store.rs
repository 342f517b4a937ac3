//! The image store under `{data_dir}/images`: verified blobs shared by all
//! images (`blobs/sha256/`), what each reference resolved to (`refs/`), and
//! unpacked images, one directory per manifest digest,
//! `sha256-<hex>/{rootfs,config.json}`, made in a temp directory and renamed
//! into place whole, so a crash never leaves a half image under its final
//! name.
//!
//! Every pull, import and local unpack holds a shared `flock` on
//! `{images}/.lock`; garbage collection takes it exclusively, or, when pulls
//! are running, is left pending until the last one ends.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use flate2::read::MultiGzDecoder;
use nix::fcntl::{Flock, FlockArg};

use super::archive;
use super::blobs::Blobs;
use super::layout::{self, Compression, Layout, Resolved};
use super::reference::{Reference, Source};
use super::refs::Refs;
use super::registry::Client;
use super::settings::PullSettings;
use super::unpack::{self, UnpackError};
use super::{Image, ImageError, Images, PullObserver, pull};

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

    /// The unpacked image of `resolved`, unpacking its layers from `layout`
    /// if it is not there yet.
    pub(crate) fn materialize(
        &self,
        reference: &str,
        layout: &Layout<'_>,
        resolved: &Resolved,
    ) -> Result<Image, ImageError> {
        let digest = resolved.manifest.to_string();
        let final_dir = self.image_dir(&resolved.manifest);
        let image = Image {
            digest: digest.clone(),
            rootfs: final_dir.join("rootfs"),
            config: resolved.config.clone(),
        };
        if image.rootfs.is_dir() {
            return Ok(image);
        }
        let started = Instant::now();
        let work = WorkDir::create(&self.root, resolved.manifest.hex(), reference)?;
        self.unpack(reference, layout, resolved, work.path())?;
        match fs::rename(work.path(), &final_dir) {
            Ok(()) => {
                work.keep();
                sync_dir(&self.root).map_err(|e| io(reference, "syncing", &self.root, e))?;
                tracing::info!(
                    image = %reference, %digest,
                    ms = started.elapsed().as_millis() as u64,
                    "image unpacked"
                );
            }
            // Another ensure of the same image renamed its copy first; ours
            // is dropped (and removed) with `work`.
            Err(_) if image.rootfs.is_dir() => {}
            Err(e) => return Err(io(reference, "renaming into place", &final_dir, e)),
        }
        Ok(image)
    }

    /// The unpacked image of manifest `digest`, if it is there, without
    /// reading any blob.
    pub(crate) fn unpacked(&self, digest: &layout::Digest) -> Option<Image> {
        let dir = self.image_dir(digest);
        let rootfs = dir.join("rootfs");
        if !rootfs.is_dir() {
            return None;
        }
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

    fn unpack(
        &self,
        reference: &str,
        layout: &Layout<'_>,
        resolved: &Resolved,
        work: &Path,
    ) -> Result<(), ImageError> {
        let rootfs = work.join("rootfs");
        fs::create_dir(&rootfs).map_err(|e| io(reference, "creating", &rootfs, e))?;
        for layer in &resolved.layers {
            let file = layout.open_layer(layer)?;
            let reader = io::BufReader::new(file);
            let result = match layer.compression {
                Compression::Plain => unpack::apply_layer(reader, &rootfs),
                Compression::Gzip => unpack::apply_layer(MultiGzDecoder::new(reader), &rootfs),
            };
            result.map_err(|e| match e {
                UnpackError::Unsafe { entry, why } => ImageError::UnsafeLayer {
                    reference: reference.to_owned(),
                    layer: layer.digest.to_string(),
                    entry,
                    why,
                },
                UnpackError::Io { op, path, source } => io(reference, op, &path, source),
                e @ (UnpackError::Invalid { .. } | UnpackError::Corrupt(_)) => {
                    ImageError::Invalid {
                        reference: reference.to_owned(),
                        what: format!("layer {}: {e}", layer.digest),
                    }
                }
            })?;
        }
        let config = work.join("config.json");
        fs::write(&config, &resolved.config_bytes)
            .map_err(|e| io(reference, "writing", &config, e))?;
        // One syncfs instead of an fsync per file: the rename must not reach
        // the disk before the files it publishes.
        let dir = fs::File::open(work).map_err(|e| io(reference, "opening", work, e))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
            .map_err(|e| io(reference, "syncing", work, e.into()))
    }

    fn ensure_any(&self, r: &Reference, observer: &dyn PullObserver) -> Result<Image, ImageError> {
        match &r.source {
            Source::Layout { path, tag } => self.ensure_local(r, path, path, false, tag.as_deref()),
            Source::Archive { path, tag } => {
                let work = WorkDir::create(&self.root, "archive", &r.text)?;
                archive::extract_archive(&r.text, path, work.path())?;
                self.ensure_local(r, work.path(), path, true, tag.as_deref())
            }
            Source::Registry(name) => pull::pull(self, r, name, observer),
        }
    }
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
    fn pull(&self, reference: &str, observer: &dyn PullObserver) -> Result<Image, ImageError> {
        let r = Reference::parse(reference)?;
        let lock = self.lock(false)?;
        let result = self.ensure_any(&r, observer);
        drop(lock);
        self.run_pending_gc();
        result
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
