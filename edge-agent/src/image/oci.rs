//! The OCI documents the agent reads — descriptors, indexes, manifests,
//! configs, kept to the fields Flotilla uses — with the digests that name
//! blobs, layer media types and the rules that pick a device's platform.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{ImageConfig, hex};

/// A `sha256:` digest, checked to be 64 lowercase hex digits so it is safe as
/// a file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 lowercase hex digits>`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let Some((algorithm, hex)) = text.split_once(':') else {
            return Err(format!("digest {text:?}: expected sha256:<64 hex digits>"));
        };
        if algorithm != "sha256" {
            return Err(format!(
                "digest {text:?}: unsupported algorithm {algorithm:?}, only sha256 is supported"
            ));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "digest {text:?}: expected sha256:<64 lowercase hex digits>"
            ));
        }
        Ok(Self(hex.to_owned()))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0
    }

    /// The digest whose hex digits are `hex`, if they are 64 lowercase ones.
    pub(crate) fn from_hex(hex: &str) -> Option<Self> {
        Self::parse(&format!("sha256:{hex}")).ok()
    }

    /// The digest of `bytes`.
    pub(crate) fn of(bytes: &[u8]) -> Self {
        Self(hex(&Sha256::digest(bytes)))
    }

    /// The digest with this sha256 hash.
    pub(crate) fn of_hash(hash: &[u8]) -> Self {
        Self(hex(hash))
    }
}

/// What a blob is, for the registry (manifests and blobs are fetched from
/// different endpoints) and for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlobKind {
    /// An image manifest or index.
    Manifest,
    /// An image config.
    Config,
    /// A layer.
    Layer,
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// An uncompressed tar.
    Plain,
    /// A gzip-compressed tar.
    Gzip,
}

/// A layer to apply.
#[derive(Debug, Clone)]
pub(crate) struct LayerDesc {
    pub digest: Digest,
    pub size: u64,
    pub compression: Compression,
}

pub(crate) fn run_config(config: &ConfigJson) -> ImageConfig {
    let inner = config.config.clone().unwrap_or_default();
    ImageConfig {
        entrypoint: inner.entrypoint.unwrap_or_default(),
        cmd: inner.cmd.unwrap_or_default(),
        env: inner.env.unwrap_or_default(),
        working_dir: inner.working_dir.unwrap_or_default(),
        user: inner.user.unwrap_or_default(),
    }
}

/// How to run an image, from its config blob (as the store keeps it next to
/// an unpacked rootfs).
pub(crate) fn parse_config(bytes: &[u8]) -> Result<ImageConfig, String> {
    serde_json::from_slice::<ConfigJson>(bytes)
        .map(|c| run_config(&c))
        .map_err(|e| e.to_string())
}

/// The blobs a manifest or index names (config and layers, or manifests),
/// with their sizes; what cannot be parsed names nothing.
pub(crate) fn children(bytes: &[u8]) -> Vec<(Digest, u64)> {
    #[derive(Deserialize)]
    struct Any {
        manifests: Option<Vec<DescriptorJson>>,
        config: Option<DescriptorJson>,
        layers: Option<Vec<DescriptorJson>>,
    }
    let Ok(any) = serde_json::from_slice::<Any>(bytes) else {
        return Vec::new();
    };
    any.manifests
        .into_iter()
        .flatten()
        .chain(any.config)
        .chain(any.layers.into_iter().flatten())
        .filter_map(|d| Some((Digest::parse(&d.digest).ok()?, u64::try_from(d.size).ok()?)))
        .collect()
}

/// This device's architecture in OCI's (Go's) names.
pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        other => other,
    }
}

pub(crate) fn host_platform() -> String {
    match host_arch() {
        "arm" => "linux/arm/v7".to_owned(),
        arch => format!("linux/{arch}"),
    }
}

