//! A container's `securityContext` (Kubernetes' shape: `privileged`,
//! `capabilities: {add, drop}`, `seccompProfile: {type}`,
//! `readOnlyRootFilesystem`) and capability lists, which namespaces use too.

use std::collections::BTreeSet;

use flotilla_proto::SecurityContext;
use serde_norway::Value;

use super::super::security::capability;
use super::{Check, field, optional, shown};

/// Most names in one capability list (there are 41 capabilities).
const MAX_CAPABILITIES: usize = 64;

impl Check<'_> {
    /// The security context, or `None` when it asks for nothing beyond
    /// the hardened default (absent, `{}`, `privileged: false`,
    /// `RuntimeDefault`…), so that such a container's spec, and its id on
    /// the device, stays what it was before security contexts existed.
    pub(super) fn security_context(&mut self, path: &str, v: &Value) -> Option<SecurityContext> {
        let fields = [
            "privileged",
            "capabilities",
            "seccompProfile",
            "readOnlyRootFilesystem",
        ];
        let m = self.map(path, v, &fields)?;
        let mut s = SecurityContext {
            privileged: self.flag(&field(path, "privileged"), optional(m, "privileged")),
            read_only_root_filesystem: self.flag(
                &field(path, "readOnlyRootFilesystem"),
                optional(m, "readOnlyRootFilesystem"),
            ),
            ..SecurityContext::default()
        };
        if let Some(caps) = optional(m, "capabilities") {
            let at = field(path, "capabilities");
            if let Some(c) = self.map(&at, caps, &["add", "drop"]) {
                s.add_capabilities = self.capabilities(&field(&at, "add"), optional(c, "add"));
                s.drop_capabilities = self.capabilities(&field(&at, "drop"), optional(c, "drop"));
            }
        }
        if let Some(profile) = optional(m, "seccompProfile") {
            let at = field(path, "seccompProfile");
            if let Some(p) = self.map(&at, profile, &["type"]) {
                if let Some(t) = self.required_str(&at, p, "type") {
                    match t {
                        "RuntimeDefault" => {}
                        "Unconfined" => s.seccomp_unconfined = true,
                        other => {
                            let msg = format!(
                                "{} is not supported (expected RuntimeDefault or Unconfined)",
                                shown(other)
                            );
                            self.err(&field(&at, "type"), msg);
                        }
                    }
                }
            }
        }
        (s != SecurityContext::default()).then_some(s)
    }

    /// A boolean field; absent is false.
    pub(super) fn flag(&mut self, path: &str, v: Option<&Value>) -> bool {
        match v {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.expected(path, "true or false", other);
                false
            }
        }
    }

    /// A list of capability names (`NET_ADMIN`, `CAP_NET_ADMIN`, any case,
    /// or `ALL`), each known and listed once, in the wire's spelling.
    pub(super) fn capabilities(&mut self, path: &str, v: Option<&Value>) -> Vec<String> {
        let Some(v) = v else { return Vec::new() };
        let Value::Sequence(items) = v else {
            self.expected(path, "a list of capability names", v);
            return Vec::new();
        };
        if items.len() > MAX_CAPABILITIES {
            let msg = format!("{} names, at most {MAX_CAPABILITIES}", items.len());
            self.err(path, msg);
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let Some(name) = self.str(&at, item) else {
                continue;
            };
            match capability(name) {
                None => {
                    let msg = format!(
                        "{} is not a capability: expected a name such as NET_ADMIN or \
                         CAP_SYS_TIME (capabilities(7)), or ALL",
                        shown(name)
                    );
                    self.err(&at, msg);
                }
                Some(cap) if !seen.insert(cap) => {
                    self.err(&at, format!("{cap} is listed twice"));
                }
                Some(cap) => out.push(cap.to_owned()),
            }
        }
        out
    }
}
