//! The device's MQTT certificate: its key pair (ECDSA P-256, made on the
//! device with ring, never sent), the files `join` keeps under
//! `{data_dir}/identity/` (owner-only), the rustls client config the MQTT
//! session connects with (the fleet CA as its only root), and renewal: when
//! a third of the certificate's lifetime is left, `POST /v1/renew` with a
//! fresh key, signed by the current one; no token needed.
//!
//! Files: `device.key` (PKCS#8 DER), `device.pem`, `ca.pem`, `broker` (the
//! `mqtts://` address from the controller), `server` (its API, for
//! renewal), `device.times` (when the certificate was received and when it
//! expires, ms since the epoch). A renewal writes the new key as
//! `device.key.next` before asking, so a lost answer is retried with the
//! same key, and renames both into place once the certificate is stored.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The device's private key.
pub const KEY_FILE: &str = "device.key";
/// The device's certificate.
pub const CERT_FILE: &str = "device.pem";
/// The fleet CA: the only root the MQTT session trusts.
pub const CA_FILE: &str = "ca.pem";
/// The broker's TLS address, as the controller gave it.
pub const BROKER_FILE: &str = "broker";
/// The controller's API, for renewal.
pub const SERVER_FILE: &str = "server";
/// Received and expiry times of the certificate.
pub const TIMES_FILE: &str = "device.times";
/// A renewal's key, kept until its certificate is stored.
const NEXT_KEY_FILE: &str = "device.key.next";
/// Largest identity file read.
const MAX_FILE: u64 = 64 * 1024;
/// What the key signs at join; the controller checks the same bytes
/// (`controller/src/identity/certs.rs`).
const JOIN_CONTEXT: &[u8] = b"flotilla-join-v1\0";
/// What the current key signs to renew.
const RENEW_CONTEXT: &[u8] = b"flotilla-renew-v1\0";
/// Shortest wait between failed renewals.
const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between failed renewals.
const RETRY_MAX: Duration = Duration::from_secs(15 * 60);

/// Why a certificate file or renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file holds something unusable.
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    /// The key could not be made or used.
    #[error("device key: {0}")]
    Key(String),
    /// The controller could not be reached or refused.
    #[error("renewing through {server}: {reason}")]
    Renew { server: String, reason: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TlsFileError {
    move |source| TlsFileError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The bytes the device signs at join (token secret, node, public key).
pub fn join_message(token: &str, node: &str, public_key: &[u8]) -> Vec<u8> {
    [
        JOIN_CONTEXT,
        token.as_bytes(),
        b"\0",
        node.as_bytes(),
        b"\0",
        public_key,
    ]
    .concat()
}

fn renew_message(node: &str, new_key: &[u8], time_ms: u64) -> Vec<u8> {
    [
        RENEW_CONTEXT,
        node.as_bytes(),
        b"\0",
        new_key,
        b"\0",
        &time_ms.to_be_bytes(),
    ]
    .concat()
}

/// An ECDSA P-256 key pair.
pub struct DeviceKey {
    pkcs8: Vec<u8>,
    pair: EcdsaKeyPair,
}

impl DeviceKey {
    /// A new key pair.
    pub fn generate() -> Result<Self, String> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| "no randomness for the device key".to_owned())?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec())
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self, String> {
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| format!("not a p-256 pkcs#8 key: {e}"))?;
        Ok(Self { pkcs8, pair })
    }

    fn load(path: &Path) -> Result<Self, TlsFileError> {
        Self::from_pkcs8(read(path)?).map_err(|reason| TlsFileError::Bad {
            path: path.to_owned(),
            reason,
        })
    }

    /// The raw public key (uncompressed point).
    pub fn public(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// An ASN.1 ECDSA signature of `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        self.pair
            .sign(&SystemRandom::new(), message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| "signing with the device key failed".to_owned())
    }
}

/// The certificate part of the controller's join or renew answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertAnswer {
    /// The device certificate, PEM.
    pub certificate: String,
    /// When it expires, ms since the epoch.
    pub certificate_expires_at_ms: u64,
    /// The fleet CA, PEM.
    pub ca_certificate: String,
    /// The broker's `mqtts://` address.
    pub broker: String,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let file = fs::File::open(path).map_err(io_err("opening", path))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    Ok(bytes)
}

