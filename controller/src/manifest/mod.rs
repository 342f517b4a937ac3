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
//! - `securityContext` takes `privileged`, `capabilities: {add, drop}`
//!   (names with or without `CAP_`, any case, or `ALL`; stored upper case
//!   without `CAP_`), `seccompProfile: {type: RuntimeDefault | Unconfined}`
//!   and `readOnlyRootFilesystem`; one that asks for nothing beyond the
//!   default is no security context at all. Whether the workload's
//!   namespace grants what it asks is decided at apply, against the
//!   stored namespaces ([`namespace`]), not here.

mod canonical;
mod load;
pub mod namespace;
mod quantity;
pub mod security;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_pod;
#[cfg(test)]
mod tests_scheduling;
#[cfg(test)]
mod tests_secret;
#[cfg(test)]
mod tests_security;

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
/// Seconds a `replicas` pod stays on a NotReady node before it is moved,
/// when the manifest gives none (Kubernetes' default eviction delay).
pub const DEFAULT_TOLERATION_SECS: u32 = 300;
/// Most replicas a workload may ask for.
pub const MAX_REPLICAS: u32 = 100_000;
/// Architectures `spec.architectures` may name (OCI `GOARCH` names).
pub const ARCHITECTURES: &[&str] = &[
    "amd64", "arm64", "arm", "386", "riscv64", "ppc64le", "s390x", "mips64le", "loong64",
];

/// Problems reported in full; past this they are only counted. A megabyte of
/// `args: [1, 1, …]` would otherwise make tens of megabytes of messages.
pub const MAX_REPORTED_ERRORS: usize = 1000;

/// A validated workload: what to run, and on which nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Unique name (a DNS label).
    pub name: String,
    /// The namespace whose policy decides which privileges its containers
    /// may ask for (`default` when the manifest names none). Not part of
    /// the name: names stay unique across namespaces.
    pub namespace: String,
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
    /// Resource requests by container name, for the containers that give
    /// any. They only guide placement, so they stay out of the wire's
    /// `ContainerSpec`.
    pub requests: BTreeMap<String, Requests>,
    /// How many pods, and where.
    pub scheduling: Scheduling,
    /// How a new revision reaches the nodes; `None`: all at once.
    pub strategy: Option<Strategy>,
    /// Secrets with registry credentials for the pods' pulls, as unsealed
    /// references (sealed per node when a desired state is encoded).
    pub image_pull_secrets: Vec<flotilla_proto::SealedSecret>,
}

/// A number of nodes, or a percentage of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// This many nodes.
    Count(u32),
    /// This percentage of the nodes (1–100), rounded up.
    Percent(u32),
}

impl Amount {
    /// How many of `total` nodes, at most `total`.
    pub fn of(self, total: usize) -> usize {
        match self {
            Self::Count(n) => (n as usize).min(total),
            Self::Percent(p) => (total * p as usize).div_ceil(100).min(total),
        }
    }
}

/// A staged rollout: the nodes switch to a new revision in waves, each
/// after the one before is healthy; too many failures roll it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strategy {
    /// How many nodes run the new revision at the end of each wave
    /// (cumulative); a last wave of every node is implied.
    pub waves: Vec<Amount>,
    /// Nodes switched but not yet healthy, at most, at any time.
    pub max_unavailable: Amount,
    /// A node is healthy once the new revision's pods are Ready this long.
    pub healthy_secs: u32,
    /// Failed nodes that stop the rollout and roll it back.
    pub failure_threshold: Amount,
    /// A node not healthy this long after it switched has failed.
    pub progress_deadline_secs: u32,
    /// A wave's nodes download the new revision's images first, their pods
    /// unchanged, and each switches once it has them.
    pub prefetch: bool,
    /// A node still downloading this long switches anyway (and pulls as
    /// it would without a prefetch).
    pub prefetch_timeout_secs: u32,
}

/// Defaults of a strategy's fields.
pub const DEFAULT_HEALTHY_SECS: u32 = 30;
/// Seconds a node has to become healthy, by default.
pub const DEFAULT_PROGRESS_DEADLINE_SECS: u32 = 300;
/// Seconds a node may spend downloading before it switches anyway, by default.
pub const DEFAULT_PREFETCH_TIMEOUT_SECS: u32 = 1800;

/// What a container asks the scheduler to reserve on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requests {
    /// Thousandths of a CPU.
    pub cpu_millis: Option<u32>,
    /// Bytes of memory.
    pub memory_bytes: Option<u64>,
}

/// How many pods a workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// One pod, named after the workload, on every node that matches (the
    /// default when neither `everyNode` nor `replicas` is given).
    #[default]
    EveryNode,
    /// This many pods, on nodes the scheduler picks, at most one per node.
    Replicas(u32),
}

