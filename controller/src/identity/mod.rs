//! Device identity: the controller's signing key ([`signing`]), join tokens
//! and per-device MQTT credentials, kept in `{data_dir}/identity.redb` (apart
//! from the fleet store, so identity never shares a transaction or a lock
//! with the control loop). Tokens and passwords are stored as sha256 hashes
//! only: both are 256 random bits, so a plain hash cannot be reversed. The
//! broker's hooks read credentials from an in-memory copy that every change
//! updates after it is committed.

pub mod api;
pub mod api_tokens;
pub mod ca;
pub mod certs;
pub mod cli;
pub mod sealing;
pub mod signing;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use flotilla_proto::check_name;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

pub use signing::SigningKey;

/// sha256(token) → (expiry in ms since the epoch, uses left, labels `k=v,…`).
const TOKENS: TableDefinition<&[u8], (u64, u32, &str)> = TableDefinition::new("tokens");
/// Node → (sha256(password), revoked).
const CREDENTIALS: TableDefinition<&str, (&[u8], bool)> = TableDefinition::new("credentials");

/// Prefix of join tokens, so a leaked one is recognisable.
const TOKEN_PREFIX: &str = "flt_";
/// Longest token or password accepted for checking.
const MAX_SECRET_LEN: usize = 128;

/// Why an identity operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The identity database could not be opened or written.
    #[error("identity store {op}: {source}")]
    Db {
        op: &'static str,
        source: redb::Error,
    },
    /// The token is unknown, used up or expired (one message for all three,
    /// so a guesser learns nothing).
    #[error("join token refused: unknown, used up or expired")]
    TokenRefused,
    /// The node name breaks the name rule.
    #[error("node name {name:?}: {error}")]
    NodeName {
        name: String,
        error: flotilla_proto::NameError,
    },
    /// The node has no credential.
    #[error("node {0:?} has no credential")]
    UnknownNode(String),
    /// The system random source failed.
    #[error("no randomness")]
    Random,
    /// A token was asked with zero uses.
    #[error("token uses: 0, expected at least 1")]
    ZeroUses,
    /// The fleet CA could not issue a certificate.
    #[error(transparent)]
    Certificate(#[from] ca::CaError),
    /// The join's proof of possession does not verify with its public key.
    #[error("join proof: not a signature of the token, node name and public key by that key")]
    BadProof,
    /// A certificate was asked of a controller whose broker has no TLS.
    #[error("this controller issues no certificates: its broker has no tls listener")]
    NoTls,
    /// A renewal request was refused.
    #[error("renewal refused: {0}")]
    RenewRefused(&'static str),
}

fn db_err<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> IdentityError {
    move |e| IdentityError::Db {
        op,
        source: e.into(),
    }
}

/// A token as `flotilla token create` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    /// The secret, shown once.
    pub token: String,
    /// Expiry, ms since the epoch.
    pub expires_ms: u64,
    /// How many joins it allows.
    pub uses: u32,
}

/// What a successful join hands the device.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// MQTT username (the node name).
    pub username: String,
    /// MQTT password, shown once.
    pub password: String,
    /// Labels the token carried.
    pub labels: Vec<(String, String)>,
    /// The device's certificate, when it joined with a key.
    pub certificate: Option<certs::DeviceCert>,
}

/// Who a connecting MQTT client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The controller's own session: every topic.
    Controller,
    /// An enrolled device: its own topics only.
    Device(String),
    /// No credentials, admitted only with `--allow-anonymous`: every topic,
    /// as before device identity existed.
    Anonymous,
}

#[derive(Debug, Clone)]
struct Credential {
    hash: [u8; 32],
    revoked: bool,
}

/// Tokens and credentials, durable and cached.
pub struct Identity {
    db: Database,
    credentials: RwLock<HashMap<String, Credential>>,
    controller_hash: [u8; 32],
    controller_password: String,
    allow_anonymous: bool,
    certs: certs::CertState,
    sealing_keys: sealing::SealingKeys,
}

/// The MQTT username of the controller's own session; never a node name
/// (':' is not allowed in those).
pub const CONTROLLER_USERNAME: &str = "flotilla:controller";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares two hashes in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_secret(prefix: &str) -> Result<String, IdentityError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Random)?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

impl Identity {
    /// Opens (or creates) `{dir}/identity.redb`. The controller's own MQTT
    /// password is made afresh for each process. Blocking.
    pub fn open(dir: &Path, allow_anonymous: bool) -> Result<Arc<Self>, IdentityError> {
        let db = Database::create(dir.join("identity.redb")).map_err(db_err("open"))?;
        let tx = db.begin_write().map_err(db_err("begin"))?;
        tx.open_table(TOKENS).map_err(db_err("create table"))?;
        tx.open_table(CREDENTIALS).map_err(db_err("create table"))?;
        tx.commit().map_err(db_err("commit"))?;
        let mut credentials = HashMap::new();
        {
            let tx = db.begin_read().map_err(db_err("begin"))?;
            let table = tx.open_table(CREDENTIALS).map_err(db_err("open table"))?;
            for entry in table.iter().map_err(db_err("read"))? {
                let (node, value) = entry.map_err(db_err("read"))?;
                let (hash, revoked) = value.value();
                let Ok(hash) = <[u8; 32]>::try_from(hash) else {
                    continue;
                };
                credentials.insert(node.value().to_owned(), Credential { hash, revoked });
            }
        }
        let controller_password = random_secret("")?;
        let certs = certs::CertState::load(&db)?;
        let sealing_keys = sealing::SealingKeys::load(&db)?;
        Ok(Arc::new(Self {
            db,
            credentials: RwLock::new(credentials),
            controller_hash: sha256(controller_password.as_bytes()),
            controller_password,
            allow_anonymous,
            certs,
            sealing_keys,
        }))
    }

