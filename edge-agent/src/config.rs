//! The agent's configuration: command-line flags and environment variables,
//! validated once into a [`Config`] whose fields cannot hold invalid values.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use flotilla_proto::{Label, NameError, check_label_key, check_label_value, check_name};

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The node name breaks the DNS-label rule.
    #[error("node name {name:?}: {error}")]
    Node { name: String, error: NameError },
    /// A label is not `key=value`.
    #[error("label {label:?}: expected key=value")]
    LabelSyntax { label: String },
    /// A label key breaks the label-key rule.
    #[error("label {label:?}: key: {error}")]
    LabelKey { label: String, error: NameError },
    /// A label value breaks the label-value rule.
    #[error("label {label:?}: value: {error}")]
    LabelValue { label: String, error: NameError },
    /// The same label key was given twice.
    #[error("label key {key:?}: given more than once")]
    LabelRepeated { key: String },
    /// The broker address is not `mqtt://HOST[:PORT]`.
    #[error("broker {url:?}: {reason}")]
    Broker { url: String, reason: &'static str },
    /// The topic prefix is empty or holds MQTT wildcards.
    #[error("topic prefix {prefix:?}: expected a non-empty topic without '+', '#' or NUL")]
    TopicPrefix { prefix: String },
    /// A duration is zero where it must not be.
    #[error("{what}: must be longer than zero")]
    ZeroDuration { what: &'static str },
    /// The registries file is unreadable or wrong.
    #[error("registries file {0}")]
    Registries(#[from] crate::image::SettingsError),
    /// The controller's key is unreadable or not a base64 ed25519 key.
    #[error("controller key {path:?}: {reason}")]
    ControllerKey { path: PathBuf, reason: String },
    /// No broker given, and none stored by `join`.
    #[error(
        "no broker: give --broker mqtt://HOST:PORT (or join with a certificate, which stores one)"
    )]
    NoBroker,
    /// The certificate from `join` cannot be used.
    #[error("device certificate: {0}")]
    Certificate(#[from] crate::tls::TlsFileError),
    /// A device with a certificate was given a plain broker, or one without
    /// a certificate an `mqtts://` one.
    #[error("broker {url:?}: {reason}")]
    BrokerTls { url: String, reason: &'static str },
    /// No key to check desired state against, and no permission to go without.
    #[error(
        "no controller key: give --controller-key FILE, run `flotilla-agent join` first, or --insecure-unsigned"
    )]
    NoControllerKey,
    /// A directory could not be made absolute.
    #[error("{what} {path:?}: {source}")]
    Path {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Makes `path` absolute against the current directory. libcontainer changes
/// the whole process's working directory while it creates a container, so a
/// relative path opened by another thread at that moment would name the
/// wrong file: every directory the agent uses is absolute from the start.
fn absolute(what: &'static str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    std::path::absolute(&path).map_err(|source| ConfigError::Path { what, path, source })
}

/// Which container runtime runs the pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    /// Real containers through youki's libcontainer.
    Youki,
    /// Runs nothing (tests and simulated fleets); images are not read either.
    Fake,
}

/// Command-line flags; every flag can also come from its environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "flotilla-agent", version, about = "Flotilla device agent")]
pub struct Args {
    /// MQTT broker, `mqtt://HOST:PORT`, or `mqtts://HOST:PORT` for a device
    /// with a certificate [default: the broker `join` stored with it].
    #[arg(long, env = "FLOTILLA_BROKER")]
    pub broker: Option<String>,
    /// This node's name (a DNS label).
    #[arg(long, env = "FLOTILLA_NODE")]
    pub node: String,
    /// A node label `key=value`; repeat the flag for several (env: comma-separated).
    #[arg(long = "label", env = "FLOTILLA_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Where desired state, images and logs are kept across reboots.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Runtime state that a reboot clears [default: /run/flotilla-agent/{node}].
    #[arg(long, env = "FLOTILLA_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Container runtime.
    #[arg(long, env = "FLOTILLA_RUNTIME", value_enum, default_value = "youki")]
    pub runtime: RuntimeKind,
    /// Root of the MQTT topics.
    #[arg(long, env = "FLOTILLA_TOPIC_PREFIX", default_value = flotilla_proto::DEFAULT_PREFIX)]
    pub topic_prefix: String,
    /// MQTT keepalive (`30s`, `1m`, `500ms`).
    #[arg(long, env = "FLOTILLA_KEEPALIVE", default_value = "30s", value_parser = parse_duration)]
    pub keepalive: Duration,
    /// How long a container gets between SIGTERM and SIGKILL when its pod is
    /// no longer known (found at start); desired pods use their own grace period.
    #[arg(long, env = "FLOTILLA_STOP_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub stop_grace: Duration,
    /// How often the status is sent again even when nothing changed.
    #[arg(long, env = "FLOTILLA_RESYNC", default_value = "30m", value_parser = parse_duration)]
    pub resync: Duration,
    /// Registry settings (TOML): insecure registries, CAs, credentials,
    /// mirrors, the free-space floor for pulls.
    #[arg(long, env = "FLOTILLA_REGISTRIES")]
    pub registries: Option<PathBuf>,
    /// A container's log file is rotated when it reaches this size (`10Mi`, `64Ki`; at least 64Ki).
    #[arg(long, env = "FLOTILLA_LOG_MAX_SIZE", default_value = "10Mi", value_parser = crate::logs::parse_size)]
    pub log_max_size: u64,
    /// Rotated log files kept per container, besides the live one (at least 1).
    #[arg(long, env = "FLOTILLA_LOG_KEPT_FILES", default_value_t = 2)]
    pub log_kept_files: u32,
    /// The controller's public key (base64, as in its `signing.pub`): desired
    /// state not signed by it is refused [default: {data-dir}/identity/controller.pub, written by `join`].
    #[arg(long, env = "FLOTILLA_CONTROLLER_KEY")]
    pub controller_key: Option<PathBuf>,
    /// Accept desired state without checking its signature (anyone who can
    /// publish on the broker can then run containers here).
    #[arg(long, env = "FLOTILLA_INSECURE_UNSIGNED")]
    pub insecure_unsigned: bool,
}

/// How desired state is checked before it is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Signed by the controller whose ed25519 public key this is.
    Pinned([u8; 32]),
    /// Not checked (`--insecure-unsigned`, tests and simulated fleets).
    Unverified,
}

