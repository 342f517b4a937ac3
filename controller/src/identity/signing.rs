//! The controller's ed25519 signing key: made on first start in the data
//! directory (owner-only), loaded afterwards, and used to sign every
//! desired-state frame before it is published, and every exec request.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flotilla_proto::{EncodeError, ExecRequest, Signature, SignedDesired, SignedExec, encode};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

/// The private key (PKCS#8), readable by the owner only.
pub const KEY_FILE: &str = "signing.key";
/// The public key, base64 of its 32 bytes: what agents pin (`--controller-key`).
pub const PUBLIC_FILE: &str = "signing.pub";

/// Largest key file read (a PKCS#8 ed25519 key is 83 bytes).
const MAX_KEY_FILE: u64 = 4096;

/// Why the signing key could not be made, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// A key file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The key file is not an ed25519 PKCS#8 key.
    #[error("signing key {path}: not an ed25519 pkcs#8 key")]
    BadKey { path: PathBuf },
    /// The key file can be read by others than its owner.
    #[error("signing key {path}: mode {mode:o} lets others read it, expected 0600")]
    Exposed { path: PathBuf, mode: u32 },
    /// The system random source failed.
    #[error("generating the signing key: no randomness")]
    Random,
    /// The signed envelope does not fit in a frame.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SigningError {
    move |source| SigningError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The controller's signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public_base64())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads `{dir}/signing.key`, or makes it (and `signing.pub`) when absent.
    /// Blocking: file I/O.
    pub fn load_or_create(dir: &Path) -> Result<Self, SigningError> {
        let path = dir.join(KEY_FILE);
        let key = match fs::File::open(&path) {
            Ok(file) => {
                let mode = file
                    .metadata()
                    .map_err(io_err("reading", &path))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(SigningError::Exposed {
                        path,
                        mode: mode & 0o777,
                    });
                }
                let mut bytes = Vec::new();
                io::Read::read_to_end(&mut io::Read::take(file, MAX_KEY_FILE), &mut bytes)
                    .map_err(io_err("reading", &path))?;
                Self::from_pkcs8(&bytes).ok_or(SigningError::BadKey { path: path.clone() })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::create(&path)?,
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        // Rewritten every start, so it always matches the key.
        let public = dir.join(PUBLIC_FILE);
        fs::write(&public, format!("{}\n", key.public_base64()))
            .map_err(io_err("writing", &public))?;
        Ok(key)
    }

    fn create(path: &Path) -> Result<Self, SigningError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| SigningError::Random)?;
        let tmp = path.with_extension("key.tmp");
        {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("creating", &tmp))?;
            file.write_all(pkcs8.as_ref())
                .and_then(|()| file.sync_all())
                .map_err(io_err("writing", &tmp))?;
        }
        fs::rename(&tmp, path).map_err(io_err("renaming to", path))?;
        tracing::info!(path = %path.display(), "made a new desired-state signing key");
        Self::from_pkcs8(pkcs8.as_ref()).ok_or(SigningError::BadKey {
            path: path.to_owned(),
        })
    }

    fn from_pkcs8(bytes: &[u8]) -> Option<Self> {
        Ed25519KeyPair::from_pkcs8(bytes)
            .ok()
            .map(|pair| Self { pair })
    }

    /// A fresh key that lives only in memory (tests).
    pub fn ephemeral() -> Result<Self, SigningError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| SigningError::Random)?;
        Self::from_pkcs8(pkcs8.as_ref()).ok_or(SigningError::Random)
    }

    /// The 32-byte public key.
    pub fn public(&self) -> [u8; 32] {
        let mut out = [0; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The public key as agents take it: base64 of its 32 bytes.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public())
    }

    /// Wraps a `DesiredState` frame in a signed envelope, ready to publish.
    pub fn sign_desired(&self, frame: Vec<u8>) -> Result<Vec<u8>, SigningError> {
        let signed = self.pair.sign(&SignedDesired::signed_bytes(&frame));
        let mut signature = [0; flotilla_proto::SIGNATURE_LEN];
        signature.copy_from_slice(signed.as_ref());
        Ok(encode(&SignedDesired {
            payload: frame,
            signature: Signature(signature),
        })?)
    }

    /// Signs an exec request for one node (`SIGNED_EXEC_CONTEXT` then its
    /// frame), as the agent checks it before running anything.
    pub fn sign_exec(&self, request: &ExecRequest) -> Result<SignedExec, SigningError> {
        let payload = encode(request)?;
        let signed = self.pair.sign(&SignedExec::signed_bytes(&payload));
        let mut signature = [0; flotilla_proto::SIGNATURE_LEN];
        signature.copy_from_slice(signed.as_ref());
        Ok(SignedExec {
            payload,
            signature: Signature(signature),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::decode;
    use ring::signature::{ED25519, UnparsedPublicKey};

    #[test]
    fn made_once_owner_only_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = SigningKey::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = SigningKey::load_or_create(dir.path()).unwrap();
        assert_eq!(first.public(), again.public());
        let public = fs::read_to_string(dir.path().join(PUBLIC_FILE)).unwrap();
        assert_eq!(public.trim(), first.public_base64());

        fs::set_permissions(dir.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = SigningKey::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("lets others read it"), "{err}");
    }

    #[test]
    fn signatures_verify_over_context_and_payload_only() {
        let key = SigningKey::ephemeral().unwrap();
        let frame = key.sign_desired(vec![1, 9, 9]).unwrap();
        let signed: SignedDesired = decode(&frame).unwrap();
        assert_eq!(signed.payload, vec![1, 9, 9]);
        let public = UnparsedPublicKey::new(&ED25519, key.public());
        let message = SignedDesired::signed_bytes(&signed.payload);
        assert!(public.verify(&message, &signed.signature.0).is_ok());
        assert!(public.verify(&signed.payload, &signed.signature.0).is_err());
        let other = SigningKey::ephemeral().unwrap();
        let forged: SignedDesired = decode(&other.sign_desired(vec![1, 9, 9]).unwrap()).unwrap();
        assert!(public.verify(&message, &forged.signature.0).is_err());
    }
}
