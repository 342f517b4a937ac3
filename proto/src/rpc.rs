//! Requests from the controller to one agent and their responses, on
//! `…/rpc/req` and `…/rpc/res` (not retained). Each request carries an id the
//! response repeats; a request whose answer never comes times out at the
//! caller (the device may be offline).

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::codec::Message;

/// A request to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcRequest {
    /// Chosen by the caller, repeated in the response.
    pub id: u64,
    /// What is asked.
    pub call: RpcCall,
}

impl Message for RpcRequest {
    const MAX_BYTES: usize = 4 * 1024;
    const NAME: &'static str = "rpc request";
}

/// What can be asked of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcCall {
    /// A piece of a container's log.
    Logs(LogsRequest),
}

/// Which part of a container's log to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    /// Pod name on the node.
    pub pod: String,
    /// Container name in the pod.
    pub container: String,
    /// Without a cursor: start this many lines before the end (all when `None`).
    pub tail_lines: Option<u32>,
    /// Continue where a previous response ended (following a log).
    pub from: Option<LogCursor>,
    /// Send at most this many bytes (the agent caps it further).
    pub max_bytes: u32,
}

/// A position in a container's log that survives rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCursor {
    /// Identifies the log file (changes when the log is rotated).
    pub file_id: u64,
    /// Byte offset in that file.
    pub offset: u64,
}

/// An agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcResponse {
    /// The request's id.
    pub id: u64,
    /// The answer.
    pub result: RpcResult,
}

impl Message for RpcResponse {
    const MAX_BYTES: usize = 256 * 1024;
    const NAME: &'static str = "rpc response";
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcResult {
    /// Log bytes and where to continue.
    Logs {
        /// The bytes, as the container wrote them.
        data: Vec<u8>,
        /// Where the next request should start.
        next: LogCursor,
    },
    /// The request could not be served.
    Error {
        /// Why, for people.
        message: String,
    },
}
