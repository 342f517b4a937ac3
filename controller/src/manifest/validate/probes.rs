//! `livenessProbe`, `readinessProbe` and `startupProbe` of a container, and
//! the whole numbers of seconds and counts they (and the pod's grace
//! period) are made of.

use flotilla_proto::{Probe, ProbeAction};
use serde_norway::Value;

use super::super::{
    DEFAULT_PROBE_FAILURE_THRESHOLD, DEFAULT_PROBE_PERIOD_SECS, DEFAULT_PROBE_TIMEOUT_SECS,
    MAX_PROBE_PATH_BYTES,
};
use super::{Check, field, optional, shown};

/// Which probe is being read: liveness and startup probes pass on a single
/// success, as in Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    fn name(self) -> &'static str {
        match self {
            Self::Liveness => "liveness",
            Self::Readiness => "readiness",
            Self::Startup => "startup",
        }
    }
}

const HANDLERS: [&str; 3] = ["exec", "tcpSocket", "httpGet"];

impl Check<'_> {
    pub(super) fn probe(&mut self, path: &str, v: &Value, kind: ProbeKind) -> Option<Probe> {
        let fields = [
            "exec",
            "tcpSocket",
            "httpGet",
            "initialDelaySeconds",
            "periodSeconds",
            "timeoutSeconds",
            "successThreshold",
            "failureThreshold",
        ];
        let m = self.map(path, v, &fields)?;
        let handlers: Vec<(&str, &Value)> = HANDLERS
            .into_iter()
            .filter_map(|k| optional(m, k).map(|v| (k, v)))
            .collect();
        let action = match handlers.as_slice() {
            [] => {
                self.err(path, "expected one of exec, tcpSocket, httpGet");
                None
            }
            [(name, v)] => self.probe_action(&field(path, name), name, v),
            [(first, _), (second, _), ..] => {
                let msg = format!(
                    "only one of exec, tcpSocket, httpGet may be given, found {first} and {second}"
                );
                self.err(path, msg);
                None
            }
        };
        let mut number = |key: &str, default: u32, min: u32| match optional(m, key) {
            None => Some(default),
            Some(v) => self.whole(&field(path, key), v, min),
        };
        let initial_delay_secs = number("initialDelaySeconds", 0, 0);
        let period_secs = number("periodSeconds", DEFAULT_PROBE_PERIOD_SECS, 1);
        let timeout_secs = number("timeoutSeconds", DEFAULT_PROBE_TIMEOUT_SECS, 1);
        let mut success_threshold = number("successThreshold", 1, 1);
        let failure_threshold = number("failureThreshold", DEFAULT_PROBE_FAILURE_THRESHOLD, 1);
        if kind != ProbeKind::Readiness && success_threshold.is_some_and(|n| n != 1) {
            let msg = format!("must be 1 for a {} probe", kind.name());
            self.err(&field(path, "successThreshold"), msg);
            success_threshold = None;
        }
        Some(Probe {
            action: action?,
            initial_delay_secs: initial_delay_secs?,
            period_secs: period_secs?,
            timeout_secs: timeout_secs?,
            success_threshold: success_threshold?,
            failure_threshold: failure_threshold?,
        })
    }

    fn probe_action(&mut self, path: &str, name: &str, v: &Value) -> Option<ProbeAction> {
        match name {
            "exec" => {
                let m = self.map(path, v, &["command"])?;
                let at = field(path, "command");
                let given = self.required(path, m, "command")?;
                let before = self.problems.list.len() + self.problems.dropped;
                let command = self.strings(&at, Some(given));
                if self.problems.list.len() + self.problems.dropped > before {
                    return None;
                }
                if command.is_empty() {
                    self.err(&at, "must not be empty");
                    return None;
                }
                Some(ProbeAction::Exec { command })
            }
            "tcpSocket" => {
                let m = self.map(path, v, &["port"])?;
                let port = self.required(path, m, "port")?;
                let port = self.port(&field(path, "port"), port)?;
                Some(ProbeAction::Tcp { port })
            }
            _ => {
                let m = self.map(path, v, &["port", "path"])?;
                let port = self
                    .required(path, m, "port")
                    .and_then(|p| self.port(&field(path, "port"), p));
                let target = match optional(m, "path") {
                    None => Some("/".to_owned()),
                    Some(p) => {
                        let at = field(path, "path");
                        self.str(&at, p)
                            .filter(|p| self.http_path(&at, p))
                            .map(str::to_owned)
                    }
                };
                Some(ProbeAction::Http {
                    port: port?,
                    path: target?,
                })
            }
        }
    }

    fn port(&mut self, path: &str, v: &Value) -> Option<u16> {
        let n = match v {
            Value::Number(n) => n,
            Value::String(s) => {
                let msg = format!(
                    "expected a port number from 1 to 65535, found the string {} \
                     (named ports are not supported)",
                    shown(s)
                );
                self.err(path, msg);
                return None;
            }
            other => {
                self.expected(path, "a port number from 1 to 65535", other);
                return None;
            }
        };
        match n.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p > 0 => Some(p),
            _ => {
                self.err(path, format!("{n} is not a port: expected 1 to 65535"));
                None
            }
        }
    }

    /// A request target: starts with `/`, printable ASCII without spaces,
    /// since it goes into the request line as it is.
    fn http_path(&mut self, path: &str, p: &str) -> bool {
        if !p.starts_with('/') {
            self.err(path, format!("{} must start with \"/\"", shown(p)));
            return false;
        }
        if p.len() > MAX_PROBE_PATH_BYTES {
            let msg = format!(
                "must be at most {MAX_PROBE_PATH_BYTES} bytes, found {}",
                p.len()
            );
            self.err(path, msg);
            return false;
        }
        if let Some((index, ch)) = p.char_indices().find(|(_, c)| !c.is_ascii_graphic()) {
            let msg =
                format!("character {ch:?} at position {index} is not allowed (percent-encode it)");
            self.err(path, msg);
            return false;
        }
        true
    }

    /// A whole number from `min` to `u32::MAX` (seconds or a count).
    pub(super) fn whole(&mut self, path: &str, v: &Value, min: u32) -> Option<u32> {
        let Value::Number(n) = v else {
            self.expected(path, "a whole number", v);
            return None;
        };
        let result = match (n.as_u64(), n.as_i64()) {
            (Some(x), _) => match u32::try_from(x) {
                Ok(x) if x >= min => Ok(x),
                Ok(_) => Err(format!("must be at least {min}")),
                Err(_) => Err(format!("must be at most {}", u32::MAX)),
            },
            (None, Some(_)) => Err(format!("must be at least {min}")),
            (None, None) => Err("must be a whole number".to_owned()),
        };
        result
            .map_err(|reason| self.err(path, format!("{n} is not valid: {reason}")))
            .ok()
    }
}