/// Where a workload's pods may go, besides `nodeSelector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduling {
    /// Every node, or a number of replicas.
    pub placement: Placement,
    /// Node architectures (OCI names) the images run on; empty means any.
    pub architectures: Vec<String>,
    /// Label key whose values the replicas are spread across (`site`).
    pub spread_by: Option<String>,
    /// Seconds a replica stays on a NotReady node before it is moved.
    pub toleration_secs: u32,
}

impl Default for Scheduling {
    fn default() -> Self {
        Self {
            placement: Placement::EveryNode,
            architectures: Vec::new(),
            spread_by: None,
            toleration_secs: DEFAULT_TOLERATION_SECS,
        }
    }
}

impl Workload {
    /// Whether a node with these labels is selected by the node selector.
    pub fn matches(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.spec
            .node_selector
            .iter()
            .all(|(k, v)| node_labels.get(k) == Some(v))
    }

    /// What one pod of the workload asks of its node: the sum of its
    /// containers' requests (cpu millis, memory bytes).
    pub fn total_requests(&self) -> (u64, u64) {
        self.spec.requests.values().fold((0, 0), |(cpu, mem), r| {
            (
                cpu + u64::from(r.cpu_millis.unwrap_or(0)),
                mem.saturating_add(r.memory_bytes.unwrap_or(0)),
            )
        })
    }

    /// Whether another workload differs from this one only in where its
    /// pods go (so the pods themselves, and the revision, stay the same).
    pub fn same_template(&self, other: &Workload) -> bool {
        let (a, b) = (&self.spec, &other.spec);
        a.restart_policy == b.restart_policy
            && a.termination_grace_secs == b.termination_grace_secs
            && a.volumes == b.volumes
            && a.containers == b.containers
            && a.image_pull_secrets == b.image_pull_secrets
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
            image_pull_secrets: self.spec.image_pull_secrets.clone(),
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

/// What a manifest holds: workloads and Secrets, each in document order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Objects {
    /// The workloads.
    pub workloads: Vec<Workload>,
    /// The Secrets (`kind: Secret`).
    pub secrets: Vec<crate::secrets::Secret>,
    /// The namespaces (`kind: Namespace`).
    pub namespaces: Vec<namespace::Namespace>,
}

/// Reads and validates a manifest of one or more documents. Either every
/// workload is valid and all are returned, in order, or nothing is and every
/// problem found is returned. Secrets in it are checked and left out: use
/// [`parse_objects`] to get them.
pub fn parse(text: &str) -> Result<Vec<Workload>, ManifestErrors> {
    parse_objects(text).map(|o| o.workloads)
}

/// [`parse`], Secrets included.
pub fn parse_objects(text: &str) -> Result<Objects, ManifestErrors> {
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
    let mut secrets = SecretDocs::default();
    let mut namespaces = NamespaceDocs::default();
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
        if validate::is_secret(&value) {
            secrets.take(&value, doc.number, &mut report);
            continue;
        }
        if validate::is_namespace(&value) {
            namespaces.take(&value, doc.number, &mut report);
            continue;
        }
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
        return Ok(Objects {
            workloads,
            secrets: secrets.valid,
            namespaces: namespaces.valid,
        });
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

/// The Secret documents of an input: the valid ones, and every name seen.
#[derive(Default)]
struct SecretDocs {
    valid: Vec<crate::secrets::Secret>,
    names: HashMap<String, usize>,
}

impl SecretDocs {
    fn take(&mut self, value: &serde_norway::Value, number: usize, report: &mut Report) {
        let mut problems = validate::Problems::with_room(report.room());
        let secret = validate::secret(value, &mut problems);
        let valid = problems.is_empty();
        report.dropped += problems.dropped;
        for p in problems.list {
            report.push(number, p.path, p.message);
        }
        if !secret.name.is_empty() {
            if let Some(first) = self.names.get(&secret.name) {
                let message = format!(
                    "duplicate secret name {:?} (also in document {first})",
                    secret.name
                );
                report.push(number, "metadata.name".into(), message);
                return;
            }
            self.names.insert(secret.name.clone(), number);
        }
        if valid {
            self.valid.push(secret);
        }
    }
}

/// The namespace documents of an input: the valid ones, and every name seen.
#[derive(Default)]
struct NamespaceDocs {
    valid: Vec<namespace::Namespace>,
    names: HashMap<String, usize>,
}

impl NamespaceDocs {
    fn take(&mut self, value: &serde_norway::Value, number: usize, report: &mut Report) {
        let mut problems = validate::Problems::with_room(report.room());
        let ns = validate::namespace(value, &mut problems);
        let valid = problems.is_empty();
        report.dropped += problems.dropped;
        for p in problems.list {
            report.push(number, p.path, p.message);
        }
        if !ns.name.is_empty() {
            if let Some(first) = self.names.get(&ns.name) {
                let message = format!(
                    "duplicate namespace name {:?} (also in document {first})",
                    ns.name
                );
                report.push(number, "metadata.name".into(), message);
                return;
            }
            self.names.insert(ns.name.clone(), number);
        }
        if valid {
            self.valid.push(ns);
        }
    }
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
