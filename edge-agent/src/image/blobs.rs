//! The content-addressed blob store under `{data_dir}/images/blobs/sha256/`,
//! shared by every image: a blob lives under its digest only once its whole
//! content has been checked against that digest and its size. Downloads go
//! to `<hex>.partial` (kept across failures and restarts, so a pull resumes
//! where it stopped), locked with `flock` so that two pulls of the same
//! blob, even from two processes, never write it at once.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};

use super::hex;
use super::layout::Digest;

/// Why a blob could not be stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BlobError {
    /// The content does not match the digest or size it was asked for.
    #[error("blob {digest}: {what}")]
    Mismatch { digest: String, what: String },
    /// The disk said no.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BlobError {
    let path = path.to_owned();
    move |source| BlobError::Io { op, path, source }
}

/// The blob directory of an image store.
#[derive(Debug, Clone)]
pub(crate) struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    /// The blobs under `{root}/blobs/sha256`, creating the directory.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        let dir = root.join("blobs").join("sha256");
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        Ok(Self { dir })
    }

    /// The directory holding the blobs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `digest` lives once verified.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.partial", digest.hex()))
    }

    /// Whether blob `digest` is stored with `size` bytes. Its content was
    /// checked when it was stored, and is checked again when it is read.
    pub fn has(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Bytes already downloaded of blob `digest` (0 when none).
    pub fn partial_len(&self, digest: &Digest) -> u64 {
        fs::metadata(self.partial_path(digest)).map_or(0, |m| m.len())
    }

    /// Stores a small blob held in memory (a manifest) after checking it.
    pub fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<(), BlobError> {
        if Digest::of(bytes) != *digest {
            return Err(BlobError::Mismatch {
                digest: digest.to_string(),
                what: format!("content hashes to {}", Digest::of(bytes)),
            });
        }
        if self.has(digest, bytes.len() as u64) {
            return Ok(());
        }
        let Some(mut partial) = self.begin(digest)? else {
            return Ok(());
        };
        partial.restart()?;
        partial.write(bytes)?;
        partial.commit(bytes.len() as u64)
    }

    /// Moves the finished file `file` (on the store's filesystem) into the
    /// store under the digest of its content, which it returns with its
    /// size. A blob already stored is kept and `file` left alone.
    pub fn adopt(&self, file: &Path) -> Result<(Digest, u64), BlobError> {
        let mut f = File::open(file).map_err(io_err("opening", file))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io_err("reading", file))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buf[..n]);
        }
        let digest = Digest::of_hash(&hasher.finalize());
        if !self.has(&digest, size) {
            f.sync_all().map_err(io_err("syncing", file))?;
            let path = self.path(&digest);
            fs::rename(file, &path).map_err(io_err("renaming", &path))?;
        }
        Ok((digest, size))
    }

    /// Opens the partial download of `digest` for appending, waiting while
    /// another pull holds it. `None` when the blob is (now) complete.
    pub fn begin(&self, digest: &Digest) -> Result<Option<Partial>, BlobError> {
        let path = self.partial_path(digest);
        let done = self.path(digest);
        loop {
            if done.exists() {
                return Ok(None);
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err("opening", &path))?;
            let file = Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| io_err("locking", &path)(e.into()))?;
            // The holder before us may have renamed the file into place, or
            // garbage collection removed it: ours must still be the partial.
            let ours = file.metadata().map_err(io_err("inspecting", &path))?;
            match fs::metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                    return Ok(Some(Partial {
                        file,
                        path,
                        done,
                        digest: digest.clone(),
                        len: ours.len(),
                    }));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("inspecting", &path)(e)),
            }
        }
    }
}

/// A locked partial download.
pub(crate) struct Partial {
    file: Flock<File>,
    path: PathBuf,
    done: PathBuf,
    digest: Digest,
    len: u64,
}

impl Partial {
    /// Bytes stored so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Throws away what was downloaded (the server ignored the range, or the
    /// content was wrong).
    pub fn restart(&mut self) -> Result<(), BlobError> {
        self.file
            .set_len(0)
            .map_err(io_err("truncating", &self.path))?;
        self.len = 0;
        Ok(())
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        self.file
            .seek(SeekFrom::Start(self.len))
            .and_then(|_| self.file.write_all(bytes))
            .map_err(io_err("writing", &self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Checks the whole download against the digest and `size` and moves it
    /// into place. On a mismatch the download is emptied, so the next
    /// attempt starts from zero.
    pub fn commit(&mut self, size: u64) -> Result<(), BlobError> {
        let digest = self.digest.to_string();
        let mismatch = |what: String| BlobError::Mismatch {
            digest: digest.clone(),
            what,
        };
        if self.len != size {
            let what = format!("downloaded {} bytes, expected {size}", self.len);
            self.restart()?;
            return Err(mismatch(what));
        }
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io_err("reading", &self.path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .file
                .read(&mut buf)
                .map_err(io_err("reading", &self.path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual = hex(&hasher.finalize());
        if actual != self.digest.hex() {
            self.restart()?;
            return Err(mismatch(format!(
                "digest mismatch, content hashes to sha256:{actual}; refused"
            )));
        }
        self.file
            .sync_all()
            .map_err(io_err("syncing", &self.path))?;
        fs::rename(&self.path, &self.done).map_err(io_err("renaming", &self.done))?;
        Ok(())
    }
}
