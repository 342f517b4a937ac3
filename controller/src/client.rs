//! The CLI's API client: where the API is, which bearer token to send and
//! which CA to trust. The token is `--token` (`$FLOTILLA_TOKEN`), else the
//! file `--token-file` (`$FLOTILLA_TOKEN_FILE`) names, else the local
//! controller's `admin.token`; the CA is `--ca`, else
//! `$FLOTILLA_CA`, else the local controller's `ca.pem`, else the system's
//! roots. The local files are read only for a loopback server, so a local
//! admin token is never sent to another machine, and a token is never sent
//! over plain HTTP to one either.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use crate::identity::api_tokens::ADMIN_TOKEN_FILE;
use crate::identity::ca::{CA_CERT_FILE, pem_der};

/// The default API address.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7470";
/// Largest token or CA file read.
const MAX_FILE: u64 = 256 * 1024;

/// What the command line says about the API.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `https://host:port` (or `http://` on loopback).
    pub server: String,
    /// `--token` / `$FLOTILLA_TOKEN`.
    pub token: Option<String>,
    /// `--token-file` / `$FLOTILLA_TOKEN_FILE`.
    pub token_file: Option<PathBuf>,
    /// `--ca` / `$FLOTILLA_CA`.
    pub ca: Option<PathBuf>,
}

/// An API client.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
    ca_der: Option<Vec<u8>>,
}

/// The host of `http(s)://host[:port][/…]`, brackets removed.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h);
    }
    Some(authority.split(':').next().unwrap_or(authority))
}

