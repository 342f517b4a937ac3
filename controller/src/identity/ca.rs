//! The fleet's certificate authority: an ECDSA P-256 key and a self-signed
//! certificate, made on first start in the data directory (`ca.key`
//! owner-only, `ca.pem`), that signs device certificates (CN and SAN = the
//! node name), the broker's server certificates, the controller's own client
//! certificate and the revocation list Mosquitto reads.
//!
//! rcgen (on ring) builds and signs; nothing here parses a certificate: the
//! issuer is rebuilt from the same fixed name and key on every start, and
//! devices send their raw public key rather than a signing request.

use std::fs;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, RevokedCertParams, SanType, SerialNumber,
    SignatureAlgorithm,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

/// The CA's private key (PKCS#8 PEM), owner-only.
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA's certificate (PEM): what devices and brokers trust.
pub const CA_CERT_FILE: &str = "ca.pem";
/// Subject of the CA. Fixed: the issuer of every certificate is rebuilt from
/// it, so it must never change for an existing CA.
const CA_NAME: &str = "flotilla fleet ca";
/// How long the CA itself is valid.
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// How long a broker's server certificate is valid. The embedded broker's is
/// made afresh at every start and never leaves memory; Mosquitto's is
/// written again by `flotilla broker-config`.
pub const SERVER_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Certificates start an hour back, so a device whose clock is a little
/// behind still takes them.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Largest key or certificate file read.
const MAX_FILE: u64 = 64 * 1024;
/// Length of an uncompressed P-256 public key (0x04, x, y).
pub const P256_PUBLIC_LEN: usize = 65;

/// Why the CA could not be made, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The key file can be read by others than its owner.
    #[error("ca key {path}: mode {mode:o} lets others read it, expected 0600")]
    Exposed { path: PathBuf, mode: u32 },
    /// A CA file is there but unusable, or the other one is missing.
    #[error("ca {path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    /// rcgen refused to build or sign something.
    #[error("building {what}: {source}")]
    Build {
        what: &'static str,
        source: rcgen::Error,
    },
    /// A public key from a device is not an uncompressed P-256 point.
    #[error("public key: {len} bytes, expected an uncompressed p-256 point of {P256_PUBLIC_LEN}")]
    PublicKey { len: usize },
    /// The system random source failed.
    #[error("no randomness for a serial number")]
    Random,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CaError {
    move |source| CaError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn build(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Build { what, source }
}

/// A device's (or broker's) P-256 public key, as the raw uncompressed point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P256PublicKey(Vec<u8>);

impl P256PublicKey {
    /// Checks the length and form of an uncompressed point (the curve check
    /// is ring's, when the proof of possession is verified with it).
    pub fn new(raw: Vec<u8>) -> Result<Self, CaError> {
        if raw.len() != P256_PUBLIC_LEN || raw[0] != 0x04 {
            return Err(CaError::PublicKey { len: raw.len() });
        }
        Ok(Self(raw))
    }

    /// The raw point.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// The certificate, PEM.
    pub pem: String,
    /// Its serial number (for revocation lists).
    pub serial: Vec<u8>,
    /// When it stops being valid, ms since the epoch.
    pub expires_ms: u64,
}

/// A revoked certificate, for the revocation list.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// Its serial number.
    pub serial: Vec<u8>,
    /// When it was revoked, ms since the epoch.
    pub at_ms: u64,
}

/// A certificate with its own fresh key (broker and controller certificates).
pub struct KeyedCert {
    /// The certificate.
    pub cert: Issued,
    /// Its private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// The fleet CA.
pub struct Ca {
    key: KeyPair,
    cert_pem: String,
    cert_der: Vec<u8>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params
}

fn time_of(t: SystemTime) -> OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn ms_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn read_capped(path: &Path) -> Result<Vec<u8>, CaError> {
    let file = fs::File::open(path).map_err(io_err("opening", path))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    Ok(bytes)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_err("writing", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err("renaming to", path))
}

/// A random positive serial number of 16 bytes.
fn serial() -> Result<Vec<u8>, CaError> {
    let mut bytes = vec![0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    // Positive and without a leading zero byte, so DER keeps all 16.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(bytes)
}

impl Ca {
    /// Loads `{dir}/ca.key` and `{dir}/ca.pem`, or makes both when neither
    /// exists. Blocking: file I/O.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (false, false) => return Self::create(&key_path, &cert_path),
            (true, true) => {}
            (key, _) => {
                let (path, missing) = if key {
                    (cert_path, CA_CERT_FILE)
                } else {
                    (key_path, CA_KEY_FILE)
                };
                return Err(CaError::Bad {
                    path,
                    reason: format!("{missing} is missing; restore it or remove both"),
                });
            }
        }
        let mode = fs::metadata(&key_path)
            .map_err(io_err("reading", &key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::Exposed {
                path: key_path,
                mode: mode & 0o777,
            });
        }
        let bad = |path: &Path, reason: String| CaError::Bad {
            path: path.to_owned(),
            reason,
        };
        let key_pem = String::from_utf8(read_capped(&key_path)?)
            .map_err(|_| bad(&key_path, "not text, expected a pem key".into()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e.to_string()))?;
        let cert_pem = String::from_utf8(read_capped(&cert_path)?)
            .map_err(|_| bad(&cert_path, "not text, expected a pem certificate".into()))?;
        let cert_der =
            pem_der(&cert_pem).ok_or_else(|| bad(&cert_path, "no pem certificate in it".into()))?;
        Ok(Self {
            key,
            cert_pem,
            cert_der,
        })
    }

