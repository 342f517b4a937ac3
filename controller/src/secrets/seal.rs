//! Sealing a Secret's files for one node: a one-time X25519 key (ring's
//! ephemeral agreement) with the node's sealing key, HKDF-SHA256 salted
//! with both public keys and with `sealed_secret_context(node, name,
//! digest)` as info, then ChaCha20-Poly1305 with that context as associated
//! data. The agent's `secrets.rs` opens it; the digest is keyed by the
//! controller ([`Vault::digest`]) so it can stand for the contents on the
//! wire (container ids hash it) without telling anything about them.

use flotilla_proto::{ConfigFile, SealedSecret, SecretFiles, encode, sealed_secret_context};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use super::Vault;

/// Seals `files` of Secret `name` for `node`, whose sealing key is
/// `node_key`; an error is the problem the node will report.
pub fn seal(
    vault: &Vault,
    node: &str,
    node_key: &[u8; 32],
    name: &str,
    files: Vec<ConfigFile>,
) -> Result<SealedSecret, String> {
    let failed = |what: &str| format!("sealing secret {name:?} for node {node}: {what}");
    let mut plain = encode(&SecretFiles { files }).map_err(|e| failed(&e.to_string()))?;
    let digest = vault.digest(name, &plain);
    let rng = SystemRandom::new();
    let ephemeral =
        EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| failed("no randomness"))?;
    let ephemeral_public: [u8; 32] = ephemeral
        .compute_public_key()
        .ok()
        .and_then(|k| k.as_ref().try_into().ok())
        .ok_or_else(|| failed("no public key"))?;
    let context = sealed_secret_context(node, name, &digest);
    let key = agreement::agree_ephemeral(
        ephemeral,
        &UnparsedPublicKey::new(&X25519, node_key),
        |shared| derive(shared, &ephemeral_public, node_key, &context),
    )
    .map_err(|_| failed("the node's sealing key is not a usable X25519 key"))?
    .ok_or_else(|| failed("key derivation"))?;
    let mut nonce = [0u8; 12];
    rng.fill(&mut nonce).map_err(|_| failed("no randomness"))?;
    let mut ciphertext = plain.clone();
    plain.fill(0);
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&context[..]),
        &mut ciphertext,
    )
    .map_err(|_| failed("encryption"))?;
    Ok(SealedSecret {
        name: name.to_owned(),
        digest,
        ephemeral_public,
        nonce,
        ciphertext,
        problem: None,
    })
}

/// The AEAD key: HKDF-SHA256 over the shared secret, salted with the
/// one-time and the node's public keys (as the agent derives it).
fn derive(
    shared: &[u8],
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

#[cfg(test)]
mod tests {
    use super::*;

    fn files(value: &str) -> Vec<ConfigFile> {
        vec![ConfigFile {
            path: "password".into(),
            data: value.as_bytes().to_vec(),
            mode: 0o400,
        }]
    }

    #[test]
    fn every_seal_differs_but_the_digest_follows_the_contents_only() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::load_or_create(dir.path()).unwrap();
        // Any 32 bytes are an X25519 public key.
        let node_key = [9u8; 32];
        let a = seal(&vault, "n1", &node_key, "db", files("hunter2")).unwrap();
        let b = seal(&vault, "n1", &node_key, "db", files("hunter2")).unwrap();
        let c = seal(&vault, "n1", &node_key, "db", files("hunter3")).unwrap();
        for s in [&a, &b, &c] {
            assert!(!s.ciphertext.windows(6).any(|w| w == b"hunter"));
            assert_eq!(s.problem, None);
        }
        assert_ne!(a.ephemeral_public, b.ephemeral_public);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        // The frame, its version byte and the 16-byte tag.
        let frame = encode(&SecretFiles {
            files: files("hunter2"),
        })
        .unwrap();
        assert_eq!(a.ciphertext.len(), frame.len() + 16);
        // A low-order "key" (all zeros) is refused rather than used.
        assert!(seal(&vault, "n1", &[0; 32], "db", files("x")).is_err());
    }
}
