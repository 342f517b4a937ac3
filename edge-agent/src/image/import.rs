//! `flotilla-agent image import FILE`: loads a `docker save` archive or an
//! OCI archive into the store for air-gapped sites. Blobs are verified and
//! moved into the blob store; each image's names (Docker's `RepoTags`, the
//! OCI `io.containerd.image.name` annotation, a full reference in
//! `org.opencontainers.image.ref.name`, or the name given) are recorded as
//! imported, so a pod naming them starts with no network and garbage
//! collection keeps them.

use std::fs;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use super::ImageError;
use super::archive;
use super::blobs::BlobError;
use super::layout::{self, Digest};
use super::reference::{ImageName, Reference, Source};
use super::store::{ImageStore, WorkDir, io};

/// Largest `manifest.json` / `index.json` read.
const MAX_JSON: u64 = layout::MAX_JSON;
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What an import loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// `(reference, digest)` for every name recorded.
    pub images: Vec<(String, String)>,
    /// Images in the archive that had no name and none was given.
    pub unnamed: usize,
}

impl ImageStore {
    /// Imports the `docker save` or OCI archive at `file`. `name` names the
    /// image when the archive holds exactly one.
    pub fn import(&self, file: &Path, name: Option<&str>) -> Result<ImportReport, ImageError> {
        let label = file.display().to_string();
        let name = match name {
            None => None,
            Some(n) => Some(registry_name(n).ok_or_else(|| ImageError::BadReference {
                reference: n.to_owned(),
                reason: "expected a registry reference like registry.local:5000/app:2".to_owned(),
            })?),
        };
        let _lock = self.lock(false)?;
        let work = WorkDir::create(self.root(), "import", &label)?;
        archive::extract_archive(&label, file, work.path())?;
        let dir = work.path();
        let oci = dir.join("oci-layout").is_file() && dir.join("index.json").is_file();
        let found = if oci {
            self.import_oci(&label, dir)?
        } else if dir.join("manifest.json").is_file() {
            self.import_docker(&label, dir)?
        } else {
            return Err(invalid(
                &label,
                "neither an OCI archive (oci-layout, index.json) nor a docker save archive (manifest.json)".to_owned(),
            ));
        };
        let mut report = ImportReport::default();
        let single = found.len() == 1;
        for (digest, names) in found {
            let mut names: Vec<String> = names.iter().filter_map(|n| registry_name(n)).collect();
            if let (Some(n), true) = (&name, single) {
                names.push(n.clone());
            }
            names.sort();
            names.dedup();
            if names.is_empty() {
                report.unnamed += 1;
            }
            for n in names {
                self.refs
                    .set(&n, &digest, true)
                    .map_err(|e| io(&label, "recording", &self.root().join("refs"), e))?;
                tracing::info!(image = %n, %digest, "imported");
                report.images.push((n, digest.to_string()));
            }
        }
        if name.is_some() && !single {
            return Err(invalid(
                &label,
                format!(
                    "--name needs an archive of one image, this one holds {}",
                    report.images.len() + report.unnamed
                ),
            ));
        }
        Ok(report)
    }

    /// Moves every blob of an OCI layout into the store; returns each
    /// top-level descriptor's digest and names.
    fn import_oci(
        &self,
        label: &str,
        dir: &Path,
    ) -> Result<Vec<(Digest, Vec<String>)>, ImageError> {
        let blobs = dir.join("blobs").join("sha256");
        if blobs.is_dir() {
            for entry in fs::read_dir(&blobs).map_err(|e| io(label, "reading", &blobs, e))? {
                let entry = entry.map_err(|e| io(label, "reading", &blobs, e))?;
                let file_name = entry.file_name();
                let Some(expected) = file_name.to_str().and_then(Digest::from_hex) else {
                    continue;
                };
                let (digest, _) = self.adopt(label, &entry.path())?;
                if digest != expected {
                    return Err(invalid(
                        label,
                        format!("blob {expected}: content hashes to {digest}; refused"),
                    ));
                }
            }
        }
        #[derive(Deserialize)]
        struct Index {
            manifests: Vec<Desc>,
        }
        #[derive(Deserialize)]
        struct Desc {
            digest: String,
            annotations: Option<std::collections::BTreeMap<String, String>>,
        }
        let index: Index = read_json(label, &dir.join("index.json"))?;
        let mut out = Vec::new();
        for d in index.manifests {
            let digest =
                Digest::parse(&d.digest).map_err(|e| invalid(label, format!("index.json: {e}")))?;
            if !self.blobs.path(&digest).is_file() {
                return Err(invalid(
                    label,
                    format!("index.json: manifest {digest} is missing from the archive"),
                ));
            }
            let names = d
                .annotations
                .map(|a| {
                    [
                        "io.containerd.image.name",
                        "org.opencontainers.image.ref.name",
                    ]
                    .iter()
                    .filter_map(|k| a.get(*k).cloned())
                    .collect()
                })
                .unwrap_or_default();
            out.push((digest, names));
        }
        Ok(out)
    }

