//! Registry authentication: parsing `WWW-Authenticate` challenges (Basic,
//! and Bearer with realm, service and scope, as the distribution token
//! spec has it) and token responses; a pod's image pull secrets (Docker's
//! config JSON) turned into credentials per registry host, matched as
//! Docker matches them.

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::reference::DOCKER_HUB;
use super::settings::Credentials;

/// Longest challenge header parsed.
const MAX_CHALLENGE: usize = 4096;
/// Longest token accepted.
const MAX_TOKEN: usize = 64 * 1024;
/// Most registries in one pull secret (the controller refuses more too).
pub(crate) const MAX_SECRET_REGISTRIES: usize = 32;
/// Longest `auth`, `username` or `password` in a pull secret: it goes into
/// a header.
const MAX_SECRET_VALUE: usize = 16 * 1024;
/// Longest registry key in a pull secret's `auths`.
const MAX_SECRET_HOST: usize = 255;

/// What a registry's 401 asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// A user name and password on every request.
    Basic,
    /// A token from `realm`, for `service` and `scope`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value; `None` when it is neither Basic nor a
/// Bearer challenge with an http(s) realm.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    if header.len() > MAX_CHALLENGE {
        return None;
    }
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let realm = get("realm").filter(|r| r.starts_with("https://") || r.starts_with("http://"))?;
    Some(Challenge::Bearer {
        realm,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `key="value", key=value` pairs; commas inside quotes belong to the value.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

/// The `Authorization` value for basic authentication.
pub(crate) fn basic(username: &str, password: &str) -> String {
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved bytes).
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The token in a token server's JSON answer (`token`, or OAuth's
/// `access_token`).
pub(crate) fn parse_token(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct TokenJson {
        token: Option<String>,
        access_token: Option<String>,
    }
    let json: TokenJson =
        serde_json::from_slice(body).map_err(|e| format!("malformed token response: {e}"))?;
    let token = json
        .token
        .or(json.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "token response holds no token".to_owned())?;
    // The token goes into a header: refuse what would break it.
    if token.len() > MAX_TOKEN || token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err("token response holds a token that is too long or not printable".to_owned());
    }
    Ok(token)
}

/// Why a pull secret's Docker config JSON cannot be used. Messages name the
/// secret and the registry key, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullSecretError {
    /// Not JSON, or not an object with `auths`.
    #[error("pull secret {secret:?}: {what}")]
    Malformed {
        /// The Secret's name.
        secret: String,
        /// What is wrong.
        what: String,
    },
    /// One registry's entry is unusable.
    #[error("pull secret {secret:?}: \"auths\".{host:?}: {what}")]
    Entry {
        /// The Secret's name.
        secret: String,
        /// The registry key as written in the secret.
        host: String,
        /// What is wrong.
        what: String,
    },
}

/// Registry credentials from a pod's image pull secrets, tried for that
/// pod's pulls before the registries file's. `Debug` shows hosts and
/// secret names only.
#[derive(Clone, Default)]
pub struct PullSecrets {
    entries: Vec<PullCredential>,
    /// Secrets that could not be used, and why (no values): a refused pull
    /// names them.
    problems: Vec<String>,
}

#[derive(Clone)]
struct PullCredential {
    /// The registry, normalised by [`registry_host`].
    host: String,
    /// The Secret it came from.
    secret: String,
    credentials: Credentials,
}

impl std::fmt::Debug for PullSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<(&str, &str)> = self
            .entries
            .iter()
            .map(|e| (e.secret.as_str(), e.host.as_str()))
            .collect();
        f.debug_struct("PullSecrets")
            .field("hosts", &hosts)
            .field("problems", &self.problems)
            .finish()
    }
}

impl PullSecrets {
    /// No credentials: pulls use the registries file's only.
    pub fn none() -> Self {
        Self::default()
    }

