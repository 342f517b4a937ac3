//! Registry settings from the agent's `--registries` TOML file: plain-HTTP
//! registries, extra CA certificates, credentials, mirrors, and the free
//! space pulls must leave on the image store's filesystem.
//!
//! ```toml
//! min_free = "256Mi"
//!
//! [[registry]]
//! host = "registry.local:5000"
//! ca_file = "/etc/flotilla/registry-ca.pem"
//! username = "robot"
//! password_file = "/etc/flotilla/registry.pass"
//! mirrors = ["cache.shop12.lan:5000"]
//!
//! [[registry]]
//! host = "cache.shop12.lan:5000"
//! insecure = true
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// Largest settings, CA or password file read.
const MAX_FILE: u64 = 1024 * 1024;
/// Free space kept when the file does not say.
pub const DEFAULT_MIN_FREE: u64 = 128 * 1024 * 1024;

/// Why the registry settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is larger than any sane settings file.
    #[error("{}: larger than {MAX_FILE} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The TOML does not parse or has unknown fields.
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The settings file.
        path: PathBuf,
        /// What the parser says, with the line.
        message: String,
    },
    /// A value is out of its rules.
    #[error("{}: {field}: {what}", path.display())]
    Invalid {
        /// The settings file.
        path: PathBuf,
        /// Which field, `registry[1].host`.
        field: String,
        /// What is wrong and what was expected.
        what: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJson {
    /// Free space a pull must leave on the image store's filesystem
    /// (`512Mi`, `1G`, or bytes); a pull that would go below waits.
    min_free: Option<Quantity>,
    /// Per-registry settings.
    #[serde(default)]
    registry: Vec<RegistryJson>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Quantity {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryJson {
    /// `host[:port]` as written in image references (`docker.io` for Docker Hub).
    host: String,
    /// Plain HTTP instead of HTTPS.
    #[serde(default)]
    insecure: bool,
    /// PEM file of CA certificates trusted for this registry, besides the
    /// system's roots.
    ca_file: Option<PathBuf>,
    /// User name for basic or token authentication.
    username: Option<String>,
    /// Password (prefer `password_file`).
    password: Option<String>,
    /// File holding the password; a trailing newline is ignored.
    password_file: Option<PathBuf>,
    /// Registries tried before this one, in order (pull-through caches).
    #[serde(default)]
    mirrors: Vec<String>,
}

/// A user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Settings of one registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySettings {
    /// Plain HTTP.
    pub insecure: bool,
    /// Extra trusted CA certificates (DER).
    pub ca: Vec<Vec<u8>>,
    /// Credentials, if any.
    pub credentials: Option<Credentials>,
    /// Hosts tried first, in order.
    pub mirrors: Vec<String>,
}

/// Validated pull settings. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PullSettings {
    registries: Arc<BTreeMap<String, RegistrySettings>>,
    /// Free space a pull must leave, in bytes.
    pub min_free: u64,
}

impl Default for PullSettings {
    fn default() -> Self {
        Self {
            registries: Arc::default(),
            min_free: DEFAULT_MIN_FREE,
        }
    }
}

impl PullSettings {
    /// Reads and checks the TOML file at `path` (CA and password files too).
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = read_capped(path)?;
        let text = String::from_utf8(text).map_err(|_| SettingsError::Syntax {
            path: path.to_owned(),
            message: "not UTF-8".to_owned(),
        })?;
        Self::parse(path, &text)
    }

    /// Checks `text`, the content of `path`; relative CA and password paths
    /// are taken from `path`'s directory.
    pub fn parse(path: &Path, text: &str) -> Result<Self, SettingsError> {
        let file: FileJson = toml::from_str(text).map_err(|e| SettingsError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |field: String, what: String| SettingsError::Invalid {
            path: path.to_owned(),
            field,
            what,
        };
        let base = path.parent().unwrap_or(Path::new("/"));
        let min_free = match file.min_free {
            None => DEFAULT_MIN_FREE,
            Some(Quantity::Bytes(n)) => n,
            Some(Quantity::Text(t)) => {
                parse_bytes(&t).map_err(|what| invalid("min_free".to_owned(), what))?
            }
        };
        let mut registries = BTreeMap::new();
        for (i, r) in file.registry.into_iter().enumerate() {
            let field = |name: &str| format!("registry[{i}].{name}");
            check_host(&r.host).map_err(|what| invalid(field("host"), what))?;
            for (j, m) in r.mirrors.iter().enumerate() {
                check_host(m).map_err(|what| invalid(field(&format!("mirrors[{j}]")), what))?;
                if *m == r.host {
                    return Err(invalid(
                        field(&format!("mirrors[{j}]")),
                        "a registry cannot be its own mirror".to_owned(),
                    ));
                }
            }
            let ca = match &r.ca_file {
                None => Vec::new(),
                Some(file) => {
                    let file = base.join(file);
                    let pem = read_capped(&file)?;
                    let certs = pem_certificates(&pem);
                    if certs.is_empty() {
                        return Err(invalid(
                            field("ca_file"),
                            format!("{}: no PEM certificate found", file.display()),
                        ));
                    }
                    certs
                }
            };
            let password = match (r.password, &r.password_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        field("password"),
                        "give password or password_file, not both".to_owned(),
                    ));
                }
                (Some(p), None) => Some(p),
                (None, Some(file)) => {
                    let file = base.join(file);
                    let bytes = read_capped(&file)?;
                    let text = String::from_utf8(bytes).map_err(|_| {
                        invalid(
                            field("password_file"),
                            format!("{}: not UTF-8", file.display()),
                        )
                    })?;
                    Some(text.trim_end_matches(['\n', '\r']).to_owned())
                }
                (None, None) => None,
            };
            let credentials = match (r.username, password) {
                (Some(username), Some(password)) => Some(Credentials { username, password }),
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        field("username"),
                        "username and a password go together".to_owned(),
                    ));
                }
            };
            let settings = RegistrySettings {
                insecure: r.insecure,
                ca,
                credentials,
                mirrors: r.mirrors,
            };
            if registries.insert(r.host.clone(), settings).is_some() {
                return Err(invalid(
                    field("host"),
                    format!("{:?} is configured more than once", r.host),
                ));
            }
        }
        Ok(Self {
            registries: Arc::new(registries),
            min_free,
        })
    }

    /// Settings with one registry added (tests, and `image pull --insecure`).
    pub fn with_registry(mut self, host: &str, settings: RegistrySettings) -> Self {
        Arc::make_mut(&mut self.registries).insert(host.to_owned(), settings);
        self
    }

    /// The settings of `host`; defaults (HTTPS, no credentials) if none.
    pub fn registry(&self, host: &str) -> RegistrySettings {
        self.registries.get(host).cloned().unwrap_or_default()
    }
}