    fn create(key_path: &Path, cert_path: &Path) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(build("ca key"))?;
        let mut params = ca_params();
        let now = SystemTime::now();
        params.not_before = time_of(now - BACKDATE);
        params.not_after = time_of(now + CA_LIFETIME);
        params.serial_number = Some(SerialNumber::from_slice(&serial()?));
        let cert = params.self_signed(&key).map_err(build("ca certificate"))?;
        write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "made a new fleet ca");
        Ok(Self {
            key,
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
        })
    }

    /// A CA that lives only in memory (tests).
    pub fn ephemeral() -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(build("ca key"))?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(build("ca certificate"))?;
        Ok(Self {
            key,
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        public: &impl PublicKeyData,
        lifetime: Duration,
        what: &'static str,
    ) -> Result<Issued, CaError> {
        let now = SystemTime::now();
        let expires = now + lifetime;
        let serial = serial()?;
        params.not_before = time_of(now - BACKDATE.min(lifetime));
        params.not_after = time_of(expires);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let ca = ca_params();
        let issuer = Issuer::from_params(&ca, &self.key);
        let cert = params.signed_by(public, &issuer).map_err(build(what))?;
        Ok(Issued {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            serial,
            expires_ms: ms_of(expires),
        })
    }

    /// A device certificate: CN and SAN the node name, for client
    /// authentication, valid for `lifetime`.
    pub fn issue_device(
        &self,
        node: &str,
        public: &P256PublicKey,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let mut params =
            CertificateParams::new(vec![node.to_owned()]).map_err(build("device certificate"))?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, public, lifetime, "device certificate")
    }

    /// A broker's server certificate for `sans` (names or IP addresses) with
    /// a fresh key.
    pub fn issue_server(&self, sans: &[String]) -> Result<KeyedCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(build("server key"))?;
        let cert = self.issue_server_for(sans, &key)?;
        Ok(KeyedCert {
            cert,
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A broker's server certificate for a key made elsewhere.
    pub fn issue_server_for(
        &self,
        sans: &[String],
        public: &impl PublicKeyData,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(build("server certificate")),
            })
            .collect::<Result<_, _>>()?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            sans.first().map_or("flotilla broker", String::as_str),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, public, SERVER_LIFETIME, "server certificate")
    }

    /// A client certificate whose CN is `name` (no SAN: `name` need not be a
    /// DNS name), with a fresh key: the controller's own, for an external
    /// broker that takes the CN as the username.
    pub fn issue_client(&self, name: &str, lifetime: Duration) -> Result<KeyedCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(build("client key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = self.issue(params, &key, lifetime, "client certificate")?;
        Ok(KeyedCert {
            cert,
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A revocation list of `revoked`, PEM, valid for `valid_for`.
    pub fn crl_pem(&self, revoked: &[Revoked], valid_for: Duration) -> Result<String, CaError> {
        let now = SystemTime::now();
        let params = CertificateRevocationListParams {
            this_update: time_of(now - BACKDATE),
            next_update: time_of(now + valid_for),
            crl_number: SerialNumber::from_slice(&ms_of(now).to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: time_of(UNIX_EPOCH + Duration::from_millis(r.at_ms)),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let ca = ca_params();
        let issuer = Issuer::from_params(&ca, &self.key);
        params
            .signed_by(&issuer)
            .and_then(|crl| crl.pem())
            .map_err(build("revocation list"))
    }
}

/// The DER of the first certificate in `pem`.
pub fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = "-----BEGIN CERTIFICATE-----";
    let start = pem.find(begin)? + begin.len();
    let end = start + pem[start..].find("-----END CERTIFICATE-----")?;
    let body: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_owner_only_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_der(), again.cert_der());
        assert_eq!(pem_der(again.cert_pem()).unwrap(), again.cert_der());

        fs::set_permissions(
            dir.path().join(CA_KEY_FILE),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let err = Ca::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("lets others read it"), "{err}");

        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = Ca::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("ca.key is missing"), "{err}");
    }

    #[test]
    fn device_certificates_chain_to_the_ca_and_bad_keys_are_refused() {
        let ca = Ca::ephemeral().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let public = P256PublicKey::new(key.public_key_raw().to_vec()).unwrap();
        let cert = ca
            .issue_device("pi-1", &public, Duration::from_secs(3600))
            .unwrap();
        assert!(cert.pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(cert.serial.len(), 16);
        // A real verifier (rustls' webpki, on ring) takes it as a client
        // certificate of this CA.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().to_vec().into()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let end = rustls::pki_types::CertificateDer::from(cert.der.clone());
        verifier
            .verify_client_cert(&end, &[], rustls::pki_types::UnixTime::now())
            .unwrap();
        // One signed by another CA is not.
        let other = Ca::ephemeral()
            .unwrap()
            .issue_device("pi-1", &public, Duration::from_secs(3600))
            .unwrap();
        let end = rustls::pki_types::CertificateDer::from(other.der);
        assert!(
            verifier
                .verify_client_cert(&end, &[], rustls::pki_types::UnixTime::now())
                .is_err()
        );

        assert!(matches!(
            P256PublicKey::new(vec![4; 64]),
            Err(CaError::PublicKey { len: 64 })
        ));
        let crl = ca
            .crl_pem(
                &[Revoked {
                    serial: cert.serial,
                    at_ms: 1,
                }],
                Duration::from_secs(3600),
            )
            .unwrap();
        assert!(crl.starts_with("-----BEGIN X509 CRL-----"), "{crl}");
    }
}
