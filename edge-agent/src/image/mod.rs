//! Images on the device: resolves an image reference to an unpacked root
//! filesystem and the image's config (entrypoint, cmd, env, workdir, user).
//! Blobs and unpacked images are stored once, content-addressed, under
//! `{data_dir}/images`.
//!
//! References are registry references (`registry.local:5000/app:2`,
//! `busybox@sha256:…`), pulled over the OCI distribution API with resume
//! and digest checks, or skopeo's local transports `oci:/path/to/layout[:tag]`
//! and `oci-archive:/path/to/file.tar[:tag]`.
//!
//! Submodules: `reference` parses references, `settings` reads the
//! registries file, `registry` and `auth` talk to registries (with a pod's
//! pull secrets, `PullSecrets`, for that pod's pulls), `pull` drives a
//! pull, `blobs` keeps verified blobs, `refs` what references resolved to,
//! `archive` extracts archives, `layout` reads layouts and the blob store
//! (verifying every blob), `unpack` applies layers safely, `store` keeps
//! unpacked images, `gc` removes what nothing needs, `import` loads
//! `docker save` and OCI archives, `user` resolves a config's `User` in a
//! rootfs.

mod archive;
mod auth;
mod blobs;
mod gc;
mod import;
pub mod layers;
mod layout;
mod oci;
mod pull;
mod reference;
mod refs;
mod registry;
mod settings;
mod store;
mod unpack;
mod user;

use std::io;
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};

pub use auth::{PullSecretError, PullSecrets};
pub use flotilla_proto::PullProgress;
pub use gc::GcReport;
pub use import::ImportReport;
pub use settings::{Credentials, PullSettings, RegistrySettings, SettingsError};
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
    /// The root filesystem, never written to by containers: the image's
    /// layer list in the store (see [`layers`]), or a plain directory.
    pub rootfs: PathBuf,
    /// How to run it.
    pub config: ImageConfig,
}

/// Who waits for a pull: told how far it got, and asked whether it should
/// go on.
pub trait PullObserver: Sync {
    /// Bytes of layers present so far, and in all; called when the download
    /// starts, then at most about once a second, and when it is complete.
    fn progress(&self, progress: PullProgress);
    /// True when nobody needs the image any more (shutdown): the pull stops
    /// soon after, keeping what it downloaded for the next one.
    fn cancelled(&self) -> bool {
        false
    }
    /// A token cancelled when [`PullObserver::cancelled`] turns true, if
    /// the observer has one: the pull then closes its connections the
    /// moment it is cancelled, rather than when a request in flight next
    /// returns. Observers without one are asked between reads only.
    fn cancel_token(&self) -> Option<&tokio_util::sync::CancellationToken> {
        None
    }
}

/// A [`PullObserver`] that watches nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl PullObserver for NoObserver {
    fn progress(&self, _: PullProgress) {}
}

/// A [`PullObserver`] that publishes progress on a watch channel and is
/// cancelled with a token (the reconciler's pod task).
#[derive(Debug)]
pub struct WatchObserver {
    /// Where progress goes.
    pub progress: tokio::sync::watch::Sender<Option<PullProgress>>,
    /// Cancelled when the pull is no longer needed.
    pub cancel: tokio_util::sync::CancellationToken,
}

impl PullObserver for WatchObserver {
    fn progress(&self, progress: PullProgress) {
        // No receiver means nobody shows it: nothing to do.
        let _ = self.progress.send(Some(progress));
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    fn cancel_token(&self) -> Option<&tokio_util::sync::CancellationToken> {
        Some(&self.cancel)
    }
}

/// Where the reconciler gets images from: the real [`ImageStore`] on devices,
/// [`FakeImages`] with the fake runtime.
pub trait Images: Send + Sync + 'static {
    /// Makes `reference` ready to run and returns it, telling `observer` how
    /// a download goes. A registry that asks for credentials gets `secrets`'
    /// for its host first (a pod's image pull secrets: for that pod's pulls
    /// only), then the registries file's. Blocking (network, files): call
    /// from `spawn_blocking`. Idempotent, and safe to call for the same
    /// reference from several threads at once: a blob is downloaded by one
    /// pull at a time, the others waiting for it, and a pull cancelled
    /// through its observer hands its partial download to them.
    fn pull_with(
        &self,
        reference: &str,
        secrets: &PullSecrets,
        observer: &dyn PullObserver,
    ) -> Result<Image, ImageError>;

    /// [`Images::pull_with`] with the registries file's credentials only.
    fn pull(&self, reference: &str, observer: &dyn PullObserver) -> Result<Image, ImageError> {
        self.pull_with(reference, &PullSecrets::none(), observer)
    }

    /// [`Images::pull`] with no one watching.
    fn ensure(&self, reference: &str) -> Result<Image, ImageError> {
        self.pull(reference, &NoObserver)
    }

    /// [`Images::pull_with`] for a prefetch: not counted by
    /// [`Images::foreground_pulls`], so the prefetch can yield to pods.
    fn pull_background(
        &self,
        reference: &str,
        secrets: &PullSecrets,
        observer: &dyn PullObserver,
    ) -> Result<Image, ImageError> {
        self.pull_with(reference, secrets, observer)
    }

    /// How many pulls other than background ones run now.
    fn foreground_pulls(&self) -> usize {
        0
    }

    /// Removes images, blobs and records that none of `keep` (the image
    /// references of the current desired state) needs. The store also keeps
    /// those of the previous set it was given, and imported images.
    /// Blocking. Failures are logged.
    fn collect_garbage(&self, keep: &[String]) {
        let _ = keep;
    }
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
    /// The registry cannot be reached or keeps failing (after retries), or
    /// answers in a way a pull cannot use.
    #[error("image {reference:?}: {what}")]
    Pull {
        /// The reference as given.
        reference: String,
        /// What failed, naming the registry and the blob or manifest.
        what: String,
    },
    /// The registry refused the credentials, or has none to accept.
    #[error("image {reference:?}: {what}")]
    Unauthorized {
        /// The reference as given.
        reference: String,
        /// What the registry said.
        what: String,
    },
    /// The pull would leave less free space than the configured floor; it is
    /// tried again later.
    #[error("image {reference:?}: {what}")]
    InsufficientStorage {
        /// The reference as given.
        reference: String,
        /// How much is free, needed and kept.
        what: String,
    },
    /// The pull was stopped because nobody needs it any more.
    #[error("image {reference:?}: pull cancelled")]
    Cancelled {
        /// The reference as given.
        reference: String,
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
            Self::Pull { .. } => "ErrImagePull",
            Self::Unauthorized { .. } => "Unauthorized",
            Self::InsufficientStorage { .. } => "InsufficientStorage",
            Self::Cancelled { .. } => "Cancelled",
        }
    }
}

/// Images for the fake runtime: checks the reference's syntax and returns an
/// image with an empty rootfs and config, reading and unpacking nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeImages;

impl Images for FakeImages {
    fn pull_with(
        &self,
        reference: &str,
        _: &PullSecrets,
        _: &dyn PullObserver,
    ) -> Result<Image, ImageError> {
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
        assert!(FakeImages.ensure("nginx:latest").is_ok());
        let err = FakeImages.ensure("Nginx:latest").err();
        assert_eq!(err.map(|e| e.reason()), Some("InvalidImageName"));
        Ok(())
    }
}
