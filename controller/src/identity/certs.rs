//! Device certificates: issued at join for a key the device made itself
//! (proven by a signature over the token, the node name and the key),
//! renewed with a request signed by the device's current key, revoked with
//! the node. Every certificate issued is recorded in `identity.redb` by the
//! sha256 of its DER, so the broker's TLS front knows a presented
//! certificate's node, and whether it was revoked, without parsing it; the
//! records also make Mosquitto's revocation list.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use tokio::sync::broadcast;

use super::ca::{Ca, Issued, P256PublicKey, Revoked};
use super::{Identity, IdentityError, db_err, now_ms, random_secret, same, sha256};

/// sha256(certificate DER) → (node, serial, expires ms, revoked at ms; 0 = not revoked).
const ISSUED: TableDefinition<&[u8], (&str, &[u8], u64, u64)> = TableDefinition::new("issued");
/// Node → (current public key, the one before it, current certificate's expiry ms).
const DEVICE_KEYS: TableDefinition<&str, (&[u8], &[u8], u64)> = TableDefinition::new("device_keys");

/// Context of the join proof: what the device's key signs at join.
pub const JOIN_CONTEXT: &[u8] = b"flotilla-join-v1\0";
/// Context of a renewal request.
pub const RENEW_CONTEXT: &[u8] = b"flotilla-renew-v1\0";
/// How far a renewal request's time may be from the controller's clock.
const RENEW_SKEW_MS: u64 = 5 * 60 * 1000;
/// Revocations waiting for the broker; a burst beyond this is seen as a lag
/// and the broker then drops every revoked node's session it holds.
const REVOCATIONS_QUEUE: usize = 1024;
/// Longest signature accepted (an ASN.1 P-256 signature is at most 72 bytes).
const MAX_SIGNATURE_LEN: usize = 128;

/// The bytes a device signs to prove it holds the key it joins with.
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

/// The bytes a device signs, with its current key, to renew.
pub fn renew_message(node: &str, new_key: &[u8], time_ms: u64) -> Vec<u8> {
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

/// How the controller issues device certificates (absent: password-only fleet).
pub struct Issuer {
    /// The fleet CA.
    pub ca: Ca,
    /// Lifetime of a device certificate.
    pub lifetime: Duration,
    /// How long after its certificate expired a node may still renew with
    /// its key (a device switched off for a season); zero: never.
    pub renew_grace: Duration,
    /// The broker address devices are told at join (`mqtts://HOST:PORT`).
    pub broker_url: String,
}

#[derive(Debug, Clone)]
struct CertRecord {
    node: String,
    revoked: bool,
}

/// The certificate side of [`Identity`]: the issuer once TLS is set up, an
/// in-memory copy of the issued certificates for the TLS front, and the
/// revocations announced to the embedded broker (which drops the node's
/// live session).
pub struct CertState {
    issuer: OnceLock<Issuer>,
    issued: RwLock<HashMap<[u8; 32], CertRecord>>,
    revoked: broadcast::Sender<String>,
    /// What the broker's TLS front presents as the password of the node a
    /// certificate named; made afresh for each process, never written.
    gate: String,
    gate_hash: [u8; 32],
}

impl CertState {
    /// Creates the tables and loads the records. Blocking.
    pub(super) fn load(db: &Database) -> Result<Self, IdentityError> {
        let tx = db.begin_write().map_err(db_err("begin"))?;
        tx.open_table(ISSUED).map_err(db_err("create table"))?;
        tx.open_table(DEVICE_KEYS).map_err(db_err("create table"))?;
        tx.commit().map_err(db_err("commit"))?;
        let mut issued = HashMap::new();
        let tx = db.begin_read().map_err(db_err("begin"))?;
        let table = tx.open_table(ISSUED).map_err(db_err("open table"))?;
        let now = now_ms();
        for entry in table.iter().map_err(db_err("read"))? {
            let (hash, value) = entry.map_err(db_err("read"))?;
            let (node, _serial, expires, revoked_at) = value.value();
            let Ok(hash) = <[u8; 32]>::try_from(hash.value()) else {
                continue;
            };
            if expires > now {
                issued.insert(
                    hash,
                    CertRecord {
                        node: node.to_owned(),
                        revoked: revoked_at != 0,
                    },
                );
            }
        }
        let gate = random_secret("")?;
        Ok(Self {
            gate_hash: sha256(gate.as_bytes()),
            gate,
            issuer: OnceLock::new(),
            issued: RwLock::new(issued),
            revoked: broadcast::channel(REVOCATIONS_QUEUE).0,
        })
    }

    pub(super) fn announce_revoked(&self, node: &str) {
        // No receiver (no embedded broker) is fine.
        let _ = self.revoked.send(node.to_owned());
    }

    fn remember(&self, der: &[u8], node: &str) {
        let mut map = self
            .issued
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(
            sha256(der),
            CertRecord {
                node: node.to_owned(),
                revoked: false,
            },
        );
    }
}

/// A certificate given to a device, with what it needs to use it.
#[derive(Debug, Clone)]
pub struct DeviceCert {
    /// The device's certificate.
    pub cert: Issued,
    /// The fleet CA certificate, PEM.
    pub ca_pem: String,
    /// Where the broker's TLS listener is.
    pub broker_url: String,
}

fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    signature.len() <= MAX_SIGNATURE_LEN
        && UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public_key)
            .verify(message, signature)
            .is_ok()
}

