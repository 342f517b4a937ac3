//! A pod's volumes on the device: its directory `{data}/pods/{pod}` holding
//! `scratch/{volume}` (kept across container restarts) and
//! `config/{volume}/…` (the config files, rewritten only when their
//! definition changes), and the bind mounts a container gets from them.
//! Secret volumes are opened (`crate::secrets`) and written to a tmpfs of
//! the pod, `{run}/secrets/{pod}` (mode 0700): never to the data directory,
//! so no secret reaches the disk in the clear; after a reboot they are
//! opened again from the sealed desired state.
//! Everything here blocks (file I/O).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::borrow::Cow;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

use flotilla_proto::{ConfigFile, SealedSecret, Volume, VolumeMount, VolumeSource};
use sha2::{Digest, Sha256};

use crate::runtime::Mount;
use crate::secrets::{Keyring, SecretError};

/// Size of a pod's secrets tmpfs: room for several volumes of the largest
/// sealed frame (512 KiB); tmpfs takes memory only for what is written.
const SECRETS_TMPFS: &str = "size=8m,mode=0700";

/// Why a container's volumes could not be made ready.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VolumeError {
    /// The desired state mounts a volume the pod does not have (the state
    /// checks make this unreachable; kept as an error, not a panic).
    #[error("volume {name:?}: not defined in the pod")]
    Unknown { name: String },
    /// A host path to mount does not exist.
    #[error("volume {name:?}: host path {path} does not exist")]
    HostPathMissing { name: String, path: String },
    /// A secret volume could not be opened for this node.
    #[error("volume {name:?}: {source}")]
    Secret { name: String, source: SecretError },
    /// A sealed secret opened to files that cannot be written as they are.
    #[error("volume {name:?}: secret file {path:?}: {reason}")]
    SecretFile {
        name: String,
        path: String,
        reason: String,
    },
    /// A directory or file of the pod could not be written.
    #[error("volume {name:?}: {op} {path}: {source}")]
    Io {
        name: String,
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// `{data}/pods/{pod}`, removed with the pod.
pub(crate) fn pod_dir(data_dir: &Path, pod: &str) -> PathBuf {
    data_dir.join("pods").join(pod)
}

/// Makes the volumes `mounts` refers to ready (scratch directories made,
/// config and secret files written) and returns the container's bind mounts.
pub(crate) fn prepare(
    data_dir: &Path,
    keyring: &Keyring,
    pod: &str,
    volumes: &[Volume],
    mounts: &[VolumeMount],
) -> Result<Vec<Mount>, VolumeError> {
    let dir = pod_dir(data_dir, pod);
    let mut out = Vec::with_capacity(mounts.len());
    for m in mounts {
        let volume =
            volumes
                .iter()
                .find(|v| v.name == m.name)
                .ok_or_else(|| VolumeError::Unknown {
                    name: m.name.clone(),
                })?;
        let io = |op: &'static str, path: &Path| {
            let (name, path) = (volume.name.clone(), path.to_path_buf());
            move |source| VolumeError::Io {
                name,
                op,
                path,
                source,
            }
        };
        let (source, read_only, agent_owned) = match &volume.source {
            VolumeSource::HostPath { path } => {
                // Checked here: libcontainer's own error names no volume.
                if fs::metadata(path).is_err() {
                    return Err(VolumeError::HostPathMissing {
                        name: volume.name.clone(),
                        path: path.clone(),
                    });
                }
                (PathBuf::from(path), m.read_only, false)
            }
            VolumeSource::Scratch => {
                let scratch = dir.join("scratch").join(&volume.name);
                fs::DirBuilder::new()
                    .recursive(true)
                    .create(&scratch)
                    .map_err(io("creating", &scratch))?;
                // As Kubernetes' emptyDir: writable whatever the container's user.
                fs::set_permissions(&scratch, fs::Permissions::from_mode(0o777))
                    .map_err(io("setting the mode of", &scratch))?;
                (scratch, m.read_only, true)
            }
            VolumeSource::Config { files } => {
                let config = dir.join("config");
                write_config(&config, &volume.name, files).map_err(|(op, path, source)| {
                    VolumeError::Io {
                        name: volume.name.clone(),
                        op,
                        path,
                        source,
                    }
                })?;
                (config.join(&volume.name), true, true)
            }
            VolumeSource::Secret { sealed, .. } => {
                let files = open_secret(keyring, &volume.name, sealed)?;
                let root = keyring.pod_dir(pod);
                mount_tmpfs(&root).map_err(|(op, path, source)| VolumeError::Io {
                    name: volume.name.clone(),
                    op,
                    path,
                    source,
                })?;
                let written = write_config(&root, &volume.name, &files);
                wipe(files);
                written.map_err(|(op, path, source)| VolumeError::Io {
                    name: volume.name.clone(),
                    op,
                    path,
                    source,
                })?;
                (root.join(&volume.name), true, true)
            }
        };
        out.push(Mount {
            source,
            destination: m.mount_path.clone(),
            read_only,
            agent_owned,
        });
    }
    Ok(out)
}

