//! Controller → agent: a node's whole desired state. Level-triggered: each
//! message replaces the previous one, and the newest `generation` wins.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::codec::Message;

/// Everything one node should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The node this state is for; an agent refuses a state for another node.
    pub node: String,
    /// Increases with every change for this node; older generations are ignored.
    pub generation: u64,
    /// The pods, each with a name unique on the node.
    pub pods: Vec<PodSpec>,
    /// Image references to download ahead of a switch, in the background,
    /// without starting anything (a staged rollout's next revision); the
    /// agent keeps them while listed and reports them in
    /// `NodeStatus::prefetch`.
    pub prefetch: Vec<String>,
    /// Registry credentials for `prefetch`'s images: the image pull secrets
    /// of the revision that lists them, sealed for this node as a pod's
    /// are, tried before the agent's own. An image no entry names is
    /// pulled with the agent's credentials only.
    pub prefetch_pull_secrets: Vec<PrefetchPullSecrets>,
}

/// The image pull secrets of one revision whose images a node prefetches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchPullSecrets {
    /// The entries of `DesiredState::prefetch` these are for.
    pub images: Vec<String>,
    /// The revision's `PodSpec::image_pull_secrets`, sealed for the node.
    pub pull_secrets: Vec<SealedSecret>,
}

impl Message for DesiredState {
    const MAX_BYTES: usize = 1024 * 1024;
    const NAME: &'static str = "desired state";
}

/// One pod: containers that are started, restarted and removed together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// Name unique on the node (a DNS label).
    pub name: String,
    /// The workload the pod belongs to.
    pub workload: String,
    /// What to do when a container exits.
    pub restart_policy: RestartPolicy,
    /// Seconds between SIGTERM and SIGKILL when a container is stopped.
    pub termination_grace_secs: u32,
    /// Volumes the containers can mount, names unique in the pod.
    pub volumes: Vec<Volume>,
    /// The containers, in start order.
    pub containers: Vec<ContainerSpec>,
    /// Registry credentials for this pod's pulls (Docker config JSON,
    /// sealed for the node), tried before the agent's own.
    pub image_pull_secrets: Vec<SealedSecret>,
}

/// A volume of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Name unique in the pod (a DNS label), used by `VolumeMount::name`.
    pub name: String,
    /// Where its files come from.
    pub source: VolumeSource,
}

/// Where a volume's files come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeSource {
    /// A directory or file of the device (absolute path).
    HostPath {
        /// Absolute path on the device.
        path: String,
    },
    /// An empty directory made for the pod, kept across container restarts
    /// and removed with the pod.
    Scratch,
    /// Small files shipped in the desired state, mounted read-only.
    Config {
        /// The files.
        files: Vec<ConfigFile>,
    },
    /// A Secret's files, sealed for this node only, written by the agent
    /// on a memory-backed mount and mounted read-only.
    Secret {
        /// Which of the Secret's keys become which files; empty: every key,
        /// as a file named after it. Names and paths only, never values.
        items: Vec<SecretItem>,
        /// Permission bits of files whose item gives none.
        default_mode: u32,
        /// The files themselves, sealed.
        sealed: SealedSecret,
    },
}

/// One file of a config volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigFile {
    /// Relative path inside the volume (no `..`, not absolute).
    pub path: String,
    /// The file's bytes.
    pub data: Vec<u8>,
    /// Permission bits (e.g. `0o644`).
    pub mode: u32,
}

/// Where a container sees a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The pod volume's name.
    pub name: String,
    /// Absolute path inside the container.
    pub mount_path: String,
    /// Mounted read-only (config volumes always are).
    pub read_only: bool,
}

/// A health check of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// What is checked.
    pub action: ProbeAction,
    /// Seconds after the container starts before the first check.
    pub initial_delay_secs: u32,
    /// Seconds between checks.
    pub period_secs: u32,
    /// Seconds before one check counts as failed.
    pub timeout_secs: u32,
    /// Consecutive successes that make the probe pass after a failure.
    pub success_threshold: u32,
    /// Consecutive failures that make the probe fail.
    pub failure_threshold: u32,
}

/// What a probe checks. Pods use the host's network, so ports are on the
/// device's loopback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeAction {
    /// A command run inside the container; exit code 0 passes.
    Exec {
        /// argv.
        command: Vec<String>,
    },
    /// A TCP connection to the port opens.
    Tcp {
        /// Port on the device.
        port: u16,
    },
    /// An HTTP GET answers 200–399.
    Http {
        /// Port on the device.
        port: u16,
        /// Request path, starting with `/`.
        path: String,
    },
}

/// When an exited container is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Always, whatever the exit code.
    #[default]
    Always,
    /// Only after a non-zero exit code or a signal.
    OnFailure,
    /// Never.
    Never,
}

