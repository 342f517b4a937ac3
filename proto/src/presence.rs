//! Agent → controller, retained, and the agent's last will: whether the agent
//! is connected.

use alloc::string::String;

use serde::{Deserialize, Serialize};

use crate::codec::Message;

/// The retained presence of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Presence {
    /// The agent is connected.
    Online {
        /// Random id of this agent process; a new one means the agent restarted.
        instance: u64,
        /// The agent's version.
        agent_version: String,
    },
    /// The agent disconnected (its last will, or a clean shutdown).
    Offline,
}

impl Message for Presence {
    const MAX_BYTES: usize = 1024;
    const NAME: &'static str = "presence";
}
