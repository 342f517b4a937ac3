//! Requests from the controller to one agent and their responses, on
//! `…/rpc/req` and `…/rpc/res` (not retained). Each request carries an id the
//! response repeats; a request whose answer never comes times out at the
//! caller (the device may be offline).

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::codec::Message;
use crate::signed::Signature;

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
    /// Run a command in a container: signed by the controller, because it
    /// runs code on the device (see [`SignedExec`]).
    Exec(SignedExec),
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
    /// How a command run by [`RpcCall::Exec`] ended and what it wrote.
    Exec(ExecResult),
}

/// Bytes signed before an exec request: a signature made for a desired state
/// (or anything else) is never valid for an exec, nor the other way round.
pub const SIGNED_EXEC_CONTEXT: &[u8] = b"flotilla-exec-v1\0";

/// An exec request signed by the controller, as [`crate::SignedDesired`]
/// carries desired state: the agent checks the signature against the key it
/// pinned at enrollment before it decodes the payload, so whoever can
/// publish on the broker cannot run commands in containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedExec {
    /// The [`ExecRequest`] frame (version byte and postcard), exactly as signed.
    pub payload: Vec<u8>,
    /// ed25519 signature of `SIGNED_EXEC_CONTEXT ++ payload`.
    pub signature: Signature,
}

impl SignedExec {
    /// The bytes the signature covers.
    pub fn signed_bytes(payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(SIGNED_EXEC_CONTEXT.len() + payload.len());
        bytes.extend_from_slice(SIGNED_EXEC_CONTEXT);
        bytes.extend_from_slice(payload);
        bytes
    }
}

/// A command to run in a running container, non-interactively (no input,
/// no terminal). Bound to one node, one moment and one nonce, so that a
/// captured request runs nowhere else and never twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The node that is to run it; any other refuses it.
    pub node: String,
    /// Pod name on the node.
    pub pod: String,
    /// Container name in the pod.
    pub container: String,
    /// The command and its arguments (at most [`ExecRequest::MAX_ARGS`],
    /// [`ExecRequest::MAX_ARGV_BYTES`] in all).
    pub argv: Vec<String>,
    /// Killed (SIGKILL) after this long; at most [`ExecRequest::MAX_TIMEOUT_MS`].
    pub timeout_ms: u32,
    /// When the controller signed it, milliseconds since the Unix epoch: the
    /// agent refuses it outside a window around its own clock.
    pub issued_at_ms: u64,
    /// Random, never reused: the agent remembers the nonces it ran within
    /// the window and refuses them again (replays).
    pub nonce: [u8; 16],
}

impl ExecRequest {
    /// Most arguments (the command included).
    pub const MAX_ARGS: usize = 64;
    /// Most bytes of all arguments together, a NUL after each counted.
    pub const MAX_ARGV_BYTES: usize = 2048;
    /// Longest timeout: 5 minutes.
    pub const MAX_TIMEOUT_MS: u32 = 300_000;
    /// Most bytes of each output stream sent back; the rest is counted, not sent.
    pub const MAX_OUTPUT: usize = 64 * 1024;

    /// Checks the argument caps: why `argv` is refused, or `None`.
    pub fn argv_problem(argv: &[String]) -> Option<&'static str> {
        if argv.first().is_none_or(String::is_empty) {
            return Some("empty command");
        }
        if argv.len() > Self::MAX_ARGS {
            return Some("more than 64 arguments");
        }
        if argv.iter().map(|a| a.len() + 1).sum::<usize>() > Self::MAX_ARGV_BYTES {
            return Some("arguments longer than 2048 bytes in all");
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Some("an argument contains a NUL byte");
        }
        None
    }
}

impl Message for ExecRequest {
    // Three names of at most 63 bytes, the argument cap with its length
    // prefixes (2 bytes each at most), the fixed fields: about 2.4 KiB.
    const MAX_BYTES: usize = 3 * 1024;
    const NAME: &'static str = "exec request";
}

/// How an exec'd command ended and what it wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Its end.
    pub end: ExecEnd,
    /// Its standard output, the first [`ExecRequest::MAX_OUTPUT`] bytes.
    pub stdout: Vec<u8>,
    /// Its standard error, the first [`ExecRequest::MAX_OUTPUT`] bytes.
    pub stderr: Vec<u8>,
    /// Bytes of standard output past the cap, read and dropped.
    pub stdout_cut: u64,
    /// Bytes of standard error past the cap, read and dropped.
    pub stderr_cut: u64,
}

/// How an exec'd command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecEnd {
    /// It exited with this code.
    Exited(i32),
    /// This signal ended it.
    Signaled(i32),
    /// It ran past its timeout and was killed, with what it started.
    TimedOut,
}