/// One container of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Name unique in the pod (a DNS label).
    pub name: String,
    /// Image reference, e.g. `oci:/srv/images/busybox:latest`.
    pub image: String,
    /// Replaces the image's entrypoint when not empty.
    pub command: Vec<String>,
    /// Replaces the image's cmd when not empty.
    pub args: Vec<String>,
    /// Added to (and overriding) the image's environment.
    pub env: Vec<EnvVar>,
    /// Replaces the image's working directory.
    pub working_dir: Option<String>,
    /// Limits enforced through cgroups.
    pub resources: Resources,
    /// Volumes of the pod mounted into this container.
    pub volume_mounts: Vec<VolumeMount>,
    /// Restarts the container when it fails.
    pub liveness_probe: Option<Probe>,
    /// Decides whether the container is ready (reported, used by rollouts).
    pub readiness_probe: Option<Probe>,
    /// Holds the other probes back until it passes once.
    pub startup_probe: Option<Probe>,
    /// Privileges beyond the hardened default; `None`: the default.
    pub security_context: Option<SecurityContext>,
}

/// What a container may do beyond the hardened default (Docker's default
/// capabilities, seccomp profile, device allowlist and masked paths).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SecurityContext {
    /// Every capability, no seccomp filter, every device, nothing masked
    /// (Docker's `--privileged`).
    pub privileged: bool,
    /// Capabilities added to the default set, as `NET_ADMIN` (no `CAP_`);
    /// `ALL` adds every one.
    pub add_capabilities: Vec<String>,
    /// Capabilities removed from the default set; `ALL` removes every one
    /// (added ones are then all there is).
    pub drop_capabilities: Vec<String>,
    /// No seccomp filter (Kubernetes' `seccompProfile: Unconfined`).
    pub seccomp_unconfined: bool,
    /// The root filesystem is mounted read-only.
    pub read_only_root_filesystem: bool,
}

impl ContainerSpec {
    /// A container running `image` as the image says: no command or args of
    /// its own, no environment, limits, mounts or probes.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            command: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            working_dir: None,
            resources: Resources::default(),
            volume_mounts: Vec::new(),
            liveness_probe: None,
            readiness_probe: None,
            startup_probe: None,
            security_context: None,
        }
    }
}

/// One environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Variable name.
    pub name: String,
    /// Variable value.
    pub value: String,
}

/// Resource limits of a container; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// CPU limit in thousandths of a CPU (`500` is half a CPU).
    pub cpu_millis: Option<u32>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes.
    pub pids: Option<u32>,
}

/// One key of a Secret projected as a file of a secret volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretItem {
    /// The Secret's key.
    pub key: String,
    /// Relative path inside the volume (no `..`, not absolute).
    pub path: String,
    /// Permission bits; `None`: the volume's `default_mode`.
    pub mode: Option<u32>,
}

/// A Secret's contents sealed for one node: X25519 from a one-time
/// controller key to the node's sealing key, HKDF-SHA256, then
/// ChaCha20-Poly1305 over a [`SecretFiles`] frame, with
/// [`sealed_secret_context`] as both the HKDF info and the AAD. Only that
/// node can open it; the broker and the agent's disk see ciphertext only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    /// The Secret's name at the controller (not secret; bound into the seal).
    pub name: String,
    /// A digest of the contents keyed by the controller: the same while
    /// they are, though every seal's ciphertext differs, so container ids
    /// hash this; being keyed, it tells nothing about the values.
    pub digest: [u8; 32],
    /// The controller's one-time X25519 public key.
    pub ephemeral_public: [u8; 32],
    /// The AEAD nonce.
    pub nonce: [u8; 12],
    /// The sealed [`SecretFiles`] frame and its tag; empty when `problem`
    /// says why nothing could be sealed.
    pub ciphertext: Vec<u8>,
    /// Why the controller sealed nothing (`secret "db" not found`, `node
    /// n1 has no sealing key: re-enrol it`); the agent reports it as the
    /// pod's error.
    pub problem: Option<String>,
}

impl SealedSecret {
    /// An unsealed reference to the Secret `name`: what the controller's
    /// pod templates hold until it seals one for a node.
    pub fn unsealed(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            digest: [0; 32],
            ephemeral_public: [0; 32],
            nonce: [0; 12],
            ciphertext: Vec::new(),
            problem: None,
        }
    }
}

/// What a [`SealedSecret`] opens to: the files of a secret volume, or the
/// `.dockerconfigjson` of an image pull secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretFiles {
    /// The files, paths relative.
    pub files: Vec<ConfigFile>,
}

impl Message for SecretFiles {
    const MAX_BYTES: usize = 512 * 1024;
    const NAME: &'static str = "secret files";
}

/// Bytes both HKDF's info and the AEAD's associated data: a sealed secret
/// opens only for the node, Secret name and contents (by digest) it was
/// sealed for.
pub fn sealed_secret_context(node: &str, name: &str, digest: &[u8; 32]) -> Vec<u8> {
    const CONTEXT: &[u8] = b"flotilla sealed secret v1\0";
    let mut out = Vec::with_capacity(CONTEXT.len() + node.len() + name.len() + 34);
    out.extend_from_slice(CONTEXT);
    out.extend_from_slice(node.as_bytes());
    out.push(0);
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.extend_from_slice(digest);
    out
}