    /// The controller's own MQTT password (for the embedded broker).
    pub fn controller_password(&self) -> &str {
        &self.controller_password
    }

    /// Makes a join token valid for `ttl_ms` and `uses` joins. Blocking.
    pub fn create_token(
        &self,
        ttl_ms: u64,
        uses: u32,
        labels: &[(String, String)],
    ) -> Result<NewToken, IdentityError> {
        if uses == 0 {
            return Err(IdentityError::ZeroUses);
        }
        let token = random_secret(TOKEN_PREFIX)?;
        let expires_ms = now_ms().saturating_add(ttl_ms);
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let tx = self.db.begin_write().map_err(db_err("begin"))?;
        {
            let mut table = tx.open_table(TOKENS).map_err(db_err("open table"))?;
            table
                .insert(
                    &sha256(token.as_bytes())[..],
                    (expires_ms, uses, labels.as_str()),
                )
                .map_err(db_err("insert"))?;
        }
        tx.commit().map_err(db_err("commit"))?;
        Ok(NewToken {
            token,
            expires_ms,
            uses,
        })
    }

    /// Consumes one use of `token` and gives `node` a new MQTT credential
    /// (replacing and un-revoking any earlier one). Blocking.
    pub fn join(&self, token: &str, node: &str) -> Result<Enrolled, IdentityError> {
        self.join_with_key(token, node, None)
    }

    /// [`Identity::join`], and with `key` (a public key whose proof the
    /// caller checked) a certificate for it; the device then has no usable
    /// password. Blocking.
    pub fn join_with_key(
        &self,
        token: &str,
        node: &str,
        device_key: Option<&ca::P256PublicKey>,
    ) -> Result<Enrolled, IdentityError> {
        if device_key.is_some() && !self.issues_certificates() {
            return Err(IdentityError::NoTls);
        }
        check_name(node).map_err(|error| IdentityError::NodeName {
            name: node.to_owned(),
            error,
        })?;
        if token.len() > MAX_SECRET_LEN {
            return Err(IdentityError::TokenRefused);
        }
        let password = random_secret("")?;
        let hash = sha256(password.as_bytes());
        let key = sha256(token.as_bytes());
        let tx = self.db.begin_write().map_err(db_err("begin"))?;
        let labels = {
            let mut tokens = tx.open_table(TOKENS).map_err(db_err("open table"))?;
            let (expires_ms, uses, labels) = {
                let Some(record) = tokens.get(&key[..]).map_err(db_err("read"))? else {
                    return Err(IdentityError::TokenRefused);
                };
                let (expires, uses, labels) = record.value();
                (expires, uses, labels.to_owned())
            };
            if expires_ms <= now_ms() || uses == 0 {
                tokens.remove(&key[..]).map_err(db_err("remove"))?;
                drop(tokens);
                tx.commit().map_err(db_err("commit"))?;
                return Err(IdentityError::TokenRefused);
            }
            if uses == 1 {
                tokens.remove(&key[..]).map_err(db_err("remove"))?;
            } else {
                tokens
                    .insert(&key[..], (expires_ms, uses - 1, labels.as_str()))
                    .map_err(db_err("update"))?;
            }
            let mut credentials = tx.open_table(CREDENTIALS).map_err(db_err("open table"))?;
            credentials
                .insert(node, (&hash[..], false))
                .map_err(db_err("insert"))?;
            labels
        };
        let certificate = match device_key {
            Some(key) => Some(self.issue_at_join(&tx, node, key)?),
            None => None,
        };
        tx.commit().map_err(db_err("commit"))?;
        if let Some(cert) = &certificate {
            self.remember_cert(cert, node);
        }
        self.cache(
            node,
            Credential {
                hash,
                revoked: false,
            },
        );
        Ok(Enrolled {
            username: node.to_owned(),
            // A device with a certificate always uses TLS: its password is
            // stored hashed but never handed out.
            password: if certificate.is_some() {
                String::new()
            } else {
                password
            },
            certificate,
            labels: labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        })
    }

