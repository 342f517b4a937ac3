//! Workload manifests: parsing, validation with every problem named by its path.
//!
//! A manifest is one or more YAML (or JSON) documents shaped like Kubernetes
//! objects (`apiVersion: flotilla.dev/v1`, `kind: Workload`, `metadata`,
//! `spec`). [`parse`] reads them into [`Workload`]s — internal types that
//! reuse the wire's `ContainerSpec` so placement copies them straight into
//! desired state — or returns every problem of every document at once.
//! [`Workload::to_json`] gives the canonical form back, which `parse` reads
//! into the same value.
//!
//! Choices where Kubernetes leaves room:
//! - Strings must be strings: `value: 8080` or `labels: {v: 2}` is refused
//!   with a hint to quote it, as kubectl does, because the YAML parser does not
//!   keep a number's spelling (`1.10` would become `"1.1"`, `0x10` `"16"`).
//! - A field given as null (`command:` with nothing after it) counts as
//!   absent; for a required field that reads "required".
//! - `cpu` and `memory` accept numbers or strings, read exactly (no floating
//!   point); values finer than 1m or one byte are refused, not rounded.
//! - A YAML syntax error stops only the document it is in: documents are cut
//!   at `---` lines and parsed one by one, so the others are still checked.
//! - Volumes: `hostPath: {path}`, `emptyDir: {}` (a per-pod scratch
//!   directory) and `config: {files: [{path, content | contentBase64, mode}]}`
//!   — small files carried in the desired state, always mounted read-only. A
//!   file's `mode` is octal digits with a leading 0 (`0644`, read as text),
//!   never a number: `644` or `0o644` in YAML, or `420` in JSON, would each
//!   mean something else to someone.
//! - Probes take `exec`, `tcpSocket` or `httpGet` with numeric ports only
//!   (pods use the host's network, so there are no named ports); `httpGet`
//!   has no `host`, `scheme` or headers: it asks 127.0.0.1 over plain HTTP.

mod canonical;
mod load;
mod quantity;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_pod;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use flotilla_proto::{ContainerSpec, PodSpec, RestartPolicy, Volume};

pub use quantity::{QuantityError, format_cpu, format_memory, parse_cpu, parse_memory};

/// Grace period when the manifest gives none (as Kubernetes).
pub const DEFAULT_TERMINATION_GRACE_SECS: u32 = 30;
/// The only `apiVersion` understood.
pub const API_VERSION: &str = "flotilla.dev/v1";
/// The only `kind` understood.
pub const KIND: &str = "Workload";
/// Larger inputs are refused before parsing.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;
/// Longest image reference.
pub const MAX_IMAGE_BYTES: usize = 1024;
/// Longest working directory (Linux `PATH_MAX`).
pub const MAX_WORKING_DIR_BYTES: usize = 4096;
/// Longest host path, mount path or config file path (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Cap on the bytes of every config file of a workload together: config
/// volumes travel in each node's desired state, itself capped at 1 MiB.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;
/// Longest `httpGet.path` of a probe.
pub const MAX_PROBE_PATH_BYTES: usize = 2048;
/// Probe timing when the manifest gives none (as Kubernetes).
pub const DEFAULT_PROBE_PERIOD_SECS: u32 = 10;
/// Seconds before one probe check counts as failed, by default.
pub const DEFAULT_PROBE_TIMEOUT_SECS: u32 = 1;
/// Consecutive failures that fail a probe, by default.
pub const DEFAULT_PROBE_FAILURE_THRESHOLD: u32 = 3;
/// Permission bits of a config file when the manifest gives none.
pub const DEFAULT_CONFIG_FILE_MODE: u32 = 0o644;
/// Problems reported in full; past this they are only counted. A megabyte of
/// `args: [1, 1, …]` would otherwise make tens of megabytes of messages.
pub const MAX_REPORTED_ERRORS: usize = 1000;

/// A validated workload: what to run, and on which nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Unique name (a DNS label).
    pub name: String,
    /// Labels, checked with the proto's label rules.
    pub labels: BTreeMap<String, String>,
    /// What to run and where.
    pub spec: WorkloadSpec,
}