/// How well `platform` suits a device of `arch`: lower is better, `None` is
/// unusable. 32-bit ARM devices prefer v7 but run v6 and v5 code.
pub(crate) fn rank(arch: &str, platform: &Platform) -> Option<u8> {
    if platform.os != "linux" || platform.architecture != arch {
        return None;
    }
    match (arch, platform.variant.as_deref().unwrap_or("")) {
        ("arm", "v7") => Some(0),
        ("arm", "") => Some(1),
        ("arm", "v6") => Some(2),
        ("arm", "v5") => Some(3),
        ("arm64", "" | "v8") | ("amd64", "" | "v1") => Some(0),
        ("arm" | "arm64" | "amd64", _) => None,
        (_, "") => Some(0),
        (_, _) => Some(1),
    }
}

pub(crate) fn tag_list(descs: &[Desc]) -> String {
    let mut tags: Vec<&str> = descs.iter().filter_map(|d| d.ref_name.as_deref()).collect();
    tags.sort_unstable();
    tags.dedup();
    if tags.is_empty() {
        "none".to_owned()
    } else {
        tags.join(", ")
    }
}

pub(crate) fn layer_compression(media: &str) -> Result<Compression, String> {
    match media {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::Plain),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        m if m.contains("zstd") => Err(format!(
            "media type {m:?}: zstd-compressed layers are not supported, rebuild or copy the image with gzip layers"
        )),
        m => Err(format!(
            "unsupported layer media type {m:?}, expected an OCI tar or tar+gzip layer"
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// A checked descriptor.
#[derive(Debug, Clone)]
pub(crate) struct Desc {
    pub media_type: Option<String>,
    pub digest: Digest,
    pub size: u64,
    pub ref_name: Option<String>,
    pub platform: Option<Platform>,
}

// The JSON shapes, kept to the fields Flotilla reads; unknown fields are
// ignored as the OCI spec requires.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DescriptorJson {
    pub media_type: Option<String>,
    pub digest: String,
    pub size: i64,
    pub annotations: Option<BTreeMap<String, String>>,
    pub platform: Option<PlatformJson>,
}

#[derive(Deserialize)]
pub(crate) struct PlatformJson {
    pub architecture: String,
    pub os: String,
    pub variant: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct IndexJson {
    pub manifests: Vec<DescriptorJson>,
}

#[derive(Deserialize)]
pub(crate) struct ManifestJson {
    pub config: DescriptorJson,
    #[serde(default)]
    pub layers: Vec<DescriptorJson>,
}

#[derive(Deserialize)]
pub(crate) struct ConfigJson {
    pub architecture: Option<String>,
    pub os: Option<String>,
    pub variant: Option<String>,
    pub config: Option<RunConfigJson>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RunConfigJson {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(arch: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        }
    }

    #[test]
    fn ranks_platforms_like_a_device_would() {
        assert_eq!(rank("arm", &p("arm", Some("v7"))), Some(0));
        assert!(rank("arm", &p("arm", Some("v6"))) > rank("arm", &p("arm", None)));
        assert_eq!(rank("arm", &p("arm", Some("v8"))), None);
        assert_eq!(rank("arm", &p("arm64", None)), None);
        assert_eq!(rank("arm64", &p("arm64", Some("v8"))), Some(0));
        assert_eq!(rank("amd64", &p("amd64", None)), Some(0));
        assert_eq!(rank("amd64", &p("amd64", Some("v3"))), None);
        let windows = Platform {
            os: "windows".into(),
            ..p("amd64", None)
        };
        assert_eq!(rank("amd64", &windows), None);
    }

    #[test]
    fn digests_must_be_sha256_hex() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(Digest::parse(&good).map(|d| d.to_string()), Ok(good));
        for bad in ["sha256:../../etc/passwd", "sha256:ABC", "md5:00", "nocolon"] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
        let msg = Digest::parse(&format!("sha512:{}", "0".repeat(128)))
            .err()
            .unwrap_or_default();
        assert!(msg.contains("only sha256"), "{msg}");
    }

    #[test]
    fn layer_media_types() {
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Ok(Compression::Gzip)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar"),
            Ok(Compression::Plain)
        );
        let zstd = layer_compression("application/vnd.oci.image.layer.v1.tar+zstd");
        assert!(zstd.is_err_and(|e| e.contains("zstd-compressed layers are not supported")));
        assert!(layer_compression("application/x-foo").is_err());
    }
}
