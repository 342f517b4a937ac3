//! How `join` trusts the controller's HTTPS certificate: a CA file
//! (`--ca`); or the CA whose sha256 the join token carries after a `.`
//! (`flotilla token create` adds it), found in the chain the controller
//! sends and then used as the only root, so a fresh device needs nothing
//! but the token; or, with neither, the system's roots. The first
//! handshake only collects the chain and is aborted before anything is
//! sent; the join itself then runs with full checks (chain, name, expiry).

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

/// How long connecting and the first handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a whole API call (join, renewal) may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest CA file read.
const MAX_CA_FILE: u64 = 256 * 1024;

/// The token's secret and the CA fingerprint it may carry
/// (`flt_SECRET.PIN`, PIN the base64url sha256 of the CA certificate).
pub fn split_token(token: &str) -> Result<(&str, Option<[u8; 32]>), String> {
    let Some((secret, pin)) = token.trim().split_once('.') else {
        return Ok((token.trim(), None));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(pin)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or("the token's CA fingerprint (after '.') is not a base64url sha256")?;
    Ok((secret, Some(bytes)))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `(host, port)` of `https://host[:port][/…]`.
fn host_port(server: &str) -> Result<(String, u16), String> {
    let rest = server
        .strip_prefix("https://")
        .ok_or("expected https://HOST[:PORT]")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed '['")?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
        None => 443,
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    Ok((host.to_owned(), port))
}

/// Collects the chain the server sends, then fails the handshake.
#[derive(Debug)]
struct Collect {
    chain: Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Collect {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut chain) = self.chain.lock() {
            chain.extend(
                std::iter::once(end_entity)
                    .chain(intermediates)
                    .map(|c| c.as_ref().to_vec()),
            );
        }
        // Never trusted: this handshake only learns the chain.
        Err(rustls::Error::General("chain collected".into()))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate in `server`'s chain whose sha256 is `pin`.
fn pinned_ca(server: &str, pin: &[u8; 32]) -> Result<Vec<u8>, String> {
    let (host, port) = host_port(server)?;
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("host {host:?}: {e}"))?;
    let collect = Arc::new(Collect {
        chain: Mutex::new(Vec::new()),
        provider: provider(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&collect) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolving {host}: no address"))?;
    let mut tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let timeout = Some(CONNECT_TIMEOUT);
    tcp.set_read_timeout(timeout)
        .and_then(|()| tcp.set_write_timeout(timeout))
        .map_err(|e| e.to_string())?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            // Our own refusal ends it once the chain is in; anything else
            // (not TLS, a timeout) is the answer.
            if e.kind() != io::ErrorKind::InvalidData {
                return Err(format!("tls handshake with {addr}: {e}"));
            }
            break;
        }
    }
    let chain = collect.chain.lock().map_err(|_| "lock poisoned")?.clone();
    if chain.is_empty() {
        return Err(format!("{addr} sent no certificate"));
    }
    chain
        .into_iter()
        .find(|der| Sha256::digest(der).as_slice() == pin)
        .ok_or_else(|| {
            "no certificate the controller sent matches the join token's CA fingerprint: \
             a different controller, or one whose certificate chain leaves its CA out (use --ca FILE)"
                .to_owned()
        })
}

/// The HTTP agent for joining through `server`, trusting `ca_file`, else
/// the CA `pin` names, else the system's roots. Blocking (the pin is
/// checked against the controller at once).
pub fn agent(
    server: &str,
    ca_file: Option<&Path>,
    pin: Option<&[u8; 32]>,
) -> Result<ureq::Agent, String> {
    let roots: Vec<Certificate<'static>> = if let Some(path) = ca_file {
        use std::io::Read;
        let mut pem = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CA_FILE).read_to_end(&mut pem))
            .map_err(|e| format!("reading the CA {}: {e}", path.display()))?;
        let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{}: no pem certificate in it", path.display()));
        }
        certs
    } else if let Some(pin) = pin {
        vec![Certificate::from_der(&pinned_ca(server, pin)?).to_owned()]
    } else {
        rustls_native_certs::load_native_certs()
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect()
    };
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::from(roots))
        .unversioned_rustls_crypto_provider(provider())
        .build();
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls)
        .timeout_global(Some(API_TIMEOUT))
        .build()
        .into())
}

/// The HTTP agent for a controller reached over plain HTTP (the caller
/// decides whether that is acceptable).
pub fn plain_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(API_TIMEOUT))
        .build()
        .into()
}

/// Why a call to the controller's API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    /// The request or the answer did not get through.
    #[error("{0}")]
    Transport(String),
    /// The controller answered with an error status: its message.
    #[error("{0}")]
    Refused(String),
}

/// POSTs `body` to `url` and returns the answer's text (at most `limit`
/// bytes); an error status is [`ApiCallError::Refused`] with the API's
/// `error` message.
pub fn post_json(
    agent: &ureq::Agent,
    url: &str,
    body: &serde_json::Value,
    limit: u64,
) -> Result<String, ApiCallError> {
    let transport = |e: ureq::Error| ApiCallError::Transport(e.to_string());
    let mut response = agent.post(url).send_json(body).map_err(transport)?;
    let status = response.status();
    let text = response
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_string()
        .map_err(transport)?;
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("status {status}"));
        return Err(ApiCallError::Refused(message));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_urls() {
        assert_eq!(split_token("flt_abc").unwrap(), ("flt_abc", None));
        let pin = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 32]);
        assert_eq!(
            split_token(&format!("flt_abc.{pin}")).unwrap(),
            ("flt_abc", Some([7u8; 32]))
        );
        assert!(split_token("flt_abc.xyz").is_err());
        assert_eq!(
            host_port("https://ctl.local:7470/x").unwrap(),
            ("ctl.local".into(), 7470)
        );
        assert_eq!(
            host_port("https://[::1]:7470").unwrap(),
            ("::1".into(), 7470)
        );
        assert_eq!(host_port("https://ctl").unwrap(), ("ctl".into(), 443));
        assert!(host_port("http://ctl").is_err());
    }
}
