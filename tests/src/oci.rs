//! Writes real OCI image layouts and `oci-archive` tars for tests: layers of
//! files, links, whiteouts and hostile raw tar entries, image configs, tags and
//! multi-platform indexes, and a busybox image made from the host's
//! `/bin/busybox`.
//!
//! Everything written here is what `skopeo copy … oci:DIR:TAG` would write: an
//! `oci-layout` file, `index.json` with the tag in the
//! `org.opencontainers.image.ref.name` annotation, and content-addressed blobs
//! under `blobs/sha256/`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flate2::Compression as GzLevel;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Media type of an OCI image manifest.
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed OCI layer.
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip-compressed OCI layer.
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd-compressed OCI layer (written only to test refusal).
pub const MEDIA_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Media type of a Docker (schema 2) gzip layer.
pub const MEDIA_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Annotation that carries a manifest's tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// How a layer blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar (`…layer.v1.tar`).
    Plain,
    /// A gzip tar (`…layer.v1.tar+gzip`).
    Gzip,
    /// A gzip tar labelled with Docker's media type
    /// (`application/vnd.docker.image.rootfs.diff.tar.gzip`).
    DockerGzip,
    /// A plain tar labelled `…tar+zstd`: lets tests check that zstd layers are refused.
    ZstdLabel,
}

/// The kind of a [`RawEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    /// A regular file with `data` as its content.
    File,
    /// A directory.
    Dir,
    /// A symbolic link to `link`.
    Symlink,
    /// A hard link to the archive path `link`.
    HardLink,
    /// A named pipe.
    Fifo,
}

/// A tar entry written byte for byte, with none of the checks of the `tar`
/// crate's safe API: for hostile layers (`../evil`, `/abs/path`, links out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    /// The entry's name exactly as stored (at most 100 bytes).
    pub name: Vec<u8>,
    /// What the entry is.
    pub kind: RawKind,
    /// Link target for symlinks and hard links (at most 100 bytes).
    pub link: Vec<u8>,
    /// Content of a regular file.
    pub data: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

impl RawEntry {
    /// A raw regular file.
    pub fn file(name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> Self {
        Self::new(name, RawKind::File, b"", data, 0o644)
    }

    /// A raw directory.
    pub fn dir(name: impl AsRef<[u8]>) -> Self {
        Self::new(name, RawKind::Dir, b"", b"", 0o755)
    }

    /// A raw symbolic link.
    pub fn symlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Self::new(name, RawKind::Symlink, target, b"", 0o777)
    }

    /// A raw hard link.
    pub fn hardlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Self::new(name, RawKind::HardLink, target, b"", 0o644)
    }

    fn new(
        name: impl AsRef<[u8]>,
        kind: RawKind,
        link: impl AsRef<[u8]>,
        data: impl AsRef<[u8]>,
        mode: u32,
    ) -> Self {
        Self {
            name: name.as_ref().to_vec(),
            kind,
            link: link.as_ref().to_vec(),
            data: data.as_ref().to_vec(),
            mode,
        }
    }
}

/// A platform in an image index (`linux/arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `os`, e.g. `linux`.
    pub os: String,
    /// `architecture`, in Go's names: `amd64`, `arm64`, `arm`.
    pub architecture: String,
    /// `variant`, e.g. `v7`.
    pub variant: Option<String>,
}

