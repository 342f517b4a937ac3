//! Each container's root filesystem: an overlay of the image's read-only
//! layers (`lowerdir=top:…:bottom`, shared with every container of images
//! that have them) with a writable layer in the bundle, or, where overlayfs
//! cannot be used, a private copy with the layers merged; and lookups of
//! paths inside it that never leave it.
//!
//! Overlayfs is used when the mount works: a kernel without it, a data
//! directory on a filesystem it cannot stack on, or options over a page
//! fall back to the copy, with the reason logged. `FLOTILLA_ROOTFS=copy` in
//! the agent's environment forces the copy (diagnostics, tests).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::image::layers;

/// The environment variable that forces copied root filesystems.
pub const COPY_SWITCH: &str = "FLOTILLA_ROOTFS";

/// Errors preparing, inspecting or releasing a container's root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The image's root filesystem or one of its layers is missing.
    #[error("image rootfs {path}: {source}")]
    ImageMissing { path: PathBuf, source: io::Error },
    /// The lease that keeps the image from garbage collection could not be
    /// recorded.
    #[error("recording that the container uses image {path}: {source}")]
    Lease { path: PathBuf, source: io::Error },
    /// A directory of the bundle could not be created.
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    /// Neither the overlay mount nor the copy worked.
    #[error("copying image {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    /// The rootfs could not be unmounted.
    #[error("unmounting {path}: {source}")]
    Unmount { path: PathBuf, source: Errno },
    /// The command's executable is not in the image.
    #[error("executable {name:?} not found in the image{searched}")]
    ExecutableNotFound { name: String, searched: String },
    /// The command names a file that is not an executable regular file.
    #[error("executable {name:?} in the image is not an executable file")]
    NotExecutable { name: String },
    /// The working directory does not exist in the image.
    #[error("working directory {cwd:?} not found in the image")]
    CwdNotFound { cwd: String },
    /// The working directory is not a directory.
    #[error("working directory {cwd:?} in the image is not a directory")]
    CwdNotDirectory { cwd: String },
    /// Looking up a path inside the rootfs failed.
    #[error("looking up {path:?} in the image: {source}")]
    Lookup { path: String, source: io::Error },
}

/// How the rootfs was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// overlayfs: the image's layers below, `upper/` and `work/` of the
    /// bundle above.
    Overlay,
    /// A private copy of the image's layers, merged (overlayfs refused or
    /// switched off).
    Copy,
}

/// The kernel limits mount data to one page.
const MAX_MOUNT_DATA: usize = 4000;
/// Symlinks followed while resolving one path, as the kernel's own limit.
const MAX_SYMLINKS: u32 = 40;

/// Makes `{bundle}/rootfs`: an overlay of `image` (a layer list of the
/// image store, or a plain directory), or a merged copy of it when the
/// overlay cannot be mounted (the reason is logged). Records the bundle as
/// a user of the image, so its layers are not collected under it.
pub fn prepare(image: &Path, bundle: &Path) -> Result<Kind, RootfsError> {
    let lowers = layers::lower_dirs(image).map_err(|source| RootfsError::ImageMissing {
        path: image.to_path_buf(),
        source,
    })?;
    let rootfs = bundle.join("rootfs");
    let upper = bundle.join("upper");
    let work = bundle.join("work");
    for dir in [&rootfs, &upper, &work] {
        create_dir(dir)?;
    }
    layers::lease(image, bundle).map_err(|source| RootfsError::Lease {
        path: image.to_path_buf(),
        source,
    })?;
    let reason = if std::env::var_os(COPY_SWITCH).is_some_and(|v| v == "copy") {
        format!("{COPY_SWITCH}=copy")
    } else {
        match mount_overlay(
            &lowers,
            layers::layers_root(image).as_deref(),
            &upper,
            &work,
            &rootfs,
        ) {
            Ok(()) => return Ok(Kind::Overlay),
            Err(why) => why,
        }
    };
    tracing::warn!(
        image = %image.display(),
        rootfs = %rootfs.display(),
        %reason,
        "copying the image's layers instead of overlaying them"
    );
    layers::merge(&lowers, &rootfs).map_err(|source| RootfsError::Copy {
        from: image.to_path_buf(),
        to: rootfs.clone(),
        source,
    })?;
    Ok(Kind::Copy)
}

