//! Container security contexts on the controller's side: the capability
//! names a manifest may use, their one spelling on the wire, and the
//! canonical form of a `securityContext`.
//! The names themselves are `flotilla_proto::CAPABILITIES`, shared with
//! the agent.

use flotilla_proto::SecurityContext;
use serde_json::{Value, json};

pub use flotilla_proto::CAPABILITIES;

/// Every capability at once, in `capabilities.add`/`drop` and in a
/// namespace's `allowedCapabilities`.
pub const ALL: &str = "ALL";

/// Longest capability name accepted before it is looked up (`CAP_` plus the
/// longest name, with room): longer input is refused without being copied.
const MAX_NAME_BYTES: usize = 32;

/// A capability name as the wire carries it — upper case, no `CAP_` — or
/// `None` when it is not one. `net_admin`, `NET_ADMIN` and `CAP_NET_ADMIN`
/// are the same capability (containerd upper-cases names too); `ALL` is
/// kept as is.
pub fn capability(name: &str) -> Option<&'static str> {
    if name.len() > MAX_NAME_BYTES {
        return None;
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if bare == ALL {
        return Some(ALL);
    }
    CAPABILITIES.iter().copied().find(|c| *c == bare)
}

/// The canonical `securityContext` of a container: every field written out.
pub fn to_json(s: &SecurityContext) -> Value {
    json!({
        "privileged": s.privileged,
        "capabilities": {"add": s.add_capabilities, "drop": s.drop_capabilities},
        "seccompProfile": {"type": if s.seccomp_unconfined { "Unconfined" } else { "RuntimeDefault" }},
        "readOnlyRootFilesystem": s.read_only_root_filesystem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_in_any_spelling_and_written_in_one() {
        assert_eq!(capability("NET_ADMIN"), Some("NET_ADMIN"));
        assert_eq!(capability("CAP_NET_ADMIN"), Some("NET_ADMIN"));
        assert_eq!(capability("cap_sys_time"), Some("SYS_TIME"));
        assert_eq!(capability("all"), Some("ALL"));
        assert_eq!(capability("CAP_ALL"), Some("ALL"));
        assert_eq!(capability("NET_ADMINX"), None);
        assert_eq!(capability("CAP_"), None);
        assert_eq!(capability(""), None);
        assert_eq!(capability(&"A".repeat(10_000)), None);
    }
}