impl Platform {
    /// A Linux platform with this architecture and optional variant.
    pub fn linux(architecture: &str, variant: Option<&str>) -> Self {
        Self {
            os: "linux".to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// The platform of the machine running the tests, as an agent maps it.
    pub fn host() -> Self {
        match std::env::consts::ARCH {
            "x86_64" => Self::linux("amd64", None),
            "aarch64" => Self::linux("arm64", None),
            "arm" => Self::linux("arm", Some("v7")),
            other => Self::linux(other, None),
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({ "os": self.os, "architecture": self.architecture });
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        v
    }
}

/// Digests of what [`ImageBuilder::write_layout`] wrote, each `sha256:…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The digest `index.json` points at: the manifest, or the image index for
    /// [`IndexBuilder`].
    pub digest: String,
    /// The image manifest (for [`IndexBuilder`], the host platform's one if any).
    pub manifest: String,
    /// The image config.
    pub config: String,
    /// The layers, lowest first.
    pub layers: Vec<String>,
}

#[derive(Debug, Clone)]
enum Entry {
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
        uid: u64,
        gid: u64,
    },
    HostFile {
        path: String,
        src: PathBuf,
        mode: u32,
        uid: u64,
        gid: u64,
    },
    Dir {
        path: String,
        mode: u32,
        uid: u64,
        gid: u64,
    },
    Symlink {
        path: String,
        target: String,
    },
    HardLink {
        path: String,
        target: String,
    },
    Fifo {
        path: String,
        mode: u32,
    },
    Raw(RawEntry),
}

#[derive(Debug, Clone)]
struct Layer {
    compression: Compression,
    entries: Vec<Entry>,
}

/// Builds one OCI image: layers and config. Entries go to the current layer;
/// [`ImageBuilder::layer`] starts the next one. Paths are written as given
/// (relative, no `..`: the `tar` crate checks); use [`ImageBuilder::raw`] for
/// anything else.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    layers: Vec<Layer>,
    owner: (u64, u64),
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
    platform: Platform,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    /// An image with one empty gzip layer and an empty config, for the host's platform.
    pub fn new() -> Self {
        Self {
            layers: vec![Layer {
                compression: Compression::Gzip,
                entries: Vec::new(),
            }],
            owner: (0, 0),
            entrypoint: None,
            cmd: None,
            env: Vec::new(),
            workdir: None,
            user: None,
            platform: Platform::host(),
        }
    }

    /// Starts a new layer, stacked on the previous ones.
    pub fn layer(mut self, compression: Compression) -> Self {
        self.layers.push(Layer {
            compression,
            entries: Vec::new(),
        });
        self
    }

    /// Sets how the current layer is stored.
    pub fn compression(mut self, compression: Compression) -> Self {
        if let Some(layer) = self.layers.last_mut() {
            layer.compression = compression;
        }
        self
    }

