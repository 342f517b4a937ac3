//! Unpacking one layer into a directory of its own (see `layers`): keeps
//! modes, owners, symlinks, hard links, directories and fifos, writes OCI
//! whiteouts as overlayfs reads them (a `.wh.name` entry becomes a character
//! device 0/0 `name`, a `.wh..wh..opq` entry the `trusted.overlay.opaque=y`
//! xattr on its directory), and refuses any entry that would write outside
//! the target.
//!
//! Safety rests on one rule: before touching an entry, every parent component
//! is checked with `lstat` to be a real directory inside the target (never a
//! symlink), and the final component is removed (not followed) before it is
//! created. The target is a fresh directory only this process writes to, so
//! there is no race between the check and the write.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::layers;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UnpackError {
    /// The entry would write outside the target.
    #[error("entry {entry:?} refused: {why}")]
    Unsafe { entry: String, why: String },
    /// The entry is malformed or of an unsupported kind.
    #[error("entry {entry:?}: {what}")]
    Invalid { entry: String, what: String },
    /// The layer's tar or gzip stream is corrupt.
    #[error("corrupt layer: {0}")]
    Corrupt(#[source] io::Error),
    /// Writing the target failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Normalises a tar entry name into a relative path: leading `/` and `.`
/// components are dropped; `..` anywhere is refused. The root is `""`.
pub(crate) fn normalize(raw: &[u8]) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path contains a `..` component"),
            _ => out.push(OsStr::from_bytes(part)),
        }
    }
    Ok(out)
}

/// Unpacks one layer (an uncompressed tar stream) into the empty `target`.
pub(crate) fn unpack_layer(layer: impl Read, target: &Path) -> Result<(), UnpackError> {
    let mut unpacker = Unpacker {
        root: target.to_owned(),
        this_layer: HashSet::new(),
        chown: nix::unistd::geteuid().is_root(),
    };
    let mut archive = tar::Archive::new(layer);
    for entry in archive.entries().map_err(UnpackError::Corrupt)? {
        let entry = entry.map_err(UnpackError::Corrupt)?;
        unpacker.entry(entry)?;
    }
    Ok(())
}

struct Unpacker {
    root: PathBuf,
    /// Every path this layer wrote, with its parents: a whiteout only hides
    /// what lower layers wrote, not an entry of its own layer.
    this_layer: HashSet<PathBuf>,
    /// Only root can give files their owners; elsewhere (development) the
    /// files stay the unpacker's.
    chown: bool,
}

impl Unpacker {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let unsafe_entry = |why: &str| UnpackError::Unsafe {
            entry: name.clone(),
            why: why.to_owned(),
        };
        let invalid = |what: String| UnpackError::Invalid {
            entry: name.clone(),
            what,
        };
        let rel = normalize(&raw).map_err(unsafe_entry)?;
        let header = entry.header();
        let mut kind = header.entry_type();
        // Old tars mark directories only by a trailing slash.
        if kind == tar::EntryType::Regular && raw.ends_with(b"/") {
            kind = tar::EntryType::Directory;
        }
        let mode = header
            .mode()
            .map_err(|e| invalid(format!("bad mode: {e}")))?
            & 0o7777;
        let uid = header.uid().map_err(|e| invalid(format!("bad uid: {e}")))?;
        let gid = header.gid().map_err(|e| invalid(format!("bad gid: {e}")))?;
        let owner = match (u32::try_from(uid), u32::try_from(gid)) {
            (Ok(uid), Ok(gid)) => (uid, gid),
            _ => return Err(invalid(format!("owner {uid}:{gid} out of range"))),
        };

