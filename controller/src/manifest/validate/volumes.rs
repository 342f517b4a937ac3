//! `spec.volumes` and `containers[].volumeMounts`: volume names and sources,
//! paths on the device and in the container, and the size cap of config files.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use flotilla_proto::{ConfigFile, Volume, VolumeMount, VolumeSource};
use serde_norway::Value;

use super::super::{DEFAULT_CONFIG_FILE_MODE, MAX_CONFIG_BYTES, MAX_PATH_BYTES};
use super::{Check, field, optional, shown};

/// The volumes a container may mount: every entry whose name was valid,
/// even when the rest of it was not (so its mounts do not also read as
/// "unknown volume"), and whether it is a config volume.
#[derive(Debug, Default)]
pub(super) struct Declared {
    config: BTreeMap<String, bool>,
}

/// Longest path component (Linux `NAME_MAX`).
const MAX_NAME_BYTES: usize = 255;
/// Config files of one workload, all volumes together.
const MAX_CONFIG_FILES: usize = 256;

impl Check<'_> {
    /// `spec.volumes`: the valid volumes, and every name declared.
    pub(super) fn volumes(&mut self, path: &str, v: Option<&Value>) -> (Vec<Volume>, Declared) {
        let mut out = Vec::new();
        let mut declared = Declared::default();
        let Some(v) = v else {
            return (out, declared);
        };
        let Value::Sequence(items) = v else {
            self.expected(path, "a list of volumes", v);
            return (out, declared);
        };
        let mut budget = Budget::default();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let fields = ["name", "hostPath", "emptyDir", "config", "secret"];
            let Some(m) = self.map(&at, item, &fields) else {
                continue;
            };
            let name = self.required_str(&at, m, "name").and_then(|name| {
                let name_at = field(&at, "name");
                if !self.name(&name_at, name) {
                    return None;
                }
                if declared.config.contains_key(name) {
                    self.err(&name_at, format!("duplicate volume name {}", shown(name)));
                    return None;
                }
                Some(name.to_owned())
            });
            let sources: Vec<(&str, &Value)> = ["hostPath", "emptyDir", "config", "secret"]
                .into_iter()
                .filter_map(|k| m.get(k).map(|v| (k, v)))
                .collect();
            if let Some(name) = &name {
                // Secret volumes are read-only as config ones are.
                let config = matches!(sources.as_slice(), [("config" | "secret", _)]);
                declared.config.insert(name.clone(), config);
            }
            let source = match sources.as_slice() {
                [] => {
                    self.err(&at, "expected one of hostPath, emptyDir, config, secret");
                    None
                }
                [(one, v)] => self.volume_source(&field(&at, one), one, v, &mut budget),
                [(first, _), (second, _), ..] => {
                    let msg = format!(
                        "only one of hostPath, emptyDir, config, secret may be given, found {first} and {second}"
                    );
                    self.err(&at, msg);
                    None
                }
            };
            if let (Some(name), Some(source)) = (name, source) {
                out.push(Volume { name, source });
            }
        }
        (out, declared)
    }

    fn volume_source(
        &mut self,
        path: &str,
        kind: &str,
        v: &Value,
        budget: &mut Budget,
    ) -> Option<VolumeSource> {
        match kind {
            "hostPath" => {
                let m = self.map(path, v, &["path"])?;
                let p = self.required_str(path, m, "path")?;
                self.absolute_path(&field(path, "path"), p)
                    .then(|| VolumeSource::HostPath { path: p.to_owned() })
            }
            "emptyDir" => {
                // `emptyDir: {}` or `emptyDir:` (null); Kubernetes' medium
                // and sizeLimit are not supported.
                if !v.is_null() {
                    self.map(path, v, &[])?;
                }
                Some(VolumeSource::Scratch)
            }
            "secret" => self.secret_volume(path, v),
            _ => {
                let m = self.map(path, v, &["files"])?;
                let files = self.required(path, m, "files")?;
                self.config_files(&field(path, "files"), files, budget)
                    .map(|files| VolumeSource::Config { files })
            }
        }
    }

    fn config_files(
        &mut self,
        path: &str,
        v: &Value,
        budget: &mut Budget,
    ) -> Option<Vec<ConfigFile>> {
        let Value::Sequence(items) = v else {
            self.expected(path, "a list of files", v);
            return None;
        };
        let mut out = Vec::new();
        let mut valid = true;
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let fields = ["path", "content", "contentBase64", "mode"];
            let Some(m) = self.map(&at, item, &fields) else {
                valid = false;
                continue;
            };
            let file_path = self.required_str(&at, m, "path").filter(|p: &&str| {
                let p: &str = p;
                let p_at = field(&at, "path");
                if !self.relative_path(&p_at, p) {
                    return false;
                }
                // A file at `a` and another at `a/b` cannot both exist.
                let clash = seen
                    .iter()
                    .copied()
                    .find(|other| *other == p || is_parent(other, p) || is_parent(p, other));
                if let Some(other) = clash {
                    let msg = if other == p {
                        format!("duplicate file {}", shown(p))
                    } else {
                        format!("{} and {} cannot both be files", shown(other), shown(p))
                    };
                    self.err(&p_at, msg);
                    return false;
                }
                seen.insert(p);
                true
            });
            let data = self.file_data(&at, m);
            let mode = match optional(m, "mode") {
                None => Some(DEFAULT_CONFIG_FILE_MODE),
                Some(v) => self.file_mode(&field(&at, "mode"), v),
            };
            if let Some(data) = &data {
                budget.files += 1;
                budget.bytes = budget.bytes.saturating_add(data.len());
                if budget.files == MAX_CONFIG_FILES + 1 {
                    let msg = format!("too many config files: at most {MAX_CONFIG_FILES} in all");
                    self.err(&at, msg);
                }
                if budget.bytes > MAX_CONFIG_BYTES && !budget.over {
                    budget.over = true;
                    let msg = format!(
                        "config files are too large: over {MAX_CONFIG_BYTES} bytes in all (they travel in the desired state)"
                    );
                    self.err(&at, msg);
                }
            }
            match (file_path, data, mode) {
                (Some(p), Some(data), Some(mode)) => out.push(ConfigFile {
                    path: p.to_owned(),
                    data,
                    mode,
                }),
                _ => valid = false,
            }
        }
        let within = budget.files <= MAX_CONFIG_FILES && !budget.over;
        (valid && within).then_some(out)
    }

    fn file_data(&mut self, path: &str, m: &serde_norway::Mapping) -> Option<Vec<u8>> {
        match (optional(m, "content"), optional(m, "contentBase64")) {
            (Some(_), Some(_)) => {
                self.err(path, "only one of content, contentBase64 may be given");
                None
            }
            (None, None) => {
                self.err(path, "expected content or contentBase64");
                None
            }
            (Some(v), None) => {
                let s = self.str(&field(path, "content"), v)?;
                Some(s.as_bytes().to_vec())
            }
            (None, Some(v)) => {
                let at = field(path, "contentBase64");
                let s = self.str(&at, v)?;
                // Long base64 is often folded over lines in YAML.
                let compact: String = s.split_ascii_whitespace().collect();
                match base64::engine::general_purpose::STANDARD.decode(compact) {
                    Ok(bytes) => Some(bytes),
                    Err(e) => {
                        let detail = match e {
                            base64::DecodeError::InvalidByte(index, byte) => format!(
                                "character {:?} at position {index} (spaces and line breaks not counted)",
                                char::from(byte)
                            ),
                            _ => "wrong length or padding".to_owned(),
                        };
                        self.err(&at, format!("not valid base64: {detail}"));
                        None
                    }
                }
            }
        }
    }

    pub(super) fn file_mode(&mut self, path: &str, v: &Value) -> Option<u32> {
        let Value::String(s) = v else {
            let msg = match v {
                // `0644` reads as text; `644` (or `0o644`) as a number,
                // whose octal intent cannot be told from `420` in JSON.
                Value::Number(n) => format!(
                    "expected octal digits with a leading 0, like 0644, found the number {n}"
                ),
                other => format!(
                    "expected octal digits with a leading 0, like 0644, found {}",
                    super::kind(other)
                ),
            };
            self.err(path, msg);
            return None;
        };
        let digits = s.strip_prefix("0o").unwrap_or(s);
        let parsed = (!digits.is_empty() && digits.len() <= 6)
            .then(|| u32::from_str_radix(digits, 8).ok())
            .flatten();
        match parsed {
            Some(mode) if mode <= 0o777 => Some(mode),
            Some(_) => {
                let msg = format!(
                    "{} is not allowed: only permission bits up to \"0777\" (no setuid, setgid or sticky)",
                    shown(s)
                );
                self.err(path, msg);
                None
            }
            None => {
                let msg = format!(
                    "{} is not a file mode: expected octal digits like \"0644\"",
                    shown(s)
                );
                self.err(path, msg);
                None
            }
        }
    }

    /// `containers[].volumeMounts`, each naming a declared volume. Config
    /// volumes are always mounted read-only, whatever `readOnly` says.
    pub(super) fn volume_mounts(
        &mut self,
        path: &str,
        v: Option<&Value>,
        declared: &Declared,
    ) -> Vec<VolumeMount> {
        let mut out = Vec::new();
        let Some(v) = v else { return out };
        let Value::Sequence(items) = v else {
            self.expected(path, "a list of {name, mountPath} maps", v);
            return out;
        };
        let mut targets = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let Some(m) = self.map(&at, item, &["name", "mountPath", "readOnly"]) else {
                continue;
            };
            let config = self.required_str(&at, m, "name").and_then(|name| {
                let known = declared.config.get(name).copied();
                if known.is_none() {
                    let names: Vec<&str> = declared.config.keys().map(String::as_str).collect();
                    let msg = if names.is_empty() {
                        format!("unknown volume {}: spec.volumes declares none", shown(name))
                    } else {
                        format!(
                            "unknown volume {}: spec.volumes declares {}",
                            shown(name),
                            names.join(", ")
                        )
                    };
                    self.err(&field(&at, "name"), msg);
                }
                known.map(|config| (name, config))
            });
            let target = self.required_str(&at, m, "mountPath").filter(|p: &&str| {
                let p: &str = p;
                let p_at = field(&at, "mountPath");
                if !self.absolute_path(&p_at, p) {
                    return false;
                }
                if p.trim_end_matches('/').is_empty() {
                    self.err(&p_at, "cannot mount over the container's root \"/\"");
                    return false;
                }
                let normal = p.trim_end_matches('/');
                if !targets.insert(normal.to_owned()) {
                    self.err(&p_at, format!("{} is mounted more than once", shown(p)));
                    return false;
                }
                true
            });
            let read_only = match optional(m, "readOnly") {
                None => Some(false),
                Some(Value::Bool(b)) => Some(*b),
                Some(other) => {
                    self.expected(&field(&at, "readOnly"), "true or false", other);
                    None
                }
            };
            if let (Some((name, config)), Some(target), Some(read_only)) =
                (config, target, read_only)
            {
                out.push(VolumeMount {
                    name: name.to_owned(),
                    mount_path: target.to_owned(),
                    read_only: read_only || config,
                });
            }
        }
        out
    }

    /// An absolute path without `..`, NUL or control characters.
    fn absolute_path(&mut self, path: &str, p: &str) -> bool {
        if !p.starts_with('/') {
            self.err(path, format!("{} is not an absolute path", shown(p)));
            return false;
        }
        self.clean_path(path, p)
    }

    /// A path relative to a volume: not absolute, no empty, `.` or `..`
    /// component, so that it stays inside the volume's directory.
    pub(super) fn relative_path(&mut self, path: &str, p: &str) -> bool {
        if p.is_empty() {
            self.err(path, "must not be empty");
            return false;
        }
        if p.starts_with('/') {
            let msg = format!("{} must be relative to the volume, not absolute", shown(p));
            self.err(path, msg);
            return false;
        }
        if !self.clean_path(path, p) {
            return false;
        }
        if p.split('/').any(|c| c.is_empty() || c == ".") {
            let msg = format!("{} has an empty or \".\" component", shown(p));
            self.err(path, msg);
            return false;
        }
        true
    }

    fn clean_path(&mut self, path: &str, p: &str) -> bool {
        if p.len() > MAX_PATH_BYTES {
            let msg = format!("must be at most {MAX_PATH_BYTES} bytes, found {}", p.len());
            self.err(path, msg);
            return false;
        }
        if let Some((index, ch)) = p.char_indices().find(|(_, c)| c.is_control()) {
            let msg = format!("character {ch:?} at position {index} is not allowed");
            self.err(path, msg);
            return false;
        }
        if p.split('/').any(|c| c == "..") {
            self.err(path, format!("{} must not contain \"..\"", shown(p)));
            return false;
        }
        if let Some(long) = p.split('/').find(|c| c.len() > MAX_NAME_BYTES) {
            let msg = format!(
                "component {} is longer than {MAX_NAME_BYTES} bytes",
                shown(long)
            );
            self.err(path, msg);
            return false;
        }
        true
    }
}

/// What the config files of a workload add up to so far.
#[derive(Debug, Default)]
struct Budget {
    files: usize,
    bytes: usize,
    /// The size cap was passed (and reported once).
    over: bool,
}

/// Whether `dir` is a parent directory of `file` (`a` of `a/b`).
fn is_parent(dir: &str, file: &str) -> bool {
    file.strip_prefix(dir)
        .is_some_and(|rest| rest.starts_with('/'))
}