impl Identity {
    /// Lets this controller issue device certificates (called once by
    /// `serve` when the broker speaks TLS; later calls are ignored).
    pub fn set_issuer(&self, issuer: Issuer) {
        if self.certs.issuer.set(issuer).is_err() {
            tracing::warn!("device certificate issuer set twice; keeping the first");
        }
    }

    /// The password the TLS front gives for the node it vouches for.
    pub fn gate_password(&self) -> &str {
        &self.certs.gate
    }

    /// Whether `hash` is the TLS front's password.
    pub(super) fn is_gate(&self, hash: &[u8; 32]) -> bool {
        same(hash, &self.certs.gate_hash)
    }

    /// Names of revoked nodes, as they are revoked.
    pub fn revocations(&self) -> broadcast::Receiver<String> {
        self.certs.revoked.subscribe()
    }

    /// Whether joins get a certificate.
    pub fn issues_certificates(&self) -> bool {
        self.certs.issuer.get().is_some()
    }

    /// The fleet CA, when TLS is set up.
    pub fn ca(&self) -> Option<&Ca> {
        self.certs.issuer.get().map(|i| &i.ca)
    }

    /// Checks the join proof: `signature` by `public_key` over
    /// [`join_message`]. Done before the token is spent.
    pub fn check_join_proof(
        token: &str,
        node: &str,
        public_key: &P256PublicKey,
        signature: &[u8],
    ) -> Result<(), IdentityError> {
        let message = join_message(token, node, public_key.as_bytes());
        if verify(public_key.as_bytes(), &message, signature) {
            Ok(())
        } else {
            Err(IdentityError::BadProof)
        }
    }

    /// Inside the join's transaction: issues and records `node`'s certificate.
    pub(super) fn issue_at_join(
        &self,
        tx: &WriteTransaction,
        node: &str,
        public_key: &P256PublicKey,
    ) -> Result<DeviceCert, IdentityError> {
        let issuer = self.certs.issuer.get().ok_or(IdentityError::NoTls)?;
        let cert = issuer.ca.issue_device(node, public_key, issuer.lifetime)?;
        record(tx, node, &cert, public_key.as_bytes(), &[])?;
        Ok(DeviceCert {
            cert,
            ca_pem: issuer.ca.cert_pem().to_owned(),
            broker_url: issuer.broker_url.clone(),
        })
    }

    /// After the join committed.
    pub(super) fn remember_cert(&self, cert: &DeviceCert, node: &str) {
        self.certs.remember(&cert.cert.der, node);
    }