    /// True when there are neither credentials nor problems.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.problems.is_empty()
    }

    /// Adds the credentials of Secret `secret`'s `.dockerconfigjson`:
    /// `{"auths": {KEY: {"auth": base64("user:password")} | {"username",
    /// "password"}}}`. Nothing is added when any entry is unusable.
    pub fn add_docker_config(&mut self, secret: &str, json: &[u8]) -> Result<(), PullSecretError> {
        #[derive(Deserialize)]
        struct Config {
            auths: serde_json::Map<String, serde_json::Value>,
        }
        #[derive(Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        let malformed = |what: String| PullSecretError::Malformed {
            secret: secret.to_owned(),
            what,
        };
        // serde_json's messages quote no input, only positions and kinds.
        let config: Config = serde_json::from_slice(json).map_err(|e| {
            malformed(format!(
                "expected Docker's config JSON with \"auths\": line {} column {}",
                e.line(),
                e.column()
            ))
        })?;
        if config.auths.len() > MAX_SECRET_REGISTRIES {
            return Err(malformed(format!(
                "\"auths\" names {} registries, at most {MAX_SECRET_REGISTRIES} are read",
                config.auths.len()
            )));
        }
        let mut added = Vec::with_capacity(config.auths.len());
        for (key, value) in config.auths {
            let entry_err = |what: &str| PullSecretError::Entry {
                secret: secret.to_owned(),
                host: key.chars().take(MAX_SECRET_HOST).collect(),
                what: what.to_owned(),
            };
            if key.is_empty() || key.len() > MAX_SECRET_HOST {
                return Err(entry_err("not a registry host"));
            }
            let entry: Entry = serde_json::from_value(value)
                .map_err(|_| entry_err("expected an object with string values"))?;
            let (username, password) = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    if auth.len() > MAX_SECRET_VALUE {
                        return Err(entry_err("\"auth\" is too long"));
                    }
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| entry_err("\"auth\" is not base64"))?;
                    let text = String::from_utf8(raw)
                        .map_err(|_| entry_err("\"auth\" is not UTF-8 \"user:password\""))?;
                    let (u, p) = text
                        .split_once(':')
                        .ok_or_else(|| entry_err("\"auth\" is not base64 of \"user:password\""))?;
                    (u.to_owned(), p.to_owned())
                }
                (_, Some(u), Some(p)) => (u, p),
                _ => {
                    return Err(entry_err(
                        "expected \"auth\", or \"username\" and \"password\"",
                    ));
                }
            };
            if username.is_empty() {
                return Err(entry_err("empty user name"));
            }
            // A user name with ':' cannot be sent as basic auth; control
            // characters would break the header.
            if username.contains(':')
                || username.len() > MAX_SECRET_VALUE
                || password.len() > MAX_SECRET_VALUE
                || username
                    .chars()
                    .chain(password.chars())
                    .any(char::is_control)
            {
                return Err(entry_err(
                    "user name or password too long, or holding ':' or control characters",
                ));
            }
            added.push(PullCredential {
                host: registry_host(&key),
                secret: secret.to_owned(),
                credentials: Credentials { username, password },
            });
        }
        self.entries.extend(added);
        Ok(())
    }

    /// Records that a pull secret could not be used, and why.
    pub fn add_problem(&mut self, problem: String) {
        self.problems.push(problem);
    }

    /// Why pull secrets could not be used, for a refused pull's message.
    pub(crate) fn problems(&self) -> &[String] {
        &self.problems
    }

    /// The credentials for registry `host` (as written in references or
    /// mirror lists), in the order the pod lists its secrets, each with a
    /// label naming its secret.
    pub(crate) fn for_host(&self, host: &str) -> Vec<(String, Credentials)> {
        let host = registry_host(host);
        self.entries
            .iter()
            .filter(|e| e.host == host)
            .map(|e| (format!("pull secret {:?}", e.secret), e.credentials.clone()))
            .collect()
    }
}

