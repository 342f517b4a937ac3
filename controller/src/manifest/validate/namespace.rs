//! `kind: Namespace` documents: `metadata.name` and what the namespace's
//! workloads may ask for (`spec.allowPrivileged`, `spec.allowedCapabilities`,
//! `spec.allowUnconfinedSeccomp`).

use serde_norway::Value;

use super::super::API_VERSION;
use super::super::namespace::{DEFAULT_NAMESPACE, NAMESPACE_KIND, Namespace};
use super::{Check, Problems, optional, shown};

/// Whether a document is a namespace (by its `kind`), so that it is
/// checked as one.
pub fn is_namespace(doc: &Value) -> bool {
    doc.get("kind").and_then(Value::as_str) == Some(NAMESPACE_KIND)
}

/// Checks a namespace document. As for workloads, the namespace is
/// returned even when problems were found, its `name` empty unless the
/// name itself was valid.
pub fn namespace(doc: &Value, problems: &mut Problems) -> Namespace {
    let mut c = Check { problems };
    let mut ns = Namespace::empty("");
    let Some(root) = c.map("", doc, &["apiVersion", "kind", "metadata", "spec"]) else {
        return ns;
    };
    if let Some(v) = c.required_str("", root, "apiVersion") {
        // Kubernetes' spelling too, so that its Namespace objects apply.
        if v != API_VERSION && v != "v1" {
            let msg = format!("{} is not supported (expected {API_VERSION})", shown(v));
            c.err("apiVersion", msg);
        }
    }
    if let Some(meta) = c.required("", root, "metadata") {
        if let Some(meta) = c.map("metadata", meta, &["name", "labels"]) {
            if let Some(name) = c.required_str("metadata", meta, "name") {
                if name == DEFAULT_NAMESPACE {
                    // Privileges come only from a namespace made for them:
                    // every workload that names none is in `default`.
                    let msg = format!(
                        "{DEFAULT_NAMESPACE:?} always exists and allows nothing; \
                         give privileged workloads a namespace of their own"
                    );
                    c.err("metadata.name", msg);
                } else if c.name("metadata.name", name) {
                    ns.name = name.to_owned();
                }
            }
            // Accepted for Kubernetes' sake, not kept.
            c.labels("metadata.labels", optional(meta, "labels"));
        }
    }
    // A namespace without a spec allows nothing, as Kubernetes' has none.
    let Some(spec) = optional(root, "spec") else {
        return ns;
    };
    let fields = [
        "allowPrivileged",
        "allowedCapabilities",
        "allowUnconfinedSeccomp",
    ];
    if let Some(spec) = c.map("spec", spec, &fields) {
        ns.allow_privileged = c.flag("spec.allowPrivileged", optional(spec, "allowPrivileged"));
        ns.allowed_capabilities = c.capabilities(
            "spec.allowedCapabilities",
            optional(spec, "allowedCapabilities"),
        );
        ns.allow_unconfined_seccomp = c.flag(
            "spec.allowUnconfinedSeccomp",
            optional(spec, "allowUnconfinedSeccomp"),
        );
    }
    ns
}