    /// Owner (uid, gid) of the files and directories added after this call.
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.owner = (uid, gid);
        self
    }

    /// Adds a regular file with these bytes and permission bits.
    pub fn file(self, path: &str, data: impl AsRef<[u8]>, mode: u32) -> Self {
        let (uid, gid) = self.owner;
        let data = data.as_ref().to_vec();
        self.push(Entry::File {
            path: path.to_owned(),
            data,
            mode,
            uid,
            gid,
        })
    }

    /// Adds a regular file whose content is copied from the host file `src`
    /// when the image is written (so a missing file is an error of
    /// [`ImageBuilder::write_layout`], not of building).
    pub fn host_file(self, path: &str, src: impl Into<PathBuf>, mode: u32) -> Self {
        let (uid, gid) = self.owner;
        self.push(Entry::HostFile {
            path: path.to_owned(),
            src: src.into(),
            mode,
            uid,
            gid,
        })
    }

    /// Adds a directory with these permission bits.
    pub fn dir(self, path: &str, mode: u32) -> Self {
        let (uid, gid) = self.owner;
        self.push(Entry::Dir {
            path: path.to_owned(),
            mode,
            uid,
            gid,
        })
    }

    /// Adds a symbolic link `path` → `target` (target written as given).
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.push(Entry::Symlink {
            path: path.to_owned(),
            target: target.to_owned(),
        })
    }

    /// Adds a hard link `path` to the earlier archive entry `target`.
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.push(Entry::HardLink {
            path: path.to_owned(),
            target: target.to_owned(),
        })
    }

    /// Adds a named pipe.
    pub fn fifo(self, path: &str, mode: u32) -> Self {
        self.push(Entry::Fifo {
            path: path.to_owned(),
            mode,
        })
    }

    /// Deletes `path` of lower layers: writes the whiteout `dir/.wh.name`.
    pub fn whiteout(self, path: &str) -> Self {
        let trimmed = path.trim_end_matches('/');
        let (dir, name) = match trimmed.rsplit_once('/') {
            Some((dir, name)) => (format!("{dir}/"), name),
            None => (String::new(), trimmed),
        };
        let wh = format!("{dir}.wh.{name}");
        self.push(Entry::File {
            path: wh,
            data: Vec::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        })
    }

    /// Makes directory `dir` opaque: hides what lower layers put in it
    /// (writes `dir/.wh..wh..opq`).
    pub fn opaque(self, dir: &str) -> Self {
        let path = format!("{}/.wh..wh..opq", dir.trim_end_matches('/'));
        self.push(Entry::File {
            path,
            data: Vec::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        })
    }

    /// Adds an entry written byte for byte (see [`RawEntry`]).
    pub fn raw(self, entry: RawEntry) -> Self {
        self.push(Entry::Raw(entry))
    }

    /// Sets the config's `Entrypoint`.
    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = Some(args.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// Sets the config's `Cmd`.
    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = Some(args.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// Sets the config's `Env` (`KEY=value` items).
    pub fn env(mut self, vars: &[&str]) -> Self {
        self.env = vars.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Sets the config's `WorkingDir`.
    pub fn workdir(mut self, dir: &str) -> Self {
        self.workdir = Some(dir.to_owned());
        self
    }

    /// Sets the config's `User`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    /// Sets the platform recorded in the config (and in an [`IndexBuilder`]).
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    fn push(mut self, entry: Entry) -> Self {
        if self.layers.is_empty() {
            self.layers.push(Layer {
                compression: Compression::Gzip,
                entries: Vec::new(),
            });
        }
        if let Some(layer) = self.layers.last_mut() {
            layer.entries.push(entry);
        }
        self
    }

    /// Writes the image as an OCI layout in `dir` (created if missing). With
    /// `tag`, the manifest is named by the `org.opencontainers.image.ref.name`
    /// annotation. An existing `index.json` is kept and the manifest added to
    /// it, replacing one with the same tag: several tags can share a layout.
    pub fn write_layout<'t>(&self, dir: &Path, tag: impl Into<Option<&'t str>>) -> Result<Written> {
        let (desc, written) = self.write_blobs(dir, false)?;
        add_to_index(dir, desc, tag.into())?;
        Ok(written)
    }

    /// Writes the image as an `oci-archive` tar at `file`.
    pub fn write_archive<'t>(
        &self,
        file: &Path,
        tag: impl Into<Option<&'t str>>,
    ) -> Result<Written> {
        let tmp = tempfile::tempdir().context("creating temp dir")?;
        let written = self.write_layout(tmp.path(), tag)?;
        tar_layout(tmp.path(), file)?;
        Ok(written)
    }

    /// Writes layers, config and manifest blobs; returns the manifest's descriptor.
    fn write_blobs(&self, dir: &Path, with_platform: bool) -> Result<(Value, Written)> {
        init_layout(dir)?;
        let mut layer_descs = Vec::new();
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let tar = build_tar(&layer.entries).with_context(|| format!("building layer {i}"))?;
            diff_ids.push(digest_of(&tar));
            let (blob, media) = match layer.compression {
                Compression::Plain => (tar, MEDIA_LAYER_TAR),
                Compression::Gzip => (gzip(&tar)?, MEDIA_LAYER_GZIP),
                Compression::DockerGzip => (gzip(&tar)?, MEDIA_DOCKER_LAYER),
                Compression::ZstdLabel => (tar, MEDIA_LAYER_ZSTD),
            };
            let desc = write_blob(dir, media, &blob)?;
            layers.push(desc_digest(&desc));
            layer_descs.push(desc);
        }
        let mut config = serde_json::Map::new();
        if let Some(v) = &self.entrypoint {
            config.insert("Entrypoint".into(), json!(v));
        }
        if let Some(v) = &self.cmd {
            config.insert("Cmd".into(), json!(v));
        }
        if !self.env.is_empty() {
            config.insert("Env".into(), json!(self.env));
        }
        if let Some(v) = &self.workdir {
            config.insert("WorkingDir".into(), json!(v));
        }
        if let Some(v) = &self.user {
            config.insert("User".into(), json!(v));
        }
        let mut image_config = json!({
            "architecture": self.platform.architecture,
            "os": self.platform.os,
            "config": config,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        if let Some(variant) = &self.platform.variant {
            image_config["variant"] = json!(variant);
        }
        let config_desc = write_blob(dir, MEDIA_CONFIG, &to_bytes(&image_config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_desc,
            "layers": layer_descs,
        });
        let mut desc = write_blob(dir, MEDIA_MANIFEST, &to_bytes(&manifest)?)?;
        if with_platform {
            desc["platform"] = self.platform.to_json();
        }
        let manifest = desc_digest(&desc);
        let written = Written {
            digest: manifest.clone(),
            manifest,
            config: desc_digest(&config_desc),
            layers,
        };
        Ok((desc, written))
    }
}

/// Builds a multi-platform image: an image index over several images, each
/// with the platform set by [`ImageBuilder::platform`].
#[derive(Debug, Clone, Default)]
pub struct IndexBuilder {
    images: Vec<ImageBuilder>,
}

impl IndexBuilder {
    /// An index with no images yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `image` for `platform`.
    pub fn image(mut self, platform: Platform, image: ImageBuilder) -> Self {
        self.images.push(image.platform(platform));
        self
    }

    /// Writes every image and the index to the layout `dir`; `index.json`
    /// points at the index under `tag`. [`Written::manifest`] and the rest are
    /// the host platform's image, when there is one.
    pub fn write_layout<'t>(&self, dir: &Path, tag: impl Into<Option<&'t str>>) -> Result<Written> {
        let mut manifests = Vec::new();
        let mut host = None;
        for image in &self.images {
            let (desc, written) = image.write_blobs(dir, true)?;
            if image.platform == Platform::host() && host.is_none() {
                host = Some(written);
            }
            manifests.push(desc);
        }
        let index = json!({ "schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests });
        init_layout(dir)?;
        let desc = write_blob(dir, MEDIA_INDEX, &to_bytes(&index)?)?;
        let digest = desc_digest(&desc);
        add_to_index(dir, desc, tag.into())?;
        let mut written = host.unwrap_or(Written {
            digest: String::new(),
            manifest: String::new(),
            config: String::new(),
            layers: Vec::new(),
        });
        written.digest = digest;
        Ok(written)
    }

    /// Writes the same as [`IndexBuilder::write_layout`] as an `oci-archive` tar.
    pub fn write_archive<'t>(
        &self,
        file: &Path,
        tag: impl Into<Option<&'t str>>,
    ) -> Result<Written> {
        let tmp = tempfile::tempdir().context("creating temp dir")?;
        let written = self.write_layout(tmp.path(), tag)?;
        tar_layout(tmp.path(), file)?;
        Ok(written)
    }
}

/// The busybox applets linked in [`busybox`] images.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "ls", "true", "false", "wc", "head", "tail", "tr", "env", "id",
    "pwd", "mkdir", "rm", "touch", "date", "yes", "kill", "ps", "grep", "sed", "printf", "test",
    "uname", "hostname", "stat", "ln", "cp", "mv", "chmod", "readlink",
];