/// Mounts the overlay, or says why it cannot be. Lower directories are
/// named by absolute path; when that passes the page the kernel takes, by
/// their short names under a descriptor of the store's `layers/` directory
/// (`/proc/self/fd/N/<16 hex>/root`), which fits about 95 layers (Docker's
/// overlay2 stops at 127).
fn mount_overlay(
    lowers: &[PathBuf],
    layers_root: Option<&Path>,
    upper: &Path,
    work: &Path,
    rootfs: &Path,
) -> Result<(), String> {
    let mut held = None;
    let data = match overlay_data(lowers, upper, work) {
        Ok(data) => data,
        Err(why) => {
            let Some(root) = layers_root else {
                return Err(why);
            };
            let dir = std::fs::File::open(root)
                .map_err(|e| format!("{why}; opening {}: {e}", root.display()))?;
            let prefix = PathBuf::from(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&dir)
            ));
            let short = lowers
                .iter()
                .map(|l| l.strip_prefix(root).map(|rel| prefix.join(rel)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| format!("{why}; a layer is outside {}", root.display()))?;
            held = Some(dir);
            overlay_data(&short, upper, work)?
        }
    };
    let result = mount(
        Some("overlay"),
        rootfs,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(data.as_str()),
    );
    // The kernel resolved the paths during the mount.
    drop(held);
    result.map_err(|e| format!("overlay mount failed: {e}"))
}

/// Overlay mount options (`lowers` top first), or why they cannot be
/// expressed.
fn overlay_data(lowers: &[PathBuf], upper: &Path, work: &Path) -> Result<String, String> {
    let text = |key: &str, path: &Path| -> Result<String, String> {
        let text = path
            .to_str()
            .ok_or_else(|| format!("{key} {} is not UTF-8", path.display()))?;
        // These separate options and lower layers in the mount data.
        if text.contains([',', ':', '\\']) {
            return Err(format!("{key} {text:?} contains ',', ':' or '\\'"));
        }
        Ok(text.to_owned())
    };
    let lower = lowers
        .iter()
        .map(|l| text("lowerdir", l))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        text("upperdir", upper)?,
        text("workdir", work)?
    );
    if data.len() > MAX_MOUNT_DATA {
        return Err(format!(
            "overlay options are {} bytes, over the {MAX_MOUNT_DATA}-byte limit",
            data.len()
        ));
    }
    Ok(data)
}

/// Unmounts `{bundle}/rootfs` if it is a mount. Not an error if it is not.
pub fn release(bundle: &Path) -> Result<(), RootfsError> {
    let rootfs = bundle.join("rootfs");
    // The image may be collected once no bundle names it; a lease left
    // behind is dropped by the collector once the bundle is gone.
    if let Err(e) = layers::release(bundle) {
        tracing::warn!(bundle = %bundle.display(), "ending the container's image lease: {e}");
    }
    match umount2(&rootfs, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        // Something still uses it (a process with it as cwd): detach it so
        // it goes away with its last user.
        Err(Errno::EBUSY) => {
            umount2(&rootfs, MntFlags::MNT_DETACH).map_err(|source| RootfsError::Unmount {
                path: rootfs.clone(),
                source,
            })
        }
        Err(source) => Err(RootfsError::Unmount {
            path: rootfs,
            source,
        }),
    }
}

/// Checks that `argv0` names an executable file inside `root`, as the
/// container will see it: looked up in `path_env` when it has no `/`,
/// relative to `cwd` when it is relative.
pub fn check_executable(
    root: &Path,
    argv0: &str,
    cwd: &str,
    path_env: &str,
) -> Result<(), RootfsError> {
    let lookup_err = |source| RootfsError::Lookup {
        path: argv0.to_owned(),
        source,
    };
    let found = if argv0.contains('/') {
        let inside = Path::new(cwd).join(argv0);
        resolve_in_root(root, &inside)
            .map_err(lookup_err)?
            .ok_or_else(|| RootfsError::ExecutableNotFound {
                name: argv0.to_owned(),
                searched: String::new(),
            })?
    } else {
        let mut hit = None;
        for dir in path_env.split(':').filter(|d| d.starts_with('/')) {
            if let Some(p) =
                resolve_in_root(root, &Path::new(dir).join(argv0)).map_err(lookup_err)?
            {
                if is_executable_file(&p) {
                    hit = Some(p);
                    break;
                }
                hit.get_or_insert(p);
            }
        }
        hit.ok_or_else(|| RootfsError::ExecutableNotFound {
            name: argv0.to_owned(),
            searched: format!(" (searched PATH {path_env})"),
        })?
    };
    if !is_executable_file(&found) {
        return Err(RootfsError::NotExecutable {
            name: argv0.to_owned(),
        });
    }
    Ok(())
}

