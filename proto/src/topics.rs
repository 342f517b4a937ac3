//! MQTT topic names. `{prefix}/node/{node}/{kind}`; the prefix defaults to
//! `flotilla/v1` and is configurable so several fleets can share a broker.

use alloc::format;
use alloc::string::String;

/// The default topic root.
pub const DEFAULT_PREFIX: &str = "flotilla/v1";

/// Which per-node topic a topic name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// Controller → agent, retained: the node's whole desired state.
    Desired,
    /// Agent → controller, retained: the node's status.
    Status,
    /// Agent (and its last will) → controller, retained: online or offline.
    Presence,
    /// Controller → agent: requests (logs, describe, exec).
    RpcRequest,
    /// Agent → controller: responses to requests.
    RpcResponse,
}

impl TopicKind {
    const ALL: [TopicKind; 5] = [
        Self::Desired,
        Self::Status,
        Self::Presence,
        Self::RpcRequest,
        Self::RpcResponse,
    ];

    /// The last topic level for this kind.
    pub const fn suffix(self) -> &'static str {
        match self {
            Self::Desired => "desired",
            Self::Status => "status",
            Self::Presence => "presence",
            Self::RpcRequest => "rpc/req",
            Self::RpcResponse => "rpc/res",
        }
    }
}

/// Topic names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Topics {
    /// Topics under `prefix` (a trailing `/` is ignored).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: String::from(prefix.trim_end_matches('/')),
        }
    }

    /// The prefix without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The topic of `kind` for `node`.
    pub fn node(&self, node: &str, kind: TopicKind) -> String {
        format!("{}/node/{}/{}", self.prefix, node, kind.suffix())
    }

    /// `…/node/{node}/desired`.
    pub fn desired(&self, node: &str) -> String {
        self.node(node, TopicKind::Desired)
    }

    /// `…/node/{node}/status`.
    pub fn status(&self, node: &str) -> String {
        self.node(node, TopicKind::Status)
    }

    /// `…/node/{node}/presence`.
    pub fn presence(&self, node: &str) -> String {
        self.node(node, TopicKind::Presence)
    }

    /// A subscription filter for `kind` of every node: `…/node/+/{kind}`.
    pub fn all_nodes(&self, kind: TopicKind) -> String {
        format!("{}/node/+/{}", self.prefix, kind.suffix())
    }

    /// Splits a topic into its node name and kind; `None` for any other topic.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<(&'t str, TopicKind)> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/node/")?;
        let (node, suffix) = rest.split_once('/')?;
        if node.is_empty() {
            return None;
        }
        let kind = TopicKind::ALL.into_iter().find(|k| k.suffix() == suffix)?;
        Some((node, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_parse() {
        let t = Topics::new("flotilla/v1/");
        assert_eq!(t.desired("pi-1"), "flotilla/v1/node/pi-1/desired");
        assert_eq!(
            t.node("pi-1", TopicKind::RpcResponse),
            "flotilla/v1/node/pi-1/rpc/res"
        );
        assert_eq!(t.all_nodes(TopicKind::Status), "flotilla/v1/node/+/status");
        for kind in TopicKind::ALL {
            assert_eq!(t.parse(&t.node("pi-1", kind)), Some(("pi-1", kind)));
        }
        assert_eq!(t.parse("flotilla/v1/node//status"), None);
        assert_eq!(t.parse("flotilla/v1/node/pi-1/other"), None);
        assert_eq!(t.parse("other/v1/node/pi-1/status"), None);
        assert_eq!(t.parse("flotilla/v1/node/pi-1/status/extra"), None);
    }
}
