//! Resolving an image config's `User` (`""`, `uid`, `uid:gid`, `name`,
//! `name:group`) to numeric ids through the rootfs's `/etc/passwd` and
//! `/etc/group`, which are read with symlinks resolved inside the rootfs,
//! never out of it.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::ImageError;
use super::layers::View;

/// Largest passwd or group file read.
const MAX_DB: u64 = 1024 * 1024;

/// Resolves `user` to `(uid, gid)` in `rootfs`. A numeric uid needs no
/// passwd entry (its gid is then the passwd entry's, or 0); a name must have
/// one; a group name must be in `/etc/group`.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), ImageError> {
    let fail = |what: String| ImageError::User {
        user: user.to_owned(),
        rootfs: rootfs.to_owned(),
        what,
    };
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    if name.is_empty() || group == Some("") {
        return Err(fail("expected user, uid, user:group or uid:gid".to_owned()));
    }
    let (uid, primary_gid) = match numeric(name).map_err(&fail)? {
        Some(uid) if group.is_some_and(|g| g.bytes().all(|b| b.is_ascii_digit())) => (uid, 0),
        Some(uid) => {
            let passwd = read_db(rootfs, "etc/passwd")
                .map_err(&fail)?
                .unwrap_or_default();
            let gid = passwd_entries(&passwd)
                .find(|e| e.uid == Some(uid))
                .and_then(|e| e.gid)
                .unwrap_or(0);
            (uid, gid)
        }
        None => {
            let Some(passwd) = read_db(rootfs, "etc/passwd").map_err(&fail)? else {
                return Err(fail(
                    "the image has no /etc/passwd to look the name up in".to_owned(),
                ));
            };
            let entry = passwd_entries(&passwd)
                .find(|e| e.name == name)
                .ok_or_else(|| fail(format!("no user {name:?} in /etc/passwd")))?;
            match (entry.uid, entry.gid) {
                (Some(uid), Some(gid)) => (uid, gid),
                _ => return Err(fail(format!("/etc/passwd entry for {name:?} has bad ids"))),
            }
        }
    };
    let gid = match group {
        None => primary_gid,
        Some(group) => match numeric(group).map_err(&fail)? {
            Some(gid) => gid,
            None => {
                let Some(db) = read_db(rootfs, "etc/group").map_err(&fail)? else {
                    return Err(fail(
                        "the image has no /etc/group to look the group up in".to_owned(),
                    ));
                };
                db.lines()
                    .filter(|line| !line.starts_with('#'))
                    .map(|line| line.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() >= 3 && f[0] == group)
                    .and_then(|f| f[2].parse().ok())
                    .ok_or_else(|| {
                        fail(format!("no group {group:?} with a valid gid in /etc/group"))
                    })?
            }
        },
    };
    Ok((uid, gid))
}

/// `Some(id)` for an all-digit id, `None` for a name.
fn numeric(text: &str) -> Result<Option<u32>, String> {
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| format!("id {text} is out of range"))
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: Option<u32>,
    gid: Option<u32>,
}

fn passwd_entries(db: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    db.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _password = f.next()?;
            let uid = f.next()?.parse().ok();
            let gid = f.next()?.parse().ok();
            Some(PasswdEntry { name, uid, gid })
        })
}