/// Where `join` keeps what enrollment gave the device, owner-only.
pub fn identity_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("identity")
}
/// The pinned controller key, under [`identity_dir`].
pub const CONTROLLER_KEY_FILE: &str = "controller.pub";
/// The labels the join token carried (`key=value` lines), under
/// [`identity_dir`]; `--label` overrides them key by key.
pub const JOIN_LABELS_FILE: &str = "labels";
/// The device's MQTT password, under [`identity_dir`] (the username is the node name).
pub const PASSWORD_FILE: &str = "mqtt.password";

impl Trust {
    /// Reads a key file: base64 of the 32-byte public key.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        use base64::Engine;
        let err = |reason: String| ConfigError::ControllerKey {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        if text.len() > 1024 {
            return Err(err("larger than 1 KiB, expected a base64 key".into()));
        }
        let text = String::from_utf8_lossy(&text);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| err(format!("not base64: {e}")))?;
        let key = <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| err(format!("{} bytes, expected 32", bytes.len())))?;
        Ok(Self::Pinned(key))
    }
}

/// A node name that passed [`check_name`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeName(String);

impl NodeName {
    /// Checks `name` against the node-name rule.
    pub fn new(name: &str) -> Result<Self, ConfigError> {
        check_name(name).map_err(|error| ConfigError::Node {
            name: name.to_owned(),
            error,
        })?;
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Node labels that passed the label rules, sorted by key, keys unique.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeLabels(Vec<Label>);

impl NodeLabels {
    /// Parses `key=value` strings.
    pub fn parse<S: AsRef<str>>(labels: &[S]) -> Result<Self, ConfigError> {
        let mut out = Vec::with_capacity(labels.len());
        for label in labels {
            let label = label.as_ref();
            let Some((key, value)) = label.split_once('=') else {
                return Err(ConfigError::LabelSyntax {
                    label: label.to_owned(),
                });
            };
            check_label_key(key).map_err(|error| ConfigError::LabelKey {
                label: label.to_owned(),
                error,
            })?;
            check_label_value(value).map_err(|error| ConfigError::LabelValue {
                label: label.to_owned(),
                error,
            })?;
            out.push(Label {
                key: key.to_owned(),
                value: value.to_owned(),
            });
        }
        out.sort();
        if let Some(pair) = out.windows(2).find(|w| w[0].key == w[1].key) {
            return Err(ConfigError::LabelRepeated {
                key: pair[0].key.clone(),
            });
        }
        Ok(Self(out))
    }

    /// The labels, sorted by key.
    pub fn as_slice(&self) -> &[Label] {
        &self.0
    }

    /// These labels over `base`: a key in both keeps this value.
    pub fn over(mut self, base: NodeLabels) -> NodeLabels {
        for label in base.0 {
            if !self.0.iter().any(|l| l.key == label.key) {
                self.0.push(label);
            }
        }
        self.0.sort();
        self
    }
}

/// Where the MQTT broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://`: TLS with the device certificate kept in this directory
    /// (the identity directory; see `tls.rs`). `None`: plain TCP.
    pub tls: Option<PathBuf>,
}

impl BrokerAddr {
    /// Parses `mqtt://HOST[:PORT]` (or `tcp://`); the port defaults to 1883.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let (addr, tls) = Self::parse_scheme(url)?;
        if tls {
            return Err(ConfigError::BrokerTls {
                url: url.to_owned(),
                reason: "mqtts:// needs the device certificate of `flotilla-agent join`",
            });
        }
        Ok(addr)
    }