/// Whether `url` points at this machine's loopback.
pub fn is_loopback(url: &str) -> bool {
    host_of(url).is_some_and(|h| {
        h.eq_ignore_ascii_case("localhost")
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

/// Where a controller on this machine keeps its files: `$FLOTILLA_DATA_DIR`
/// (or `/var/lib/flotilla`) as `serve` uses it, and its `controller/` as
/// `up` does.
fn local_dirs() -> Vec<PathBuf> {
    let base = std::env::var_os("FLOTILLA_DATA_DIR")
        .map_or_else(|| PathBuf::from("/var/lib/flotilla"), PathBuf::from);
    vec![base.join("controller"), base]
}

fn read_capped(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The first of `dirs/name` that can be read.
fn local_file(name: &str) -> Option<(PathBuf, String)> {
    local_dirs().into_iter().find_map(|d| {
        let path = d.join(name);
        read_capped(&path).ok().map(|text| (path, text))
    })
}

impl Client {
    /// A client of the API that `options` name.
    pub fn new(options: &ClientOptions) -> anyhow::Result<Client> {
        let base = options.server.trim_end_matches('/').to_owned();
        let https = if base.starts_with("https://") {
            true
        } else if base.starts_with("http://") {
            false
        } else {
            bail!("server {base:?}: expected https://HOST:PORT (or http:// on this machine)");
        };
        let local = is_loopback(&base);
        let token = match (&options.token, &options.token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(path)) => {
                let text = read_capped(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?;
                let token = text.trim();
                anyhow::ensure!(
                    !token.is_empty(),
                    "token file {}: empty, expected an api token",
                    path.display()
                );
                Some(token.to_owned())
            }
            (None, None) if local => local_file(ADMIN_TOKEN_FILE).map(|(_, t)| t.trim().to_owned()),
            (None, None) => None,
        }
        .filter(|t| !t.is_empty());
        if !https && !local && token.is_some() {
            bail!(
                "server {base}: refusing to send an api token in the clear to another machine; use https://"
            );
        }
        let ca = match &options.ca {
            Some(path) => Some((
                path.clone(),
                read_capped(path).with_context(|| format!("reading the CA {}", path.display()))?,
            )),
            None if local && https => local_file(CA_CERT_FILE),
            None => None,
        };
        let ca_der = match &ca {
            Some((path, pem)) => Some(
                pem_der(pem)
                    .with_context(|| format!("{}: no pem certificate in it", path.display()))?,
            ),
            None => None,
        };
        let roots = match &ca_der {
            Some(der) => vec![Certificate::from_der(der).to_owned()],
            None if https => {
                let found = rustls_native_certs::load_native_certs();
                found
                    .certs
                    .iter()
                    .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                    .collect()
            }
            None => Vec::new(),
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::from(roots))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Ok(Self {
            base,
            agent,
            token,
            ca_der,
        })
    }

    /// The sha256 of the CA this client trusts, base64url: what a join
    /// token carries so a device can pin the controller without a file.
    pub fn ca_fingerprint(&self) -> Option<String> {
        use base64::Engine;
        self.ca_der
            .as_ref()
            .map(|der| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(der)))
    }

    /// One request (a POST body is sent as YAML, which takes JSON too); the
    /// answer's JSON, or its `error` as the error.
    pub fn call(&self, method: &str, path: &str, body: Option<String>) -> anyhow::Result<Value> {
        self.send(method, path, body.map(|b| ("application/yaml", b)), None)
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(
            "POST",
            path,
            Some(("application/json", body.to_string())),
            None,
        )
    }

    /// [`Client::post_json`] for an answer that may take longer than the
    /// usual 30 s (`exec`): waits at most `timeout`.
    pub fn post_json_within(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let body = Some(("application/json", body.to_string()));
        self.send("POST", path, body, Some(timeout))
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, String)>,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{}", self.base, path);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("POST", Some((content_type, body))) => {
                let mut req = self.agent.post(&url).header("content-type", content_type);
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                if let Some(t) = timeout {
                    req = req.config().timeout_global(Some(t)).build();
                }
                req.send(body)
            }
            (m, _) => {
                let mut req = match m {
                    "DELETE" => self.agent.delete(&url),
                    _ => self.agent.get(&url),
                };
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.call()
            }
        };
        let mut response = result.map_err(|e| {
            // rustls' refusals reach us wrapped in an io error.
            let tls = match &e {
                ureq::Error::Tls(_) | ureq::Error::Rustls(_) => true,
                ureq::Error::Io(io) => io
                    .get_ref()
                    .is_some_and(|inner| inner.is::<rustls::Error>()),
                _ => false,
            };
            if tls {
                anyhow::anyhow!(
                    "cannot reach the flotilla API at {}: TLS: {e} (trust the controller's CA with --ca FILE or FLOTILLA_CA)",
                    self.base
                )
            } else {
                anyhow::Error::new(e)
                    .context(format!("cannot reach the flotilla API at {}", self.base))
            }
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .with_context(|| format!("reading the response from {url}"))?;
        let value: Value = serde_json::from_str(&text).with_context(|| {
            format!("{url}: the server answered {status} with a body that is not JSON")
        })?;
        if !status.is_success() {
            let msg = value["error"].as_str().unwrap_or("no message");
            bail!("{msg}");
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_servers() {
        for url in [
            "https://127.0.0.1:7470",
            "http://localhost:1/x",
            "https://[::1]:7470/",
            "https://127.9.9.9",
        ] {
            assert!(is_loopback(url), "{url}");
        }
        for url in [
            "https://10.0.0.1:7470",
            "https://controller.local:7470",
            "https://127.0.0.1.evil.example",
            "https://[2001:db8::1]:7470",
            "nonsense",
        ] {
            assert!(!is_loopback(url), "{url}");
        }
    }

    #[test]
    fn no_token_in_the_clear_to_another_machine() {
        let options = ClientOptions {
            server: "http://10.0.0.1:7470".into(),
            token: Some("fla_x".into()),
            token_file: None,
            ca: None,
        };
        let err = Client::new(&options).err().unwrap().to_string();
        assert!(err.contains("in the clear"), "{err}");
        let options = ClientOptions {
            server: "ftp://x".into(),
            ..options
        };
        assert!(Client::new(&options).is_err());
    }
}
