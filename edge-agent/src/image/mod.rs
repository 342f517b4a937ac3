//! Images on the device: resolves an image reference to an unpacked root
//! filesystem and the image's config (entrypoint, cmd, env, workdir, user).
//! Unpacked images are stored once, content-addressed by manifest digest,
//! under `{data_dir}/images`.
//!
//! References use skopeo's transports: `oci:/path/to/layout[:tag]` (an OCI
//! image layout directory) and `oci-archive:/path/to/file.tar[:tag]` (the same
//! layout as a tar file). Registry pulls come later.
//!
//! Submodules: `reference` parses references, `archive` extracts archives,
//! `layout` reads layouts (verifying every blob), `unpack` applies layers
//! safely, `store` keeps unpacked images, `user` resolves a config's `User`
//! in a rootfs.

mod archive;
mod layout;
mod reference;
mod store;
mod unpack;
mod user;

use std::io;
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};

pub use store::ImageStore;
pub use user::resolve_user;

/// What an image says about how to run it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value`.
    pub env: Vec<String>,
    /// `WorkingDir`; empty when unset.
    pub working_dir: String,
    /// `User`, as written in the image (`""`, `"1000"`, `"1000:1000"`, `"nobody"`).
    pub user: String,
}

/// An image ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Digest of the image manifest, `sha256:…`.
    pub digest: String,
    /// The unpacked root filesystem; never written to by containers.
    pub rootfs: PathBuf,
    /// How to run it.
    pub config: ImageConfig,
}

/// Where the reconciler gets images from: the real [`ImageStore`] on devices,
/// [`FakeImages`] with the fake runtime.
pub trait Images: Send + Sync + 'static {
    /// Makes `reference` ready to run and returns it. Blocking (reads and
    /// unpacks files): call from `spawn_blocking`. Idempotent, and safe to
    /// call for the same reference from several threads at once.
    fn ensure(&self, reference: &str) -> Result<Image, ImageError>;
}

/// Why an image could not be made ready. Every message names the reference
/// (or, for [`ImageError::User`], the rootfs) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference cannot be parsed, uses an unsupported transport, or
    /// does not say which of several images it means.
    #[error("image {reference:?}: {reason}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The layout, archive or tag does not exist.
    #[error("image {reference:?}: {what}")]
    NotFound {
        /// The reference as given.
        reference: String,
        /// What is missing, and where it was looked for.
        what: String,
    },
    /// The image has no manifest for this device's platform.
    #[error(
        "image {reference:?}: no manifest for this device's platform {wanted} (available: {available})"
    )]
    NoMatchingPlatform {
        /// The reference as given.
        reference: String,
        /// This device's platform, `linux/arm64`.
        wanted: String,
        /// The platforms the image offers, comma separated.
        available: String,
    },
    /// The image is malformed: bad JSON, a digest or size mismatch, a
    /// missing blob, an unsupported media type, a corrupt layer.
    #[error("image {reference:?}: {what}")]
    Invalid {
        /// The reference as given.
        reference: String,
        /// What is wrong, naming the blob or file.
        what: String,
    },
    /// A layer has an entry that would write outside the root filesystem.
    #[error("image {reference:?}: layer {layer}: entry {entry:?} refused: {why}")]
    UnsafeLayer {
        /// The reference as given.
        reference: String,
        /// Digest of the layer.
        layer: String,
        /// The entry's name as stored in the layer.
        entry: String,
        /// Why it is refused.
        why: String,
    },
    /// The image's user cannot be resolved in its root filesystem.
    #[error("user {user:?} in rootfs {}: {what}", rootfs.display())]
    User {
        /// The `User` value, as in the image config.
        user: String,
        /// The root filesystem it was looked up in.
        rootfs: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The store itself cannot be opened or cleaned.
    #[error("image store: {op} {}: {source}", path.display())]
    Store {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading the image or writing the store failed.
    #[error("image {reference:?}: {op} {}: {source}", path.display())]
    Io {
        /// The reference as given.
        reference: String,
        /// What was being done: `reading`, `creating`, `renaming`.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// A short CamelCase reason for pod status.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadReference { .. } => "InvalidImageName",
            Self::NotFound { .. } => "ImageNotFound",
            Self::NoMatchingPlatform { .. } => "NoMatchingPlatform",
            Self::Invalid { .. } | Self::User { .. } => "InvalidImage",
            Self::UnsafeLayer { .. } => "UnsafeLayer",
            Self::Io { .. } | Self::Store { .. } => "ImageStoreError",
        }
    }
}

/// Images for the fake runtime: checks the reference's syntax and returns an
/// image with an empty rootfs and config, reading and unpacking nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeImages;

impl Images for FakeImages {
    fn ensure(&self, reference: &str) -> Result<Image, ImageError> {
        reference::Reference::parse(reference)?;
        // Stable per reference, so status and restarts behave as with real images.
        let digest = format!("sha256:{}", hex(&Sha256::digest(reference.as_bytes())));
        Ok(Image {
            digest,
            rootfs: PathBuf::new(),
            config: ImageConfig::default(),
        })
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_images_check_syntax_only() -> Result<(), ImageError> {
        let image = FakeImages.ensure("oci:/nowhere/at/all:v1")?;
        assert!(image.digest.starts_with("sha256:") && image.digest.len() == 71);
        assert_eq!(image.rootfs, PathBuf::new());
        assert_eq!(image.config, ImageConfig::default());
        assert_eq!(
            FakeImages.ensure("oci:/nowhere/at/all:v1")?.digest,
            image.digest
        );
        assert_ne!(
            FakeImages.ensure("oci:/nowhere/at/all:v2")?.digest,
            image.digest
        );
        let err = FakeImages.ensure("nginx:latest").err();
        assert_eq!(err.map(|e| e.reason()), Some("InvalidImageName"));
        Ok(())
    }
}
