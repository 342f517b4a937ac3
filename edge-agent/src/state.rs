//! The accepted desired state: deciding whether an incoming frame is accepted
//! (decodes, is for this node, names valid and unique, newer generation), and
//! keeping the last accepted frame on disk so that the node runs it again
//! after a reboot with no network.
//!
//! On disk, under `{data_dir}/state/`: `desired.bin` (the raw frame as
//! received) and `desired.prev.bin` (the one before). Writes are atomic:
//! temp file, fsync, rename, fsync of the directory. At every instant both
//! files hold a complete frame (or do not exist yet).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use flotilla_proto::{DecodeError, DesiredState, Message, check_name, decode};

/// Why a desired state was refused, or the state files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The frame does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The state names another node.
    #[error("desired state is for node {got:?}, expected {expected:?}")]
    WrongNode { got: String, expected: String },
    /// A pod name breaks the name rule.
    #[error("pods[{index}].name {name:?}: {error}")]
    PodName {
        index: usize,
        name: String,
        error: flotilla_proto::NameError,
    },
    /// Two pods share a name.
    #[error("pod {name:?}: name used more than once")]
    PodRepeated { name: String },
    /// A pod has no containers.
    #[error("pod {pod:?}: no containers")]
    NoContainers { pod: String },
    /// A container name breaks the name rule.
    #[error("pod {pod:?}: containers[{index}].name {name:?}: {error}")]
    ContainerName {
        pod: String,
        index: usize,
        name: String,
        error: flotilla_proto::NameError,
    },
    /// Two containers of a pod share a name.
    #[error("pod {pod:?}: container {name:?}: name used more than once")]
    ContainerRepeated { pod: String, name: String },
    /// A state file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// What to do with an incoming desired-state frame.
#[derive(Debug)]
pub enum Verdict {
    /// Newer than what runs: store it and reconcile.
    Accept(DesiredState),
    /// The generation already accepted (a reconnect or a redelivery): nothing to do.
    Unchanged,
    /// Older than what runs (redelivery can reorder): ignored.
    Stale { generation: u64 },
    /// Bad: refused, nothing changes.
    Refuse(StateError),
}

/// Judges `frame` for `node`, given the generation accepted so far.
pub fn judge(frame: &[u8], node: &str, accepted: Option<u64>) -> Verdict {
    let desired = match decode::<DesiredState>(frame) {
        Ok(d) => d,
        Err(e) => return Verdict::Refuse(e.into()),
    };
    if let Err(e) = validate(&desired, node) {
        return Verdict::Refuse(e);
    }
    match accepted {
        Some(current) if desired.generation == current => Verdict::Unchanged,
        Some(current) if desired.generation < current => Verdict::Stale {
            generation: desired.generation,
        },
        _ => Verdict::Accept(desired),
    }
}

/// Checks what the agent relies on: the node, and names it uses in paths
/// and container ids, unique where they must be.
pub fn validate(desired: &DesiredState, node: &str) -> Result<(), StateError> {
    if desired.node != node {
        return Err(StateError::WrongNode {
            got: desired.node.clone(),
            expected: node.to_owned(),
        });
    }
    let mut pods = HashSet::with_capacity(desired.pods.len());
    for (index, pod) in desired.pods.iter().enumerate() {
        check_name(&pod.name).map_err(|error| StateError::PodName {
            index,
            name: pod.name.clone(),
            error,
        })?;
        if !pods.insert(pod.name.as_str()) {
            return Err(StateError::PodRepeated {
                name: pod.name.clone(),
            });
        }
        if pod.containers.is_empty() {
            return Err(StateError::NoContainers {
                pod: pod.name.clone(),
            });
        }
        let mut names = HashSet::with_capacity(pod.containers.len());
        for (index, c) in pod.containers.iter().enumerate() {
            check_name(&c.name).map_err(|error| StateError::ContainerName {
                pod: pod.name.clone(),
                index,
                name: c.name.clone(),
                error,
            })?;
            if !names.insert(c.name.as_str()) {
                return Err(StateError::ContainerRepeated {
                    pod: pod.name.clone(),
                    name: c.name.clone(),
                });
            }
        }
    }
    Ok(())
}

