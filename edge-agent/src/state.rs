//! The accepted desired state: deciding whether an incoming frame is accepted
//! (signed by the pinned controller key, decodes, is for this node, names valid and unique, volumes and probes
//! usable, newer generation), and
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

use flotilla_proto::{
    ContainerSpec, DecodeError, DesiredState, Message, PodSpec, Probe, ProbeAction, SignedDesired,
    VolumeSource, check_name, decode,
};
use ring::signature::{ED25519, UnparsedPublicKey};

use crate::config::Trust;

/// Why a desired state was refused, or the state files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The frame does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The signature is not the pinned controller key's.
    #[error("desired state: signature does not verify against the pinned controller key")]
    BadSignature,
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
    /// A volume, volume mount or probe of a pod is unusable.
    #[error("pod {pod:?}: {field}: {problem}")]
    PodField {
        pod: String,
        field: String,
        problem: String,
    },
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

/// Judges an envelope from the `desired` topic: its signature first (against
/// the pinned controller key, unless `trust` says not to), then its payload
/// with [`judge`]. Returns the verdict and the payload (the `DesiredState`
/// frame, which is what is stored), empty when refused before decoding.
pub fn judge_signed(
    envelope: &[u8],
    node: &str,
    accepted: Option<u64>,
    trust: &Trust,
) -> (Verdict, Vec<u8>) {
    let signed = match decode::<SignedDesired>(envelope) {
        Ok(s) => s,
        Err(e) => return (Verdict::Refuse(e.into()), Vec::new()),
    };
    if let Trust::Pinned(key) = trust {
        let key = UnparsedPublicKey::new(&ED25519, key);
        let message = SignedDesired::signed_bytes(&signed.payload);
        if key.verify(&message, &signed.signature.0).is_err() {
            return (Verdict::Refuse(StateError::BadSignature), Vec::new());
        }
    }
    (judge(&signed.payload, node, accepted), signed.payload)
}

/// Judges `frame` (a `DesiredState` frame, already authenticated) for
/// `node`, given the generation accepted so far.
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
        check_pod_parts(pod).map_err(|(field, problem)| StateError::PodField {
            pod: pod.name.clone(),
            field,
            problem,
        })?;
    }
    Ok(())
}

/// Longest path the agent accepts in a volume or mount (`PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;

/// Volumes, mounts and probes: volume names become directory names, file
/// paths are joined under the pod's directory, and probe timings drive
/// loops, so none is trusted from the wire. Errors are (field, problem).
fn check_pod_parts(pod: &PodSpec) -> Result<(), (String, String)> {
    let mut volumes = HashSet::with_capacity(pod.volumes.len());
    for (i, v) in pod.volumes.iter().enumerate() {
        let at = |f: &str| format!("volumes[{i}].{f}");
        check_name(&v.name).map_err(|e| (at("name"), format!("{:?}: {e}", v.name)))?;
        if !volumes.insert(v.name.as_str()) {
            return Err((at("name"), format!("{:?} used more than once", v.name)));
        }
        match &v.source {
            VolumeSource::HostPath { path } => absolute(path).map_err(|p| (at("path"), p))?,
            VolumeSource::Scratch => {}
            VolumeSource::Config { files } => {
                let paths: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
                for (j, f) in files.iter().enumerate() {
                    let at = |f: &str| format!("volumes[{i}].files[{j}].{f}");
                    relative(&f.path).map_err(|p| (at("path"), p))?;
                    if paths.len() != files.len() {
                        return Err((at("path"), "paths repeat within the volume".into()));
                    }
                    let parent = f
                        .path
                        .match_indices('/')
                        .map(|(k, _)| &f.path[..k])
                        .find(|dir| paths.contains(dir));
                    if let Some(dir) = parent {
                        return Err((at("path"), format!("{dir:?} is also a file")));
                    }
                    if f.mode > 0o777 {
                        return Err((at("mode"), format!("{:o} is over 0777", f.mode)));
                    }
                }
            }
            VolumeSource::Secret {
                items,
                default_mode,
                sealed,
            } => crate::secrets::check_volume(items, *default_mode, sealed)
                .map_err(|(f, p)| (at(&f), p))?,
        }
    }
    for (c_index, c) in pod.containers.iter().enumerate() {
        let mut targets = HashSet::with_capacity(c.volume_mounts.len());
        for (j, m) in c.volume_mounts.iter().enumerate() {
            let at = |f: &str| format!("containers[{c_index}].volume_mounts[{j}].{f}");
            if !volumes.contains(m.name.as_str()) {
                return Err((at("name"), format!("no volume {:?} in the pod", m.name)));
            }
            absolute(&m.mount_path).map_err(|p| (at("mount_path"), p))?;
            let target = m.mount_path.trim_end_matches('/');
            if target.is_empty() {
                return Err((at("mount_path"), "\"/\" cannot be mounted over".into()));
            }
            if !targets.insert(target) {
                return Err((at("mount_path"), format!("{target:?} mounted twice")));
            }
        }
        check_probes(c).map_err(|(f, p)| (format!("containers[{c_index}].{f}"), p))?;
    }
    Ok(())
}