fn read_text(path: &Path) -> Result<String, TlsFileError> {
    String::from_utf8(read(path)?)
        .map(|s| s.trim().to_owned())
        .map_err(|_| TlsFileError::Bad {
            path: path.to_owned(),
            reason: "not text".into(),
        })
}

/// Writes `bytes` to `path` owner-only, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsFileError> {
    crate::private_file::write(path, bytes).map_err(io_err("writing", path))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn check_pem(cert: &CertAnswer) -> Result<(), String> {
    for (what, pem) in [
        ("certificate", &cert.certificate),
        ("ca", &cert.ca_certificate),
    ] {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("{what}: not a pem certificate: {e}"))?;
    }
    if !cert.broker.starts_with("mqtts://") {
        return Err(format!("broker {:?}: expected mqtts://", cert.broker));
    }
    Ok(())
}

/// Keeps what a join gave: key, certificate, CA, broker, and the API the
/// certificate is renewed through. Certificate and times go last: a device
/// with a certificate file has everything else.
pub fn store(
    dir: &Path,
    key: &DeviceKey,
    cert: &CertAnswer,
    server: &str,
) -> Result<(), TlsFileError> {
    check_pem(cert).map_err(|reason| TlsFileError::Bad {
        path: dir.join(CERT_FILE),
        reason,
    })?;
    write_private(&dir.join(KEY_FILE), &key.pkcs8)?;
    write_private(&dir.join(CA_FILE), cert.ca_certificate.as_bytes())?;
    write_private(&dir.join(BROKER_FILE), cert.broker.as_bytes())?;
    write_private(&dir.join(SERVER_FILE), server.as_bytes())?;
    store_cert(dir, cert)
}

fn store_cert(dir: &Path, cert: &CertAnswer) -> Result<(), TlsFileError> {
    write_private(&dir.join(CERT_FILE), cert.certificate.as_bytes())?;
    let times = format!("{} {}\n", now_ms(), cert.certificate_expires_at_ms);
    write_private(&dir.join(TIMES_FILE), times.as_bytes())
}

/// Removes the certificate files (a join that gave a password instead).
pub fn forget(dir: &Path) -> Result<(), TlsFileError> {
    for name in [
        CERT_FILE,
        TIMES_FILE,
        KEY_FILE,
        NEXT_KEY_FILE,
        CA_FILE,
        BROKER_FILE,
        SERVER_FILE,
    ] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("removing", &path)(e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `dir` holds a device certificate.
pub fn has_certificate(dir: &Path) -> bool {
    dir.join(CERT_FILE).exists()
}

/// The broker address stored at join.
pub fn stored_broker(dir: &Path) -> Result<String, TlsFileError> {
    read_text(&dir.join(BROKER_FILE))
}

/// The rustls client config for the MQTT session: the fleet CA as the only
/// root, the device's certificate and key; ring as the provider.
pub fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, TlsFileError> {
    let bad = |path: PathBuf| move |reason: String| TlsFileError::Bad { path, reason };
    let ca_path = dir.join(CA_FILE);
    let ca = CertificateDer::from_pem_slice(&read(&ca_path)?)
        .map_err(|e| bad(ca_path.clone())(format!("not a pem certificate: {e}")))?;
    let cert_path = dir.join(CERT_FILE);
    let cert = CertificateDer::from_pem_slice(&read(&cert_path)?)
        .map_err(|e| bad(cert_path.clone())(format!("not a pem certificate: {e}")))?;
    let key_path = dir.join(KEY_FILE);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(read(&key_path)?));
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca)
        .map_err(|e| bad(ca_path.clone())(e.to_string()))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsFileError::Key(e.to_string()))?
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![cert], key)
    .map_err(|e| bad(key_path)(format!("does not go with {CERT_FILE}: {e}")))?;
    Ok(Arc::new(config))
}

/// When the certificate should be renewed (once a third of its lifetime is
/// left) and when it expires, ms since the epoch.
fn renew_at_ms(dir: &Path) -> Result<(u64, u64), TlsFileError> {
    let path = dir.join(TIMES_FILE);
    let text = read_text(&path)?;
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(received)), Some(Ok(expires))) => {
            let lifetime = expires.saturating_sub(received);
            Ok((expires.saturating_sub(lifetime / 3), expires))
        }
        _ => Err(TlsFileError::Bad {
            path,
            reason: "expected two times in ms".into(),
        }),
    }
}

