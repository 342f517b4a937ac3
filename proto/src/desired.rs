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