const CURRENT: &str = "desired.bin";
const PREVIOUS: &str = "desired.prev.bin";
const CURRENT_TMP: &str = "desired.bin.tmp";
const PREVIOUS_TMP: &str = "desired.prev.bin.tmp";

/// The desired-state files of one agent. All methods block (file I/O and
/// fsync): call them from `spawn_blocking`.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens (creating if needed) `{data_dir}/state`.
    pub fn open(data_dir: &Path) -> Result<Self, StateError> {
        let dir = data_dir.join("state");
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        Ok(Self { dir })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last accepted desired state for `node`: `desired.bin`, or when that
    /// is missing or corrupt, `desired.prev.bin`. `None` when neither holds
    /// one (first start). Problems are logged, never fatal: the controller
    /// sends the state again once the broker is reachable.
    pub fn load(&self, node: &str) -> Option<DesiredState> {
        for name in [CURRENT, PREVIOUS] {
            let path = self.dir.join(name);
            match read_capped(&path) {
                Ok(None) => continue,
                Ok(Some(frame)) => match decode::<DesiredState>(&frame)
                    .map_err(StateError::from)
                    .and_then(|d| validate(&d, node).map(|()| d))
                {
                    Ok(d) => {
                        tracing::info!(
                            path = %path.display(),
                            generation = d.generation,
                            pods = d.pods.len(),
                            "loaded desired state"
                        );
                        return Some(d);
                    }
                    Err(e) => tracing::error!(
                        path = %path.display(),
                        "stored desired state is unusable, trying the previous copy: {e}"
                    ),
                },
                Err(e) => tracing::error!("{e}; trying the previous copy"),
            }
        }
        None
    }

    /// Stores `frame` (an accepted desired state) as `desired.bin`; the
    /// frame it replaces becomes `desired.prev.bin`.
    pub fn save(&self, frame: &[u8]) -> Result<(), StateError> {
        let current = self.dir.join(CURRENT);
        let tmp = self.dir.join(CURRENT_TMP);
        {
            let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
            f.write_all(frame).map_err(io_err("writing", &tmp))?;
            f.sync_all().map_err(io_err("syncing", &tmp))?;
        }
        // A hard link keeps `desired.bin` in place while the previous copy is
        // replaced, so a crash at any step leaves a readable current file.
        if current.exists() {
            let prev_tmp = self.dir.join(PREVIOUS_TMP);
            match fs::remove_file(&prev_tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &prev_tmp)(e)),
            }
            fs::hard_link(&current, &prev_tmp).map_err(io_err("linking", &prev_tmp))?;
            let prev = self.dir.join(PREVIOUS);
            fs::rename(&prev_tmp, &prev).map_err(io_err("renaming to", &prev))?;
        }
        fs::rename(&tmp, &current).map_err(io_err("renaming to", &current))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", &self.dir))
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