/// Renews the certificate now. Blocking (HTTP, file I/O).
pub fn renew(dir: &Path, node: &str) -> Result<(), TlsFileError> {
    let current = DeviceKey::load(&dir.join(KEY_FILE))?;
    let next_path = dir.join(NEXT_KEY_FILE);
    // The key of an earlier attempt whose answer may have been lost.
    let next = match DeviceKey::load(&next_path) {
        Ok(k) => k,
        Err(_) => {
            let k = DeviceKey::generate().map_err(TlsFileError::Key)?;
            write_private(&next_path, &k.pkcs8)?;
            k
        }
    };
    let time_ms = now_ms();
    let signature = current
        .sign(&renew_message(node, next.public(), time_ms))
        .map_err(TlsFileError::Key)?;
    let server = read_text(&dir.join(SERVER_FILE))?;
    let fail = |reason: String| TlsFileError::Renew {
        server: server.clone(),
        reason,
    };
    let base = server.trim_end_matches('/');
    let agent = if base.starts_with("https://") {
        crate::join_tls::agent(base, Some(&dir.join(CA_FILE)), None).map_err(fail)?
    } else {
        crate::join_tls::plain_agent()
    };
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let body = serde_json::json!({
        "node": node,
        "publicKey": b64(next.public()),
        "timeMs": time_ms,
        "signature": b64(&signature),
    });
    let text = crate::join_tls::post_json(&agent, &format!("{base}/v1/renew"), &body, MAX_FILE)
        .map_err(|e| fail(e.to_string()))?;
    let answer: CertAnswer =
        serde_json::from_str(&text).map_err(|e| fail(format!("the answer: {e}")))?;
    check_pem(&answer).map_err(|e| fail(format!("the answer: {e}")))?;
    // The new key replaces the old first: until the certificate is written
    // the old certificate is kept with a key that does not match it, which
    // `client_config` refuses; the order below keeps that window to two
    // renames, and a crash inside it is mended by the retry, which finds
    // no `.next` key and renews with the (new) current key.
    fs::rename(&next_path, dir.join(KEY_FILE)).map_err(io_err("renaming", &next_path))?;
    store_cert(dir, &answer)
}

/// Keeps the certificate renewed while the agent runs: at start when a
/// third of its lifetime is already gone, else when that time comes;
/// failures are retried with back-off. Each stored certificate bumps
/// `renewed`, and the session uses it at its next connect.
pub fn spawn_renewal(
    dir: PathBuf,
    node: String,
    renewed: watch::Sender<u64>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    tracker.spawn(async move {
        let mut retry = RETRY_MIN;
        loop {
            let wait = match renew_at_ms(&dir) {
                Ok((at, _)) => Duration::from_millis(at.saturating_sub(now_ms())),
                Err(e) => {
                    tracing::warn!("certificate renewal: {e}");
                    RETRY_MAX
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let (d, n) = (dir.clone(), node.clone());
            match tokio::task::spawn_blocking(move || renew(&d, &n)).await {
                Ok(Ok(())) => {
                    retry = RETRY_MIN;
                    renewed.send_modify(|g| *g += 1);
                    tracing::info!("certificate renewed; used from the next connect");
                }
                Ok(Err(e)) => {
                    let left = renew_at_ms(&dir).map_or(0, |(_, exp)| exp.saturating_sub(now_ms()));
                    tracing::warn!(
                        left_ms = left,
                        "certificate renewal failed, retrying in {retry:?}: {e}"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
                Err(e) => {
                    tracing::error!("certificate renewal task: {e}");
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_with_a_third_left() {
        let dir = tempfile::tempdir().unwrap();
        write_private(&dir.path().join(TIMES_FILE), b"1000 4000\n").unwrap();
        assert_eq!(renew_at_ms(dir.path()).unwrap(), (3000, 4000));
        write_private(&dir.path().join(TIMES_FILE), b"garbage").unwrap();
        assert!(renew_at_ms(dir.path()).is_err());
    }

    #[test]
    fn keys_sign_and_survive_a_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate().unwrap();
        assert_eq!(key.public().len(), 65);
        let path = dir.path().join(KEY_FILE);
        write_private(&path, &key.pkcs8).unwrap();
        let again = DeviceKey::load(&path).unwrap();
        assert_eq!(again.public(), key.public());
        let sig = again.sign(b"m").unwrap();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            key.public(),
        )
        .verify(b"m", &sig)
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
