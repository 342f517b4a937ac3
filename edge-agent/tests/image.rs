//! The image store against real OCI layouts and archives written by the test
//! kit: tag and platform choice, digest checks, layer semantics, hostile
//! layers, concurrency and reuse.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use anyhow::{Context, Result, anyhow, bail};
use flotilla_agent::image::{
    Image, ImageConfig, ImageError, ImageStore, Images, layers, resolve_user,
};
use flotilla_testkit::oci::{
    self, Compression, ImageBuilder, IndexBuilder, Platform, RawEntry, RawKind,
};

/// What the store keeps besides images and work directories: the blob
/// store, the reference records, its lock, the garbage collector's list and
/// the shared unpacked layers.
const BOOKKEEPING: &[&str] = &["blobs", "refs", ".lock", "gc-keep", "layers"];

/// A temp dir holding the store at `store/`, layouts and archives.
struct Fixture {
    dir: tempfile::TempDir,
    store: ImageStore,
}

impl Fixture {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = ImageStore::new(dir.path().join("store"))?;
        Ok(Self { dir, store })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Names in the store root, sorted.
    fn store_entries(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.store.root())? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.retain(|n| !BOOKKEEPING.contains(&n.as_str()));
        names.sort();
        Ok(names)
    }

    /// The store holds nothing: no image, no work directory.
    fn assert_store_empty(&self) -> Result<()> {
        let entries = self.store_entries()?;
        if !entries.is_empty() {
            bail!("store not empty: {entries:?}");
        }
        Ok(())
    }
}

/// The image's files as a container sees them, read through its layers.
fn read(image: &Image, path: &str) -> Result<String> {
    let found = layers::find(&image.rootfs, Path::new(path))?
        .with_context(|| format!("{path} not in the image"))?;
    Ok(fs::read_to_string(found)?)
}

/// The image's top layer as unpacked in the store.
fn top_layer(image: &Image) -> Result<PathBuf> {
    layers::lower_dirs(&image.rootfs)?
        .into_iter()
        .next()
        .context("an image has a layer")
}

fn oci_ref(dir: &Path, tag: Option<&str>) -> String {
    match tag {
        Some(tag) => format!("oci:{}:{tag}", dir.display()),
        None => format!("oci:{}", dir.display()),
    }
}

fn expect_err(result: Result<flotilla_agent::image::Image, ImageError>) -> Result<ImageError> {
    match result {
        Ok(image) => Err(anyhow!("expected an error, got {image:?}")),
        Err(e) => Ok(e),
    }
}

fn assert_msg(err: &ImageError, reason: &str, parts: &[&str]) {
    let msg = err.to_string();
    assert_eq!(err.reason(), reason, "{msg}");
    for part in parts {
        assert!(msg.contains(part), "message {msg:?} lacks {part:?}");
    }
}

