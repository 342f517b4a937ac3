//! Agent → controller, retained: what a node runs, sent on change and on a
//! slow resync timer.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::codec::Message;

/// A node's whole status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The reporting node.
    pub node: String,
    /// Random id of the agent process; with `seq` it orders status messages,
    /// since MQTT redelivery after a reconnect can reorder them.
    pub instance: u64,
    /// Increases with every status this agent process sends.
    pub seq: u64,
    /// The newest desired generation the agent accepted.
    pub observed_generation: u64,
    /// Why the newest desired message was refused, if it was.
    pub desired_error: Option<String>,
    /// Facts about the node.
    pub info: NodeInfo,
    /// How the node is doing, refreshed on the slow resync timer (so idle
    /// traffic stays small) and when it crosses a warning level.
    pub health: NodeHealth,
    /// Every pod on the node, desired or still being removed.
    pub pods: Vec<PodStatus>,
    /// Each image of `DesiredState::prefetch`, in its order, and how far
    /// its download is; empty when nothing is listed.
    pub prefetch: Vec<PrefetchStatus>,
}

impl Message for NodeStatus {
    const MAX_BYTES: usize = 256 * 1024;
    const NAME: &'static str = "node status";
}

/// Facts about a node, as its agent sees them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeInfo {
    /// CPU architecture in OCI terms (`amd64`, `arm64`, `arm`).
    pub arch: String,
    /// Operating system (`linux`).
    pub os: String,
    /// The agent's version.
    pub agent_version: String,
    /// Labels set at the agent.
    pub labels: Vec<Label>,
    /// Number of CPUs.
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// The kernel's boot id: a new one means the device rebooted.
    pub boot_id: String,
}

/// Resource use of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeHealth {
    /// Memory available for new work, in bytes.
    pub memory_available_bytes: u64,
    /// Free bytes on the filesystem of the agent's data directory.
    pub disk_free_bytes: u64,
    /// Size of that filesystem in bytes.
    pub disk_total_bytes: u64,
    /// One-minute load average × 1000.
    pub load_milli: u32,
    /// Seconds since the device booted.
    pub uptime_secs: u64,
}

/// A `key=value` label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Label {
    /// Label key.
    pub key: String,
    /// Label value.
    pub value: String,
}

/// Where a pod is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodPhase {
    /// Accepted, but not every container has started (image missing, waiting to restart).
    Pending,
    /// Every container has started and at least one still runs.
    Running,
    /// Every container exited with 0 and none will be restarted.
    Succeeded,
    /// A container failed and will not be restarted.
    Failed,
    /// No longer desired; its containers are being stopped.
    Terminating,
}

/// The status of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    /// The pod's name on the node.
    pub name: String,
    /// The workload it belongs to.
    pub workload: String,
    /// The desired generation whose spec this pod runs.
    pub generation: u64,
    /// The pod's phase.
    pub phase: PodPhase,
    /// Why the pod is not running, when it is not.
    pub message: Option<String>,
    /// One entry per container, in spec order.
    pub containers: Vec<ContainerStatus>,
}

/// The status of one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    /// The container's name in its pod.
    pub name: String,
    /// Its state now.
    pub state: ContainerState,
    /// How many times it was started again after exiting.
    pub restarts: u32,
    /// Running and its readiness probe (if any) passes.
    pub ready: bool,
    /// Progress of the image download while the image is being pulled.
    pub pull: Option<PullProgress>,
    /// While a changed container waits for its new image, the old one keeps
    /// running (it is what `state`, `restarts` and `ready` describe): the new
    /// one's state (`Pulling`, or why its image failed and when it is tried
    /// again). `None` once the new one is started, or when nothing waits.
    pub next: Option<ContainerState>,
}

/// How far an image download has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullProgress {
    /// Bytes downloaded and verified so far.
    pub done_bytes: u64,
    /// Bytes in all (0 until known).
    pub total_bytes: u64,
}

/// The state of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// Not running yet, or waiting to be started again.
    Waiting {
        /// A short CamelCase reason (`ImageNotFound`, `CreateFailed`, `BackOff`).
        reason: String,
        /// A sentence for people.
        message: Option<String>,
        /// When the next attempt is due (back-off), in milliseconds since the
        /// Unix epoch (device clock).
        retry_at_ms: Option<u64>,
    },
    /// Running.
    Running {
        /// When it started, in milliseconds since the Unix epoch (device clock).
        started_at_ms: u64,
    },
    /// Exited.
    Terminated {
        /// Exit code; 128 + n for a process killed by signal n.
        exit_code: i32,
        /// A short reason (`Completed`, `Error`, `OOMKilled`, `Killed`).
        reason: String,
        /// A sentence for people.
        message: Option<String>,
        /// When it exited, in milliseconds since the Unix epoch (device clock).
        finished_at_ms: u64,
    },
}

/// An image the desired state asks to have on the device ahead of a switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchStatus {
    /// The reference, as listed in `DesiredState::prefetch`.
    pub image: String,
    /// How far it is.
    pub state: PrefetchState,
}

/// How far a prefetched image is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrefetchState {
    /// Waiting for its turn: one image at a time, behind pods' own pulls.
    Queued,
    /// Being downloaded.
    Pulling {
        /// Bytes so far and in all (0 until known).
        progress: PullProgress,
    },
    /// Present and unpacked: a pod naming it starts with no download.
    Ready,
    /// The last attempt failed; it is tried again at `retry_at_ms`.
    Failed {
        /// A short CamelCase reason (`ErrImagePull`, `InsufficientStorage`).
        reason: String,
        /// A sentence for people.
        message: String,
        /// When the next attempt is due, in milliseconds since the Unix
        /// epoch (device clock).
        retry_at_ms: u64,
    },
}
