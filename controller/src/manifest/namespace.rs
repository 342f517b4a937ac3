//! Namespaces as privilege policy: which of the privileges a container's
//! `securityContext` may ask for (privileged, added capabilities, no
//! seccomp filter) the workloads of a namespace are granted. A workload
//! asks; only its namespace can allow, and `default`, which always exists
//! and cannot be written, allows nothing.
//!
//! Taking privileges away (dropping capabilities, a read-only root) is
//! always allowed. Namespaces group workloads for policy only: workload
//! names stay unique across the fleet.

use std::borrow::Cow;
use std::collections::BTreeMap;

use flotilla_proto::SecurityContext;
use serde_json::{Value, json};

use super::security::ALL;
use super::{API_VERSION, Workload};

/// The `kind` of a namespace document.
pub const NAMESPACE_KIND: &str = "Namespace";
/// The namespace of a workload that names none; it allows nothing.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A validated namespace: what its workloads' containers may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Its name (a DNS label, not `default`).
    pub name: String,
    /// Privileged containers (and with them every capability and no
    /// seccomp filter: a privileged container has both anyway).
    pub allow_privileged: bool,
    /// Capabilities containers may add, upper case without `CAP_`; `ALL`
    /// allows every one (and `add: [ALL]`).
    pub allowed_capabilities: Vec<String>,
    /// `seccompProfile: {type: Unconfined}`.
    pub allow_unconfined_seccomp: bool,
}

/// A privilege a workload asks for and its namespace does not grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The workload.
    pub workload: String,
    /// The field that asks, e.g. `spec.containers[0].securityContext.privileged`.
    pub path: String,
    /// Why it is refused, naming the namespace.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "workload {:?}: {}: {}",
            self.workload, self.path, self.message
        )
    }
}

impl Namespace {
    /// The implicit `default` namespace: nothing allowed.
    pub fn default_namespace() -> Self {
        Self::empty(DEFAULT_NAMESPACE)
    }

    /// A namespace named `name` that allows nothing.
    pub fn empty(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            allow_privileged: false,
            allowed_capabilities: Vec::new(),
            allow_unconfined_seccomp: false,
        }
    }

    /// The canonical document, to store and to print: every field written.
    pub fn to_json(&self) -> Value {
        json!({
            "apiVersion": API_VERSION,
            "kind": NAMESPACE_KIND,
            "metadata": {"name": self.name},
            "spec": {
                "allowPrivileged": self.allow_privileged,
                "allowedCapabilities": self.allowed_capabilities,
                "allowUnconfinedSeccomp": self.allow_unconfined_seccomp,
            },
        })
    }

    /// Whether containers here may add capability `cap` (a wire name).
    pub fn allows_capability(&self, cap: &str) -> bool {
        self.allow_privileged
            || self
                .allowed_capabilities
                .iter()
                .any(|c| c == ALL || c == cap)
    }

    /// What `w`, in this namespace, asks for and is not granted, in
    /// container then field order; empty when it may run.
    pub fn violations(&self, w: &Workload) -> Vec<Violation> {
        let mut out = Vec::new();
        for (i, c) in w.spec.containers.iter().enumerate() {
            let Some(s) = &c.security_context else {
                continue;
            };
            let at = format!("spec.containers[{i}].securityContext");
            let mut refuse = |path: String, message: String| {
                out.push(Violation {
                    workload: w.name.clone(),
                    path,
                    message,
                });
            };
            self.check(s, &at, &mut refuse);
        }
        out
    }

    fn check(&self, s: &SecurityContext, at: &str, refuse: &mut impl FnMut(String, String)) {
        let ns = &self.name;
        if s.privileged && !self.allow_privileged {
            refuse(
                format!("{at}.privileged"),
                format!("namespace {ns:?} does not allow privileged containers"),
            );
        }
        // Indices match the manifest's list: duplicates are refused when
        // it is read, so nothing was merged.
        for (j, cap) in s.add_capabilities.iter().enumerate() {
            if !self.allows_capability(cap) {
                let what = if cap == ALL {
                    "every capability (ALL)".to_owned()
                } else {
                    format!("capability {cap}")
                };
                refuse(
                    format!("{at}.capabilities.add[{j}]"),
                    format!("namespace {ns:?} does not allow adding {what}"),
                );
            }
        }
        if s.seccomp_unconfined && !(self.allow_unconfined_seccomp || self.allow_privileged) {
            refuse(
                format!("{at}.seccompProfile.type"),
                format!("namespace {ns:?} does not allow Unconfined seccomp"),
            );
        }
    }
}

/// The namespace `name` among `stored`, `default` included; `None` when
/// there is no such namespace.
pub fn lookup<'a>(
    stored: &'a BTreeMap<String, Namespace>,
    name: &str,
) -> Option<Cow<'a, Namespace>> {
    match stored.get(name) {
        Some(ns) => Some(Cow::Borrowed(ns)),
        None if name == DEFAULT_NAMESPACE => Some(Cow::Owned(Namespace::default_namespace())),
        None => None,
    }
}

/// What `w` asks for that its namespace, among `namespaces`, does not
/// grant; a namespace that does not exist grants nothing and is named.
pub fn violations(namespaces: &BTreeMap<String, Namespace>, w: &Workload) -> Vec<Violation> {
    match lookup(namespaces, &w.namespace) {
        Some(ns) => ns.violations(w),
        None => vec![Violation {
            workload: w.name.clone(),
            path: "metadata.namespace".into(),
            message: format!(
                "namespace {:?} not found: apply a kind: Namespace of that name first",
                w.namespace
            ),
        }],
    }
}