    /// Stores the config and layers of each image in a `docker save`
    /// archive and writes a manifest for it.
    fn import_docker(
        &self,
        label: &str,
        dir: &Path,
    ) -> Result<Vec<(Digest, Vec<String>)>, ImageError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let entries: Vec<Entry> = read_json(label, &dir.join("manifest.json"))?;
        let mut out = Vec::new();
        for e in entries {
            let (config, config_size) = self.adopt_member(label, dir, &e.config)?;
            let mut layers = Vec::with_capacity(e.layers.len());
            for l in &e.layers {
                let (digest, size) = self.adopt_member(label, dir, l)?;
                layers.push(serde_json::json!({
                    "mediaType": DOCKER_LAYER_TAR,
                    "digest": digest.to_string(),
                    "size": size,
                }));
            }
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": layout::DOCKER_MANIFEST,
                "config": {"mediaType": DOCKER_CONFIG, "digest": config.to_string(), "size": config_size},
                "layers": layers,
            });
            let bytes = serde_json::to_vec(&manifest)
                .map_err(|e| invalid(label, format!("writing a manifest: {e}")))?;
            let digest = Digest::of(&bytes);
            self.blobs
                .put(&digest, &bytes)
                .map_err(|e| blob_error(label, e))?;
            out.push((digest, e.repo_tags.unwrap_or_default()));
        }
        Ok(out)
    }

    /// Adopts archive member `rel` (a path inside the extracted archive).
    fn adopt_member(
        &self,
        label: &str,
        dir: &Path,
        rel: &str,
    ) -> Result<(Digest, u64), ImageError> {
        let rel_path = super::unpack::normalize(rel.as_bytes())
            .map_err(|why| invalid(label, format!("manifest.json: {rel:?}: {why}")))?;
        let path = dir.join(rel_path);
        if !path.is_file() {
            return Err(invalid(
                label,
                format!("manifest.json names {rel:?}, which the archive does not hold"),
            ));
        }
        // Two images may share a layer file: adopt a copy, keep the original.
        let copy = path.with_extension("adopting");
        fs::copy(&path, &copy).map_err(|e| io(label, "copying", &path, e))?;
        let result = self.adopt(label, &copy);
        let _ = fs::remove_file(&copy);
        result
    }

    fn adopt(&self, label: &str, path: &Path) -> Result<(Digest, u64), ImageError> {
        self.blobs.adopt(path).map_err(|e| blob_error(label, e))
    }
}

/// `name` in canonical form if it is a full registry reference. A bare tag
/// (`1.36`, as `org.opencontainers.image.ref.name` often holds) is not.
fn registry_name(name: &str) -> Option<String> {
    if !name.contains(['/', ':', '@']) {
        return None;
    }
    match Reference::parse(name) {
        Ok(Reference {
            source: Source::Registry(n),
            ..
        }) => Some(n.to_string()),
        _ => ImageName::parse(name).ok().map(|n| n.to_string()),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(label: &str, path: &Path) -> Result<T, ImageError> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_JSON + 1).read_to_end(&mut bytes))
        .map_err(|e| io(label, "reading", path, e))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(invalid(
            label,
            format!("{} is larger than {MAX_JSON} bytes", path.display()),
        ));
    }
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    serde_json::from_slice(&bytes).map_err(|e| invalid(label, format!("{name}: {e}")))
}

fn invalid(label: &str, what: String) -> ImageError {
    ImageError::Invalid {
        reference: label.to_owned(),
        what,
    }
}

fn blob_error(label: &str, e: BlobError) -> ImageError {
    match e {
        BlobError::Io { op, path, source } => io(label, op, &path, source),
        e @ BlobError::Mismatch { .. } => invalid(label, e.to_string()),
    }
}