fn check_probes(c: &ContainerSpec) -> Result<(), (String, String)> {
    let probes = [
        ("liveness_probe", &c.liveness_probe),
        ("readiness_probe", &c.readiness_probe),
        ("startup_probe", &c.startup_probe),
    ];
    for (name, probe) in probes {
        let Some(Probe {
            action,
            period_secs,
            timeout_secs,
            success_threshold,
            failure_threshold,
            ..
        }) = probe
        else {
            continue;
        };
        let bad = |problem: &str| Err((name.to_owned(), problem.to_owned()));
        if [
            period_secs,
            timeout_secs,
            success_threshold,
            failure_threshold,
        ]
        .contains(&&0)
        {
            return bad("period, timeout and thresholds must be at least 1");
        }
        match action {
            ProbeAction::Exec { command } => {
                if command.first().is_none_or(String::is_empty) {
                    return bad("exec: empty command");
                }
                if command.iter().any(|a| a.contains('\0')) {
                    return bad("exec: NUL in the command");
                }
            }
            ProbeAction::Tcp { port } | ProbeAction::Http { port, .. } if *port == 0 => {
                return bad("port 0");
            }
            ProbeAction::Http { path, .. } => {
                if !path.starts_with('/') || path.len() > MAX_PATH_BYTES {
                    return bad("http path must start with '/'");
                }
                if !path.bytes().all(|b| b.is_ascii_graphic()) {
                    return bad("http path must be printable ASCII without spaces");
                }
            }
            ProbeAction::Tcp { .. } => {}
        }
    }
    Ok(())
}

fn absolute(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not an absolute path"));
    }
    clean(path)
}

fn relative(path: &str) -> Result<(), String> {
    if path.is_empty() || path.starts_with('/') {
        return Err(format!("{path:?} is not a relative path"));
    }
    if path.split('/').any(|c| c.is_empty() || c == ".") {
        return Err(format!("{path:?} has an empty or \".\" component"));
    }
    clean(path)
}