/// Where [`busybox`] copies busybox from (Debian's `busybox-static`).
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// A one-layer image with the host's static `/bin/busybox`, its applets as
/// symlinks in `/bin` (`/bin/sh -> busybox`), `/etc/passwd` and `/etc/group`
/// with root and nobody, `/tmp` (1777), empty `/proc`, `/sys`, `/dev` mount
/// points, `PATH` set and cmd `["sh"]`. The binary is read when the image
/// is written: a host without it gets an error naming the package to install.
pub fn busybox() -> ImageBuilder {
    let mut image = ImageBuilder::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("root", 0o700)
        .dir("tmp", 0o1777)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("dev", 0o755)
        .host_file("bin/busybox", HOST_BUSYBOX, 0o755)
        .file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        )
        .file("etc/group", "root:x:0:\nnobody:x:65534:\n", 0o644);
    for applet in BUSYBOX_APPLETS {
        image = image.symlink(&format!("bin/{applet}"), "busybox");
    }
    image
        .env(&["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
        .cmd(&["sh"])
}

/// Path of the blob `digest` (`sha256:…`) in the layout `dir`.
pub fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    dir.join("blobs").join("sha256").join(hex)
}

/// `sha256:` digest of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn desc_digest(desc: &Value) -> String {
    desc["digest"].as_str().unwrap_or_default().to_owned()
}

fn to_bytes(v: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec(v).context("encoding JSON")
}

fn init_layout(dir: &Path) -> Result<()> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let marker = dir.join("oci-layout");
    fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .with_context(|| format!("writing {}", marker.display()))
}

fn write_blob(dir: &Path, media_type: &str, bytes: &[u8]) -> Result<Value> {
    let digest = digest_of(bytes);
    let path = blob_path(dir, &digest);
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(json!({ "mediaType": media_type, "digest": digest, "size": bytes.len() }))
}

