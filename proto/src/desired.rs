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
    /// The containers, in start order.
    pub containers: Vec<ContainerSpec>,
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