fn clean(path: &str) -> Result<(), String> {
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("{} bytes, over {MAX_PATH_BYTES}", path.len()));
    }
    if path.contains('\0') {
        return Err(format!("{path:?} holds a NUL byte"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("{path:?} holds \"..\""));
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
    use flotilla_proto::{ContainerSpec, PodSpec, RestartPolicy, encode};

    use super::*;

    fn container(name: &str) -> ContainerSpec {
        ContainerSpec::new(name, "oci:/img")
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
                    image_pull_secrets: Vec::new(),
                })
                .collect(),
            prefetch: Vec::new(),
            prefetch_pull_secrets: Vec::new(),
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
    fn refuses_unusable_volumes_mounts_and_probes() {
        use flotilla_proto::{ConfigFile, Volume, VolumeMount};
        fn file(path: &str, mode: u32) -> ConfigFile {
            ConfigFile {
                path: path.into(),
                data: b"x".to_vec(),
                mode,
            }
        }
        let volume = |name: &str, source: VolumeSource| Volume {
            name: name.into(),
            source,
        };
        let mount = |name: &str, path: &str| VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            read_only: false,
        };
        fn probe(action: ProbeAction, period_secs: u32) -> Probe {
            Probe {
                action,
                initial_delay_secs: 0,
                period_secs,
                timeout_secs: 1,
                success_threshold: 1,
                failure_threshold: 3,
            }
        }
        let good = || {
            let mut d = desired(1, &[("a", &["x"])]);
            d.pods[0].volumes = vec![
                volume(
                    "data",
                    VolumeSource::HostPath {
                        path: "/srv".into(),
                    },
                ),
                volume("tmp", VolumeSource::Scratch),
                volume(
                    "conf",
                    VolumeSource::Config {
                        files: vec![file("a.conf", 0o644), file("dir/b.conf", 0o600)],
                    },
                ),
            ];
            d.pods[0].containers[0].volume_mounts =
                vec![mount("data", "/data"), mount("conf", "/etc/app")];
            d.pods[0].containers[0].liveness_probe = Some(probe(
                ProbeAction::Http {
                    port: 80,
                    path: "/healthz".into(),
                },
                10,
            ));
            d
        };
        assert!(matches!(
            judge(&frame(&good()), "n1", None),
            Verdict::Accept(_)
        ));
        type Edit = fn(&mut PodSpec);
        let cases: [(Edit, &str); 11] = [
            (
                |p| p.volumes[1].name = "Tmp".into(),
                "pod \"a\": volumes[1].name: \"Tmp\": character 'T' at position 0 is not allowed",
            ),
            (
                |p| p.volumes[1].name = "data".into(),
                "pod \"a\": volumes[1].name: \"data\" used more than once",
            ),
            (
                |p| p.volumes[0].source = VolumeSource::HostPath { path: "srv".into() },
                "pod \"a\": volumes[0].path: \"srv\" is not an absolute path",
            ),
            (
                |p| {
                    p.volumes[2].source = VolumeSource::Config {
                        files: vec![file("../../etc/cron.d/x", 0o644)],
                    }
                },
                "pod \"a\": volumes[2].files[0].path: \"../../etc/cron.d/x\" holds \"..\"",
            ),
            (
                |p| {
                    p.volumes[2].source = VolumeSource::Config {
                        files: vec![file("/etc/passwd", 0o644)],
                    }
                },
                "pod \"a\": volumes[2].files[0].path: \"/etc/passwd\" is not a relative path",
            ),
            (
                |p| {
                    p.volumes[2].source = VolumeSource::Config {
                        files: vec![file("d", 0o644), file("d/e", 0o644)],
                    }
                },
                "pod \"a\": volumes[2].files[1].path: \"d\" is also a file",
            ),
            (
                |p| {
                    p.volumes[2].source = VolumeSource::Config {
                        files: vec![file("s", 0o4755)],
                    }
                },
                "pod \"a\": volumes[2].files[0].mode: 4755 is over 0777",
            ),
            (
                |p| p.containers[0].volume_mounts[0].name = "nope".into(),
                "pod \"a\": containers[0].volume_mounts[0].name: no volume \"nope\" in the pod",
            ),
            (
                |p| p.containers[0].volume_mounts[1].mount_path = "/data/".into(),
                "pod \"a\": containers[0].volume_mounts[1].mount_path: \"/data\" mounted twice",
            ),
            (
                |p| {
                    if let Some(l) = &mut p.containers[0].liveness_probe {
                        l.period_secs = 0;
                    }
                },
                "pod \"a\": containers[0].liveness_probe: period, timeout and thresholds must be at least 1",
            ),
            (
                |p| {
                    p.containers[0].readiness_probe =
                        Some(probe(ProbeAction::Exec { command: vec![] }, 1))
                },
                "pod \"a\": containers[0].readiness_probe: exec: empty command",
            ),
        ];
        for (edit, expected) in cases {
            let mut d = good();
            edit(&mut d.pods[0]);
            assert_eq!(refusal(&frame(&d)), expected);
        }
    }

    #[test]
    fn signatures_are_checked_before_anything_else() {
        use ring::rand::SystemRandom;
        use ring::signature::{Ed25519KeyPair, KeyPair};
        let pair = |seed: u8| {
            let _ = seed;
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
        };
        let sign = |key: &Ed25519KeyPair, payload: Vec<u8>| {
            let sig = key.sign(&SignedDesired::signed_bytes(&payload));
            let mut bytes = [0; 64];
            bytes.copy_from_slice(sig.as_ref());
            flotilla_proto::encode(&SignedDesired {
                payload,
                signature: flotilla_proto::Signature(bytes),
            })
            .unwrap()
        };
        let controller = pair(1);
        let mut public = [0; 32];
        public.copy_from_slice(controller.public_key().as_ref());
        let trust = Trust::Pinned(public);
        let inner = frame(&desired(5, &[("p", &["c"])]));

        let (verdict, payload) =
            judge_signed(&sign(&controller, inner.clone()), "n1", None, &trust);
        assert!(matches!(verdict, Verdict::Accept(d) if d.generation == 5));
        assert_eq!(payload, inner, "the inner frame is what gets stored");

        let forged = sign(&pair(2), inner.clone());
        let (verdict, _) = judge_signed(&forged, "n1", None, &trust);
        assert!(matches!(verdict, Verdict::Refuse(StateError::BadSignature)));
        // Unchecked only when asked.
        let (verdict, _) = judge_signed(&forged, "n1", None, &Trust::Unverified);
        assert!(matches!(verdict, Verdict::Accept(_)));

        // A tampered payload under a good signature.
        let mut tampered: SignedDesired = decode(&sign(&controller, inner.clone())).unwrap();
        tampered.payload = frame(&desired(6, &[("p", &["c"])]));
        let (verdict, _) = judge_signed(
            &flotilla_proto::encode(&tampered).unwrap(),
            "n1",
            None,
            &trust,
        );
        assert!(matches!(verdict, Verdict::Refuse(StateError::BadSignature)));

        // A bare, unsigned frame is not an envelope.
        let (verdict, _) = judge_signed(&inner, "n1", None, &trust);
        assert!(matches!(verdict, Verdict::Refuse(StateError::Decode(_))));

        // Signed but older, or for another node: the usual rules.
        let (verdict, _) = judge_signed(&sign(&controller, inner.clone()), "n1", Some(7), &trust);
        assert!(matches!(verdict, Verdict::Stale { generation: 5 }));
        let (verdict, _) = judge_signed(&sign(&controller, inner), "n2", None, &trust);
        assert!(matches!(
            verdict,
            Verdict::Refuse(StateError::WrongNode { .. })
        ));
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
