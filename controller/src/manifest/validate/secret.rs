//! `kind: Secret` documents (Kubernetes' shape: `metadata.name`, `type`,
//! `data` in base64, `stringData` in plain text, the latter winning on the
//! same key) and the references to Secrets in a workload: `secret` volumes
//! and `imagePullSecrets`. No message ever quotes a value.

use std::collections::BTreeMap;

use base64::Engine as _;
use flotilla_proto::{SealedSecret, SecretItem, VolumeSource};
use serde_norway::{Mapping, Value};

use super::super::{API_VERSION, DEFAULT_CONFIG_FILE_MODE};
use super::{Check, Problems, field, optional, shown};
use crate::secrets::{
    DOCKER_CONFIG_KEY, MAX_KEY_LEN, MAX_KEYS, MAX_SECRET_BYTES, Secret, SecretType, docker,
};

/// The `kind` of a Secret document.
pub const SECRET_KIND: &str = "Secret";

/// Whether a document is a Secret (by its `kind`), so that it is checked
/// as one.
pub fn is_secret(doc: &Value) -> bool {
    doc.get("kind").and_then(Value::as_str) == Some(SECRET_KIND)
}

/// Checks a Secret document. As for workloads, the Secret is returned even
/// when problems were found, its `name` empty unless the name was valid.
pub fn secret(doc: &Value, problems: &mut Problems) -> Secret {
    let mut c = Check { problems };
    let mut s = Secret {
        name: String::new(),
        kind: SecretType::Opaque,
        data: BTreeMap::new(),
    };
    let fields = [
        "apiVersion",
        "kind",
        "metadata",
        "type",
        "data",
        "stringData",
    ];
    let Some(root) = c.map("", doc, &fields) else {
        return s;
    };
    if let Some(v) = c.required_str("", root, "apiVersion") {
        // Kubernetes' own spelling too, so its Secrets apply unchanged.
        if v != API_VERSION && v != "v1" {
            let msg = format!("{} is not supported (expected {API_VERSION})", shown(v));
            c.err("apiVersion", msg);
        }
    }
    if let Some(meta) = c.required("", root, "metadata") {
        if let Some(meta) = c.map("metadata", meta, &["name"]) {
            if let Some(name) = c.required_str("metadata", meta, "name") {
                if c.name("metadata.name", name) {
                    s.name = name.to_owned();
                }
            }
        }
    }
    if let Some(v) = optional(root, "type") {
        if let Some(t) = c.str("type", v) {
            match SecretType::parse(t) {
                Some(kind) => s.kind = kind,
                None => c.err(
                    "type",
                    format!(
                        "{} is not supported (expected Opaque or {})",
                        shown(t),
                        SecretType::DockerConfigJson.as_str()
                    ),
                ),
            }
        }
    }
    c.secret_values(root, "data", true, &mut s.data);
    c.secret_values(root, "stringData", false, &mut s.data);
    if s.data.len() > MAX_KEYS {
        c.err("data", format!("{} keys, at most {MAX_KEYS}", s.data.len()));
    }
    if s.size() > MAX_SECRET_BYTES {
        let msg = format!(
            "values are too large: {} bytes, at most {MAX_SECRET_BYTES} in all",
            s.size()
        );
        c.err("data", msg);
    }
    if s.kind == SecretType::DockerConfigJson {
        match s.data.get(DOCKER_CONFIG_KEY) {
            None => c.err(
                "data",
                format!("{DOCKER_CONFIG_KEY:?} is required by this type"),
            ),
            Some(bytes) => {
                if let Err(e) = docker::check(bytes) {
                    c.err(&format!("data[{DOCKER_CONFIG_KEY:?}]"), e);
                }
            }
        }
    }
    s
}