/// A `host[:port]` as it appears in references.
fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{host:?}: expected host[:port]"))
    }
}

/// `512Mi`, `1G`, `4096`: bytes, with binary (Ki…Ti) or decimal (k…T) units.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: expected bytes like 512Mi, 1G or 1048576"))?;
    let mul: u64 = match unit {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}, expected Ki, Mi, Gi, Ti, k, M, G or T"
            ));
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// The DER certificates in a PEM file.
fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.der().to_vec()),
            _ => None,
        })
        .collect()
}

fn read_capped(path: &Path) -> Result<Vec<u8>, SettingsError> {
    let read_err = |source| SettingsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(SettingsError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PullSettings, String> {
        PullSettings::parse(Path::new("/etc/flotilla/registries.toml"), text)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn reads_registries_mirrors_credentials_and_floor() {
        let s = parse(
            r#"
min_free = "512Mi"
[[registry]]
host = "docker.io"
username = "robot"
password = "s3cret"
mirrors = ["cache.lan:5000"]
[[registry]]
host = "cache.lan:5000"
insecure = true
"#,
        )
        .unwrap();
        assert_eq!(s.min_free, 512 << 20);
        let hub = s.registry("docker.io");
        assert_eq!(hub.mirrors, ["cache.lan:5000"]);
        assert!(!hub.insecure);
        assert_eq!(
            hub.credentials.as_ref().map(|c| c.username.as_str()),
            Some("robot")
        );
        assert!(!format!("{hub:?}").contains("s3cret"));
        assert!(s.registry("cache.lan:5000").insecure);
        assert!(!s.registry("elsewhere.io").insecure);
        assert_eq!(parse("").unwrap().min_free, DEFAULT_MIN_FREE);
        assert_eq!(parse("min_free = 1000").unwrap().min_free, 1000);
    }

    #[test]
    fn refuses_mistakes_naming_the_field() {
        for (text, expect) in [
            ("min_fre = 1", "unknown field `min_fre`"),
            ("min_free = \"1X\"", "min_free: \"1X\": unknown unit"),
            (
                "[[registry]]\nhost = \"a b\"",
                "registry[0].host: \"a b\": expected host[:port]",
            ),
            (
                "[[registry]]\nhost = \"r\"\nusername = \"u\"",
                "registry[0].username: username and a password",
            ),
            (
                "[[registry]]\nhost = \"r\"\nmirrors = [\"r\"]",
                "registry[0].mirrors[0]: a registry cannot be its own mirror",
            ),
            (
                "[[registry]]\nhost = \"r\"\n[[registry]]\nhost = \"r\"",
                "registry[1].host: \"r\" is configured more than once",
            ),
            (
                "[[registry]]\nhost = \"r\"\nca_file = \"/nonexistent/ca.pem\"",
                "reading /nonexistent/ca.pem",
            ),
            (
                "[[registry]]\nhost = \"r\"\ninsecure = \"yes\"",
                "invalid type",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(expect), "{text:?}: {e}");
        }
    }
}