    /// Renews `node`'s certificate for `new_key`: `signature` must be by the
    /// node's current key over [`renew_message`], within five minutes of now,
    /// and the node not revoked, its certificate not expired for longer than
    /// the issuer's `renew_grace`. A retry of a renewal whose answer was lost
    /// (the new key is already the current one) may be signed by the key
    /// before it. Blocking.
    pub fn renew(
        &self,
        node: &str,
        new_key: &P256PublicKey,
        time_ms: u64,
        signature: &[u8],
    ) -> Result<DeviceCert, IdentityError> {
        let issuer = self.certs.issuer.get().ok_or(IdentityError::NoTls)?;
        if now_ms().abs_diff(time_ms) > RENEW_SKEW_MS {
            return Err(IdentityError::RenewRefused("request time too far from now"));
        }
        if !self.is_active(node) {
            return Err(IdentityError::RenewRefused("node unknown or revoked"));
        }
        let message = renew_message(node, new_key.as_bytes(), time_ms);
        let tx = self.db.begin_write().map_err(db_err("begin"))?;
        let cert = {
            let keys = tx.open_table(DEVICE_KEYS).map_err(db_err("open table"))?;
            let (current, previous, expires) = match keys.get(node).map_err(db_err("read"))? {
                Some(v) => {
                    let (c, p, e) = v.value();
                    (c.to_vec(), p.to_vec(), e)
                }
                None => return Err(IdentityError::RenewRefused("node has no certificate")),
            };
            drop(keys);
            let grace = u64::try_from(issuer.renew_grace.as_millis()).unwrap_or(u64::MAX);
            if expires.saturating_add(grace) <= now_ms() {
                return Err(IdentityError::RenewRefused(
                    "certificate expired longer ago than the renewal grace: join again with a new token",
                ));
            }
            let by_current = verify(&current, &message, signature);
            let retry = new_key.as_bytes() == current.as_slice()
                && !previous.is_empty()
                && verify(&previous, &message, signature);
            if !by_current && !retry {
                return Err(IdentityError::RenewRefused(
                    "not signed by the node's current key",
                ));
            }
            let cert = issuer.ca.issue_device(node, new_key, issuer.lifetime)?;
            let keep = if retry { previous } else { current };
            record(&tx, node, &cert, new_key.as_bytes(), &keep)?;
            cert
        };
        tx.commit().map_err(db_err("commit"))?;
        self.certs.remember(&cert.der, node);
        Ok(DeviceCert {
            cert,
            ca_pem: issuer.ca.cert_pem().to_owned(),
            broker_url: issuer.broker_url.clone(),
        })
    }

    /// Inside the revocation's transaction: marks every certificate of
    /// `node` revoked. Returns their hashes, for the in-memory copy.
    pub(super) fn revoke_certs(
        tx: &WriteTransaction,
        node: &str,
    ) -> Result<Vec<[u8; 32]>, IdentityError> {
        let mut table = tx.open_table(ISSUED).map_err(db_err("open table"))?;
        let mut hits = Vec::new();
        for entry in table.iter().map_err(db_err("read"))? {
            let (hash, value) = entry.map_err(db_err("read"))?;
            let (owner, serial, expires, revoked_at) = value.value();
            if owner == node && revoked_at == 0 {
                hits.push((hash.value().to_vec(), serial.to_vec(), expires));
            }
        }
        let now = now_ms().max(1);
        let mut hashes = Vec::with_capacity(hits.len());
        for (hash, serial, expires) in hits {
            table
                .insert(&hash[..], (node, &serial[..], expires, now))
                .map_err(db_err("update"))?;
            if let Ok(h) = <[u8; 32]>::try_from(hash.as_slice()) {
                hashes.push(h);
            }
        }
        Ok(hashes)
    }

    /// After the revocation committed.
    pub(super) fn forget_certs(&self, hashes: &[[u8; 32]]) {
        let mut map = self
            .certs
            .issued
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for h in hashes {
            if let Some(r) = map.get_mut(h) {
                r.revoked = true;
            }
        }
    }