    /// Refuses `node`'s credential from now on. Blocking.
    pub fn revoke(&self, node: &str) -> Result<(), IdentityError> {
        let tx = self.db.begin_write().map_err(db_err("begin"))?;
        let certs = Self::revoke_certs(&tx, node)?;
        let hash = {
            let mut table = tx.open_table(CREDENTIALS).map_err(db_err("open table"))?;
            let hash = match table.get(node).map_err(db_err("read"))? {
                Some(v) => v.value().0.to_vec(),
                None => return Err(IdentityError::UnknownNode(node.to_owned())),
            };
            table
                .insert(node, (&hash[..], true))
                .map_err(db_err("update"))?;
            hash
        };
        tx.commit().map_err(db_err("commit"))?;
        self.forget_certs(&certs);
        if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
            self.cache(
                node,
                Credential {
                    hash,
                    revoked: true,
                },
            );
        }
        self.certs.announce_revoked(node);
        Ok(())
    }

    fn cache(&self, node: &str, credential: Credential) {
        let mut map = self
            .credentials
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(node.to_owned(), credential);
    }

    /// Who a client presenting `username`/`password` is, or `None` to refuse it.
    /// Non-blocking (memory only): the broker calls it on every CONNECT.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Option<Principal> {
        let Some(username) = username else {
            return self.allow_anonymous.then_some(Principal::Anonymous);
        };
        let password = password.filter(|p| p.len() <= MAX_SECRET_LEN)?;
        let hash = sha256(password);
        if username == CONTROLLER_USERNAME {
            return same(&hash, &self.controller_hash).then_some(Principal::Controller);
        }
        if self.is_gate(&hash) {
            // The TLS front vouches for the node its certificate names.
            return self
                .is_active(username)
                .then(|| Principal::Device(username.to_owned()));
        }
        let map = self
            .credentials
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let credential = map.get(username)?;
        let matches = same(&hash, &credential.hash);
        (matches && !credential.revoked).then(|| Principal::Device(username.to_owned()))
    }

    /// Whether `node`'s credential is still good (checked again on every
    /// publish and subscribe, so a revocation cuts a live session's rights).
    pub fn is_active(&self, node: &str) -> bool {
        let map = self
            .credentials
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(node).is_some_and(|c| !c.revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_counted_expire_and_are_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::open(dir.path(), false).unwrap();
        let labels = vec![("site".to_owned(), "s1".to_owned())];
        let t = id.create_token(60_000, 2, &labels).unwrap();
        assert!(t.token.starts_with("flt_"));
        let a = id.join(&t.token, "dev-a").unwrap();
        assert_eq!(a.labels, labels);
        id.join(&t.token, "dev-b").unwrap();
        assert!(matches!(
            id.join(&t.token, "dev-c"),
            Err(IdentityError::TokenRefused)
        ));
        assert!(matches!(
            id.join("flt_nope", "dev-c"),
            Err(IdentityError::TokenRefused)
        ));

        let expired = id.create_token(0, 1, &[]).unwrap();
        assert!(matches!(
            id.join(&expired.token, "dev-d"),
            Err(IdentityError::TokenRefused)
        ));
        assert!(matches!(
            id.create_token(1000, 0, &[]),
            Err(IdentityError::ZeroUses)
        ));
        assert!(matches!(
            id.join(&id.create_token(1000, 1, &[]).unwrap().token, "Bad_Name"),
            Err(IdentityError::NodeName { .. })
        ));

        // Neither the token nor the password is in the file in the clear.
        drop(id);
        let raw = std::fs::read(dir.path().join("identity.redb")).unwrap();
        for secret in [&t.token, &a.password] {
            assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
        // Credentials survive a restart; the controller's password does not.
        let id = Identity::open(dir.path(), false).unwrap();
        assert_eq!(
            id.authenticate(Some("dev-a"), Some(a.password.as_bytes())),
            Some(Principal::Device("dev-a".into()))
        );
    }

    #[test]
    fn authentication_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::open(dir.path(), false).unwrap();
        let t = id.create_token(60_000, 1, &[]).unwrap();
        let e = id.join(&t.token, "dev-a").unwrap();
        let pw = e.password.as_bytes();
        assert_eq!(
            id.authenticate(Some("dev-a"), Some(pw)),
            Some(Principal::Device("dev-a".into()))
        );
        assert_eq!(id.authenticate(Some("dev-a"), Some(b"wrong")), None);
        assert_eq!(id.authenticate(Some("dev-b"), Some(pw)), None);
        assert_eq!(id.authenticate(None, None), None);
        assert_eq!(
            id.authenticate(
                Some(CONTROLLER_USERNAME),
                Some(id.controller_password().as_bytes())
            ),
            Some(Principal::Controller)
        );
        assert_eq!(id.authenticate(Some(CONTROLLER_USERNAME), Some(pw)), None);
        id.revoke("dev-a").unwrap();
        assert!(!id.is_active("dev-a"));
        assert_eq!(id.authenticate(Some("dev-a"), Some(pw)), None);
        assert!(matches!(
            id.revoke("ghost"),
            Err(IdentityError::UnknownNode(_))
        ));
        drop(id);
        let id = Identity::open(dir.path(), true).unwrap();
        assert_eq!(
            id.authenticate(Some("dev-a"), Some(pw)),
            None,
            "revocation is durable"
        );
        assert_eq!(id.authenticate(None, None), Some(Principal::Anonymous));
    }
}
