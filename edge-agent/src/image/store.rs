//! The store of unpacked images under `{data_dir}/images`: one directory per
//! manifest digest, `sha256-<hex>/{rootfs,config.json}`, made in a temp
//! directory and renamed into place whole, so a crash never leaves a half
//! image under its final name.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use flate2::read::MultiGzDecoder;

use super::archive;
use super::layout::{Compression, Layout, Resolved};
use super::reference::{Reference, Transport};
use super::unpack::{self, UnpackError};
use super::{Image, ImageError, Images};

/// Prefix of work directories; anything named so is scratch.
const TMP_PREFIX: &str = ".tmp-";

/// Unpacked images, content-addressed by manifest digest. One store per
/// root: [`ImageStore::new`] removes scratch directories left by dead
/// processes.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens the store at `root` (`{data_dir}/images`), creating it if
    /// missing, and removes work directories a crashed agent left behind.
    pub fn new(root: PathBuf) -> Result<Self, ImageError> {
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
        Ok(Self { root })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn ensure_from(&self, r: &Reference, dir: &Path) -> Result<Image, ImageError> {
        let archive = r.transport == Transport::Archive;
        let layout = Layout::open(&r.text, dir, &r.path, archive)?;
        let resolved = layout.resolve(r.tag.as_deref())?;
        let digest = resolved.manifest.to_string();
        let final_dir = self
            .root
            .join(format!("sha256-{}", resolved.manifest.hex()));
        let image = Image {
            digest: digest.clone(),
            rootfs: final_dir.join("rootfs"),
            config: resolved.config.clone(),
        };
        if image.rootfs.is_dir() {
            return Ok(image);
        }
        let started = Instant::now();
        let work = WorkDir::create(&self.root, resolved.manifest.hex(), &r.text)?;
        self.unpack(r, &layout, &resolved, work.path())?;
        match fs::rename(work.path(), &final_dir) {
            Ok(()) => {
                work.keep();
                sync_dir(&self.root).map_err(|e| self.io(r, "syncing", &self.root, e))?;
                tracing::info!(
                    image = %r.text, %digest,
                    ms = started.elapsed().as_millis() as u64,
                    "image unpacked"
                );
            }
            // Another ensure of the same image renamed its copy first; ours
            // is dropped (and removed) with `work`.
            Err(_) if image.rootfs.is_dir() => {}
            Err(e) => return Err(self.io(r, "renaming into place", &final_dir, e)),
        }
        Ok(image)
    }

    fn unpack(
        &self,
        r: &Reference,
        layout: &Layout<'_>,
        resolved: &Resolved,
        work: &Path,
    ) -> Result<(), ImageError> {
        let rootfs = work.join("rootfs");
        fs::create_dir(&rootfs).map_err(|e| self.io(r, "creating", &rootfs, e))?;
        for layer in &resolved.layers {
            let file = layout.open_layer(layer)?;
            let reader = io::BufReader::new(file);
            let result = match layer.compression {
                Compression::Plain => unpack::apply_layer(reader, &rootfs),
                Compression::Gzip => unpack::apply_layer(MultiGzDecoder::new(reader), &rootfs),
            };
            result.map_err(|e| match e {
                UnpackError::Unsafe { entry, why } => ImageError::UnsafeLayer {
                    reference: r.text.clone(),
                    layer: layer.digest.to_string(),
                    entry,
                    why,
                },
                UnpackError::Io { op, path, source } => self.io(r, op, &path, source),
                e @ (UnpackError::Invalid { .. } | UnpackError::Corrupt(_)) => {
                    ImageError::Invalid {
                        reference: r.text.clone(),
                        what: format!("layer {}: {e}", layer.digest),
                    }
                }
            })?;
        }
        let config = work.join("config.json");
        fs::write(&config, &resolved.config_bytes)
            .map_err(|e| self.io(r, "writing", &config, e))?;
        // One syncfs instead of an fsync per file: the rename must not reach
        // the disk before the files it publishes.
        let dir = fs::File::open(work).map_err(|e| self.io(r, "opening", work, e))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
            .map_err(|e| self.io(r, "syncing", work, e.into()))
    }

    fn io(&self, r: &Reference, op: &'static str, path: &Path, source: io::Error) -> ImageError {
        ImageError::Io {
            reference: r.text.clone(),
            op,
            path: path.to_owned(),
            source,
        }
    }
}

impl Images for ImageStore {
    fn ensure(&self, reference: &str) -> Result<Image, ImageError> {
        let r = Reference::parse(reference)?;
        match r.transport {
            Transport::Layout => self.ensure_from(&r, &r.path),
            Transport::Archive => {
                let work = WorkDir::create(&self.root, "archive", &r.text)?;
                archive::extract_archive(&r.text, &r.path, work.path())?;
                self.ensure_from(&r, work.path())
            }
        }
    }
}

/// A scratch directory under the store root, removed on drop unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create(root: &Path, label: &str, reference: &str) -> Result<Self, ImageError> {
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

    fn path(&self) -> &Path {
        &self.path
    }

    /// The directory was renamed away: nothing to remove.
    fn keep(mut self) {
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
