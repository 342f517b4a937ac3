//! The device's sealing key and the opening of sealed secrets. `join` makes
//! an X25519 key pair, keeps the private half owner-only in
//! `{data}/identity/sealing.key` and hands the public half to the controller,
//! which seals each Secret a pod of this node uses for that key alone. Only
//! here is a secret ever in the clear on the device, in memory, on its way
//! to a tmpfs (`reconciler/volumes.rs`) or to a registry login.
//!
//! The seal (see `flotilla_proto::SealedSecret`): the shared X25519 secret
//! of the controller's one-time key and ours, HKDF-SHA256 with the two
//! public keys as salt and `sealed_secret_context(node, name, digest)` as
//! info, then ChaCha20-Poly1305 with that same context as associated data.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flotilla_proto::{
    ConfigFile, SealedSecret, SecretFiles, SecretItem, decode, sealed_secret_context,
};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::config::identity_dir;
use crate::image::PullSecrets;

/// The sealing key's private half, under [`identity_dir`].
pub const SEALING_KEY_FILE: &str = "sealing.key";
/// The one file of an image pull secret: Docker's config JSON.
pub const DOCKER_CONFIG_FILE: &str = ".dockerconfigjson";
/// Most image pull secrets of one pod that are read.
pub const MAX_PULL_SECRETS: usize = 16;

/// Why a sealed secret could not be opened, or the key not made or read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// This device never got a sealing key (enrolled before secrets
    /// existed, or never enrolled).
    #[error("node {node} has no sealing key: re-enrol it")]
    NoKey { node: String },
    /// The controller sealed nothing, and said why.
    #[error("secret {name:?}: {problem}")]
    NotSealed { name: String, problem: String },
    /// Not sealed for this node's key, node name, Secret or contents, or
    /// changed on the way.
    #[error(
        "secret {name:?}: cannot be opened with this node's sealing key (sealed for another key or node, or altered)"
    )]
    Open { name: String },
    /// Opened, but not the files frame expected.
    #[error("secret {name:?}: {reason}")]
    Contents { name: String, reason: String },
    /// The key file could not be read or written.
    #[error("sealing key {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    /// The system random source failed.
    #[error("no randomness for a sealing key")]
    Random,
}

/// A sealing key pair, made at `join`.
pub struct SealingKey {
    secret: StaticSecret,
}

impl SealingKey {
    /// A new random key pair.
    pub fn generate() -> Result<Self, SecretError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SecretError::Random)?;
        Ok(Self {
            secret: StaticSecret::from(bytes),
        })
    }

    /// The public half, as the controller stores it.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.secret).to_bytes()
    }

    /// The public half in base64, as `join` sends it.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public())
    }

    /// Writes the private half to `path` (base64), owner-only, atomically.
    pub fn save(&self, path: &Path) -> Result<(), SecretError> {
        let err = |e: io::Error| SecretError::KeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
        let text = format!("{}\n", STANDARD.encode(self.secret.to_bytes()));
        crate::private_file::write(path, text.as_bytes()).map_err(err)
    }

    /// Reads a key written by [`SealingKey::save`].
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let err = |reason: String| SecretError::KeyFile {
            path: path.to_owned(),
            reason,
        };
        let text = fs::read(path).map_err(|e| err(e.to_string()))?;
        if text.len() > 1024 {
            return Err(err("larger than 1 KiB, expected a base64 key".into()));
        }
        let bytes = STANDARD
            .decode(String::from_utf8_lossy(&text).trim())
            .map_err(|e| err(format!("not base64: {e}")))?;
        let bytes = <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| err(format!("{} bytes, expected 32", bytes.len())))?;
        Ok(Self {
            secret: StaticSecret::from(bytes),
        })
    }
}

/// What opening secrets needs: the node's name and key, and where the
/// per-pod tmpfs mounts go. Cheap to clone.
#[derive(Clone)]
pub struct Keyring {
    node: String,
    secrets_dir: PathBuf,
    key: Option<Arc<SealingKey>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("node", &self.node)
            .field("secrets_dir", &self.secrets_dir)
            .field("key", &self.key.is_some())
            .finish()
    }
}

impl Keyring {
    /// `node`'s keyring with `key` (if it has one); tmpfs mounts go under
    /// `{run_dir}/secrets`.
    pub fn new(node: &str, run_dir: &Path, key: Option<SealingKey>) -> Self {
        Self {
            node: node.to_owned(),
            secrets_dir: run_dir.join("secrets"),
            key: key.map(Arc::new),
        }
    }