#[test]
fn tags_select_manifests_and_missing_tags_are_named() -> Result<()> {
    let f = Fixture::new()?;
    let layout = f.path("img");
    ImageBuilder::new()
        .file("version", "one", 0o644)
        .write_layout(&layout, Some("1"))?;
    ImageBuilder::new()
        .file("version", "latest", 0o644)
        .write_layout(&layout, Some("latest"))?;

    let one = f.store.ensure(&oci_ref(&layout, Some("1")))?;
    assert_eq!(read(&one, "version")?, "one");
    let latest = f.store.ensure(&oci_ref(&layout, Some("latest")))?;
    assert_eq!(read(&latest, "version")?, "latest");
    assert_ne!(one.digest, latest.digest);

    let reference = oci_ref(&layout, Some("2"));
    let err = expect_err(f.store.ensure(&reference))?;
    let index = format!("{}/index.json", layout.display());
    let want = format!("image {reference:?}: tag \"2\" not found in {index} (tags: 1, latest)");
    assert_eq!(err.to_string(), want);
    assert_eq!(err.reason(), "ImageNotFound");

    // No tag with two manifests: ambiguous, and the message lists the tags.
    let err = expect_err(f.store.ensure(&oci_ref(&layout, None)))?;
    assert_msg(
        &err,
        "InvalidImageName",
        &["2 manifests", "tags: 1, latest"],
    );

    // No tag with one untagged manifest: that one.
    let single = f.path("single");
    ImageBuilder::new()
        .file("x", "single", 0o644)
        .write_layout(&single, None)?;
    let image = f.store.ensure(&oci_ref(&single, None))?;
    assert_eq!(read(&image, "x")?, "single");

    fs::write(f.path("a-file"), "not a layout")?;
    let err = expect_err(f.store.ensure(&oci_ref(&f.path("a-file"), None)))?;
    assert_msg(
        &err,
        "ImageNotFound",
        &["a-file is not an OCI image layout directory"],
    );
    let err = expect_err(f.store.ensure(&oci_ref(&single.join("blobs"), None)))?;
    assert_msg(
        &err,
        "ImageNotFound",
        &["blobs is not an OCI image layout (no oci-layout file)"],
    );
    let err = expect_err(f.store.ensure(&oci_ref(&f.path("nothing"), Some("1"))))?;
    assert_msg(
        &err,
        "ImageNotFound",
        &["no OCI image layout at", "nothing"],
    );
    let err = expect_err(f.store.ensure("oci:relative/path"))?;
    assert_msg(&err, "InvalidImageName", &["not absolute"]);
    Ok(())
}

#[test]
fn config_fields_are_read() -> Result<()> {
    let f = Fixture::new()?;
    let layout = f.path("img");
    let written = ImageBuilder::new()
        .entrypoint(&["/bin/app", "--serve"])
        .cmd(&["--port", "80"])
        .env(&["A=1", "PATH=/bin"])
        .workdir("/srv")
        .user("app:staff")
        .write_layout(&layout, Some("v1"))?;
    let image = f.store.ensure(&oci_ref(&layout, Some("v1")))?;
    assert_eq!(image.digest, written.manifest);
    let want = ImageConfig {
        entrypoint: vec!["/bin/app".into(), "--serve".into()],
        cmd: vec!["--port".into(), "80".into()],
        env: vec!["A=1".into(), "PATH=/bin".into()],
        working_dir: "/srv".into(),
        user: "app:staff".into(),
    };
    assert_eq!(image.config, want);
    // The store keeps the config blob next to the layer list.
    let stored = image
        .rootfs
        .parent()
        .context("rootfs has a parent")?
        .join("config.json");
    assert_eq!(
        fs::read(stored)?,
        fs::read(oci::blob_path(&layout, &written.config))?
    );
    Ok(())
}

#[test]
fn multi_platform_images_pick_this_device() -> Result<()> {
    let f = Fixture::new()?;
    let layout = f.path("multi");
    let host = Platform::host();
    let other = if host.architecture == "s390x" {
        Platform::linux("riscv64", None)
    } else {
        Platform::linux("s390x", None)
    };
    let written = IndexBuilder::new()
        .image(
            other.clone(),
            ImageBuilder::new().file("arch", "other", 0o644),
        )
        .image(
            host.clone(),
            ImageBuilder::new().file("arch", "host", 0o644),
        )
        .write_layout(&layout, Some("latest"))?;
    let image = f.store.ensure(&oci_ref(&layout, Some("latest")))?;
    assert_eq!(read(&image, "arch")?, "host");
    assert_eq!(image.digest, written.manifest);
    assert_ne!(written.digest, written.manifest);

    let foreign = f.path("foreign");
    IndexBuilder::new()
        .image(Platform::linux("s390x", None), ImageBuilder::new())
        .image(Platform::linux("riscv64", None), ImageBuilder::new())
        .image(
            Platform::linux(&host.architecture, Some("v99")),
            ImageBuilder::new(),
        )
        .write_layout(&foreign, Some("latest"))?;
    let err = expect_err(f.store.ensure(&oci_ref(&foreign, Some("latest"))))?;
    assert_msg(
        &err,
        "NoMatchingPlatform",
        &[
            "linux/s390x",
            "linux/riscv64",
            &format!("linux/{}/v99", host.architecture),
        ],
    );

    // A single-platform image for another CPU is refused up front too.
    let single = f.path("single-foreign");
    ImageBuilder::new()
        .platform(other.clone())
        .write_layout(&single, None)?;
    let err = expect_err(f.store.ensure(&oci_ref(&single, None)))?;
    assert_msg(&err, "NoMatchingPlatform", &[&other.architecture]);
    f.store_entries().map(|e| assert_eq!(e.len(), 1, "{e:?}"))
}

