//! Checking one manifest document, read as a YAML value, into a `Workload`,
//! recording every problem with the path of the field it concerns.

mod namespace;
mod placement;
mod probes;
mod secret;
mod security;
mod volumes;

use std::collections::{BTreeMap, BTreeSet};

use flotilla_proto::{
    ContainerSpec, EnvVar, Resources, RestartPolicy, check_label_key, check_label_value, check_name,
};
use serde_norway::{Mapping, Value};

pub use self::namespace::{is_namespace, namespace};
use self::probes::ProbeKind;
pub use self::secret::{is_secret, secret};
use self::volumes::Declared;
use super::quantity::{parse_cpu, parse_memory};
use super::{
    API_VERSION, DEFAULT_TERMINATION_GRACE_SECS, KIND, MAX_IMAGE_BYTES, MAX_WORKING_DIR_BYTES,
    Requests, Scheduling, Workload, WorkloadSpec,
};

/// One problem found in a document: the field's path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field; empty for the document itself.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Problems found in a document, at most as many as the caller has room for.
#[derive(Debug)]
pub struct Problems {
    /// The problems recorded, in field order.
    pub list: Vec<Problem>,
    /// How many more were found past the room given.
    pub dropped: usize,
    room: usize,
}

impl Problems {
    /// Room for `room` problems; more are only counted.
    pub fn with_room(room: usize) -> Self {
        Self {
            list: Vec::new(),
            dropped: 0,
            room,
        }
    }

    /// Whether any problem was found, recorded or not.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty() && self.dropped == 0
    }
}

/// Checks one non-empty document. The workload is returned even when
/// problems were found (with defaults where fields were bad) so the caller
/// can still compare names across documents; its `name` is empty unless the
/// name itself was valid.
pub fn workload(doc: &Value, problems: &mut Problems) -> Workload {
    let mut c = Check { problems };
    let mut w = Workload {
        name: String::new(),
        namespace: super::namespace::DEFAULT_NAMESPACE.to_owned(),
        labels: BTreeMap::new(),
        spec: WorkloadSpec {
            node_selector: BTreeMap::new(),
            restart_policy: RestartPolicy::default(),
            termination_grace_secs: DEFAULT_TERMINATION_GRACE_SECS,
            volumes: Vec::new(),
            containers: Vec::new(),
            requests: BTreeMap::new(),
            scheduling: Scheduling::default(),
            strategy: None,
            image_pull_secrets: Vec::new(),
        },
    };
    let Some(root) = c.map("", doc, &["apiVersion", "kind", "metadata", "spec"]) else {
        return w;
    };
    // Under another apiVersion or kind the rest follows another schema (a
    // Kubernetes Deployment, say): listing its fields as unknown would bury
    // the one problem that matters.
    let mut foreign = false;
    if let Some(v) = c.required_str("", root, "apiVersion") {
        if v != API_VERSION {
            let msg = format!("{} is not supported (expected {API_VERSION})", shown(v));
            c.err("apiVersion", msg);
            foreign = true;
        }
    }
    if let Some(v) = c.required_str("", root, "kind") {
        if v != KIND {
            c.err(
                "kind",
                format!("{} is not supported (expected {KIND})", shown(v)),
            );
            foreign = true;
        }
    }
    if foreign {
        return w;
    }
    if let Some(meta) = c.required("", root, "metadata") {
        if let Some(meta) = c.map("metadata", meta, &["name", "namespace", "labels"]) {
            if let Some(name) = c.required_str("metadata", meta, "name") {
                if c.name("metadata.name", name) {
                    w.name = name.to_owned();
                }
            }
            if let Some(ns) = optional(meta, "namespace") {
                if let Some(ns) = c.str("metadata.namespace", ns) {
                    if c.name("metadata.namespace", ns) {
                        w.namespace = ns.to_owned();
                    }
                }
            }
            w.labels = c.labels("metadata.labels", optional(meta, "labels"));
        }
    }
    if let Some(spec) = c.required("", root, "spec") {
        let fields = [
            "nodeSelector",
            "restartPolicy",
            "terminationGracePeriodSeconds",
            "volumes",
            "containers",
            "everyNode",
            "replicas",
            "architectures",
            "spreadBy",
            "tolerationSeconds",
            "strategy",
            "imagePullSecrets",
        ];
        if let Some(spec) = c.map("spec", spec, &fields) {
            w.spec = c.spec(spec);
            if !w.name.is_empty() {
                c.replica_room(&w.name, w.spec.scheduling.placement);
            }
        }
    }
    w
}

/// Joins a field name onto a path; the empty path is the document root.
fn field(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// A map entry's path: `labels.app`, or `labels["flotilla.dev/site"]` when
/// the key would not read unambiguously after a dot.
fn entry(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        field(path, key)
    } else {
        format!("{path}[{}]", shown(key))
    }
}

