//! Sealing secrets for a node as the controller does (one-time X25519 on
//! ring, HKDF-SHA256 salted with both public keys, ChaCha20-Poly1305 under
//! `sealed_secret_context`), so tests hand the agent what it gets from the
//! wire; and the `.dockerconfigjson` of an image pull secret.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use flotilla_proto::{ConfigFile, SealedSecret, SecretFiles, sealed_secret_context};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

/// `files` sealed as Secret `name` for `node`, whose sealing public key is
/// `node_public`. The digest is the files' sha256 (the controller keys it;
/// the agent only binds it).
pub fn seal(
    node: &str,
    node_public: &[u8; 32],
    name: &str,
    files: Vec<ConfigFile>,
) -> SealedSecret {
    let rng = SystemRandom::new();
    let mut plain = flotilla_proto::encode(&SecretFiles { files }).unwrap();
    let digest: [u8; 32] = Sha256::digest(&plain).into();
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
            let mut salt = [0u8; 64];
            salt[..32].copy_from_slice(&ephemeral_public);
            salt[32..].copy_from_slice(node_public);
            let info = [context.as_slice()];
            let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
            let okm = prk.expand(&info, &aead::CHACHA20_POLY1305).unwrap();
            LessSafeKey::new(UnboundKey::from(okm))
        },
    )
    .unwrap();
    let mut nonce = [0u8; 12];
    rng.fill(&mut nonce).unwrap();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(context.as_slice()),
        &mut plain,
    )
    .unwrap();
    SealedSecret {
        name: name.to_owned(),
        digest,
        ephemeral_public,
        nonce,
        ciphertext: plain,
        problem: None,
    }
}

/// An image pull secret's one file: Docker's config JSON with `user` and
/// `password` for `registry`, as `auth` (base64 of `user:password`).
pub fn docker_config(registry: &str, user: &str, password: &str) -> Vec<ConfigFile> {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let json = format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#);
    vec![ConfigFile {
        path: ".dockerconfigjson".into(),
        data: json.into_bytes(),
        mode: 0o400,
    }]
}