    /// Parses `mqtt://` (port 1883 by default) or `mqtts://` (8883); the
    /// flag says which (`tls` is left for the caller to fill in).
    fn parse_scheme(url: &str) -> Result<(Self, bool), ConfigError> {
        let err = |reason| ConfigError::Broker {
            url: url.to_owned(),
            reason,
        };
        let (rest, tls) = match url.strip_prefix("mqtts://") {
            Some(rest) => (rest, true),
            None => (
                url.strip_prefix("mqtt://")
                    .or_else(|| url.strip_prefix("tcp://"))
                    .ok_or_else(|| err("expected mqtt://HOST:PORT or mqtts://HOST:PORT"))?,
                false,
            ),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('@') || rest.contains('?') {
            return Err(err("expected only HOST:PORT after mqtt://"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| err("unclosed '[' in IPv6 address"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| err("expected ':' after ']'"))?,
                    ),
                ),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(err("empty host"));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| err("port: expected a number from 1 to 65535"))?,
        };
        Ok((
            Self {
                host: host.to_owned(),
                port,
                tls: None,
            },
            tls,
        ))
    }
}

/// The agent's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The MQTT broker.
    pub broker: BrokerAddr,
    /// This node's name.
    pub node: NodeName,
    /// Labels reported in the node's info.
    pub labels: NodeLabels,
    /// Persistent data: desired state, images, logs.
    pub data_dir: PathBuf,
    /// Volatile runtime state (cleared by a reboot, as the containers are).
    pub run_dir: PathBuf,
    /// Container runtime.
    pub runtime: RuntimeKind,
    /// The binary the youki runtime re-executes as its create/exec helper;
    /// `None` is this process's own executable (the agent). Set by tests,
    /// whose executable is not the agent.
    pub runtime_helper: Option<PathBuf>,
    /// Root of the MQTT topics, without a trailing `/`.
    pub topic_prefix: String,
    /// MQTT keepalive.
    pub keepalive: Duration,
    /// Time between SIGTERM and SIGKILL for containers of unknown pods.
    pub stop_grace: Duration,
    /// Status is sent again this often even when nothing changed.
    pub resync: Duration,
    /// How images are pulled from registries.
    pub pull: crate::image::PullSettings,
    /// Size cap and rotated files kept of each container's log.
    pub logs: crate::logs::LogLimits,
    /// How desired state is checked.
    pub trust: Trust,
    /// MQTT password (username: the node name), from `join`.
    pub password: Option<String>,
}

impl Config {
    /// A configuration with the defaults of the command line.
    pub fn new(broker: &str, node: &str, data_dir: PathBuf) -> Result<Self, ConfigError> {
        let node = NodeName::new(node)?;
        Ok(Self {
            broker: BrokerAddr::parse(broker)?,
            run_dir: default_run_dir(&node),
            node,
            labels: NodeLabels::default(),
            data_dir: absolute("data dir", data_dir)?,
            runtime: RuntimeKind::Youki,
            runtime_helper: None,
            topic_prefix: flotilla_proto::DEFAULT_PREFIX.to_owned(),
            keepalive: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            resync: Duration::from_secs(30 * 60),
            pull: crate::image::PullSettings::default(),
            logs: crate::logs::LogLimits::default(),
            // The command line insists on a key (`from_args`); code that
            // builds a config itself (tests, simulated fleets) decides.
            trust: Trust::Unverified,
            password: None,
        })
    }

