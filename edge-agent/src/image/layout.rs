//! Reading OCI image layouts and archives: picks the manifest for a tag and
//! this device's platform, and reads every blob (index, manifest, config,
//! layers) only after checking it against its digest and size. The agent's
//! own blob store is read the same way, with a [`Fetch`] that downloads each
//! blob from a registry before it is read.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{ImageConfig, ImageError, hex};

/// Largest JSON blob (index, manifest, config) read; real ones are a few KiB.
pub(crate) const MAX_JSON: u64 = 4 * 1024 * 1024;
/// Image indexes pointing at image indexes, at most this deep.
const MAX_NESTING: usize = 4;
/// The annotation that names a manifest in `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

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

/// Makes blobs present in a layout before they are read: the registry
/// puller downloads them into the agent's blob store.
pub(crate) trait Fetch {
    /// Makes blob `digest` of `size` bytes present under
    /// `blobs/sha256/<hex>`, verified against its digest and size.
    fn fetch(&self, digest: &Digest, size: u64, kind: BlobKind) -> Result<(), ImageError>;
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    Plain,
    Gzip,
}

/// A layer to apply.
#[derive(Debug, Clone)]
pub(crate) struct LayerDesc {
    pub digest: Digest,
    pub size: u64,
    pub compression: Compression,
}

/// The image a reference resolved to.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub manifest: Digest,
    pub config: ImageConfig,
    /// The config blob, verified, as stored in the layout.
    pub config_bytes: Vec<u8>,
    /// Lowest first.
    pub layers: Vec<LayerDesc>,
}

/// An OCI image layout directory.
pub(crate) struct Layout<'a> {
    reference: &'a str,
    dir: PathBuf,
    /// How messages name `index.json`: its path, or `archive.tar:index.json`.
    index_name: String,
    /// Downloads blobs before they are read (registry pulls).
    fetch: Option<&'a dyn Fetch>,
}