    /// Loads `{data}/identity/sealing.key` when there is one. A key file
    /// that exists but cannot be read is an error, not "no key".
    pub fn load(node: &str, data_dir: &Path, run_dir: &Path) -> Result<Self, SecretError> {
        let path = identity_dir(data_dir).join(SEALING_KEY_FILE);
        let key = match path.exists() {
            true => Some(SealingKey::load(&path)?),
            false => None,
        };
        Ok(Self::new(node, run_dir, key))
    }

    /// Where a pod's tmpfs is mounted: `{run}/secrets/{pod}`.
    pub fn pod_dir(&self, pod: &str) -> PathBuf {
        self.secrets_dir.join(pod)
    }

    /// The node's sealing public key, if it has one.
    pub fn public(&self) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| k.public())
    }

    /// `{run}/secrets`.
    pub fn secrets_dir(&self) -> &Path {
        &self.secrets_dir
    }

    /// The files sealed in `sealed`, for this node.
    pub fn open(&self, sealed: &SealedSecret) -> Result<Vec<ConfigFile>, SecretError> {
        let name = &sealed.name;
        if let Some(problem) = &sealed.problem {
            return Err(SecretError::NotSealed {
                name: name.clone(),
                problem: problem.clone(),
            });
        }
        let Some(key) = &self.key else {
            return Err(SecretError::NoKey {
                node: self.node.clone(),
            });
        };
        let refused = || SecretError::Open { name: name.clone() };
        let shared = key
            .secret
            .diffie_hellman(&PublicKey::from(sealed.ephemeral_public));
        // A low-order point from the sender would give a known shared secret.
        if !shared.was_contributory() {
            return Err(refused());
        }
        let context = sealed_secret_context(&self.node, name, &sealed.digest);
        let aead_key = derive(
            shared.as_bytes(),
            &sealed.ephemeral_public,
            &key.public(),
            &context,
        )
        .ok_or_else(refused)?;
        let mut buf = sealed.ciphertext.clone();
        let plain = aead_key
            .open_in_place(
                Nonce::assume_unique_for_key(sealed.nonce),
                Aad::from(&context[..]),
                &mut buf,
            )
            .map_err(|_| refused())?;
        let files = decode::<SecretFiles>(plain).map_err(|e| SecretError::Contents {
            name: name.clone(),
            reason: e.to_string(),
        });
        // The clear copy must not outlive this call in our heap.
        buf.fill(0);
        Ok(files?.files)
    }
}

impl Keyring {
    /// A pod's image pull secrets, opened into credentials per registry.
    /// One that cannot be opened or read is left out, its reason kept (a
    /// refused pull names it) and logged by name only: an image already on
    /// the device needs no credentials, so it is no reason to fail a start.
    pub fn pull_secrets(&self, pod: &str, sealed: &[SealedSecret]) -> PullSecrets {
        let mut out = PullSecrets::none();
        for s in sealed.iter().take(MAX_PULL_SECRETS) {
            let problem = match self.open(s) {
                Ok(mut files) => {
                    let result = match files.iter().find(|f| f.path == DOCKER_CONFIG_FILE) {
                        Some(f) => out
                            .add_docker_config(&s.name, &f.data)
                            .map_err(|e| e.to_string()),
                        None => Err(format!(
                            "pull secret {:?} has no {DOCKER_CONFIG_FILE}",
                            s.name
                        )),
                    };
                    // The clear copy must not outlive this call in our heap.
                    for f in &mut files {
                        f.data.fill(0);
                    }
                    result.err()
                }
                Err(e) => Some(format!("pull secret {:?} could not be used: {e}", s.name)),
            };
            if let Some(problem) = problem {
                tracing::warn!(pod, "{problem}");
                out.add_problem(problem);
            }
        }
        if sealed.len() > MAX_PULL_SECRETS {
            let problem = format!(
                "{} image pull secrets, only the first {MAX_PULL_SECRETS} are read",
                sealed.len()
            );
            tracing::warn!(pod, "{problem}");
            out.add_problem(problem);
        }
        out
    }
}

