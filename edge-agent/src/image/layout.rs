//! Reading OCI image layouts and archives: picks the manifest for a tag and
//! this device's platform, and reads every blob (index, manifest, config,
//! layers) only after checking it against its digest and size. The agent's
//! own blob store is read the same way, with a [`Fetch`] that downloads each
//! blob from a registry before it is read.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

pub(crate) use super::oci::{
    BlobKind, Compression, Digest, LayerDesc, children, host_arch, host_platform, parse_config,
};
use super::oci::{
    ConfigJson, Desc, DescriptorJson, IndexJson, ManifestJson, Platform, layer_compression, rank,
    run_config, tag_list,
};
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

/// Makes blobs present in a layout before they are read: the registry
/// puller downloads them into the agent's blob store.
pub(crate) trait Fetch {
    /// Makes blob `digest` of `size` bytes present under
    /// `blobs/sha256/<hex>`, verified against its digest and size.
    fn fetch(&self, digest: &Digest, size: u64, kind: BlobKind) -> Result<(), ImageError>;
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