    /// The node a presented certificate (DER, already verified against the
    /// CA) was issued to, or `None` when it was not issued here or is
    /// revoked. Memory only: the TLS front calls it on every handshake.
    pub fn certificate_node(&self, der: &[u8]) -> Option<String> {
        let map = self
            .certs
            .issued
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&sha256(der))
            .filter(|r| !r.revoked)
            .map(|r| r.node.clone())
            .filter(|node| self.is_active(node))
    }

    /// Every revoked certificate not yet expired, for a revocation list. Blocking.
    pub fn revoked_certificates(&self) -> Result<Vec<Revoked>, IdentityError> {
        let tx = self.db.begin_read().map_err(db_err("begin"))?;
        let table = tx.open_table(ISSUED).map_err(db_err("open table"))?;
        let now = now_ms();
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err("read"))? {
            let (_, value) = entry.map_err(db_err("read"))?;
            let (_, serial, expires, revoked_at) = value.value();
            if revoked_at != 0 && expires > now {
                out.push(Revoked {
                    serial: serial.to_vec(),
                    at_ms: revoked_at,
                });
            }
        }
        Ok(out)
    }

    /// The names of every node with a credential that is not revoked.
    pub fn active_nodes(&self) -> Vec<String> {
        let map = self
            .credentials
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut nodes: Vec<String> = map
            .iter()
            .filter(|(_, c)| !c.revoked)
            .map(|(n, _)| n.clone())
            .collect();
        nodes.sort();
        nodes
    }
}