/// Checks that the absolute `cwd` is a directory inside `root`.
pub fn check_cwd(root: &Path, cwd: &str) -> Result<(), RootfsError> {
    let found = resolve_in_root(root, Path::new(cwd))
        .map_err(|source| RootfsError::Lookup {
            path: cwd.to_owned(),
            source,
        })?
        .ok_or_else(|| RootfsError::CwdNotFound {
            cwd: cwd.to_owned(),
        })?;
    if !found.is_dir() {
        return Err(RootfsError::CwdNotDirectory {
            cwd: cwd.to_owned(),
        });
    }
    Ok(())
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Resolves `path` as a process chrooted at `root` would: symlinks are
/// followed, but absolute targets and `..` stay inside `root`. Returns the
/// host path, or `None` when some component does not exist.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<Option<PathBuf>> {
    let mut pending: VecDeque<OsString> = components(path);
    let mut resolved: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&part);
        let meta = match std::fs::symlink_metadata(&candidate) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
            Err(e) => return Err(e),
        };
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = std::fs::read_link(&candidate)?;
            if target.is_absolute() {
                resolved.clear();
            }
            for c in components(&target).into_iter().rev() {
                pending.push_front(c);
            }
        } else {
            resolved.push(part);
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(Some(out))
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn create_dir(dir: &Path) -> Result<(), RootfsError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(RootfsError::CreateDir {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};

    use super::*;

    fn image() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("bin/busybox"), "#!").unwrap();
        std::fs::set_permissions(root.join("bin/busybox"), PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(root.join("data/plain"), "x").unwrap();
        symlink("busybox", root.join("bin/sh")).unwrap();
        // An absolute target must resolve inside the root, not on the host.
        symlink("/bin/busybox", root.join("usr/bin/env")).unwrap();
        symlink("../../../../../../bin", root.join("usr/escape")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        tmp
    }

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let img = image();
        let root = img.path();
        let r = |p: &str| resolve_in_root(root, Path::new(p));
        assert_eq!(r("/bin/sh").unwrap(), Some(root.join("bin/busybox")));
        assert_eq!(r("/usr/bin/env").unwrap(), Some(root.join("bin/busybox")));
        assert_eq!(r("/usr/escape/sh").unwrap(), Some(root.join("bin/busybox")));
        assert_eq!(r("/../../bin/sh").unwrap(), Some(root.join("bin/busybox")));
        assert_eq!(r("/nope").unwrap(), None);
        assert_eq!(r("/data/plain/below").unwrap(), None);
        assert_eq!(r("/loop").unwrap_err().raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn checks_executables_and_cwd() {
        let img = image();
        let root = img.path();
        let path = "/usr/local/bin:/usr/bin:/bin";
        check_executable(root, "sh", "/", path).unwrap();
        check_executable(root, "/usr/bin/env", "/", path).unwrap();
        check_executable(root, "./sh", "/bin", path).unwrap();
        let err = check_executable(root, "/bin/nope", "/", path).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"executable "/bin/nope" not found in the image"#
        );
        let err = check_executable(root, "nope", "/", path).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"executable "nope" not found in the image (searched PATH /usr/local/bin:/usr/bin:/bin)"#
        );
        let err = check_executable(root, "/data/plain", "/", path).unwrap_err();
        assert!(matches!(err, RootfsError::NotExecutable { .. }), "{err}");
        let err = check_executable(root, "/data", "/", path).unwrap_err();
        assert!(matches!(err, RootfsError::NotExecutable { .. }), "{err}");

        check_cwd(root, "/data").unwrap();
        check_cwd(root, "/usr/escape").unwrap();
        assert!(matches!(
            check_cwd(root, "/srv").unwrap_err(),
            RootfsError::CwdNotFound { .. }
        ));
        assert!(matches!(
            check_cwd(root, "/data/plain").unwrap_err(),
            RootfsError::CwdNotDirectory { .. }
        ));
    }

    #[test]
    fn copy_keeps_links_modes_and_owners() {
        let img = image();
        let dst = tempfile::tempdir().unwrap();
        let to = dst.path().join("rootfs");
        std::fs::create_dir(&to).unwrap();
        std::os::unix::fs::chown(img.path().join("data/plain"), Some(1234), Some(4321)).unwrap();
        layers::merge(&[img.path().to_path_buf()], &to).unwrap();
        assert_eq!(
            std::fs::read_link(to.join("usr/bin/env")).unwrap(),
            Path::new("/bin/busybox")
        );
        let m = std::fs::metadata(to.join("bin/busybox")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o755);
        let m = std::fs::metadata(to.join("data/plain")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 4321));
        assert_eq!(std::fs::read(to.join("data/plain")).unwrap(), b"x");
    }

    #[test]
    fn overlay_options_refuse_separators() {
        let lowers = |l: &[&str]| l.iter().map(PathBuf::from).collect::<Vec<_>>();
        let ok = overlay_data(
            &lowers(&["/l/top", "/l/base"]),
            Path::new("/b/upper"),
            Path::new("/b/work"),
        );
        assert_eq!(
            ok.unwrap(),
            "lowerdir=/l/top:/l/base,upperdir=/b/upper,workdir=/b/work"
        );
        let (u, w) = (Path::new("/u"), Path::new("/w"));
        assert!(overlay_data(&lowers(&["/im,g"]), u, w).is_err());
        assert!(overlay_data(&lowers(&["/im:g"]), u, w).is_err());
        let many: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("/var/lib/flotilla/images/layers/{i:016x}/root")))
            .collect();
        assert!(overlay_data(&many, u, w).unwrap_err().contains("limit"));
    }
}