/// A string from the input, quoted, and cut short so that a megabyte of junk
/// does not end up in an error message.
fn shown(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// What kind of value was found, for "expected X, found Y".
fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(_) => "a number".into(),
        Value::String(_) => "a string".into(),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a map".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// A field's value, absent and null alike meaning "not given" (YAML writes
/// `command:` with nothing after it as null).
fn optional<'v>(m: &'v Mapping, key: &str) -> Option<&'v Value> {
    m.get(key).filter(|v| !v.is_null())
}

/// A map key as the user wrote it, for unknown-field paths.
fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        _ => "?".into(),
    }
}

struct Check<'p> {
    problems: &'p mut Problems,
}

impl Check<'_> {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        let p = &mut *self.problems;
        if p.list.len() >= p.room {
            p.dropped += 1;
            return;
        }
        p.list.push(Problem {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn expected(&mut self, path: &str, what: &str, v: &Value) {
        // Unquoted numbers and booleans are not taken as text: the parser
        // does not keep their spelling (`1.10` reads as 1.1, `0x10` as 16),
        // so accepting them would silently change the value.
        let hint = match v {
            Value::Number(_) | Value::Bool(_) if what == "a string" => {
                " (put it in quotes to use it as text)"
            }
            _ => "",
        };
        self.err(path, format!("expected {what}, found {}{hint}", kind(v)));
    }

    /// The value as a map whose keys are all among `fields`.
    fn map<'v>(&mut self, path: &str, v: &'v Value, fields: &[&str]) -> Option<&'v Mapping> {
        let Value::Mapping(m) = v else {
            self.expected(path, "a map", v);
            return None;
        };
        for k in m.keys() {
            if !k.as_str().is_some_and(|k| fields.contains(&k)) {
                self.err(&entry(path, &key_text(k)), "unknown field");
            }
        }
        Some(m)
    }

    fn required<'v>(&mut self, path: &str, m: &'v Mapping, key: &str) -> Option<&'v Value> {
        let v = optional(m, key);
        if v.is_none() {
            self.err(&field(path, key), "required");
        }
        v
    }

    fn str<'v>(&mut self, path: &str, v: &'v Value) -> Option<&'v str> {
        match v {
            Value::String(s) => Some(s),
            _ => {
                self.expected(path, "a string", v);
                None
            }
        }
    }

    fn required_str<'v>(&mut self, path: &str, m: &'v Mapping, key: &str) -> Option<&'v str> {
        let v = self.required(path, m, key)?;
        self.str(&field(path, key), v)
    }

    /// Checks a DNS-label name; true when it is valid.
    fn name(&mut self, path: &str, name: &str) -> bool {
        match check_name(name) {
            Ok(()) => true,
            Err(e) => {
                self.err(path, format!("{} is not a valid name: {e}", shown(name)));
                false
            }
        }
    }

    /// A string without NUL, which cannot pass through `execve`.
    fn c_string(&mut self, path: &str, v: &Value) -> Option<String> {
        let s = self.str(path, v)?;
        if let Some(index) = s.find('\0') {
            self.err(
                path,
                format!("character '\\0' at position {index} is not allowed"),
            );
            return None;
        }
        Some(s.to_owned())
    }

    fn labels(&mut self, path: &str, v: Option<&Value>) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(v) = v else { return out };
        let Value::Mapping(m) = v else {
            self.expected(path, "a map of strings", v);
            return out;
        };
        for (k, v) in m {
            let Value::String(k) = k else {
                self.err(
                    path,
                    format!("keys must be strings, found {} {}", kind(k), key_text(k)),
                );
                continue;
            };
            let key_ok = match check_label_key(k) {
                Ok(()) => true,
                Err(e) => {
                    self.err(path, format!("{} is not a valid label key: {e}", shown(k)));
                    false
                }
            };
            let at = entry(path, k);
            if let Some(value) = self.str(&at, v) {
                match check_label_value(value) {
                    Err(e) => {
                        let msg = format!("{} is not a valid label value: {e}", shown(value));
                        self.err(&at, msg);
                    }
                    Ok(()) if key_ok => {
                        out.insert(k.clone(), value.to_owned());
                    }
                    Ok(()) => {}
                }
            }
        }
        out
    }

    fn spec(&mut self, spec: &Mapping) -> WorkloadSpec {
        let node_selector = self.labels("spec.nodeSelector", optional(spec, "nodeSelector"));
        let restart_policy = optional(spec, "restartPolicy")
            .and_then(|v| self.str("spec.restartPolicy", v))
            .map_or(RestartPolicy::default(), |s| match s {
                "Always" => RestartPolicy::Always,
                "OnFailure" => RestartPolicy::OnFailure,
                "Never" => RestartPolicy::Never,
                other => {
                    let msg = format!("{} is not one of Always, OnFailure, Never", shown(other));
                    self.err("spec.restartPolicy", msg);
                    RestartPolicy::default()
                }
            });
        let grace = "spec.terminationGracePeriodSeconds";
        let termination_grace_secs = optional(spec, "terminationGracePeriodSeconds")
            .and_then(|v| self.whole(grace, v, 0))
            .unwrap_or(DEFAULT_TERMINATION_GRACE_SECS);
        let (volumes, declared) = self.volumes("spec.volumes", optional(spec, "volumes"));
        let scheduling = self.scheduling(spec);
        let strategy = optional(spec, "strategy").and_then(|v| self.strategy(v));
        let mut containers = Vec::new();
        let mut requests = BTreeMap::new();
        if let Some(list) = self.required("spec", spec, "containers") {
            match list {
                Value::Sequence(items) if items.is_empty() => {
                    self.err("spec.containers", "must have at least one container");
                }
                Value::Sequence(items) => {
                    let mut seen = BTreeSet::new();
                    for (i, item) in items.iter().enumerate() {
                        let path = format!("spec.containers[{i}]");
                        let Some((c, asked)) = self.container(&path, item, &declared) else {
                            continue;
                        };
                        if let Some(asked) = asked {
                            requests.insert(c.name.clone(), asked);
                        }
                        if !c.name.is_empty() && !seen.insert(c.name.clone()) {
                            let msg = format!("duplicate container name {}", shown(&c.name));
                            self.err(&field(&path, "name"), msg);
                        }
                        containers.push(c);
                    }
                }
                other => self.expected("spec.containers", "a list of containers", other),
            }
        }
        WorkloadSpec {
            node_selector,
            restart_policy,
            termination_grace_secs,
            volumes,
            containers,
            requests,
            scheduling,
            strategy,
            image_pull_secrets: self.image_pull_secrets(optional(spec, "imagePullSecrets")),
        }
    }

    fn container(
        &mut self,
        path: &str,
        v: &Value,
        declared: &Declared,
    ) -> Option<(ContainerSpec, Option<Requests>)> {
        let fields = [
            "name",
            "image",
            "command",
            "args",
            "env",
            "workingDir",
            "resources",
            "volumeMounts",
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
            "securityContext",
        ];
        let m = self.map(path, v, &fields)?;
        let mut c = ContainerSpec::new(String::new(), String::new());
        if let Some(name) = self.required_str(path, m, "name") {
            if self.name(&field(path, "name"), name) {
                c.name = name.to_owned();
            }
        }
        if let Some(image) = self.required_str(path, m, "image") {
            if self.image(&field(path, "image"), image) {
                c.image = image.to_owned();
            }
        }
        c.command = self.strings(&field(path, "command"), optional(m, "command"));
        c.args = self.strings(&field(path, "args"), optional(m, "args"));
        c.env = self.env(&field(path, "env"), optional(m, "env"));
        if let Some(v) = optional(m, "workingDir") {
            let at = field(path, "workingDir");
            if let Some(dir) = self.str(&at, v) {
                if self.working_dir(&at, dir) {
                    c.working_dir = Some(dir.to_owned());
                }
            }
        }
        let mut requests = None;
        if let Some(v) = optional(m, "resources") {
            let at = field(path, "resources");
            if let Some(r) = self.map(&at, v, &["limits", "requests"]) {
                if let Some(limits) = optional(r, "limits") {
                    c.resources = self.limits(&field(&at, "limits"), limits);
                }
                if let Some(asked) = optional(r, "requests") {
                    requests = self.requests(&field(&at, "requests"), asked);
                }
            }
        }
        let mounts = optional(m, "volumeMounts");
        c.volume_mounts = self.volume_mounts(&field(path, "volumeMounts"), mounts, declared);
        let mut probe = |key: &str, kind: ProbeKind| {
            optional(m, key).and_then(|v| self.probe(&field(path, key), v, kind))
        };
        c.liveness_probe = probe("livenessProbe", ProbeKind::Liveness);
        c.readiness_probe = probe("readinessProbe", ProbeKind::Readiness);
        c.startup_probe = probe("startupProbe", ProbeKind::Startup);
        c.security_context = optional(m, "securityContext")
            .and_then(|v| self.security_context(&field(path, "securityContext"), v));
        Some((c, requests))
    }

    fn image(&mut self, path: &str, image: &str) -> bool {
        if image.is_empty() {
            self.err(path, "must not be empty");
            return false;
        }
        if image.len() > MAX_IMAGE_BYTES {
            let msg = format!(
                "must be at most {MAX_IMAGE_BYTES} bytes, found {}",
                image.len()
            );
            self.err(path, msg);
            return false;
        }
        if let Some((index, ch)) = image
            .char_indices()
            .find(|(_, c)| c.is_whitespace() || c.is_control())
        {
            let msg = format!(
                "{} is not a valid image reference: character {ch:?} at position {index} is not allowed",
                shown(image)
            );
            self.err(path, msg);
            return false;
        }
        true
    }

    fn working_dir(&mut self, path: &str, dir: &str) -> bool {
        if !dir.starts_with('/') {
            self.err(path, format!("{} is not an absolute path", shown(dir)));
            return false;
        }
        if dir.len() > MAX_WORKING_DIR_BYTES {
            let msg = format!(
                "must be at most {MAX_WORKING_DIR_BYTES} bytes, found {}",
                dir.len()
            );
            self.err(path, msg);
            return false;
        }
        if let Some((index, ch)) = dir.char_indices().find(|(_, c)| c.is_control()) {
            let msg = format!("character {ch:?} at position {index} is not allowed");
            self.err(path, msg);
            return false;
        }
        true
    }

    fn strings(&mut self, path: &str, v: Option<&Value>) -> Vec<String> {
        let Some(v) = v else { return Vec::new() };
        let Value::Sequence(items) = v else {
            self.expected(path, "a list of strings", v);
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.c_string(&format!("{path}[{i}]"), item))
            .collect()
    }

    fn env(&mut self, path: &str, v: Option<&Value>) -> Vec<EnvVar> {
        let Some(v) = v else { return Vec::new() };
        let Value::Sequence(items) = v else {
            self.expected(path, "a list of {name, value} maps", v);
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let Some(m) = self.map(&at, item, &["name", "value"]) else {
                continue;
            };
            let name = self.required_str(&at, m, "name").and_then(|name| {
                let name_at = field(&at, "name");
                if !is_env_name(name) {
                    let msg = format!(
                        "{} is not a valid variable name: expected letters, digits and '_', not starting with a digit",
                        shown(name)
                    );
                    self.err(&name_at, msg);
                    None
                } else if !seen.insert(name) {
                    self.err(&name_at, format!("duplicate variable {}", shown(name)));
                    None
                } else {
                    Some(name.to_owned())
                }
            });
            // Kubernetes lets `value` be left out for an empty variable.
            let value = match optional(m, "value") {
                Some(v) => self.c_string(&field(&at, "value"), v),
                None => Some(String::new()),
            };
            if let (Some(name), Some(value)) = (name, value) {
                out.push(EnvVar { name, value });
            }
        }
        out
    }

    fn limits(&mut self, path: &str, v: &Value) -> Resources {
        let mut r = Resources::default();
        let Some(m) = self.map(path, v, &["cpu", "memory", "pids"]) else {
            return r;
        };
        if let Some(v) = optional(m, "cpu") {
            r.cpu_millis = self.quantity(&field(path, "cpu"), v, parse_cpu);
        }
        if let Some(v) = optional(m, "memory") {
            r.memory_bytes = self.quantity(&field(path, "memory"), v, parse_memory);
        }
        if let Some(v) = optional(m, "pids") {
            r.pids = self.pids(&field(path, "pids"), v);
        }
        r
    }

    fn quantity<T>(
        &mut self,
        path: &str,
        v: &Value,
        parse: fn(&str) -> Result<T, super::quantity::QuantityError>,
    ) -> Option<T> {
        // A number is read through its text so that `cpu: 0.5` and
        // `cpu: "0.5"` go through the same exact decimal arithmetic.
        let (text, quoted) = match v {
            Value::String(s) => (s.clone(), shown(s)),
            Value::Number(n) => (n.to_string(), n.to_string()),
            other => {
                self.expected(path, "a quantity like \"500m\", \"64Mi\" or 2", other);
                return None;
            }
        };
        match parse(&text) {
            Ok(q) => Some(q),
            Err(e) => {
                self.err(path, format!("{quoted} is not a valid quantity: {e}"));
                None
            }
        }
    }

    fn pids(&mut self, path: &str, v: &Value) -> Option<u32> {
        let Value::Number(n) = v else {
            self.expected(path, "a positive integer", v);
            return None;
        };
        let result = match (n.as_u64(), n.as_i64()) {
            (Some(0), _) | (None, Some(_)) => Err("must be greater than zero".to_owned()),
            (Some(p), _) => u32::try_from(p).map_err(|_| format!("must be at most {}", u32::MAX)),
            (None, None) => Err("must be an integer".to_owned()),
        };
        result
            .map_err(|reason| self.err(path, format!("{n} is not a valid limit: {reason}")))
            .ok()
    }
}

fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