    /// Validates flags into a configuration.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        // A device with a certificate always uses TLS, to the broker `join`
        // stored unless told another.
        let identity = identity_dir(&absolute("data dir", args.data_dir.clone())?);
        let certified = crate::tls::has_certificate(&identity);
        let url = match (&args.broker, certified) {
            (Some(url), _) => url.clone(),
            (None, true) => crate::tls::stored_broker(&identity)?,
            (None, false) => return Err(ConfigError::NoBroker),
        };
        let (mut broker, tls) = BrokerAddr::parse_scheme(&url)?;
        match (tls, certified) {
            (true, true) => {
                // Checked now, so a broken identity fails the start, not every connect.
                crate::tls::client_config(&identity)?;
                broker.tls = Some(identity.clone());
            }
            (false, false) => {}
            (false, true) => {
                return Err(ConfigError::BrokerTls {
                    url,
                    reason: "this device has a certificate: it only connects with mqtts://",
                });
            }
            (true, false) => {
                return Err(ConfigError::BrokerTls {
                    url,
                    reason: "mqtts:// needs the device certificate of `flotilla-agent join`",
                });
            }
        }
        let mut config = Self::new("mqtt://unset", &args.node, args.data_dir)?;
        config.broker = broker;
        config.labels = NodeLabels::parse(&args.labels)?;
        if let Some(run_dir) = args.run_dir {
            config.run_dir = absolute("run dir", run_dir)?;
        }
        config.runtime = args.runtime;
        config.topic_prefix = check_topic_prefix(&args.topic_prefix)?;
        config.keepalive = nonzero(args.keepalive, "keepalive")?;
        config.stop_grace = args.stop_grace;
        config.resync = nonzero(args.resync, "resync")?;
        if let Some(path) = args.registries {
            config.pull = crate::image::PullSettings::load(&absolute("registries file", path)?)?;
        }
        config.logs = crate::logs::LogLimits {
            max_bytes: args.log_max_size.max(crate::logs::MIN_MAX_BYTES),
            kept_files: args.log_kept_files.max(1),
        };
        let identity = identity_dir(&config.data_dir);
        let pinned = identity.join(CONTROLLER_KEY_FILE);
        config.trust = match args.controller_key {
            Some(path) => Trust::load(&path)?,
            None if pinned.exists() => Trust::load(&pinned)?,
            None if args.insecure_unsigned => Trust::Unverified,
            None => return Err(ConfigError::NoControllerKey),
        };
        let joined = identity.join(JOIN_LABELS_FILE);
        if joined.exists() {
            let text = std::fs::read_to_string(&joined).map_err(|source| ConfigError::Path {
                what: "join labels file",
                path: joined.clone(),
                source,
            })?;
            let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
            let labels = std::mem::take(&mut config.labels);
            config.labels = labels.over(NodeLabels::parse(&lines)?);
        }
        let password = identity.join(PASSWORD_FILE);
        if password.exists() {
            let text = std::fs::read_to_string(&password).map_err(|source| ConfigError::Path {
                what: "mqtt password file",
                path: password.clone(),
                source,
            })?;
            config.password = Some(text.trim().to_owned());
        }
        Ok(config)
    }
}

fn default_run_dir(node: &NodeName) -> PathBuf {
    PathBuf::from(format!("/run/flotilla-agent/{node}"))
}

fn nonzero(d: Duration, what: &'static str) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::ZeroDuration { what });
    }
    Ok(d)
}

fn check_topic_prefix(prefix: &str) -> Result<String, ConfigError> {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() || trimmed.contains(['+', '#', '\0']) {
        return Err(ConfigError::TopicPrefix {
            prefix: prefix.to_owned(),
        });
    }
    Ok(trimmed.to_owned())
}

