//! Flotilla's wire protocol: the messages the controller and the agents exchange
//! over MQTT, their postcard codec, the topic names, and the name rules both
//! sides check. No I/O here: this crate is `no_std` + `alloc` so that any
//! program — the controller, the agent, a test, a simulated fleet — speaks
//! exactly the same bytes.
#![no_std]

extern crate alloc;

mod capabilities;
mod codec;
mod desired;
mod names;
mod presence;
mod rpc;
mod signed;
mod status;
mod topics;

pub use capabilities::CAPABILITIES;
pub use codec::{DecodeError, EncodeError, Message, WIRE_VERSION, decode, encode};
pub use desired::{
    ConfigFile, ContainerSpec, DesiredState, EnvVar, PodSpec, PrefetchPullSecrets, Probe,
    ProbeAction, Resources, RestartPolicy, SealedSecret, SecretFiles, SecretItem, SecurityContext,
    Volume, VolumeMount, VolumeSource, sealed_secret_context,
};
pub use names::{MAX_NAME, NameError, check_label_key, check_label_value, check_name};
pub use presence::Presence;
pub use rpc::{
    ExecEnd, ExecRequest, ExecResult, LogCursor, LogsRequest, RpcCall, RpcRequest, RpcResponse,
    RpcResult, SIGNED_EXEC_CONTEXT, SignedExec,
};
pub use signed::{SIGNATURE_LEN, SIGNED_DESIRED_CONTEXT, Signature, SignedDesired};
pub use status::{
    ContainerState, ContainerStatus, Label, NodeHealth, NodeInfo, NodeStatus, PodPhase, PodStatus,
    PrefetchState, PrefetchStatus, PullProgress,
};
pub use topics::{DEFAULT_PREFIX, TopicKind, Topics};
