//! A pod's volumes on the device: its directory `{data}/pods/{pod}` holding
//! `scratch/{volume}` (kept across container restarts) and
//! `config/{volume}/…` (the config files, rewritten only when their
//! definition changes), and the bind mounts a container gets from them.
//! Everything here blocks (file I/O).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flotilla_proto::{ConfigFile, Volume, VolumeMount, VolumeSource};
use sha2::{Digest, Sha256};

use crate::runtime::Mount;

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
/// config files written) and returns the container's bind mounts.
pub(crate) fn prepare(
    data_dir: &Path,
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

/// Removes a pod's directory (scratch data and config files).
pub(crate) fn remove(data_dir: &Path, pod: &str) -> Result<(), String> {
    let dir = pod_dir(data_dir, pod);
    remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))
}

/// Pods that have a directory under `{data}/pods`.
pub(crate) fn pods_on_disk(data_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(data_dir.join("pods")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| flotilla_proto::check_name(name).is_ok())
        .collect()
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
        let got = prepare(data, "web", &volumes, &mounts).unwrap();
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
        prepare(data, "web", &volumes, &mounts).unwrap();
        assert!(pod.join("scratch/tmp/keep").exists());
        assert_eq!(fs::metadata(&app).unwrap().ino(), inode);
        let changed = vec![volumes[0].clone(), volumes[1].clone(), conf("v2")];
        prepare(data, "web", &changed, &mounts).unwrap();
        assert_eq!(fs::read_to_string(&app).unwrap(), "v2");
        assert!(!pod.join("config/.conf.tmp").exists());

        assert_eq!(pods_on_disk(data), ["web"]);
        remove(data, "web").unwrap();
        assert!(!pod.exists());
        remove(data, "web").unwrap();
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
        let err = prepare(tmp.path(), "p", &volumes, &[mount("gone", "/x", false)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "volume \"gone\": host path /nonexistent/flotilla does not exist"
        );
        let err = prepare(tmp.path(), "p", &volumes, &[mount("other", "/x", false)]).unwrap_err();
        assert_eq!(err.to_string(), "volume \"other\": not defined in the pod");
    }
}
