//! The controller's key-encryption key, `{data}/secrets.key` (32 random
//! bytes, base64, owner-only, made on first start): Secrets are stored
//! sealed under it (ChaCha20-Poly1305, the Secret's name as associated
//! data, so a stored value cannot be moved to another name), and the
//! digests that stand for a Secret's contents on the wire are keyed by a
//! key derived from it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use serde_json::{Map, Value, json};

use super::{Secret, SecretError, SecretType};

/// The key file, in the data directory.
pub const KEY_FILE: &str = "secrets.key";
/// First byte of a stored Secret: the format.
const AT_REST_V1: u8 = 1;
/// Associated data of a stored Secret, before its name.
const AT_REST_CONTEXT: &[u8] = b"flotilla secret at rest v1\0";

/// The key-encryption key and what is derived from it.
pub struct Vault {
    kek: LessSafeKey,
    digest_key: hmac::Key,
    rng: SystemRandom,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vault(..)")
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SecretError {
    let path = path.to_path_buf();
    move |source| SecretError::Io { op, path, source }
}

impl Vault {
    /// Loads `{dir}/secrets.key`, or makes it when absent. Blocking.
    pub fn load_or_create(dir: &Path) -> Result<Self, SecretError> {
        let path = dir.join(KEY_FILE);
        let rng = SystemRandom::new();
        let key = match fs::File::open(&path) {
            Ok(file) => {
                let mode = file
                    .metadata()
                    .map_err(io_err("reading", &path))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(SecretError::Exposed { path, mode });
                }
                read_key(&path)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rng.fill(&mut key).map_err(|_| SecretError::Random)?;
                write_key(&path, &key)?;
                key
            }
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        Self::from_key(&key)
    }

    fn from_key(key: &[u8; 32]) -> Result<Self, SecretError> {
        let kek = UnboundKey::new(&aead::CHACHA20_POLY1305, key)
            .map(LessSafeKey::new)
            .map_err(|_| SecretError::Random)?;
        // A key of its own for digests, so they never use the KEK itself.
        let info = [b"flotilla secret digest v1".as_slice()];
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(key);
        let okm = prk
            .expand(&info, hmac::HMAC_SHA256)
            .map_err(|_| SecretError::Random)?;
        let digest_key = hmac::Key::from(okm);
        Ok(Self {
            kek,
            digest_key,
            rng: SystemRandom::new(),
        })
    }

    /// A Secret as stored: format byte, nonce, then its JSON sealed.
    pub fn seal_at_rest(&self, secret: &Secret) -> Result<Vec<u8>, SecretError> {
        let data: Map<String, Value> = secret
            .data
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(STANDARD.encode(v))))
            .collect();
        let mut body = serde_json::to_vec(&json!({
            "type": secret.kind.as_str(),
            "data": data,
        }))
        .map_err(|e| SecretError::Stored {
            name: secret.name.clone(),
            reason: e.to_string(),
        })?;
        let mut nonce = [0u8; 12];
        self.rng.fill(&mut nonce).map_err(|_| SecretError::Random)?;
        self.kek
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(at_rest_aad(&secret.name)),
                &mut body,
            )
            .map_err(|_| SecretError::Random)?;
        let mut out = Vec::with_capacity(1 + 12 + body.len());
        out.push(AT_REST_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The Secret `name` from what [`Vault::seal_at_rest`] stored.
    pub fn open_at_rest(&self, name: &str, stored: &[u8]) -> Result<Secret, SecretError> {
        let bad = |reason: &str| SecretError::Stored {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        let (&version, rest) = stored.split_first().ok_or_else(|| bad("empty"))?;
        if version != AT_REST_V1 || rest.len() < 12 {
            return Err(bad("unknown format"));
        }
        let (nonce, sealed) = rest.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad("bad nonce"))?;
        let mut buf = sealed.to_vec();
        let plain = self
            .kek
            .open_in_place(nonce, Aad::from(at_rest_aad(name)), &mut buf)
            .map_err(|_| bad("cannot be opened with this controller's secrets.key"))?;
        let value: Value = serde_json::from_slice(plain).map_err(|_| bad("not JSON"))?;
        buf.fill(0);
        let kind = value["type"]
            .as_str()
            .and_then(SecretType::parse)
            .ok_or_else(|| bad("unknown type"))?;
        let mut data = BTreeMap::new();
        for (k, v) in value["data"].as_object().ok_or_else(|| bad("no data"))? {
            let bytes = v
                .as_str()
                .and_then(|s| STANDARD.decode(s).ok())
                .ok_or_else(|| bad("a value is not base64"))?;
            data.insert(k.clone(), bytes);
        }
        Ok(Secret {
            name: name.to_owned(),
            kind,
            data,
        })
    }

    /// The digest that stands for `bytes` (a Secret's sealed frame) on the
    /// wire: HMAC-SHA256 under the derived key, so equal contents give
    /// equal digests and the digest tells nothing without the key.
    pub fn digest(&self, name: &str, bytes: &[u8]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.digest_key);
        ctx.update(&(name.len() as u64).to_le_bytes());
        ctx.update(name.as_bytes());
        ctx.update(bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }
}

fn at_rest_aad(name: &str) -> Vec<u8> {
    let mut aad = AT_REST_CONTEXT.to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad
}

fn read_key(path: &Path) -> Result<[u8; 32], SecretError> {
    let bad = |reason: String| SecretError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = fs::read(path).map_err(io_err("reading", path))?;
    if text.len() > 1024 {
        return Err(bad("larger than 1 KiB, expected a base64 key".into()));
    }
    let bytes = STANDARD
        .decode(String::from_utf8_lossy(&text).trim())
        .map_err(|e| bad(format!("not base64: {e}")))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| bad(format!("{} bytes, expected 32", bytes.len())))
}

fn write_key(path: &Path, key: &[u8; 32]) -> Result<(), SecretError> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(format!("{}\n", STANDARD.encode(key)).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming to", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(value: &[u8]) -> Secret {
        Secret {
            name: "db".into(),
            kind: SecretType::Opaque,
            data: BTreeMap::from([("password".to_owned(), value.to_vec())]),
        }
    }

    #[test]
    fn key_is_made_once_owner_only_and_opens_what_it_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let stored = vault.seal_at_rest(&secret(b"hunter2")).unwrap();
        assert!(!stored.windows(7).any(|w| w == b"hunter2"));
        assert_ne!(stored, vault.seal_at_rest(&secret(b"hunter2")).unwrap());

        let again = Vault::load_or_create(dir.path()).unwrap();
        assert_eq!(
            again.open_at_rest("db", &stored).unwrap(),
            secret(b"hunter2")
        );
        // Moved to another name, or altered: refused.
        assert!(again.open_at_rest("other", &stored).is_err());
        let mut altered = stored.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(again.open_at_rest("db", &altered).is_err());
        // Digests: stable across restarts, per contents and name.
        assert_eq!(vault.digest("db", b"x"), again.digest("db", b"x"));
        assert_ne!(vault.digest("db", b"x"), vault.digest("db", b"y"));
        assert_ne!(vault.digest("db", b"x"), vault.digest("dc", b"x"));

        // Another controller's key opens nothing.
        let other = tempfile::tempdir().unwrap();
        let stranger = Vault::load_or_create(other.path()).unwrap();
        assert!(stranger.open_at_rest("db", &stored).is_err());
        assert_ne!(stranger.digest("db", b"x"), vault.digest("db", b"x"));

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Vault::load_or_create(dir.path()),
            Err(SecretError::Exposed { .. })
        ));
    }
}