/// Reads a state file, refusing one larger than any valid frame.
fn read_capped(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("opening", path)(e)),
    };
    let mut frame = Vec::new();
    // One byte over the cap is enough for decode to report "too large".
    let cap = DesiredState::MAX_BYTES as u64 + 1;
    f.take(cap)
        .read_to_end(&mut frame)
        .map_err(io_err("reading", path))?;
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use flotilla_proto::{ContainerSpec, PodSpec, Resources, RestartPolicy, encode};

    use super::*;

    fn container(name: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: "oci:/img".into(),
            command: vec![],
            args: vec![],
            env: vec![],
            working_dir: None,
            resources: Resources::default(),
            volume_mounts: vec![],
            liveness_probe: None,
            readiness_probe: None,
            startup_probe: None,
        }
    }

    fn desired(generation: u64, pods: &[(&str, &[&str])]) -> DesiredState {
        DesiredState {
            node: "n1".into(),
            generation,
            pods: pods
                .iter()
                .map(|(name, cs)| PodSpec {
                    name: (*name).into(),
                    workload: "w".into(),
                    restart_policy: RestartPolicy::Always,
                    termination_grace_secs: 30,
                    volumes: vec![],
                    containers: cs.iter().map(|c| container(c)).collect(),
                })
                .collect(),
        }
    }

    fn frame(d: &DesiredState) -> Vec<u8> {
        encode(d).unwrap()
    }

    fn refusal(frame: &[u8]) -> String {
        match judge(frame, "n1", None) {
            Verdict::Refuse(e) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn refusals() {
        assert!(refusal(b"\x01\xff\xff").starts_with("desired state: malformed body"));
        assert_eq!(refusal(b""), "desired state: empty payload");
        let mut other = desired(1, &[]);
        other.node = "n2".into();
        assert_eq!(
            refusal(&frame(&other)),
            "desired state is for node \"n2\", expected \"n1\""
        );
        assert_eq!(
            refusal(&frame(&desired(1, &[("a", &["x"]), ("a", &["y"])]))),
            "pod \"a\": name used more than once"
        );
        assert_eq!(
            refusal(&frame(&desired(1, &[("a", &["x", "x"])]))),
            "pod \"a\": container \"x\": name used more than once"
        );
        assert_eq!(
            refusal(&frame(&desired(1, &[("a/b", &["x"])]))),
            "pods[0].name \"a/b\": character '/' at position 1 is not allowed"
        );
        assert_eq!(
            refusal(&frame(&desired(1, &[("a", &["x", "X"])]))),
            "pod \"a\": containers[1].name \"X\": character 'X' at position 0 is not allowed"
        );
        assert_eq!(
            refusal(&frame(&desired(1, &[("a", &[])]))),
            "pod \"a\": no containers"
        );
    }

    #[test]
    fn generations() {
        let f = frame(&desired(5, &[("a", &["x"])]));
        assert!(matches!(judge(&f, "n1", None), Verdict::Accept(d) if d.generation == 5));
        assert!(matches!(judge(&f, "n1", Some(4)), Verdict::Accept(_)));
        assert!(matches!(judge(&f, "n1", Some(5)), Verdict::Unchanged));
        assert!(matches!(
            judge(&f, "n1", Some(6)),
            Verdict::Stale { generation: 5 }
        ));
    }

    #[test]
    fn save_load_and_fall_back() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::open(tmp.path()).unwrap();
        assert!(store.load("n1").is_none());

        let d1 = desired(1, &[("a", &["x"])]);
        let d2 = desired(2, &[("b", &["y"])]);
        store.save(&frame(&d1)).unwrap();
        assert_eq!(store.load("n1"), Some(d1.clone()));
        store.save(&frame(&d2)).unwrap();
        assert_eq!(store.load("n1"), Some(d2.clone()));
        assert_eq!(
            fs::read(store.dir().join("desired.prev.bin")).unwrap(),
            frame(&d1)
        );
        assert!(!store.dir().join("desired.bin.tmp").exists());

        // A torn or garbled current file: the previous copy is used.
        fs::write(store.dir().join("desired.bin"), b"\x01\x02garbage").unwrap();
        assert_eq!(store.load("n1"), Some(d1.clone()));

        // A current file for another node counts as unusable too.
        assert_eq!(store.load("n2"), None);

        // An oversized file is refused without reading it all.
        let big = vec![1u8; DesiredState::MAX_BYTES + 10];
        fs::write(store.dir().join("desired.bin"), &big).unwrap();
        assert_eq!(store.load("n1"), Some(d1));

        fs::remove_file(store.dir().join("desired.prev.bin")).unwrap();
        assert_eq!(store.load("n1"), None);
    }
}