type IoFailure = (&'static str, PathBuf, io::Error);

/// Writes config volume `name` under `config/{name}` unless its stamp
/// (`config/.{name}.sha256`, a name no volume can have) says it already
/// holds these files. A new copy is built aside and renamed into place, so
/// a crash leaves either copy whole; the stamp is written last.
fn write_config(config: &Path, name: &str, files: &[ConfigFile]) -> Result<(), IoFailure> {
    let target = config.join(name);
    let stamp = config.join(format!(".{name}.sha256"));
    let want = digest(files);
    if target.is_dir() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want) {
        return Ok(());
    }
    let err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: io::Error| (op, path, e)
    };
    fs::create_dir_all(config).map_err(err("creating", config))?;
    let tmp = config.join(format!(".{name}.tmp"));
    remove_dir_all(&tmp).map_err(err("removing", &tmp))?;
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(err("creating", &tmp))?;
    for f in files {
        // The state checks refused absolute paths and `..`; the directory
        // is new and the agent's own, so nothing in it can point elsewhere.
        let path = tmp.join(&f.path);
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(err("creating", parent))?;
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(err("creating", &path))?;
        file.write_all(&f.data).map_err(err("writing", &path))?;
        // Set after writing, and exactly: the umask must not change it.
        file.set_permissions(fs::Permissions::from_mode(f.mode & 0o777))
            .map_err(err("setting the mode of", &path))?;
    }
    remove_dir_all(&target).map_err(err("removing", &target))?;
    fs::rename(&tmp, &target).map_err(err("renaming to", &target))?;
    let stamp_tmp = config.join(format!(".{name}.sha256.tmp"));
    fs::write(&stamp_tmp, &want).map_err(err("writing", &stamp_tmp))?;
    fs::rename(&stamp_tmp, &stamp).map_err(err("renaming to", &stamp))
}

/// Opens a secret volume's files and checks them as the state checks
/// check a config volume's (the sealed frame was not visible to those).
fn open_secret(
    keyring: &Keyring,
    name: &str,
    sealed: &SealedSecret,
) -> Result<Vec<ConfigFile>, VolumeError> {
    let files = keyring.open(sealed).map_err(|source| VolumeError::Secret {
        name: name.to_owned(),
        source,
    })?;
    let bad = |path: &str, reason: String| VolumeError::SecretFile {
        name: name.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let paths: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
    for f in &files {
        crate::secrets::check_path(&f.path).map_err(|r| bad(&f.path, r))?;
        if f.mode > 0o777 {
            return Err(bad(&f.path, format!("mode {:o} is over 0777", f.mode)));
        }
        let parent = f
            .path
            .match_indices('/')
            .map(|(k, _)| &f.path[..k])
            .find(|dir| paths.contains(dir));
        if let Some(dir) = parent {
            return Err(bad(&f.path, format!("{dir:?} is also a file")));
        }
    }
    if paths.len() != files.len() {
        return Err(bad("", "paths repeat within the volume".into()));
    }
    Ok(files)
}

/// Zeroes opened secret values before their memory is freed.
fn wipe(files: Vec<ConfigFile>) {
    for mut f in files {
        f.data.fill(0);
    }
}

/// Mounts the pod's secrets tmpfs at `root` unless it is mounted already
/// (a mount point is on another device than its parent).
fn mount_tmpfs(root: &Path) -> Result<(), IoFailure> {
    use nix::mount::{MsFlags, mount};
    let err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: io::Error| (op, path, e)
    };
    if is_mount_point(root) {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(err("creating", root))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("flotilla-secrets"),
        root,
        Some("tmpfs"),
        flags,
        Some(SECRETS_TMPFS),
    )
    .map_err(|e| {
        (
            "mounting a tmpfs on",
            root.to_path_buf(),
            io::Error::from(e),
        )
    })
}

fn is_mount_point(path: &Path) -> bool {
    let (Ok(own), Some(Ok(parent))) = (fs::metadata(path), path.parent().map(fs::metadata)) else {
        return false;
    };
    own.dev() != parent.dev()
}