/// Reads `rel` (`etc/passwd`) of `rootfs`; `None` when it does not exist.
fn read_db(rootfs: &Path, rel: &str) -> Result<Option<String>, String> {
    let shown = format!("/{rel}");
    let view = View::open(rootfs).map_err(|e| format!("reading the image's layers: {e}"))?;
    let Some(path) = view
        .resolve(Path::new(rel))
        .map_err(|e| format!("resolving {shown}: {e}"))?
    else {
        return Ok(None);
    };
    // The path was resolved without symlinks; O_NOFOLLOW keeps it that way.
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| format!("opening {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("reading {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_DB + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("reading {shown}: {e}"))?;
    if text.len() as u64 > MAX_DB {
        return Err(format!("{shown} is larger than {MAX_DB} bytes"));
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io;

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        app:x:1000:1001:app:/home/app:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\nnogroup:x:65534:\n";

    fn rootfs() -> io::Result<tempfile::TempDir> {
        let dir = tempfile::tempdir()?;
        fs::create_dir(dir.path().join("etc"))?;
        fs::write(dir.path().join("etc/passwd"), PASSWD)?;
        fs::write(dir.path().join("etc/group"), GROUP)?;
        Ok(dir)
    }

    #[test]
    fn resolves_every_form() -> Result<(), Box<dyn std::error::Error>> {
        let root = rootfs()?;
        for (user, want) in [
            ("", (0, 0)),
            ("0", (0, 0)),
            ("1000", (1000, 1001)),
            ("4242", (4242, 0)),
            ("4242:77", (4242, 77)),
            ("app", (1000, 1001)),
            ("app:staff", (1000, 50)),
            ("app:0", (1000, 0)),
            ("1000:nogroup", (1000, 65534)),
            ("nobody", (65534, 65534)),
        ] {
            assert_eq!(resolve_user(root.path(), user)?, want, "{user:?}");
        }
        Ok(())
    }

    #[test]
    fn refuses_unknown_names_and_bad_ids() -> Result<(), Box<dyn std::error::Error>> {
        let root = rootfs()?;
        for (user, expect) in [
            ("ghost", "no user \"ghost\" in /etc/passwd"),
            ("app:ghosts", "no group \"ghosts\""),
            ("99999999999", "out of range"),
            (":50", "expected user"),
            ("app:", "expected user"),
        ] {
            let err = resolve_user(root.path(), user)
                .err()
                .ok_or(format!("{user:?} resolved"))?;
            let msg = err.to_string();
            assert!(
                msg.contains(expect) && msg.contains(user),
                "{user:?}: {msg}"
            );
            assert_eq!(err.reason(), "InvalidImage");
        }
        let empty = tempfile::tempdir()?;
        assert_eq!(resolve_user(empty.path(), "123")?, (123, 0));
        let msg = resolve_user(empty.path(), "app")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("no /etc/passwd"), "{msg}");
        Ok(())
    }

    #[test]
    fn follows_symlinks_only_inside_the_rootfs() -> Result<(), Box<dyn std::error::Error>> {
        // /etc/passwd -> /shared/passwd must mean {rootfs}/shared/passwd.
        let root = tempfile::tempdir()?;
        fs::create_dir_all(root.path().join("etc"))?;
        fs::create_dir_all(root.path().join("shared"))?;
        fs::write(
            root.path().join("shared/passwd"),
            "inside:x:7:8::/:/bin/sh\n",
        )?;
        std::os::unix::fs::symlink("/shared/passwd", root.path().join("etc/passwd"))?;
        assert_eq!(resolve_user(root.path(), "inside")?, (7, 8));

        // An escape by `..` or absolute path lands on the rootfs's own files,
        // never on the host's: the host passwd has "root", this one not.
        let outside = tempfile::tempdir()?;
        fs::write(outside.path().join("passwd"), "escaped:x:1:1::/:/bin/sh\n")?;
        let root2 = tempfile::tempdir()?;
        fs::create_dir(root2.path().join("etc"))?;
        let up = format!("../../../../../../..{}/passwd", outside.path().display());
        std::os::unix::fs::symlink(&up, root2.path().join("etc/passwd"))?;
        assert!(resolve_user(root2.path(), "escaped").is_err());
        std::os::unix::fs::symlink("/etc/passwd", root2.path().join("etc/group"))?;
        assert!(resolve_user(root2.path(), "0:root").is_err());

        // A loop ends with an error, not a hang.
        let root3 = tempfile::tempdir()?;
        std::os::unix::fs::symlink("etc", root3.path().join("etc"))?;
        let msg = resolve_user(root3.path(), "x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("symbolic links"), "{msg}");
        Ok(())
    }
}