impl Check<'_> {
    /// `data` (base64 values) or `stringData` (plain), into `out`.
    fn secret_values(
        &mut self,
        root: &Mapping,
        key: &str,
        base64: bool,
        out: &mut BTreeMap<String, Vec<u8>>,
    ) {
        let Some(v) = optional(root, key) else {
            return;
        };
        let Value::Mapping(m) = v else {
            self.expected(key, "a map of strings", v);
            return;
        };
        for (k, v) in m {
            let Some(k) = k.as_str() else {
                self.err(key, "keys must be strings");
                continue;
            };
            let at = format!("{key}[{}]", shown(k));
            if let Err(e) = check_key(k) {
                self.err(&at, e);
                continue;
            }
            // Never `str()` here: its message would not quote the value,
            // but a type hint is all that is needed.
            let Value::String(text) = v else {
                self.err(&at, "expected a string (quote it)");
                continue;
            };
            let bytes = if base64 {
                match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
                    Ok(b) => b,
                    Err(_) => {
                        self.err(&at, "not base64");
                        continue;
                    }
                }
            } else {
                text.as_bytes().to_vec()
            };
            out.insert(k.to_owned(), bytes);
        }
    }

    /// A `secret` volume source: `{secretName, items?, defaultMode?}`.
    pub(super) fn secret_volume(&mut self, path: &str, v: &Value) -> Option<VolumeSource> {
        let m = self.map(path, v, &["secretName", "items", "defaultMode"])?;
        let name = self.required_str(path, m, "secretName")?;
        if !self.name(&field(path, "secretName"), name) {
            return None;
        }
        let default_mode = match optional(m, "defaultMode") {
            None => DEFAULT_CONFIG_FILE_MODE,
            Some(v) => self.file_mode(&field(path, "defaultMode"), v)?,
        };
        let mut items = Vec::new();
        if let Some(list) = optional(m, "items") {
            let at = field(path, "items");
            let Value::Sequence(list) = list else {
                self.expected(&at, "a list of items", list);
                return None;
            };
            let mut valid = true;
            for (i, item) in list.iter().enumerate() {
                let at = format!("{at}[{i}]");
                let Some(im) = self.map(&at, item, &["key", "path", "mode"]) else {
                    valid = false;
                    continue;
                };
                let key = self.required_str(&at, im, "key").filter(|k| {
                    check_key(k)
                        .map_err(|e| self.err(&field(&at, "key"), e))
                        .is_ok()
                });
                let p = self
                    .required_str(&at, im, "path")
                    .filter(|p| self.relative_path(&field(&at, "path"), p));
                let mode = match optional(im, "mode") {
                    None => Some(None),
                    Some(v) => self.file_mode(&field(&at, "mode"), v).map(Some),
                };
                match (key, p, mode) {
                    (Some(key), Some(p), Some(mode)) => items.push(SecretItem {
                        key: key.to_owned(),
                        path: p.to_owned(),
                        mode,
                    }),
                    _ => valid = false,
                }
            }
            if !valid {
                return None;
            }
        }
        Some(VolumeSource::Secret {
            items,
            default_mode,
            sealed: SealedSecret::unsealed(name),
        })
    }

    /// `spec.imagePullSecrets`: `[{name}]`, as unsealed references.
    pub(super) fn image_pull_secrets(&mut self, v: Option<&Value>) -> Vec<SealedSecret> {
        let path = "spec.imagePullSecrets";
        let mut out: Vec<SealedSecret> = Vec::new();
        let Some(v) = v else { return out };
        let Value::Sequence(list) = v else {
            self.expected(path, "a list of {name: SECRET}", v);
            return out;
        };
        for (i, item) in list.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let Some(m) = self.map(&at, item, &["name"]) else {
                continue;
            };
            let Some(name) = self.required_str(&at, m, "name") else {
                continue;
            };
            if !self.name(&field(&at, "name"), name) {
                continue;
            }
            if out.iter().any(|s| s.name == name) {
                self.err(
                    &field(&at, "name"),
                    format!("{} is listed twice", shown(name)),
                );
                continue;
            }
            out.push(SealedSecret::unsealed(name));
        }
        out
    }
}

/// A Secret key: Kubernetes' rule (letters, digits, `-`, `_`, `.`; not `.`
/// or `..`), which also makes it a safe file name.
fn check_key(k: &str) -> Result<(), String> {
    if k.is_empty() || k.len() > MAX_KEY_LEN {
        return Err(format!("key {}: 1 to {MAX_KEY_LEN} characters", shown(k)));
    }
    if k == "." || k == ".." {
        return Err(format!("key {} is not allowed", shown(k)));
    }
    match k
        .char_indices()
        .find(|(_, ch)| !(ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.')))
    {
        Some((i, ch)) => Err(format!(
            "key {}: character {ch:?} at position {i} is not allowed (letters, digits, '-', '_', '.')",
            shown(k)
        )),
        None => Ok(()),
    }
}