/// Flips one byte of a blob in place (same size, wrong digest).
fn flip_byte(path: &Path) -> Result<()> {
    let mut bytes = fs::read(path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    fs::write(path, bytes)?;
    Ok(())
}

#[test]
fn corrupt_or_truncated_blobs_are_refused() -> Result<()> {
    let image = ImageBuilder::new()
        .file("a", "data", 0o644)
        .layer(Compression::Plain)
        .file("b", "more", 0o644);
    for (what, blob) in [("layer", 1usize), ("config", 0), ("manifest", 0)] {
        let f = Fixture::new()?;
        let layout = f.path("img");
        let written = image.write_layout(&layout, Some("t"))?;
        let digest = match what {
            "layer" => written.layers[blob].clone(),
            "config" => written.config.clone(),
            _ => written.manifest.clone(),
        };
        flip_byte(&oci::blob_path(&layout, &digest))?;
        let err = expect_err(f.store.ensure(&oci_ref(&layout, Some("t"))))?;
        assert_msg(&err, "InvalidImage", &[what, &digest, "digest mismatch"]);
        f.assert_store_empty()?;
    }

    let f = Fixture::new()?;
    let layout = f.path("img");
    let written = image.write_layout(&layout, Some("t"))?;
    let blob = oci::blob_path(&layout, &written.layers[0]);
    let len = fs::metadata(&blob)?.len();
    fs::File::options()
        .write(true)
        .open(&blob)?
        .set_len(len - 10)?;
    let err = expect_err(f.store.ensure(&oci_ref(&layout, Some("t"))))?;
    assert_msg(
        &err,
        "InvalidImage",
        &[&written.layers[0], &format!("descriptor says {len}")],
    );
    fs::remove_file(&blob)?;
    let err = expect_err(f.store.ensure(&oci_ref(&layout, Some("t"))))?;
    assert_msg(&err, "InvalidImage", &[&written.layers[0], "missing"]);
    f.assert_store_empty()
}

#[test]
fn zstd_layers_are_refused_and_docker_gzip_accepted() -> Result<()> {
    let f = Fixture::new()?;
    let layout = f.path("img");
    ImageBuilder::new()
        .compression(Compression::ZstdLabel)
        .file("a", "x", 0o644)
        .write_layout(&layout, Some("z"))?;
    let err = expect_err(f.store.ensure(&oci_ref(&layout, Some("z"))))?;
    assert_msg(
        &err,
        "InvalidImage",
        &["zstd-compressed layers are not supported"],
    );

    ImageBuilder::new()
        .compression(Compression::DockerGzip)
        .file("a", "docker", 0o644)
        .layer(Compression::Plain)
        .file("b", "plain", 0o644)
        .write_layout(&layout, Some("d"))?;
    let image = f.store.ensure(&oci_ref(&layout, Some("d")))?;
    assert_eq!(read(&image, "a")?, "docker");
    assert_eq!(read(&image, "b")?, "plain");
    Ok(())
}

#[test]
fn layers_keep_modes_owners_and_links() -> Result<()> {
    let f = Fixture::new()?;
    let layout = f.path("img");
    ImageBuilder::new()
        .dir("opt", 0o750)
        .owner(1000, 1001)
        .file("opt/setuid", "#!", 0o4755)
        .owner(0, 0)
        .file("opt/plain", "plain", 0o600)
        .hardlink("opt/hard", "opt/plain")
        .symlink("opt/abs-link", "/etc/passwd")
        .symlink("opt/rel-link", "plain")
        .fifo("opt/pipe", 0o620)
        .raw(RawEntry::file("/etc/abs-name", "normalised"))
        .raw(RawEntry::file("./etc/dot-name", "normalised"))
        .write_layout(&layout, None)?;
    let root = top_layer(&f.store.ensure(&oci_ref(&layout, None))?)?;

    let mode = |p: &str| -> Result<u32> {
        Ok(fs::symlink_metadata(root.join(p))?.permissions().mode() & 0o7777)
    };
    assert_eq!(mode("opt")?, 0o750);
    assert_eq!(mode("opt/setuid")?, 0o4755);
    assert_eq!(mode("opt/plain")?, 0o600);
    let setuid = fs::metadata(root.join("opt/setuid"))?;
    assert_eq!((setuid.uid(), setuid.gid()), (1000, 1001));
    assert_eq!(
        fs::metadata(root.join("opt/hard"))?.ino(),
        fs::metadata(root.join("opt/plain"))?.ino()
    );
    assert_eq!(
        fs::read_link(root.join("opt/abs-link"))?,
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::read_link(root.join("opt/rel-link"))?,
        Path::new("plain")
    );
    assert!(
        fs::symlink_metadata(root.join("opt/pipe"))?
            .file_type()
            .is_fifo()
    );
    assert_eq!(mode("opt/pipe")?, 0o620);
    assert_eq!(fs::read_to_string(root.join("etc/abs-name"))?, "normalised");
    assert_eq!(fs::read_to_string(root.join("etc/dot-name"))?, "normalised");
    Ok(())
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers() -> Result<()> {
    let f = Fixture::new()?;
    let layout = f.path("img");
    ImageBuilder::new()
        .file("keep", "k", 0o644)
        .file("gone", "g", 0o644)
        .file("dir/gone-too/deep", "d", 0o644)
        .file("opq/lower", "l", 0o644)
        .file("opq/sub/lower", "l", 0o644)
        .file("replaced", "file", 0o644)
        .layer(Compression::Gzip)
        .whiteout("gone")
        .whiteout("dir/gone-too")
        .whiteout("never-existed")
        // This layer's own entries survive its opaque marker, before or after it.
        .file("opq/sub/upper-before", "u", 0o644)
        .opaque("opq")
        .file("opq/upper-after", "u", 0o644)
        .dir("replaced", 0o755)
        .layer(Compression::Plain)
        .file("gone", "back", 0o644)
        .write_layout(&layout, None)?;
    let image = f.store.ensure(&oci_ref(&layout, None))?;
    // As overlayfs reads them: a whiteout is a character device 0/0, an
    // opaque directory carries the xattr; each layer keeps only its own.
    let lower = layers::lower_dirs(&image.rootfs)?;
    assert_eq!(lower.len(), 3);
    let middle = &lower[1];
    assert!(layers::is_whiteout(&fs::symlink_metadata(
        middle.join("gone")
    )?));
    assert!(layers::is_whiteout(&fs::symlink_metadata(
        middle.join("dir/gone-too")
    )?));
    assert!(layers::is_opaque(&middle.join("opq")));
    let bottom = &lower[2];
    assert!(!layers::is_opaque(&bottom.join("opq")) && bottom.join("opq/lower").exists());
    assert!(
        !middle.join("keep").exists(),
        "lower layers are not copied up"
    );
    assert_eq!(fs::read_to_string(lower[0].join("gone"))?, "back");
    // The merged view (the copy fallback's merge).
    let root = f.path("merged");
    fs::create_dir(&root)?;
    layers::merge(&lower, &root)?;
    let exists = |p: &str| fs::symlink_metadata(root.join(p)).is_ok();
    assert!(exists("keep"));
    assert_eq!(fs::read_to_string(root.join("gone"))?, "back");
    assert!(exists("dir") && !exists("dir/gone-too"));
    assert!(!exists("opq/lower") && !exists("opq/sub/lower"));
    assert!(exists("opq/sub/upper-before") && exists("opq/upper-after"));
    assert!(fs::metadata(root.join("replaced"))?.is_dir());
    let mut names: Vec<String> = fs::read_dir(&root)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(
        names,
        ["dir", "gone", "keep", "opq", "replaced"],
        "no .wh. file is materialised"
    );
    Ok(())
}

/// Hostile layers: (case, image, what the error must name). `canary` is a
/// directory next to the store that nothing may touch.
fn hostile_images(canary: &str) -> Vec<(&'static str, ImageBuilder, &'static str)> {
    // A layer is built at {tmp}/store/.tmp-…/root: ../../../canary is the canary.
    let up = "../../../canary";
    let link = || ImageBuilder::new().symlink("evil", canary);
    vec![
        (
            "dotdot name",
            ImageBuilder::new().raw(RawEntry::file(format!("{up}/pwned"), "x")),
            "pwned",
        ),
        (
            "dotdot dir",
            ImageBuilder::new().raw(RawEntry::dir("a/../../x")),
            "a/../../x",
        ),
        (
            "symlink parent",
            link().file("evil/pwned", "x", 0o644),
            "evil/pwned",
        ),
        ("symlink dir", link().dir("evil/sub", 0o755), "evil/sub"),
        (
            "relative symlink parent",
            ImageBuilder::new()
                .symlink("evil", up)
                .file("evil/pwned", "x", 0o644),
            "evil/pwned",
        ),
        (
            "absolute hard link",
            ImageBuilder::new().raw(RawEntry::hardlink("h", format!("{canary}/secret"))),
            "\"h\"",
        ),
        (
            "dotdot hard link",
            ImageBuilder::new().raw(RawEntry::hardlink("h", format!("{up}/secret"))),
            "\"h\"",
        ),
        (
            "hard link through symlink",
            link().hardlink("h", "evil/secret"),
            "\"h\"",
        ),
        (
            "whiteout through symlink",
            link().whiteout("evil/secret"),
            ".wh.secret",
        ),
        (
            "opaque through symlink",
            link().opaque("evil"),
            ".wh..wh..opq",
        ),
        (
            "whiteout of dotdot",
            ImageBuilder::new().raw(RawEntry::file("a/.wh...", "")),
            ".wh...",
        ),
        (
            "fifo through symlink",
            link().raw(RawEntry {
                kind: RawKind::Fifo,
                ..RawEntry::file("evil/fifo", "")
            }),
            "evil/fifo",
        ),
    ]
}

#[test]
fn escaping_layers_are_refused_and_write_nothing_outside() -> Result<()> {
    let count = hostile_images("/").len();
    for i in 0..count {
        let f = Fixture::new()?;
        let canary = f.path("canary");
        fs::create_dir(&canary)?;
        fs::write(canary.join("secret"), "s3cret")?;
        let (name, builder, entry) = hostile_images(&canary.display().to_string())
            .into_iter()
            .nth(i)
            .context("case")?;
        let layout = f.path("img");
        let written = builder.write_layout(&layout, None)?;
        let err = expect_err(f.store.ensure(&oci_ref(&layout, None)))
            .with_context(|| format!("case {name}"))?;
        let msg = err.to_string();
        assert_eq!(err.reason(), "UnsafeLayer", "{name}: {msg}");
        assert!(
            msg.contains(entry),
            "{name}: {msg:?} does not name {entry:?}"
        );
        assert!(
            msg.contains(written.layers.last().map_or("?", String::as_str)),
            "{name}: {msg}"
        );
        let mut left: Vec<_> = fs::read_dir(&canary)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        left.sort();
        assert_eq!(left, ["secret"], "{name}: canary dir touched");
        assert_eq!(
            fs::read_to_string(canary.join("secret"))?,
            "s3cret",
            "{name}"
        );
        assert_eq!(
            fs::symlink_metadata(canary.join("secret"))?.nlink(),
            1,
            "{name}: secret hard-linked"
        );
        let mut beside: Vec<_> = fs::read_dir(f.dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        beside.sort();
        assert_eq!(
            beside,
            ["canary", "img", "store"],
            "{name}: wrote next to the store"
        );
        f.assert_store_empty().with_context(|| name.to_owned())?;
    }
    Ok(())
}

#[test]
fn a_symlink_in_a_lower_layer_is_shadowed_never_followed() -> Result<()> {
    // Each layer is unpacked on its own: an upper layer's `evil/pwned`
    // makes a directory `evil` in that layer, which hides the lower
    // symlink (as with Docker's overlay2), and nothing is written outside.
    let f = Fixture::new()?;
    let canary = f.path("canary");
    fs::create_dir(&canary)?;
    let layout = f.path("img");
    ImageBuilder::new()
        .symlink("evil", &canary.display().to_string())
        .layer(Compression::Gzip)
        .file("evil/pwned", "x", 0o644)
        .write_layout(&layout, None)?;
    let image = f.store.ensure(&oci_ref(&layout, None))?;
    assert_eq!(fs::read_dir(&canary)?.count(), 0, "canary dir touched");
    assert_eq!(read(&image, "evil/pwned")?, "x");
    let root = f.path("merged");
    fs::create_dir(&root)?;
    layers::merge(&layers::lower_dirs(&image.rootfs)?, &root)?;
    assert!(fs::symlink_metadata(root.join("evil"))?.is_dir());
    assert_eq!(fs::read_dir(&canary)?.count(), 0, "canary dir touched");
    Ok(())
}

#[test]
fn oci_archives_unpack_and_leave_no_scratch() -> Result<()> {
    let f = Fixture::new()?;
    let archive = f.path("img.tar");
    let written = ImageBuilder::new()
        .file("etc/hello", "from archive", 0o644)
        .cmd(&["sh"])
        .write_archive(&archive, Some("v2"))?;
    let reference = format!("oci-archive:{}:v2", archive.display());
    let image = f.store.ensure(&reference)?;
    assert_eq!(image.digest, written.manifest);
    assert_eq!(read(&image, "etc/hello")?, "from archive");
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(
        f.store_entries()?,
        [format!("sha256-{}", &written.manifest[7..])]
    );

    let err = expect_err(
        f.store
            .ensure(&format!("oci-archive:{}:v3", archive.display())),
    )?;
    assert_msg(
        &err,
        "ImageNotFound",
        &["tag \"v3\" not found in", "img.tar:index.json", "tags: v2"],
    );
    let err = expect_err(
        f.store
            .ensure(&format!("oci-archive:{}", f.path("none.tar").display())),
    )?;
    assert_msg(&err, "ImageNotFound", &["no image archive at"]);
    assert_eq!(
        f.store_entries()?.len(),
        1,
        "scratch directories are removed after errors too"
    );
    Ok(())
}

#[test]
fn concurrent_ensures_of_one_image_all_succeed() -> Result<()> {
    let f = Fixture::new()?;
    let layout = f.path("img");
    let mut builder = ImageBuilder::new();
    for i in 0..200 {
        builder = builder.file(&format!("d{}/f{i}", i % 10), format!("{i}"), 0o644);
    }
    builder.write_layout(&layout, Some("x"))?;
    let reference = oci_ref(&layout, Some("x"));
    let store = Arc::new(f.store);
    let barrier = Arc::new(Barrier::new(6));
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let (store, barrier, reference) = (store.clone(), barrier.clone(), reference.clone());
            std::thread::spawn(move || {
                barrier.wait();
                store.ensure(&reference)
            })
        })
        .collect();
    let mut images = Vec::new();
    for h in handles {
        images.push(h.join().map_err(|_| anyhow!("ensure thread panicked"))??);
    }
    assert!(images.windows(2).all(|w| w[0] == w[1]));
    for i in 0..200 {
        assert_eq!(
            read(&images[0], &format!("d{}/f{i}", i % 10))?,
            i.to_string()
        );
    }
    let mut entries: Vec<_> = fs::read_dir(store.root())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    entries.retain(|n| !BOOKKEEPING.iter().any(|b| n == b));
    assert_eq!(entries.len(), 1, "losers removed their copies: {entries:?}");
    Ok(())
}

#[test]
fn a_stored_image_is_not_unpacked_again() -> Result<()> {
    let f = Fixture::new()?;
    let layout = f.path("img");
    let written = ImageBuilder::new()
        .file("a", "1", 0o644)
        .write_layout(&layout, Some("x"))?;
    let first = f.store.ensure(&oci_ref(&layout, Some("x")))?;
    // Without its layer blob the image could not be unpacked: the second
    // ensure succeeds only by reusing the stored rootfs.
    fs::remove_file(oci::blob_path(&layout, &written.layers[0]))?;
    let second = f.store.ensure(&oci_ref(&layout, Some("x")))?;
    assert_eq!(first, second);
    assert_eq!(read(&second, "a")?, "1");

    // A fresh store over the same root finds it too (agent restart).
    let reopened = ImageStore::new(f.store.root().to_owned())?;
    assert_eq!(reopened.ensure(&oci_ref(&layout, Some("x")))?, first);
    Ok(())
}

#[test]
fn leftover_work_directories_of_dead_processes_are_removed() -> Result<()> {
    let f = Fixture::new()?;
    let root = f.store.root().to_owned();
    // pid_max is at most 2^22 on Linux: this pid cannot be alive.
    fs::create_dir_all(root.join(".tmp-99999999-0-abc/rootfs/etc"))?;
    let mine = format!(".tmp-{}-0-live", std::process::id());
    fs::create_dir(root.join(&mine))?;
    ImageStore::new(root.clone())?;
    assert_eq!(f.store_entries()?, [mine]);
    Ok(())
}

#[test]
fn busybox_image_unpacks_with_its_applets() -> Result<()> {
    let f = Fixture::new()?;
    let layout = f.path("busybox");
    oci::busybox().write_layout(&layout, Some("latest"))?;
    let image = f.store.ensure(&oci_ref(&layout, Some("latest")))?;
    let root = &top_layer(&image)?;
    assert_eq!(fs::read_link(root.join("bin/sh"))?, Path::new("busybox"));
    let busybox = fs::metadata(root.join("bin/busybox"))?;
    assert_eq!(busybox.len(), fs::metadata(oci::HOST_BUSYBOX)?.len());
    assert_eq!(busybox.permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        fs::metadata(root.join("tmp"))?.permissions().mode() & 0o7777,
        0o1777
    );
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(resolve_user(&image.rootfs, "nobody")?, (65534, 65534));
    assert_eq!(resolve_user(&image.rootfs, "root")?, (0, 0));
    // The unpacked shell really runs.
    let out = std::process::Command::new(root.join("bin/sh"))
        .args(["-c", "echo ok"])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    Ok(())
}

/// A tar with one entry whose name is written byte for byte.
fn hostile_archive(path: &Path, name: &[u8], kind: tar::EntryType) -> Result<()> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("oci-layout")?;
    let marker = br#"{"imageLayoutVersion":"1.0.0"}"#;
    h.set_size(marker.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &marker[..])?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(1);
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..4].copy_from_slice(b"/etc");
    h.set_cksum();
    b.append(&h, &b"x"[..])?;
    fs::write(path, b.into_inner()?)?;
    Ok(())
}

#[test]
fn hostile_archives_are_refused() -> Result<()> {
    for (name, kind, expect) in [
        (&b"../../escaped"[..], tar::EntryType::Regular, "`..`"),
        (
            b"blobs/link",
            tar::EntryType::Symlink,
            "only files and directories",
        ),
        (
            b"blobs/hard",
            tar::EntryType::Link,
            "only files and directories",
        ),
    ] {
        let f = Fixture::new()?;
        let archive = f.path("evil.tar");
        hostile_archive(&archive, name, kind)?;
        let err = expect_err(
            f.store
                .ensure(&format!("oci-archive:{}", archive.display())),
        )?;
        assert_msg(&err, "InvalidImage", &["evil.tar", expect]);
        f.assert_store_empty()?;
        let mut beside: Vec<_> = fs::read_dir(f.dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        beside.sort();
        assert_eq!(beside, ["evil.tar", "store"]);
    }
    Ok(())
}