impl<'a> Layout<'a> {
    /// Opens the layout in `dir`. `source` is what the user named (the
    /// directory, or the archive it was extracted from), for messages.
    pub fn open(
        reference: &'a str,
        dir: &Path,
        source: &Path,
        archive: bool,
    ) -> Result<Self, ImageError> {
        let index_name = if archive {
            format!("{}:index.json", source.display())
        } else {
            source.join("index.json").display().to_string()
        };
        let layout = Self {
            reference,
            dir: dir.to_owned(),
            index_name,
            fetch: None,
        };
        let marker = dir.join("oci-layout");
        let bytes = match read_capped(&marker, 4096) {
            Ok(bytes) => bytes,
            Err(e)
                if !archive
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
            {
                let what = if dir.is_dir() {
                    format!(
                        "{} is not an OCI image layout (no oci-layout file)",
                        source.display()
                    )
                } else if dir.exists() {
                    format!("{} is not an OCI image layout directory", source.display())
                } else {
                    format!("no OCI image layout at {}", source.display())
                };
                return Err(ImageError::NotFound {
                    reference: reference.to_owned(),
                    what,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let what = format!(
                    "{} is not an OCI image archive (no oci-layout file)",
                    source.display()
                );
                return Err(layout.invalid(what));
            }
            Err(e) => return Err(layout.io("reading", &marker, e)),
        };
        #[derive(Deserialize)]
        struct Marker {
            #[serde(rename = "imageLayoutVersion")]
            version: String,
        }
        match serde_json::from_slice::<Marker>(&bytes) {
            Ok(m) if m.version.starts_with("1.") => Ok(layout),
            Ok(m) => Err(layout.invalid(format!(
                "{}: oci-layout: unsupported imageLayoutVersion {:?}, expected 1.x",
                source.display(),
                m.version
            ))),
            Err(e) => Err(layout.invalid(format!("{}: oci-layout: {e}", source.display()))),
        }
    }

    /// The agent's blob store at `dir` (`{dir}/blobs/sha256/…`, no
    /// `index.json`), read as a layout; `fetch` brings in missing blobs.
    pub fn blob_store(reference: &'a str, dir: &Path, fetch: Option<&'a dyn Fetch>) -> Self {
        Self {
            reference,
            dir: dir.to_owned(),
            index_name: dir.join("blobs").display().to_string(),
            fetch,
        }
    }

    /// Picks the manifest for this device's platform starting from the
    /// manifest or index `digest` (of `size` bytes, `media_type` when known),
    /// and reads its manifest and config.
    pub fn resolve_digest(
        &self,
        digest: Digest,
        size: u64,
        media_type: Option<String>,
    ) -> Result<Resolved, ImageError> {
        self.resolve_desc(Desc {
            media_type,
            digest,
            size,
            ref_name: None,
            platform: None,
        })
    }

    /// Picks the manifest `tag` names (or the only one) for this device's
    /// platform, and reads its manifest and config.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Resolved, ImageError> {
        let path = self.dir.join("index.json");
        let bytes = match read_capped(&path, MAX_JSON) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.invalid(format!("{} is missing", self.index_name)));
            }
            Err(e) => return Err(self.io("reading", &path, e)),
        };
        if bytes.len() as u64 > MAX_JSON {
            return Err(self.invalid(format!(
                "{} is larger than {MAX_JSON} bytes",
                self.index_name
            )));
        }
        let index: IndexJson = serde_json::from_slice(&bytes)
            .map_err(|e| self.invalid(format!("{}: {e}", self.index_name)))?;
        let descs = self.descriptors(index.manifests, &self.index_name)?;
        let tags = tag_list(&descs);
        let candidates: Vec<Desc> = match tag {
            Some(tag) => descs
                .into_iter()
                .filter(|d| d.ref_name.as_deref() == Some(tag))
                .collect(),
            None => descs,
        };
        let desc = match (candidates.len(), tag) {
            (0, Some(tag)) => {
                let what = format!(
                    "tag {tag:?} not found in {} (tags: {tags})",
                    self.index_name
                );
                return Err(ImageError::NotFound {
                    reference: self.reference.to_owned(),
                    what,
                });
            }
            (0, None) => {
                return Err(self.invalid(format!("{} lists no manifests", self.index_name)));
            }
            (1, _) => candidates
                .into_iter()
                .next()
                .ok_or_else(|| self.invalid("no manifest"))?,
            // Several descriptors under one name, each with a platform: a
            // multi-platform image written straight into index.json.
            (_, _) if candidates.iter().all(|d| d.platform.is_some()) => self.choose(candidates)?,
            (n, _) => {
                let reason = format!(
                    "{n} manifests in {}: name one with a tag (tags: {tags})",
                    self.index_name
                );
                return Err(ImageError::BadReference {
                    reference: self.reference.to_owned(),
                    reason,
                });
            }
        };
        self.resolve_desc(desc)
    }

    fn resolve_desc(&self, mut desc: Desc) -> Result<Resolved, ImageError> {
        for _ in 0..MAX_NESTING {
            let bytes = self.read_json(&desc, "manifest")?;
            match self.kind(&desc, &bytes)? {
                Kind::Manifest => return self.load_manifest(desc.digest, &bytes),
                Kind::Index => {
                    let index: IndexJson = serde_json::from_slice(&bytes)
                        .map_err(|e| self.invalid(format!("image index {}: {e}", desc.digest)))?;
                    let name = format!("image index {}", desc.digest);
                    desc = self.choose(self.descriptors(index.manifests, &name)?)?;
                }
            }
        }
        Err(self.invalid(format!("image indexes nested more than {MAX_NESTING} deep")))
    }

    /// Opens a layer blob after checking its whole content against its digest
    /// and size, so nothing unverified reaches the tar reader.
    pub fn open_layer(&self, layer: &LayerDesc) -> Result<File, ImageError> {
        let path = self.blob_path(&layer.digest);
        let mut file = self.open_blob(&path, &layer.digest, layer.size, "layer")?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| self.io("reading", &path, e))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            hasher.update(&buf[..n]);
        }
        self.check(
            &layer.digest,
            layer.size,
            total,
            &hasher.finalize(),
            "layer",
        )?;
        file.rewind().map_err(|e| self.io("reading", &path, e))?;
        Ok(file)
    }

    fn load_manifest(&self, digest: Digest, bytes: &[u8]) -> Result<Resolved, ImageError> {
        let manifest: ManifestJson = serde_json::from_slice(bytes)
            .map_err(|e| self.invalid(format!("manifest {digest}: {e}")))?;
        let name = format!("manifest {digest}");
        let config_desc = self.descriptor(manifest.config, &name)?;
        match config_desc.media_type.as_deref() {
            Some(OCI_CONFIG | DOCKER_CONFIG) | None => {}
            Some(other) => {
                return Err(self.invalid(format!(
                    "manifest {digest}: config media type {other:?} is not a container image config"
                )));
            }
        }
        let config_bytes = self.read_json(&config_desc, "config")?;
        let config: ConfigJson = serde_json::from_slice(&config_bytes)
            .map_err(|e| self.invalid(format!("config {}: {e}", config_desc.digest)))?;
        let run_config = run_config(&config);
        if let Some(arch) = config.architecture.as_deref().filter(|a| !a.is_empty()) {
            // A single-platform image for another CPU would only fail later,
            // at exec, with a cryptic "exec format error".
            let platform = Platform {
                os: config.os.clone().unwrap_or_else(|| "linux".to_owned()),
                architecture: arch.to_owned(),
                variant: config.variant.clone(),
            };
            if rank(host_arch(), &platform).is_none() {
                return Err(ImageError::NoMatchingPlatform {
                    reference: self.reference.to_owned(),
                    wanted: host_platform(),
                    available: platform.to_string(),
                });
            }
        }
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for layer in manifest.layers {
            let desc = self.descriptor(layer, &name)?;
            let Some(media) = desc.media_type.as_deref() else {
                return Err(self.invalid(format!("layer {}: no mediaType", desc.digest)));
            };
            let compression = layer_compression(media)
                .map_err(|why| self.invalid(format!("layer {}: {why}", desc.digest)))?;
            layers.push(LayerDesc {
                digest: desc.digest,
                size: desc.size,
                compression,
            });
        }
        Ok(Resolved {
            manifest: digest,
            config: run_config,
            config_bytes,
            layers,
        })
    }

    /// Picks the descriptor for this device's platform.
    fn choose(&self, descs: Vec<Desc>) -> Result<Desc, ImageError> {
        let arch = host_arch();
        let best = descs
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((rank(arch, d.platform.as_ref()?)?, i)))
            .min()
            .map(|(_, i)| i);
        let available: Vec<String> = descs
            .iter()
            .map(|d| {
                d.platform
                    .as_ref()
                    .map_or_else(|| "unspecified".to_owned(), Platform::to_string)
            })
            .collect();
        match best.and_then(|i| descs.into_iter().nth(i)) {
            Some(desc) => Ok(desc),
            None => Err(ImageError::NoMatchingPlatform {
                reference: self.reference.to_owned(),
                wanted: host_platform(),
                available: available.join(", "),
            }),
        }
    }

    fn kind(&self, desc: &Desc, bytes: &[u8]) -> Result<Kind, ImageError> {
        // Old layouts omit the descriptor's mediaType; the blob's own says.
        let media = match desc.media_type.clone() {
            Some(media) => media,
            None => {
                #[derive(Deserialize)]
                struct Sniff {
                    #[serde(rename = "mediaType")]
                    media_type: Option<String>,
                    manifests: Option<serde::de::IgnoredAny>,
                }
                let sniff: Sniff = serde_json::from_slice(bytes)
                    .map_err(|e| self.invalid(format!("manifest {}: {e}", desc.digest)))?;
                match (sniff.media_type, sniff.manifests) {
                    (Some(media), _) => media,
                    (None, Some(_)) => OCI_INDEX.to_owned(),
                    (None, None) => OCI_MANIFEST.to_owned(),
                }
            }
        };
        match media.as_str() {
            OCI_INDEX | DOCKER_LIST => Ok(Kind::Index),
            OCI_MANIFEST | DOCKER_MANIFEST => Ok(Kind::Manifest),
            other => Err(self.invalid(format!(
                "manifest {}: unsupported media type {other:?}, expected an OCI or Docker v2 manifest or index",
                desc.digest
            ))),
        }
    }

    fn descriptors(&self, raw: Vec<DescriptorJson>, within: &str) -> Result<Vec<Desc>, ImageError> {
        raw.into_iter()
            .map(|d| self.descriptor(d, within))
            .collect()
    }

    fn descriptor(&self, raw: DescriptorJson, within: &str) -> Result<Desc, ImageError> {
        let digest =
            Digest::parse(&raw.digest).map_err(|e| self.invalid(format!("{within}: {e}")))?;
        let size = u64::try_from(raw.size)
            .map_err(|_| self.invalid(format!("{within}: {digest}: negative size {}", raw.size)))?;
        Ok(Desc {
            media_type: raw.media_type,
            digest,
            size,
            ref_name: raw.annotations.and_then(|mut a| a.remove(REF_NAME)),
            platform: raw.platform.map(|p| Platform {
                os: p.os,
                architecture: p.architecture,
                variant: p.variant.filter(|v| !v.is_empty()),
            }),
        })
    }

    fn read_json(&self, desc: &Desc, what: &str) -> Result<Vec<u8>, ImageError> {
        if desc.size > MAX_JSON {
            return Err(self.invalid(format!(
                "{what} {} is {} bytes, at most {MAX_JSON} allowed",
                desc.digest, desc.size
            )));
        }
        if let Some(fetch) = self.fetch {
            let kind = if what == "config" {
                BlobKind::Config
            } else {
                BlobKind::Manifest
            };
            fetch.fetch(&desc.digest, desc.size, kind)?;
        }
        let path = self.blob_path(&desc.digest);
        let file = self.open_blob(&path, &desc.digest, desc.size, what)?;
        let mut bytes = Vec::with_capacity(usize::try_from(desc.size).unwrap_or(0));
        file.take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.io("reading", &path, e))?;
        let hash = Sha256::digest(&bytes);
        self.check(&desc.digest, desc.size, bytes.len() as u64, &hash, what)?;
        Ok(bytes)
    }

    fn open_blob(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
        what: &str,
    ) -> Result<File, ImageError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.invalid(format!("{what} {digest}: blob missing from the layout")));
            }
            Err(e) => return Err(self.io("opening", path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| self.io("reading", path, e))?
            .len();
        if len != size {
            return Err(self.invalid(format!(
                "{what} {digest}: blob is {len} bytes, its descriptor says {size}"
            )));
        }
        Ok(file)
    }

    fn check(
        &self,
        digest: &Digest,
        size: u64,
        got: u64,
        hash: &[u8],
        what: &str,
    ) -> Result<(), ImageError> {
        if got != size {
            return Err(self.invalid(format!(
                "{what} {digest}: read {got} bytes, its descriptor says {size}"
            )));
        }
        let actual = hex(hash);
        if actual != digest.hex() {
            return Err(self.invalid(format!(
                "{what} {digest}: digest mismatch, content hashes to sha256:{actual}"
            )));
        }
        Ok(())
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    fn invalid(&self, what: impl Into<String>) -> ImageError {
        ImageError::Invalid {
            reference: self.reference.to_owned(),
            what: what.into(),
        }
    }

    fn io(&self, op: &'static str, path: &Path, source: io::Error) -> ImageError {
        ImageError::Io {
            reference: self.reference.to_owned(),
            op,
            path: path.to_owned(),
            source,
        }
    }
}