fn record(
    tx: &WriteTransaction,
    node: &str,
    cert: &Issued,
    key: &[u8],
    previous: &[u8],
) -> Result<(), IdentityError> {
    let mut issued = tx.open_table(ISSUED).map_err(db_err("open table"))?;
    issued
        .insert(
            &sha256(&cert.der)[..],
            (node, &cert.serial[..], cert.expires_ms, 0u64),
        )
        .map_err(db_err("insert"))?;
    let mut keys = tx.open_table(DEVICE_KEYS).map_err(db_err("open table"))?;
    keys.insert(node, (key, previous, cert.expires_ms))
        .map_err(db_err("insert"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn device_key() -> (EcdsaKeyPair, P256PublicKey) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = P256PublicKey::new(pair.public_key().as_ref().to_vec()).unwrap();
        (pair, public)
    }

    fn sign(pair: &EcdsaKeyPair, message: &[u8]) -> Vec<u8> {
        pair.sign(&SystemRandom::new(), message)
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn identity_with_ca(dir: &std::path::Path) -> std::sync::Arc<Identity> {
        issuing(dir, Duration::from_secs(3600), Duration::ZERO)
    }

    fn issuing(
        dir: &std::path::Path,
        lifetime: Duration,
        renew_grace: Duration,
    ) -> std::sync::Arc<Identity> {
        let id = Identity::open(dir, false).unwrap();
        id.set_issuer(Issuer {
            ca: Ca::ephemeral().unwrap(),
            lifetime,
            renew_grace,
            broker_url: "mqtts://broker:8883".into(),
        });
        id
    }

    /// A device switched off past its certificate's expiry renews with its
    /// key within the grace, and only then.
    #[test]
    fn an_expired_certificate_renews_within_the_grace_only() {
        let lifetime = Duration::from_secs(1);
        let (strict_dir, lenient_dir) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let strict = issuing(strict_dir.path(), lifetime, Duration::ZERO);
        let lenient = issuing(lenient_dir.path(), lifetime, Duration::from_secs(3600));
        let (pair, public) = device_key();
        let joined = now_ms();
        for id in [&strict, &lenient] {
            let token = id.create_token(60_000, 1, &[]).unwrap().token;
            id.join_with_key(&token, "pi-1", Some(&public)).unwrap();
        }
        while now_ms() <= joined + 1_100 {
            std::thread::sleep(Duration::from_millis(20));
        }

        let (next_pair, next) = device_key();
        let now = now_ms();
        let signed = sign(&pair, &renew_message("pi-1", next.as_bytes(), now));
        match strict.renew("pi-1", &next, now, &signed) {
            Err(IdentityError::RenewRefused(why)) => {
                assert!(
                    why.contains("expired") && why.contains("new token"),
                    "{why}"
                )
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let renewed = lenient.renew("pi-1", &next, now, &signed).unwrap();
        assert_eq!(
            lenient.certificate_node(&renewed.cert.der).as_deref(),
            Some("pi-1")
        );
        // Revocation still wins over the grace.
        lenient.revoke("pi-1").unwrap();
        let (_, third) = device_key();
        let by_next = sign(&next_pair, &renew_message("pi-1", third.as_bytes(), now));
        assert!(matches!(
            lenient.renew("pi-1", &third, now, &by_next),
            Err(IdentityError::RenewRefused("node unknown or revoked"))
        ));
    }

    #[test]
    fn join_with_a_proven_key_renew_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity_with_ca(dir.path());
        let token = id.create_token(60_000, 2, &[]).unwrap().token;
        let (pair, public) = device_key();

        // The proof binds token, node and key.
        let proof = sign(&pair, &join_message(&token, "pi-1", public.as_bytes()));
        Identity::check_join_proof(&token, "pi-1", &public, &proof).unwrap();
        for (t, n) in [("flt_other", "pi-1"), (token.as_str(), "pi-2")] {
            assert!(matches!(
                Identity::check_join_proof(t, n, &public, &proof),
                Err(IdentityError::BadProof)
            ));
        }

        let joined = id.join_with_key(&token, "pi-1", Some(&public)).unwrap();
        let cert = joined.certificate.unwrap();
        assert!(joined.password.is_empty(), "no password with a certificate");
        assert_eq!(cert.broker_url, "mqtts://broker:8883");
        assert_eq!(id.certificate_node(&cert.cert.der).as_deref(), Some("pi-1"));
        assert_eq!(id.certificate_node(b"not issued here"), None);

        // Renewal: signed by the current key, recent.
        let (next_pair, next) = device_key();
        let now = now_ms();
        let refused = |e: Result<DeviceCert, IdentityError>| match e {
            Err(IdentityError::RenewRefused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let by_stranger = sign(&next_pair, &renew_message("pi-1", next.as_bytes(), now));
        assert_eq!(
            refused(id.renew("pi-1", &next, now, &by_stranger)),
            "not signed by the node's current key"
        );
        let old = now - 10 * 60 * 1000;
        let stale = sign(&pair, &renew_message("pi-1", next.as_bytes(), old));
        assert_eq!(
            refused(id.renew("pi-1", &next, old, &stale)),
            "request time too far from now"
        );
        let good = sign(&pair, &renew_message("pi-1", next.as_bytes(), now));
        let renewed = id.renew("pi-1", &next, now, &good).unwrap();
        assert_ne!(renewed.cert.der, cert.cert.der);
        assert_eq!(
            id.certificate_node(&renewed.cert.der).as_deref(),
            Some("pi-1")
        );
        // The same request again (its answer lost): still answered, as the
        // new key is now the current one and the old one signed it.
        id.renew("pi-1", &next, now, &good).unwrap();
        // Now the new key renews.
        let (_, third) = device_key();
        let by_next = sign(&next_pair, &renew_message("pi-1", third.as_bytes(), now));
        id.renew("pi-1", &third, now, &by_next).unwrap();

        // Revocation: every certificate of the node, and the node's renewals.
        id.revoke("pi-1").unwrap();
        assert_eq!(id.certificate_node(&cert.cert.der), None);
        assert_eq!(id.certificate_node(&renewed.cert.der), None);
        assert_eq!(id.revoked_certificates().unwrap().len(), 4);
        assert_eq!(
            refused(id.renew("pi-1", &third, now, &by_next)),
            "node unknown or revoked"
        );
        // Durable: a restart still refuses them.
        drop(id);
        let id = identity_with_ca(dir.path());
        assert_eq!(id.certificate_node(&cert.cert.der), None);
        assert_eq!(id.revoked_certificates().unwrap().len(), 4);
    }

    #[test]
    fn no_certificates_without_tls_and_the_gate_is_per_process() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::open(dir.path(), false).unwrap();
        let token = id.create_token(60_000, 2, &[]).unwrap().token;
        let (_, public) = device_key();
        assert!(matches!(
            id.join_with_key(&token, "pi-1", Some(&public)),
            Err(IdentityError::NoTls)
        ));
        id.join(&token, "pi-1").unwrap();
        let gate = id.gate_password().to_owned();
        assert_eq!(
            id.authenticate(Some("pi-1"), Some(gate.as_bytes())),
            Some(super::super::Principal::Device("pi-1".into()))
        );
        assert_eq!(id.authenticate(Some("ghost"), Some(gate.as_bytes())), None);
        drop(id);
        let id = Identity::open(dir.path(), false).unwrap();
        assert_eq!(id.authenticate(Some("pi-1"), Some(gate.as_bytes())), None);
    }
}