/// Checks a secret volume's definition from the wire (its names become
/// paths): an error is (field, problem), as the state checks give them.
pub fn check_volume(
    items: &[SecretItem],
    default_mode: u32,
    sealed: &SealedSecret,
) -> Result<(), (String, String)> {
    check_sealed(sealed).map_err(|p| ("sealed.name".to_owned(), p))?;
    if default_mode > 0o777 {
        return Err((
            "default_mode".into(),
            format!("{default_mode:o} is over 0777"),
        ));
    }
    for (j, item) in items.iter().enumerate() {
        check_path(&item.path).map_err(|p| (format!("items[{j}].path"), p))?;
        if item.mode.is_some_and(|m| m > 0o777) {
            return Err((format!("items[{j}].mode"), "over 0777".into()));
        }
    }
    Ok(())
}

/// A sealed secret's name is a DNS label, as the controller's Secret names.
pub fn check_sealed(sealed: &SealedSecret) -> Result<(), String> {
    flotilla_proto::check_name(&sealed.name).map_err(|e| format!("{:?}: {e}", sealed.name))
}

/// A file path inside a secret volume: relative, no `..`, no empty or `.`
/// part, at most `PATH_MAX`.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 4096 || path.starts_with('/') {
        return Err(format!("{path:?} is not a relative path"));
    }
    if path
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(format!("{path:?} has an empty, '.' or '..' part"));
    }
    if path.contains('\0') {
        return Err(format!("{path:?} has a NUL byte"));
    }
    Ok(())
}

/// The AEAD key both ends derive: HKDF-SHA256 over the shared secret,
/// salted with the one-time and the node's public keys.
fn derive(
    shared: &[u8; 32],
    ephemeral_public: &[u8; 32],
    node_public: &[u8; 32],
    context: &[u8],
) -> Option<LessSafeKey> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral_public);
    salt[32..].copy_from_slice(node_public);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
    let info = [context];
    let okm = prk.expand(&info, &aead::CHACHA20_POLY1305).ok()?;
    Some(LessSafeKey::new(UnboundKey::from(okm)))
}