fn add_to_index(dir: &Path, mut desc: Value, tag: Option<&str>) -> Result<()> {
    let path = dir.join("index.json");
    let mut index = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing existing {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            json!({ "schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [] })
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if let Some(tag) = tag {
        desc["annotations"] = json!({ REF_NAME: tag });
    }
    let Some(manifests) = index["manifests"].as_array_mut() else {
        bail!("{}: manifests is not an array", path.display());
    };
    if let Some(tag) = tag {
        manifests.retain(|m| m["annotations"][REF_NAME].as_str() != Some(tag));
    }
    manifests.push(desc);
    fs::write(&path, to_bytes(&index)?).with_context(|| format!("writing {}", path.display()))
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::new(), GzLevel::fast());
    enc.write_all(bytes).context("gzip")?;
    enc.finish().context("gzip")
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    // A fixed mtime keeps blobs, and so digests, reproducible.
    h.set_mtime(1_700_000_000);
    h
}

fn build_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for entry in entries {
        match entry {
            Entry::File {
                path,
                data,
                mode,
                uid,
                gid,
            } => {
                let mut h = header(
                    tar::EntryType::Regular,
                    *mode,
                    *uid,
                    *gid,
                    data.len() as u64,
                );
                b.append_data(&mut h, path, data.as_slice())
            }
            Entry::HostFile {
                path,
                src,
                mode,
                uid,
                gid,
            } => {
                let data = fs::read(src).with_context(|| host_file_hint(src))?;
                let size = data.len() as u64;
                let mut h = header(tar::EntryType::Regular, *mode, *uid, *gid, size);
                b.append_data(&mut h, path, data.as_slice())
            }
            Entry::Dir {
                path,
                mode,
                uid,
                gid,
            } => {
                let mut h = header(tar::EntryType::Directory, *mode, *uid, *gid, 0);
                b.append_data(&mut h, path, std::io::empty())
            }
            Entry::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
                b.append_link(&mut h, path, target)
            }
            Entry::HardLink { path, target } => {
                let mut h = header(tar::EntryType::Link, 0o644, 0, 0, 0);
                b.append_link(&mut h, path, target)
            }
            Entry::Fifo { path, mode } => {
                let mut h = header(tar::EntryType::Fifo, *mode, 0, 0, 0);
                b.append_data(&mut h, path, std::io::empty())
            }
            Entry::Raw(raw) => append_raw(&mut b, raw),
        }
        .with_context(|| format!("adding {entry:?}"))?;
    }
    b.into_inner().context("finishing tar")
}

fn host_file_hint(src: &Path) -> String {
    if src == Path::new(HOST_BUSYBOX) {
        format!("reading {HOST_BUSYBOX} (install the Debian package busybox-static)")
    } else {
        format!("reading {}", src.display())
    }
}

fn append_raw(b: &mut tar::Builder<Vec<u8>>, raw: &RawEntry) -> std::io::Result<()> {
    let kind = match raw.kind {
        RawKind::File => tar::EntryType::Regular,
        RawKind::Dir => tar::EntryType::Directory,
        RawKind::Symlink => tar::EntryType::Symlink,
        RawKind::HardLink => tar::EntryType::Link,
        RawKind::Fifo => tar::EntryType::Fifo,
    };
    let mut h = header(kind, raw.mode, 0, 0, raw.data.len() as u64);
    let old = h.as_old_mut();
    if raw.name.len() > old.name.len() || raw.link.len() > old.linkname.len() {
        return Err(std::io::Error::other(
            "raw entry name or link longer than 100 bytes",
        ));
    }
    // Written straight into the header: the safe setters refuse `..` and `/`.
    old.name[..raw.name.len()].copy_from_slice(&raw.name);
    old.linkname[..raw.link.len()].copy_from_slice(&raw.link);
    h.set_cksum();
    b.append(&h, raw.data.as_slice())
}

/// Tars a layout directory the way skopeo's `oci-archive:` does: the layout's
/// files at the archive root.
fn tar_layout(dir: &Path, file: &Path) -> Result<()> {
    let out = fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.append_path_with_name(dir.join("oci-layout"), "oci-layout")?;
    b.append_path_with_name(dir.join("index.json"), "index.json")?;
    b.append_dir_all("blobs", dir.join("blobs"))
        .context("adding blobs")?;
    b.into_inner()
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", file.display()))
}