/// The part of a volume a container id hashes: a secret volume's seal
/// (one-time key, nonce, ciphertext) changes at every publish, so only its
/// controller-keyed digest counts, which changes with the contents.
pub(crate) fn for_id(v: &Volume) -> Cow<'_, Volume> {
    match &v.source {
        VolumeSource::Secret {
            items,
            default_mode,
            sealed,
        } => Cow::Owned(Volume {
            name: v.name.clone(),
            source: VolumeSource::Secret {
                items: items.clone(),
                default_mode: *default_mode,
                sealed: SealedSecret {
                    digest: sealed.digest,
                    problem: sealed.problem.clone(),
                    ..SealedSecret::unsealed(sealed.name.clone())
                },
            },
        }),
        _ => Cow::Borrowed(v),
    }
}

fn digest(files: &[ConfigFile]) -> String {
    let mut h = Sha256::new();
    for f in files {
        // Lengths first, so that no two lists hash alike by concatenation.
        h.update((f.path.len() as u64).to_le_bytes());
        h.update(f.path.as_bytes());
        h.update((f.data.len() as u64).to_le_bytes());
        h.update(&f.data);
        h.update(f.mode.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes a pod's directory (scratch data and config files) and its
/// secrets tmpfs.
pub(crate) fn remove(data_dir: &Path, keyring: &Keyring, pod: &str) -> Result<(), String> {
    let secrets = keyring.pod_dir(pod);
    if is_mount_point(&secrets) {
        // Detached: a container that still holds it keeps its own view.
        nix::mount::umount2(&secrets, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| format!("unmounting {}: {e}", secrets.display()))?;
    }
    remove_dir_all(&secrets).map_err(|e| format!("removing {}: {e}", secrets.display()))?;
    let dir = pod_dir(data_dir, pod);
    remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))
}

/// Pods that have a directory under `{data}/pods` or a secrets tmpfs.
pub(crate) fn pods_on_disk(data_dir: &Path, keyring: &Keyring) -> Vec<String> {
    let mut out: Vec<String> = [data_dir.join("pods"), keyring.secrets_dir().to_path_buf()]
        .iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| flotilla_proto::check_name(name).is_ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn remove_dir_all(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn file(path: &str, data: &str, mode: u32) -> ConfigFile {
        ConfigFile {
            path: path.into(),
            data: data.as_bytes().to_vec(),
            mode,
        }
    }

    fn keyring(data: &Path) -> Keyring {
        Keyring::new("n1", &data.join("run"), None)
    }

    fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            read_only,
        }
    }

    #[test]
    fn prepares_every_kind_of_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        let host = data.join("host");
        fs::create_dir(&host).unwrap();
        let conf = |text: &str| Volume {
            name: "conf".into(),
            source: VolumeSource::Config {
                files: vec![file("app.conf", text, 0o640), file("d/run.sh", "#!", 0o755)],
            },
        };
        let volumes = vec![
            Volume {
                name: "host".into(),
                source: VolumeSource::HostPath {
                    path: host.display().to_string(),
                },
            },
            Volume {
                name: "tmp".into(),
                source: VolumeSource::Scratch,
            },
            conf("v1"),
        ];
        let mounts = [
            mount("host", "/h", true),
            mount("tmp", "/tmp", false),
            mount("conf", "/etc/app", false),
        ];
        let got = prepare(data, &keyring(data), "web", &volumes, &mounts).unwrap();
        let pod = data.join("pods/web");
        assert_eq!(
            got,
            vec![
                Mount {
                    source: host.clone(),
                    destination: "/h".into(),
                    read_only: true,
                    agent_owned: false,
                },
                Mount {
                    source: pod.join("scratch/tmp"),
                    destination: "/tmp".into(),
                    read_only: false,
                    agent_owned: true,
                },
                Mount {
                    source: pod.join("config/conf"),
                    destination: "/etc/app".into(),
                    read_only: true,
                    agent_owned: true,
                },
            ]
        );
        let meta = fs::metadata(pod.join("scratch/tmp")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o777);
        let app = pod.join("config/conf/app.conf");
        assert_eq!(fs::read_to_string(&app).unwrap(), "v1");
        assert_eq!(fs::metadata(&app).unwrap().mode() & 0o7777, 0o640);
        let run = pod.join("config/conf/d/run.sh");
        assert_eq!(fs::metadata(&run).unwrap().mode() & 0o7777, 0o755);

        // Scratch data survives a second prepare; unchanged config files are
        // not rewritten (same inode); changed ones are.
        fs::write(pod.join("scratch/tmp/keep"), "x").unwrap();
        let inode = fs::metadata(&app).unwrap().ino();
        prepare(data, &keyring(data), "web", &volumes, &mounts).unwrap();
        assert!(pod.join("scratch/tmp/keep").exists());
        assert_eq!(fs::metadata(&app).unwrap().ino(), inode);
        let changed = vec![volumes[0].clone(), volumes[1].clone(), conf("v2")];
        prepare(data, &keyring(data), "web", &changed, &mounts).unwrap();
        assert_eq!(fs::read_to_string(&app).unwrap(), "v2");
        assert!(!pod.join("config/.conf.tmp").exists());

        assert_eq!(pods_on_disk(data, &keyring(data)), ["web"]);
        remove(data, &keyring(data), "web").unwrap();
        assert!(!pod.exists());
        remove(data, &keyring(data), "web").unwrap();
    }

    #[test]
    fn names_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let volumes = [Volume {
            name: "gone".into(),
            source: VolumeSource::HostPath {
                path: "/nonexistent/flotilla".into(),
            },
        }];
        let err = prepare(
            tmp.path(),
            &keyring(tmp.path()),
            "p",
            &volumes,
            &[mount("gone", "/x", false)],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "volume \"gone\": host path /nonexistent/flotilla does not exist"
        );
        let err = prepare(
            tmp.path(),
            &keyring(tmp.path()),
            "p",
            &volumes,
            &[mount("other", "/x", false)],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "volume \"other\": not defined in the pod");
    }

    #[test]
    fn secret_volumes_go_to_a_tmpfs_of_the_pod_and_leave_with_it() {
        use crate::secrets::{SealingKey, seal_for_tests};
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        let key = SealingKey::generate().unwrap();
        let sealed = seal_for_tests(
            "n1",
            &key.public(),
            "db",
            [3; 32],
            vec![
                file("password", "hunter2", 0o440),
                file("d/user", "app", 0o444),
            ],
        );
        let volume = |sealed: SealedSecret| Volume {
            name: "creds".into(),
            source: VolumeSource::Secret {
                items: vec![],
                default_mode: 0o644,
                sealed,
            },
        };
        let keyring = Keyring::new("n1", &data.join("run"), Some(key));
        let volumes = vec![volume(sealed.clone())];
        let mounts = [mount("creds", "/etc/creds", false)];
        let got = prepare(data, &keyring, "web", &volumes, &mounts).unwrap();
        let root = data.join("run/secrets/web");
        assert_eq!(
            got,
            vec![Mount {
                source: root.join("creds"),
                destination: "/etc/creds".into(),
                read_only: true,
                agent_owned: true,
            }]
        );
        let mounts_now = fs::read_to_string("/proc/self/mounts").unwrap();
        let line = mounts_now
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(root.to_str().unwrap()))
            .unwrap();
        assert!(line.starts_with("flotilla-secrets "), "{line}");
        assert_eq!(line.split(' ').nth(2), Some("tmpfs"));
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o7777, 0o700);
        let password = root.join("creds/password");
        assert_eq!(fs::read_to_string(&password).unwrap(), "hunter2");
        assert_eq!(fs::metadata(&password).unwrap().mode() & 0o7777, 0o440);
        assert_eq!(
            fs::read_to_string(root.join("creds/d/user")).unwrap(),
            "app"
        );
        // Nothing of it under the data directory.
        assert!(!data.join("pods/web").exists());

        // Sealed again (new one-time key): the same id part and no rewrite.
        let inode = fs::metadata(&password).unwrap().ino();
        let resealed = volume(seal_for_tests(
            "n1",
            &keyring.public().unwrap(),
            "db",
            [3; 32],
            vec![
                file("password", "hunter2", 0o440),
                file("d/user", "app", 0o444),
            ],
        ));
        assert_ne!(resealed, volumes[0]);
        assert_eq!(for_id(&resealed), for_id(&volumes[0]));
        prepare(data, &keyring, "web", &[resealed], &mounts).unwrap();
        assert_eq!(fs::metadata(&password).unwrap().ino(), inode);

        // A seal for another node is refused, naming the volume.
        let other = volume(seal_for_tests("n2", &[5; 32], "db", [3; 32], vec![]));
        let err = prepare(data, &keyring, "web", &[other], &mounts).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("volume \"creds\": secret \"db\": cannot be opened"),
            "{err}"
        );

        assert_eq!(pods_on_disk(data, &keyring), ["web"]);
        remove(data, &keyring, "web").unwrap();
        assert!(!root.exists());
        let mounts_now = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts_now.contains(root.to_str().unwrap()));
    }
}
