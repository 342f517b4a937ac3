//! Unpacked layers, stored once and shared by every image that has them:
//! `{images}/layers/<first 16 hex digits of the layer blob's digest>/`
//! holding `digest` (the whole digest, checked on every use) and `root/`
//! (the layer's own files, whiteouts as overlayfs writes them: a character
//! device 0/0 for a removed file, the `trusted.overlay.opaque=y` xattr on a
//! directory that hides what lower layers put in it). The short names keep
//! overlay mount options within a page for images of a hundred layers.
//!
//! An image lists its layers in `{images}/sha256-<manifest>/layers`, one
//! short name per line, lowest first; that file is what the runtime is
//! given as the image's root filesystem. A container using an image records
//! a lease in `{image}/users/<container id>` (its bundle's path), so garbage
//! collection keeps the image and its layers while the bundle exists.
//!
//! Images unpacked by older agents, `sha256-<manifest>/rootfs/` with the
//! layers merged, stay usable as they are: a plain directory is a root
//! filesystem of one layer.

use std::ffi::{CString, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::layout::Digest;

/// Where layers live, under the store root.
pub(crate) const LAYERS_DIR: &str = "layers";
/// The file of an image directory listing its layers.
pub(crate) const LIST_FILE: &str = "layers";
/// A layer's files, inside its directory.
pub(crate) const ROOT: &str = "root";
/// The whole digest of a layer, inside its directory.
pub(crate) const DIGEST_FILE: &str = "digest";
/// Leases, inside an image directory.
const USERS_DIR: &str = "users";
/// Where a container's bundle remembers the image it leased.
const BUNDLE_IMAGE_FILE: &str = "image";
/// The xattr overlayfs reads to hide lower layers under a directory.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Hex digits in a layer's directory name: 64 bits, checked against the
/// whole digest on use.
const SHORT: usize = 16;
/// Most layers an image may list; the OCI spec sets none, Docker 127.
pub(crate) const MAX_LAYERS: usize = 500;
/// Largest list file read.
const MAX_LIST: u64 = (MAX_LAYERS as u64) * (SHORT as u64 + 1);
/// Symlinks followed while resolving one path, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// The directory name of layer `digest`.
pub(crate) fn short_name(digest: &Digest) -> &str {
    &digest.hex()[..SHORT]
}

/// `{root}/layers/<short>` of layer `digest`.
pub(crate) fn layer_dir(root: &Path, digest: &Digest) -> PathBuf {
    root.join(LAYERS_DIR).join(short_name(digest))
}

/// Whether `dir` holds the unpacked layer `digest` (and not another one
/// whose digest starts alike).
pub(crate) fn layer_present(dir: &Path, digest: &Digest) -> io::Result<bool> {
    match fs::read_to_string(dir.join(DIGEST_FILE)) {
        Ok(text) if text.trim() == digest.to_string() => Ok(dir.join(ROOT).is_dir()),
        Ok(text) => Err(io::Error::other(format!(
            "layer directory {} holds {}, not {digest}",
            dir.display(),
            text.trim()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The layer directories' short names that the list file `path` names,
/// lowest first.
pub(crate) fn read_list(path: &Path) -> io::Result<Vec<String>> {
    let mut text = String::new();
    fs::File::open(path)?
        .take(MAX_LIST + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_LIST {
        return Err(io::Error::other(format!(
            "{}: more than {MAX_LAYERS} layers",
            path.display()
        )));
    }
    let mut names = Vec::new();
    for line in text.lines() {
        if line.len() != SHORT || !line.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(io::Error::other(format!(
                "{}: {line:?} is not a layer name",
                path.display()
            )));
        }
        names.push(line.to_owned());
    }
    Ok(names)
}

/// The read-only layers of the image at `image` (what [`super::Image::rootfs`]
/// names), top first: a layer list gives its layers' `root/` directories, a
/// plain directory is itself the only layer.
pub fn lower_dirs(image: &Path) -> io::Result<Vec<PathBuf>> {
    let meta = fs::metadata(image)?;
    if meta.is_dir() {
        return Ok(vec![image.to_owned()]);
    }
    let store = image
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| io::Error::other(format!("{}: not in an image store", image.display())))?;
    let mut dirs = Vec::new();
    for name in read_list(image)?.into_iter().rev() {
        let dir = store.join(LAYERS_DIR).join(name).join(ROOT);
        if !dir.is_dir() {
            return Err(io::Error::other(format!(
                "layer {} of {} is missing",
                dir.display(),
                image.display()
            )));
        }
        dirs.push(dir);
    }
    if dirs.is_empty() {
        return Err(io::Error::other(format!("{}: no layers", image.display())));
    }
    Ok(dirs)
}

/// The store's `layers/` directory for a layer list `image`, when it is one.
pub fn layers_root(image: &Path) -> Option<PathBuf> {
    if image.is_dir() {
        return None;
    }
    Some(image.parent()?.parent()?.join(LAYERS_DIR))
}

/// Records that the container whose bundle is `bundle` uses `image`, so
/// garbage collection keeps it. Nothing to do for a plain directory.
pub fn lease(image: &Path, bundle: &Path) -> io::Result<()> {
    let (Some(dir), Some(id)) = (image.parent(), bundle.file_name()) else {
        return Ok(());
    };
    if image.is_dir() {
        return Ok(());
    }
    let users = dir.join(USERS_DIR);
    fs::create_dir_all(&users)?;
    fs::write(users.join(id), bundle.as_os_str().as_bytes())?;
    fs::write(bundle.join(BUNDLE_IMAGE_FILE), image.as_os_str().as_bytes())
}

/// Ends the lease the container of `bundle` holds, if any.
pub fn release(bundle: &Path) -> io::Result<()> {
    let record = bundle.join(BUNDLE_IMAGE_FILE);
    let image = match fs::read(&record) {
        Ok(bytes) => PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if let (Some(dir), Some(id)) = (image.parent(), bundle.file_name()) {
        match fs::remove_file(dir.join(USERS_DIR).join(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    fs::remove_file(record)
}

/// Whether a container still uses the image directory `dir`: a lease whose
/// bundle exists. Leases of bundles that are gone are removed.
pub(crate) fn in_use(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir.join(USERS_DIR)) else {
        return false;
    };
    let mut used = false;
    for entry in entries.flatten() {
        let bundle = fs::read(entry.path())
            .map(|b| PathBuf::from(std::ffi::OsStr::from_bytes(&b)))
            .ok();
        if bundle.as_deref().is_some_and(Path::is_dir) {
            used = true;
        } else if let Err(e) = fs::remove_file(entry.path()) {
            tracing::warn!(path = %entry.path().display(), "removing a stale image lease: {e}");
        }
    }
    used
}

/// An overlayfs whiteout: a character device 0/0.
pub fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Whether directory `dir` carries the opaque xattr.
pub fn is_opaque(dir: &Path) -> bool {
    let (Ok(path), Ok(name)) = (
        CString::new(dir.as_os_str().as_bytes()),
        CString::new(OPAQUE_XATTR),
    ) else {
        return false;
    };
    let mut value = [0u8; 2];
    // SAFETY: both strings are NUL-terminated and live across the call;
    // the buffer's length is passed with it.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

/// Marks directory `dir` opaque.
pub(crate) fn set_opaque(dir: &Path) -> io::Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let name = CString::new(OPAQUE_XATTR).map_err(io::Error::other)?;
    // SAFETY: both strings are NUL-terminated and live across the call;
    // the value's length is passed with it.
    let rc = unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Merges `lowers` (top first) into `to` as overlayfs would show them:
/// each layer copied over the ones below, its whiteouts removing what they
/// name, its opaque directories emptied of what lower layers put there.
/// Symlinks stay symlinks; owners, modes and special files are kept;
/// sockets are skipped, they mean nothing in a copy.
pub fn merge(lowers: &[PathBuf], to: &Path) -> io::Result<()> {
    for layer in lowers.iter().rev() {
        merge_layer(layer, to)?;
    }
    Ok(())
}

fn merge_layer(from: &Path, to: &Path) -> io::Result<()> {
    copy_attributes(&std::fs::symlink_metadata(from)?, to)?;
    let mut stack = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((src_dir, dst_dir)) = stack.pop() {
        for entry in std::fs::read_dir(&src_dir)? {
            let entry = entry?;
            let src = entry.path();
            let dst = dst_dir.join(entry.file_name());
            let meta = std::fs::symlink_metadata(&src)?;
            let existing = match std::fs::symlink_metadata(&dst) {
                Ok(m) => Some(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            if is_whiteout(&meta) {
                remove_any(&dst, existing.as_ref())?;
                continue;
            }
            let ft = meta.file_type();
            if ft.is_dir() {
                match &existing {
                    Some(e) if e.is_dir() && is_opaque(&src) => {
                        for child in std::fs::read_dir(&dst)? {
                            let child = child?;
                            let meta = std::fs::symlink_metadata(child.path())?;
                            remove_any(&child.path(), Some(&meta))?;
                        }
                    }
                    Some(e) if e.is_dir() => {}
                    other => {
                        remove_any(&dst, other.as_ref())?;
                        std::fs::create_dir(&dst)?;
                    }
                }
                copy_attributes(&meta, &dst)?;
                stack.push((src, dst));
                continue;
            }
            remove_any(&dst, existing.as_ref())?;
            if ft.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
                std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
            } else if ft.is_file() {
                std::fs::copy(&src, &dst)?;
                copy_attributes(&meta, &dst)?;
            } else {
                if ft.is_socket() {
                    continue;
                }
                let kind = nix::sys::stat::SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
                let perm = nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o7777);
                nix::sys::stat::mknod(&dst, kind, perm, meta.rdev())?;
                copy_attributes(&meta, &dst)?;
            }
        }
    }
    Ok(())
}

/// Removes `path` (whose metadata is `meta`, `None` when it does not
/// exist) without following symlinks.
fn remove_any(path: &Path, meta: Option<&std::fs::Metadata>) -> io::Result<()> {
    match meta {
        None => Ok(()),
        Some(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Some(_) => std::fs::remove_file(path),
    }
}

/// Owner first, then mode: chown clears setuid bits.
fn copy_attributes(meta: &std::fs::Metadata, dst: &Path) -> io::Result<()> {
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
}

/// Files of an image's root filesystem, read without mounting it: through
/// its layers, top first, as overlayfs would merge them.
pub(crate) struct View {
    layers: Vec<PathBuf>,
}

impl View {
    /// The view of `image` (a layer list or a plain directory).
    pub(crate) fn open(image: &Path) -> io::Result<Self> {
        Ok(Self {
            layers: lower_dirs(image)?,
        })
    }

    /// The host path of `rel` as the merged tree has it, without following
    /// a final symlink; `None` when missing, whited out or hidden.
    fn entry(&self, rel: &[OsString]) -> io::Result<Option<(PathBuf, fs::Metadata)>> {
        'layers: for layer in &self.layers {
            let mut path = layer.clone();
            let mut opaque = false;
            for (k, part) in rel.iter().enumerate() {
                path.push(part);
                let meta = match fs::symlink_metadata(&path) {
                    Ok(meta) => meta,
                    Err(e)
                        if e.kind() == io::ErrorKind::NotFound
                            || e.raw_os_error() == Some(libc::ENOTDIR) =>
                    {
                        if opaque {
                            return Ok(None);
                        }
                        continue 'layers;
                    }
                    Err(e) => return Err(e),
                };
                if is_whiteout(&meta) {
                    return Ok(None);
                }
                if k + 1 == rel.len() {
                    return Ok(Some((path, meta)));
                }
                if !meta.is_dir() {
                    // A file (or a symlink, resolved by the caller) hides
                    // whatever lower layers have below that name.
                    return Ok(None);
                }
                opaque |= is_opaque(&path);
            }
            // `rel` is the root.
            let meta = fs::symlink_metadata(&path)?;
            return Ok(Some((path, meta)));
        }
        Ok(None)
    }

    /// Resolves `rel` as a process whose root is the image would: symlinks
    /// are followed, absolute targets and `..` stay inside. Returns the host
    /// path of the final entry (not a symlink), or `None` when missing.
    pub(crate) fn resolve(&self, rel: &Path) -> io::Result<Option<PathBuf>> {
        let mut pending: Vec<OsString> = components(rel);
        pending.reverse();
        let mut resolved: Vec<OsString> = Vec::new();
        let mut links = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                resolved.pop();
                continue;
            }
            resolved.push(part);
            let Some((path, meta)) = self.entry(&resolved)? else {
                return Ok(None);
            };
            if !meta.file_type().is_symlink() {
                continue;
            }
            resolved.pop();
            links += 1;
            if links > MAX_LINKS {
                return Err(io::Error::other("too many levels of symbolic links"));
            }
            let target = fs::read_link(&path)?;
            if target.is_absolute() {
                resolved.clear();
            }
            let mut next = components(&target);
            next.reverse();
            pending.extend(next);
        }
        Ok(self.entry(&resolved)?.map(|(path, _)| path))
    }
}

/// Resolves `path` inside the image at `image` (a layer list or a plain
/// directory) as a process whose root is the image would, without mounting
/// anything: the host path of the file, or `None` when it is missing.
pub fn find(image: &Path, path: &Path) -> io::Result<Option<PathBuf>> {
    View::open(image)?.resolve(path)
}

/// The normal and `..` components of `path`; `/` and `.` say nothing here.
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn whiteout(path: &Path) {
        nix::sys::stat::mknod(
            path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
    }

    /// A store with an image of three layers, as the unpacker leaves them.
    fn store() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let names = ["0000000000000001", "0000000000000002", "0000000000000003"];
        for n in names {
            fs::create_dir_all(root.join(LAYERS_DIR).join(n).join(ROOT)).unwrap();
        }
        let l = |i: usize, rel: &str| root.join(LAYERS_DIR).join(names[i]).join(ROOT).join(rel);
        // Bottom: /etc/passwd, /etc/old, /opt/a, /bin -> usr/bin.
        fs::create_dir_all(l(0, "etc")).unwrap();
        fs::write(l(0, "etc/passwd"), "bottom").unwrap();
        fs::write(l(0, "etc/old"), "old").unwrap();
        fs::create_dir_all(l(0, "opt")).unwrap();
        fs::write(l(0, "opt/a"), "a").unwrap();
        fs::create_dir_all(l(0, "usr/bin")).unwrap();
        fs::write(l(0, "usr/bin/tool"), "tool").unwrap();
        symlink("usr/bin", l(0, "bin")).unwrap();
        // Middle: a new /etc/passwd; /etc/old removed; /opt opaque with /opt/b.
        fs::create_dir_all(l(1, "etc")).unwrap();
        fs::write(l(1, "etc/passwd"), "middle").unwrap();
        whiteout(&l(1, "etc/old"));
        fs::create_dir_all(l(1, "opt")).unwrap();
        fs::write(l(1, "opt/b"), "b").unwrap();
        set_opaque(&l(1, "opt")).unwrap();
        // Top: only /etc/group.
        fs::create_dir_all(l(2, "etc")).unwrap();
        fs::write(l(2, "etc/group"), "top").unwrap();
        let dir = root.join("sha256-ab");
        fs::create_dir(&dir).unwrap();
        let list = dir.join(LIST_FILE);
        fs::write(&list, names.join("\n") + "\n").unwrap();
        (tmp, list)
    }

    #[test]
    fn the_view_merges_layers_as_overlayfs_does() {
        let (_tmp, list) = store();
        let view = View::open(&list).unwrap();
        let read = |p: &str| {
            view.resolve(Path::new(p))
                .unwrap()
                .map(|path| fs::read_to_string(path).unwrap())
        };
        assert_eq!(read("etc/passwd").as_deref(), Some("middle"));
        assert_eq!(read("/etc/group").as_deref(), Some("top"));
        assert_eq!(read("etc/old"), None, "whited out");
        assert_eq!(read("opt/a"), None, "hidden by the opaque /opt");
        assert_eq!(read("opt/b").as_deref(), Some("b"));
        assert_eq!(
            read("bin/tool").as_deref(),
            Some("tool"),
            "through a lower symlink"
        );
        assert_eq!(read("nothing"), None);
    }

    #[test]
    fn lists_are_read_top_first_and_checked() {
        let (tmp, list) = store();
        let dirs = lower_dirs(&list).unwrap();
        assert_eq!(dirs.len(), 3);
        assert!(dirs[0].ends_with("0000000000000003/root"), "{dirs:?}");
        assert_eq!(lower_dirs(tmp.path()).unwrap(), [tmp.path()]);
        fs::write(&list, "../../etc\n").unwrap();
        assert!(lower_dirs(&list).is_err());
    }

    #[test]
    fn leases_keep_images_while_their_bundle_exists() {
        let (tmp, list) = store();
        let bundle = tmp.path().join("work/pod.app.1234");
        fs::create_dir_all(&bundle).unwrap();
        let image_dir = list.parent().unwrap();
        assert!(!in_use(image_dir));
        lease(&list, &bundle).unwrap();
        assert!(in_use(image_dir));
        release(&bundle).unwrap();
        assert!(!in_use(image_dir));
        // A bundle removed without a release leaves a stale lease: dropped.
        lease(&list, &bundle).unwrap();
        fs::remove_dir_all(&bundle).unwrap();
        assert!(!in_use(image_dir));
        assert_eq!(fs::read_dir(image_dir.join(USERS_DIR)).unwrap().count(), 0);
    }
}