fn run_config(config: &ConfigJson) -> ImageConfig {
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
fn rank(arch: &str, platform: &Platform) -> Option<u8> {
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

fn tag_list(descs: &[Desc]) -> String {
    let mut tags: Vec<&str> = descs.iter().filter_map(|d| d.ref_name.as_deref()).collect();
    tags.sort_unstable();
    tags.dedup();
    if tags.is_empty() {
        "none".to_owned()
    } else {
        tags.join(", ")
    }
}

fn layer_compression(media: &str) -> Result<Compression, String> {
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

/// Reads at most `cap + 1` bytes of `path`, so callers can tell "too big".
fn read_capped(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.take(cap + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

enum Kind {
    Index,
    Manifest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
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
struct Desc {
    media_type: Option<String>,
    digest: Digest,
    size: u64,
    ref_name: Option<String>,
    platform: Option<Platform>,
}

// The JSON shapes, kept to the fields Flotilla reads; unknown fields are
// ignored as the OCI spec requires.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescriptorJson {
    media_type: Option<String>,
    digest: String,
    size: i64,
    annotations: Option<BTreeMap<String, String>>,
    platform: Option<PlatformJson>,
}

#[derive(Deserialize)]
struct PlatformJson {
    architecture: String,
    os: String,
    variant: Option<String>,
}

#[derive(Deserialize)]
struct IndexJson {
    manifests: Vec<DescriptorJson>,
}

#[derive(Deserialize)]
struct ManifestJson {
    config: DescriptorJson,
    #[serde(default)]
    layers: Vec<DescriptorJson>,
}

#[derive(Deserialize)]
struct ConfigJson {
    architecture: Option<String>,
    os: Option<String>,
    variant: Option<String>,
    config: Option<RunConfigJson>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "PascalCase")]
struct RunConfigJson {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
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