/// A registry key as Docker compares them: the scheme and any path dropped
/// (`https://index.docker.io/v1/` → `index.docker.io`), lowercase (host
/// names are), and Docker Hub's names all `docker.io`. A port stays: it is
/// another registry.
pub(crate) fn registry_host(key: &str) -> String {
    let key = key.trim();
    let lower = key.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .unwrap_or(&lower);
    let host = rest.split('/').next().unwrap_or(rest);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_owned()
        }
        _ => host.to_owned(),
    }
}

/// A fingerprint of a list of credentials, keying cached `Authorization`
/// values: a pod's credentials never serve another pod's requests.
pub(crate) fn fingerprint(credentials: &[(String, Credentials)]) -> [u8; 32] {
    let mut h = Sha256::new();
    for (_, c) in credentials {
        h.update((c.username.len() as u64).to_le_bytes());
        h.update(c.username.as_bytes());
        h.update((c.password.len() as u64).to_le_bytes());
        h.update(c.password.as_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=http://127.0.0.1:1/t"),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm="file:///etc/passwd""#),
            None
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn basic_encoding_and_query_escaping() {
        assert_eq!(basic("robot", "pa:ss"), "Basic cm9ib3Q6cGE6c3M=");
        assert_eq!(encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn users(secrets: &PullSecrets, host: &str) -> Vec<(String, String, String)> {
        secrets
            .for_host(host)
            .into_iter()
            .map(|(source, c)| (source, c.username, c.password))
            .collect()
    }

    #[test]
    fn registry_keys_match_as_docker_matches_them() {
        for (key, host) in [
            ("https://index.docker.io/v1/", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("docker.io", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("http://Registry.Local:5000/v2/", "registry.local:5000"),
            ("registry.local:5000", "registry.local:5000"),
            ("registry.local", "registry.local"),
            ("ghcr.io/org", "ghcr.io"),
            ("  127.0.0.1:5000 ", "127.0.0.1:5000"),
        ] {
            assert_eq!(registry_host(key), host, "{key}");
        }
    }

    #[test]
    fn docker_config_gives_credentials_per_registry() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "registry.local:5000": {{"username": "robot", "password": "p:w"}},
                "registry.local": {{"auth": "{}", "email": "x@y"}}
            }}}}"#,
            b64("hub:secret"),
            b64("plain:colon:in:password")
        );
        let mut s = PullSecrets::none();
        s.add_docker_config("regcred", json.as_bytes()).unwrap();
        let label = "pull secret \"regcred\"".to_owned();
        // Docker Hub under any of its names; a reference's registry is
        // `docker.io` for `busybox`, kept as written for `index.docker.io/…`.
        for host in ["docker.io", "index.docker.io"] {
            assert_eq!(
                users(&s, host),
                [(label.clone(), "hub".into(), "secret".into())]
            );
        }
        // The port is part of the registry.
        assert_eq!(
            users(&s, "registry.local:5000"),
            [(label.clone(), "robot".into(), "p:w".into())]
        );
        assert_eq!(
            users(&s, "registry.local"),
            [(label.clone(), "plain".into(), "colon:in:password".into())]
        );
        assert!(users(&s, "registry.local:5001").is_empty());
        assert!(users(&s, "other.local").is_empty());

        // A second secret adds, in order; the first listed is tried first.
        let json2 = format!(r#"{{"auths":{{"docker.io":{{"auth":"{}"}}}}}}"#, b64("b:2"));
        s.add_docker_config("second", json2.as_bytes()).unwrap();
        let found = users(&s, "docker.io");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].1, "hub");
        assert_eq!(
            (found[1].0.as_str(), found[1].1.as_str()),
            ("pull secret \"second\"", "b")
        );

        // Debug never shows a value.
        let shown = format!("{s:?}");
        assert!(shown.contains("registry.local:5000"), "{shown}");
        for value in ["secret", "p:w", "colon", "hub"] {
            assert!(!shown.contains(value), "{shown}");
        }
    }

    #[test]
    fn bad_docker_configs_are_refused_whole_naming_no_value() {
        let refused = |json: &str| {
            let mut s = PullSecrets::none();
            let e = s.add_docker_config("rc", json.as_bytes()).unwrap_err();
            assert!(s.for_host("r").is_empty(), "nothing added for {json}");
            e.to_string()
        };
        let e = refused("{");
        assert!(
            e.starts_with("pull secret \"rc\": expected Docker's config JSON"),
            "{e}"
        );
        assert!(refused(r#"{"x":1}"#).contains("\"auths\""));
        let e = refused(r#"{"auths":{"r":{"auth":"!!notbase64"}}}"#);
        assert_eq!(
            e,
            "pull secret \"rc\": \"auths\".\"r\": \"auth\" is not base64"
        );
        let e = refused(&format!(
            r#"{{"auths":{{"r":{{"auth":"{}"}}}}}}"#,
            b64("hunter2")
        ));
        assert!(e.contains("user:password"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = refused(r#"{"auths":{"r":{"username":"u"}}}"#);
        assert!(e.contains("expected \"auth\""), "{e}");
        let e = refused(r#"{"auths":{"r":{"username":"a:b","password":"p"}}}"#);
        assert!(e.contains("':'"), "{e}");
        let e = refused(r#"{"auths":{"r":{"username":"u","password":"p\r\nX-Evil: 1"}}}"#);
        assert!(
            e.contains("control characters") && !e.contains("Evil"),
            "{e}"
        );
        let e = refused(r#"{"auths":{"r":{"username":"u","password":7}}}"#);
        assert!(e.contains("string values"), "{e}");
        // One good entry and one bad: nothing is taken.
        refused(r#"{"auths":{"r":{"username":"u","password":"p"},"s":{"auth":"%"}}}"#);
        // At most 32 registries, as the controller allows.
        let many = |n: usize| {
            let entries: Vec<String> = (0..n)
                .map(|i| format!(r#""r{i}.local":{{"username":"u","password":"p"}}"#))
                .collect();
            format!(r#"{{"auths":{{{}}}}}"#, entries.join(","))
        };
        let mut s = PullSecrets::none();
        s.add_docker_config("rc", many(32).as_bytes()).unwrap();
        assert_eq!(s.for_host("r31.local").len(), 1);
        assert!(refused(&many(33)).contains("at most 32"));
        let long = "x".repeat(MAX_SECRET_VALUE + 1);
        let e = refused(&format!(
            r#"{{"auths":{{"r":{{"username":"u","password":"{long}"}}}}}}"#
        ));
        assert!(e.contains("too long"), "{}", &e[..e.len().min(200)]);
        let long_host = "h".repeat(300);
        let e = refused(&format!(
            r#"{{"auths":{{"{long_host}":{{"username":"u","password":"p"}}}}}}"#
        ));
        assert!(
            e.contains("not a registry host"),
            "{}",
            &e[..e.len().min(400)]
        );
    }

    #[test]
    fn fingerprints_tell_credential_lists_apart() {
        let c = |u: &str, p: &str| {
            (
                String::new(),
                Credentials {
                    username: u.into(),
                    password: p.into(),
                },
            )
        };
        assert_eq!(fingerprint(&[c("a", "b")]), fingerprint(&[c("a", "b")]));
        assert_ne!(fingerprint(&[c("a", "b")]), fingerprint(&[c("a", "c")]));
        assert_ne!(fingerprint(&[c("ab", "")]), fingerprint(&[c("a", "b")]));
        assert_ne!(fingerprint(&[]), fingerprint(&[c("a", "b")]));
    }

    #[test]
    fn tokens() {
        assert_eq!(parse_token(br#"{"token":"abc"}"#), Ok("abc".to_owned()));
        assert_eq!(
            parse_token(br#"{"access_token":"xyz","expires_in":60}"#),
            Ok("xyz".to_owned())
        );
        assert!(parse_token(br#"{"token":""}"#).is_err());
        assert!(parse_token(b"{\"token\":\"a\\nb\"}").is_err());
        assert!(parse_token(b"<html>").is_err());
    }
}