        let Some(file_name) = rel.file_name().map(OsStr::as_bytes) else {
            // The entry names the target itself (`./`): only its mode and owner apply.
            if kind != tar::EntryType::Directory {
                return Err(invalid("names the root but is not a directory".to_owned()));
            }
            let root = self.root.clone();
            return self.set_meta(&root, owner, Some(mode));
        };
        if file_name == OPAQUE {
            let dir_rel = rel.parent().unwrap_or(Path::new("")).to_owned();
            let dir = self.make_dirs(&dir_rel, &name, true)?;
            return layers::set_opaque(&dir).map_err(|e| io_err("marking opaque", &dir, e));
        }
        if file_name.starts_with(b".wh..wh.") {
            // aufs bookkeeping (`.wh..wh.plnk`, …): not part of the filesystem.
            return Ok(());
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT) {
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(unsafe_entry("whiteout names no file"));
            }
            let parent_rel = rel.parent().unwrap_or(Path::new(""));
            let hidden_rel = parent_rel.join(OsStr::from_bytes(hidden));
            if self.this_layer.contains(&hidden_rel) {
                return Ok(());
            }
            let parent = self.make_dirs(parent_rel, &name, true)?;
            let path = parent.join(OsStr::from_bytes(hidden));
            nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .map_err(|e| io_err("creating whiteout", &path, e.into()))?;
            return Ok(());
        }

        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = self.make_dirs(parent_rel, &name, true)?;
        let path = parent.join(OsStr::from_bytes(file_name));
        let existing = match fs::symlink_metadata(&path) {
            Ok(meta) => Some(meta.file_type()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("inspecting", &path, e)),
        };
        let existing_dir = existing.is_some_and(|t| t.is_dir());
        // Whatever was there is replaced, never written through.
        if existing.is_some() && !(kind == tar::EntryType::Directory && existing_dir) {
            remove_any(&path)?;
        }
        match kind {
            tar::EntryType::Directory => {
                if !existing_dir {
                    fs::create_dir(&path).map_err(|e| io_err("creating", &path, e))?;
                }
                self.set_meta(&path, owner, Some(mode))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| io_err("creating", &path, e))?;
                copy(&mut entry, &mut out, &path)?;
                self.set_meta(&path, owner, Some(mode))?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                if target.is_empty() {
                    return Err(invalid("symlink with an empty target".to_owned()));
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| io_err("creating symlink", &path, e))?;
                self.set_meta(&path, owner, None)?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let source = self.link_source(&target, &name)?;
                fs::hard_link(&source, &path)
                    .map_err(|e| io_err("creating hard link", &path, e))?;
            }
            tar::EntryType::Fifo => {
                let fifo_mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
                nix::unistd::mkfifo(&path, fifo_mode)
                    .map_err(|e| io_err("creating fifo", &path, e.into()))?;
                self.set_meta(&path, owner, Some(mode))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                // The runtime gives each container its own /dev; device nodes
                // in an image would only widen what a container can reach.
                tracing::debug!(entry = %name, "skipping device node in layer");
                return Ok(());
            }
            other => return Err(invalid(format!("unsupported entry type {other:?}"))),
        }
        self.this_layer.insert(rel);
        Ok(())
    }

    /// Resolves `rel` (a directory) under the root, checking that no
    /// component is a symlink. With `create`, missing directories are made
    /// (0755, root); without, `None` is returned when one is missing.
    fn walk(
        &mut self,
        rel: &Path,
        entry: &str,
        create: bool,
    ) -> Result<Option<PathBuf>, UnpackError> {
        let mut path = self.root.clone();
        let mut sofar = PathBuf::new();
        for part in rel.iter() {
            path.push(part);
            sofar.push(part);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(UnpackError::Unsafe {
                        entry: entry.to_owned(),
                        why: format!(
                            "its parent {} is a symlink: writing through it could leave the rootfs",
                            sofar.display()
                        ),
                    });
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::Invalid {
                        entry: entry.to_owned(),
                        what: format!("its parent {} is not a directory", sofar.display()),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&path).map_err(|e| io_err("creating", &path, e))?;
                    fs::set_permissions(&path, Permissions::from_mode(0o755))
                        .map_err(|e| io_err("setting mode of", &path, e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err("inspecting", &path, e)),
            }
            if create {
                self.this_layer.insert(sofar.clone());
            }
        }
        Ok(Some(path))
    }

    fn make_dirs(&mut self, rel: &Path, entry: &str, create: bool) -> Result<PathBuf, UnpackError> {
        self.walk(rel, entry, create)?
            .ok_or_else(|| UnpackError::Invalid {
                entry: entry.to_owned(),
                what: "its parent directory is missing".to_owned(),
            })
    }

    /// The path a hard link's target names: relative to the layer root, an
    /// existing non-directory reached through real directories only.
    fn link_source(&mut self, target: &[u8], entry: &str) -> Result<PathBuf, UnpackError> {
        let refuse = |why: &str| UnpackError::Unsafe {
            entry: entry.to_owned(),
            why: why.to_owned(),
        };
        if target.starts_with(b"/") {
            return Err(refuse("hard link target is an absolute path"));
        }
        let rel = normalize(target).map_err(|_| refuse("hard link target contains `..`"))?;
        let Some(file_name) = rel.file_name() else {
            return Err(refuse("hard link target is empty"));
        };
        let parent = self.make_dirs(rel.parent().unwrap_or(Path::new("")), entry, false)?;
        let source = parent.join(file_name);
        match fs::symlink_metadata(&source) {
            Ok(meta) if meta.is_dir() => Err(UnpackError::Invalid {
                entry: entry.to_owned(),
                what: format!("hard link target {} is a directory", rel.display()),
            }),
            Ok(_) => Ok(source),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(UnpackError::Invalid {
                entry: entry.to_owned(),
                what: format!("hard link target {} does not exist", rel.display()),
            }),
            Err(e) => Err(io_err("inspecting", &source, e)),
        }
    }

    /// Owner first: chown clears the set-id bits that the mode then restores.
    fn set_meta(
        &self,
        path: &Path,
        (uid, gid): (u32, u32),
        mode: Option<u32>,
    ) -> Result<(), UnpackError> {
        if self.chown {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .map_err(|e| io_err("changing owner of", path, e))?;
        }
        if let Some(mode) = mode {
            fs::set_permissions(path, Permissions::from_mode(mode))
                .map_err(|e| io_err("setting mode of", path, e))?;
        }
        Ok(())
    }
}

/// Copies an entry's data, telling a corrupt stream from a failing disk.
fn copy(from: &mut impl Read, to: &mut File, path: &Path) -> Result<(), UnpackError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(UnpackError::Corrupt(e)),
        };
        to.write_all(&buf[..n])
            .map_err(|e| io_err("writing", path, e))?;
    }
}

/// Removes a file, symlink or directory tree without following symlinks.
fn remove_any(path: &Path) -> Result<(), UnpackError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| io_err("removing", path, e))
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> UnpackError {
    UnpackError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_entry_names() {
        for (raw, want) in [
            ("./etc/passwd", Ok("etc/passwd")),
            ("/etc//passwd", Ok("etc/passwd")),
            ("./", Ok("")),
            ("a/./b/", Ok("a/b")),
            ("../evil", Err(())),
            ("a/../../evil", Err(())),
            ("a/..", Err(())),
        ] {
            let got = normalize(raw.as_bytes());
            match want {
                Ok(want) => assert_eq!(got.as_deref(), Ok(Path::new(want)), "{raw}"),
                Err(()) => assert!(got.is_err(), "{raw}"),
            }
        }
    }
}