/// Parses `500ms`, `30s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: expected a number with ms, s, m or h"))?;
    let secs = |mul: u64| {
        n.checked_mul(mul)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {s:?}: too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!(
            "duration {s:?}: unknown unit {unit:?}, expected ms, s, m or h"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_made_absolute() {
        let c = Config::new("mqtt://h", "pi-1", PathBuf::from("rel/data")).unwrap();
        assert!(
            c.data_dir.is_absolute() && c.data_dir.ends_with("rel/data"),
            "{:?}",
            c.data_dir
        );
        let c = args(&["--run-dir", "run"]).unwrap();
        assert!(
            c.run_dir.is_absolute() && c.run_dir.ends_with("run"),
            "{:?}",
            c.run_dir
        );
    }

    #[test]
    fn a_key_is_required_unless_insecure() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let argv = [
            "flotilla-agent",
            "--broker",
            "mqtt://h",
            "--node",
            "pi-1",
            "--data-dir",
            data,
        ];
        let err = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap_err();
        assert!(err.to_string().contains("no controller key"), "{err}");
    }

    fn args(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec![
            "flotilla-agent",
            "--broker",
            "mqtt://127.0.0.1:1884",
            "--node",
            "pi-1",
            "--data-dir",
            "/var/lib/flotilla",
            "--insecure-unsigned",
        ];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        Config::from_args(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = args(&[]).unwrap();
        assert_eq!(c.broker.host, "127.0.0.1");
        assert_eq!(c.broker.port, 1884);
        assert_eq!(c.node.as_str(), "pi-1");
        assert_eq!(c.run_dir, PathBuf::from("/run/flotilla-agent/pi-1"));
        assert_eq!(c.runtime, RuntimeKind::Youki);
        assert_eq!(c.topic_prefix, "flotilla/v1");
        assert_eq!(c.keepalive, Duration::from_secs(30));
        assert_eq!(c.stop_grace, Duration::from_secs(10));
        assert_eq!(c.resync, Duration::from_secs(1800));
        assert_eq!(c.logs.max_bytes, 10 << 20);
        assert_eq!(c.logs.kept_files, 2);
    }

    #[test]
    fn labels_sorted_and_checked() {
        let c = args(&["--label", "zone=b", "--label", "site=shop_1"]).unwrap();
        let keys: Vec<_> = c.labels.as_slice().iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["site", "zone"]);
        assert_eq!(
            args(&["--label", "site"]).unwrap_err(),
            "label \"site\": expected key=value"
        );
        assert_eq!(
            args(&["--label", "a=1", "--label", "a=2"]).unwrap_err(),
            "label key \"a\": given more than once"
        );
        assert!(
            args(&["--label", "a=b c"])
                .unwrap_err()
                .starts_with("label \"a=b c\": value:")
        );
    }

    #[test]
    fn the_join_tokens_labels_under_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(identity_dir(dir.path())).unwrap();
        let file = identity_dir(dir.path()).join(JOIN_LABELS_FILE);
        std::fs::write(&file, "site=shop1\nboard=pi4\n").unwrap();
        let argv = |extra: &[&str]| {
            let mut v = vec![
                "flotilla-agent".to_owned(),
                "--broker".into(),
                "mqtt://127.0.0.1:1884".into(),
                "--node".into(),
                "pi-1".into(),
                "--data-dir".into(),
                dir.path().display().to_string(),
                "--insecure-unsigned".into(),
            ];
            v.extend(extra.iter().map(|s| (*s).to_owned()));
            Config::from_args(Args::try_parse_from(v).unwrap())
        };
        let c = argv(&["--label", "site=shop2"]).unwrap();
        let labels: Vec<String> = c
            .labels
            .as_slice()
            .iter()
            .map(|l| format!("{}={}", l.key, l.value))
            .collect();
        assert_eq!(labels, ["board=pi4", "site=shop2"]);
        std::fs::write(&file, "bad label\n").unwrap();
        let err = argv(&[]).unwrap_err().to_string();
        assert!(err.contains("bad label"), "{err}");
    }

    #[test]
    fn bad_node_and_flags() {
        let e = Config::new("mqtt://h:1", "Pi_1", PathBuf::from("/d")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "node name \"Pi_1\": character 'P' at position 0 is not allowed"
        );
        assert!(args(&["--runtime", "fake", "--run-dir", "/tmp/r"]).is_ok());
        assert!(args(&["--topic-prefix", "a/#"]).is_err());
        assert!(args(&["--keepalive", "0s"]).is_err());
        assert!(args(&["--stop-grace", "10x"]).is_err());
        let e = args(&["--registries", "/nonexistent/registries.toml"]).unwrap_err();
        assert!(
            e.starts_with("registries file reading /nonexistent/registries.toml:"),
            "{e}"
        );
    }

    #[test]
    fn broker_urls() {
        let ok = |u: &str| BrokerAddr::parse(u).map(|b| (b.host, b.port));
        assert_eq!(
            ok("mqtt://broker.local").unwrap(),
            ("broker.local".into(), 1883)
        );
        assert_eq!(
            ok("tcp://10.0.0.1:1999/").unwrap(),
            ("10.0.0.1".into(), 1999)
        );
        assert_eq!(ok("mqtt://[::1]:1884").unwrap(), ("::1".into(), 1884));
        for bad in [
            "broker:1883",
            "mqtts://h:8883",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://h/a",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}