/// The `spec` of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Labels a node must all have to run the workload; empty means every node.
    pub node_selector: BTreeMap<String, String>,
    /// What the agent does when a container exits.
    pub restart_policy: RestartPolicy,
    /// Seconds between SIGTERM and SIGKILL when a container is stopped.
    pub termination_grace_secs: u32,
    /// Volumes the containers can mount.
    pub volumes: Vec<Volume>,
    /// At least one container, names unique; CPU in millis, memory in bytes.
    pub containers: Vec<ContainerSpec>,
}

impl Workload {
    /// Whether a node with these labels is selected by the node selector.
    pub fn matches(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.spec
            .node_selector
            .iter()
            .all(|(k, v)| node_labels.get(k) == Some(v))
    }

    /// The pod this workload runs, under the name placement gave it.
    pub fn pod_spec(&self, pod_name: &str) -> PodSpec {
        PodSpec {
            name: pod_name.to_owned(),
            workload: self.name.clone(),
            restart_policy: self.spec.restart_policy,
            termination_grace_secs: self.spec.termination_grace_secs,
            volumes: self.spec.volumes.clone(),
            containers: self.spec.containers.clone(),
        }
    }
}

/// One problem in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// 1-based document number, counting empty documents; 0 when the problem
    /// is with the input as a whole (too large, no document at all).
    pub document: usize,
    /// Dotted path of the field, e.g. `spec.containers[0].image`; empty for
    /// the document (or input) itself.
    pub path: String,
    /// What is wrong, lowercase.
    pub message: String,
    /// Whether the input held more than one document, in which case Display
    /// names the document.
    pub multi_document: bool,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.multi_document && self.document > 0 {
            write!(f, "document {}: ", self.document)?;
        }
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// Every problem found in a manifest, in document then field order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<FieldError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

/// Reads and validates a manifest of one or more documents. Either every
/// workload is valid and all are returned, in order, or nothing is and every
/// problem found is returned.
pub fn parse(text: &str) -> Result<Vec<Workload>, ManifestErrors> {
    let whole = |message: String| {
        ManifestErrors(vec![FieldError {
            document: 0,
            path: String::new(),
            message,
            multi_document: false,
        }])
    };
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(whole(format!(
            "manifest is too large: {} bytes, at most {MAX_MANIFEST_BYTES}",
            text.len()
        )));
    }
    let mut report = Report::default();
    let mut workloads = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut non_empty = 0;
    for doc in load::documents(text) {
        let value = match doc.value {
            Ok(serde_norway::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                non_empty += 1;
                report.push(doc.number, String::new(), e.to_string());
                continue;
            }
        };
        non_empty += 1;
        let mut problems = validate::Problems::with_room(report.room());
        let workload = validate::workload(&value, &mut problems);
        let valid = problems.is_empty();
        report.dropped += problems.dropped;
        for p in problems.list {
            report.push(doc.number, p.path, p.message);
        }
        if !workload.name.is_empty() {
            if let Some(first) = names.get(&workload.name) {
                let message = format!(
                    "duplicate workload name {:?} (also in document {first})",
                    workload.name
                );
                report.push(doc.number, "metadata.name".into(), message);
                continue;
            }
            names.insert(workload.name.clone(), doc.number);
        }
        if valid {
            workloads.push(workload);
        }
    }
    if non_empty == 0 {
        return Err(whole(
            "no workload found: the input has no YAML document".into(),
        ));
    }
    let Report {
        mut errors,
        dropped,
    } = report;
    if errors.is_empty() && dropped == 0 {
        return Ok(workloads);
    }
    for e in &mut errors {
        e.multi_document = non_empty > 1;
    }
    if dropped > 0 {
        errors.push(FieldError {
            document: 0,
            path: String::new(),
            message: format!("{dropped} more problems not shown"),
            multi_document: false,
        });
    }
    Err(ManifestErrors(errors))
}

/// The problems of a whole input, kept up to [`MAX_REPORTED_ERRORS`].
#[derive(Default)]
struct Report {
    errors: Vec<FieldError>,
    dropped: usize,
}

impl Report {
    fn room(&self) -> usize {
        MAX_REPORTED_ERRORS.saturating_sub(self.errors.len())
    }

    fn push(&mut self, document: usize, path: String, message: String) {
        if self.room() == 0 {
            self.dropped += 1;
            return;
        }
        self.errors.push(FieldError {
            document,
            path,
            message,
            multi_document: false,
        });
    }
}