/// Seals `files` for `node` with the node's public key, as the controller
/// does (its own code, on ring's ephemeral agreement); the agent's tests
/// use it to make what it opens.
#[cfg(test)]
pub(crate) fn seal_for_tests(
    node: &str,
    node_public: &[u8; 32],
    name: &str,
    digest: [u8; 32],
    files: Vec<ConfigFile>,
) -> SealedSecret {
    #![allow(clippy::unwrap_used)]
    use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
    let rng = SystemRandom::new();
    let ephemeral = EphemeralPrivateKey::generate(&X25519, &rng).unwrap();
    let ephemeral_public: [u8; 32] = ephemeral
        .compute_public_key()
        .unwrap()
        .as_ref()
        .try_into()
        .unwrap();
    let context = sealed_secret_context(node, name, &digest);
    let key = agreement::agree_ephemeral(
        ephemeral,
        &UnparsedPublicKey::new(&X25519, node_public),
        |shared| {
            let shared: [u8; 32] = shared.try_into().unwrap();
            derive(&shared, &ephemeral_public, node_public, &context).unwrap()
        },
    )
    .unwrap();
    let mut nonce = [0u8; 12];
    rng.fill(&mut nonce).unwrap();
    let mut ciphertext = flotilla_proto::encode(&SecretFiles { files }).unwrap();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&context[..]),
        &mut ciphertext,
    )
    .unwrap();
    SealedSecret {
        name: name.to_owned(),
        digest,
        ephemeral_public,
        nonce,
        ciphertext,
        problem: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn files() -> Vec<ConfigFile> {
        vec![ConfigFile {
            path: "password".into(),
            data: b"hunter2".to_vec(),
            mode: 0o400,
        }]
    }

    fn keyring(node: &str, key: SealingKey) -> Keyring {
        Keyring::new(node, Path::new("/run/x"), Some(key))
    }

    #[test]
    fn opens_what_was_sealed_for_it_and_nothing_else() {
        let key = SealingKey::generate().unwrap();
        let public = key.public();
        let ring = keyring("n1", key);
        let sealed = seal_for_tests("n1", &public, "db", [7; 32], files());
        assert!(
            !sealed
                .ciphertext
                .windows(7)
                .any(|w| w == b"hunter2".as_slice())
        );
        assert_eq!(ring.open(&sealed).unwrap(), files());

        // Another node's key cannot open it.
        let other = keyring("n1", SealingKey::generate().unwrap());
        assert!(matches!(other.open(&sealed), Err(SecretError::Open { .. })));

        // Sealed for another node's name (with this node's key): refused.
        let for_n2 = seal_for_tests("n2", &public, "db", [7; 32], files());
        assert!(matches!(ring.open(&for_n2), Err(SecretError::Open { .. })));

        // Another Secret's name or digest claimed on the wire: refused.
        let renamed = SealedSecret {
            name: "other".into(),
            ..sealed.clone()
        };
        assert!(matches!(ring.open(&renamed), Err(SecretError::Open { .. })));
        let redigested = SealedSecret {
            digest: [8; 32],
            ..sealed.clone()
        };
        assert!(matches!(
            ring.open(&redigested),
            Err(SecretError::Open { .. })
        ));

        // Any flipped bit of the ciphertext, the tag, the nonce or the key.
        for i in [0, sealed.ciphertext.len() / 2, sealed.ciphertext.len() - 1] {
            let mut t = sealed.clone();
            t.ciphertext[i] ^= 1;
            assert!(matches!(ring.open(&t), Err(SecretError::Open { .. })));
        }
        let mut t = sealed.clone();
        t.nonce[0] ^= 1;
        assert!(matches!(ring.open(&t), Err(SecretError::Open { .. })));
        let mut t = sealed.clone();
        t.ephemeral_public[3] ^= 1;
        assert!(matches!(ring.open(&t), Err(SecretError::Open { .. })));
        // A low-order point (all zeros) is refused, not used.
        t.ephemeral_public = [0; 32];
        assert!(matches!(ring.open(&t), Err(SecretError::Open { .. })));
    }

    #[test]
    fn no_key_and_controller_problems_are_named() {
        let ring = Keyring::new("n1", Path::new("/run/x"), None);
        let sealed = seal_for_tests("n1", &[9; 32], "db", [0; 32], files());
        assert_eq!(
            ring.open(&sealed).unwrap_err().to_string(),
            "node n1 has no sealing key: re-enrol it"
        );
        let refused = SealedSecret {
            problem: Some("secret \"db\" not found".into()),
            ..SealedSecret::unsealed("db")
        };
        assert_eq!(
            ring.open(&refused).unwrap_err().to_string(),
            "secret \"db\": secret \"db\" not found"
        );
    }

    #[test]
    fn pull_secrets_open_into_credentials_and_name_what_failed() {
        let key = SealingKey::generate().unwrap();
        let public = key.public();
        let ring = keyring("n1", key);
        let config = |json: &str| {
            vec![ConfigFile {
                path: DOCKER_CONFIG_FILE.into(),
                data: json.as_bytes().to_vec(),
                mode: 0o400,
            }]
        };
        let good = seal_for_tests(
            "n1",
            &public,
            "regcred",
            [1; 32],
            config(r#"{"auths":{"r.local:5000":{"username":"robot","password":"pw"}}}"#),
        );
        let malformed = seal_for_tests("n1", &public, "bad", [2; 32], config("{"));
        let missing = SealedSecret {
            problem: Some("secret \"gone\" not found".into()),
            ..SealedSecret::unsealed("gone")
        };
        let secrets = ring.pull_secrets("p", &[missing, good, malformed]);
        let found = secrets.for_host("r.local:5000");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1.username, "robot");
        assert_eq!(found[0].1.password, "pw");
        let problems = secrets.problems().join("\n");
        assert!(
            problems.contains(
                "pull secret \"gone\" could not be used: secret \"gone\": secret \"gone\" not found"
            ),
            "{problems}"
        );
        assert!(
            problems.contains("pull secret \"bad\": expected Docker's config JSON"),
            "{problems}"
        );

        // More secrets than are read: the rest is named, not opened.
        let many: Vec<SealedSecret> = (0..MAX_PULL_SECRETS + 1)
            .map(|i| SealedSecret::unsealed(format!("s{i}")))
            .collect();
        let secrets = ring.pull_secrets("p", &many);
        assert_eq!(secrets.problems().len(), MAX_PULL_SECRETS + 1);
        assert!(secrets.problems()[MAX_PULL_SECRETS].contains("only the first 16"));
    }

    #[test]
    fn key_file_round_trips_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = SealingKey::generate().unwrap();
        let path = identity_dir(dir.path()).join(SEALING_KEY_FILE);
        key.save(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let ring = Keyring::load("n1", dir.path(), Path::new("/run/x")).unwrap();
        let sealed = seal_for_tests("n1", &key.public(), "db", [1; 32], files());
        assert_eq!(ring.open(&sealed).unwrap(), files());
        fs::write(&path, "short\n").unwrap();
        assert!(matches!(
            Keyring::load("n1", dir.path(), Path::new("/run/x")),
            Err(SecretError::KeyFile { .. })
        ));
    }
}
