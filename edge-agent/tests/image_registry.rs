//! Registry pulls against a real registry (Debian's `docker-registry` on
//! loopback, images pushed with skopeo): platform choice, resume after a
//! dropped connection (then a real container runs from the image), corrupt
//! blobs, hostile layers, credentials, TLS, mirrors, the free-space floor
//! and a full disk, garbage collection, and imports for sites with no
//! network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use flotilla_agent::image::{
    Credentials, Image, ImageError, ImageStore, Images, NoObserver, PullObserver, PullProgress,
    PullSecrets, PullSettings, RegistrySettings, layers,
};
use flotilla_testkit::oci::{self, IndexBuilder, Platform, RawEntry};
use flotilla_testkit::registry::{CutProxy, Registry, TokenServer};
use tempfile::TempDir;

fn insecure(settings: PullSettings, host: &str) -> PullSettings {
    settings.with_registry(
        host,
        RegistrySettings {
            insecure: true,
            ..RegistrySettings::default()
        },
    )
}

fn settings_for(hosts: &[&str]) -> PullSettings {
    let mut s = PullSettings::default();
    s.min_free = 0;
    for h in hosts {
        s = insecure(s, h);
    }
    s
}

fn store(settings: PullSettings) -> (TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::with_settings(dir.path().join("images"), settings).unwrap();
    (dir, store)
}

/// A busybox image with one more layer holding `marker`, pushed as `dest`.
fn push_busybox(registry: &Registry, dest: &str, marker: &str) -> oci::Written {
    let layout = tempfile::tempdir().unwrap();
    let written = oci::busybox()
        .layer(oci::Compression::Gzip)
        .file("etc/marker", marker, 0o644)
        .write_layout(layout.path(), "t")
        .unwrap();
    registry.push(layout.path(), "t", dest).unwrap();
    written
}

#[derive(Default)]
struct Recorder(Mutex<Vec<PullProgress>>);

impl PullObserver for Recorder {
    fn progress(&self, p: PullProgress) {
        self.0.lock().unwrap().push(p);
    }
}

fn marker(image: &Image) -> String {
    let path = layers::find(&image.rootfs, Path::new("etc/marker")).unwrap();
    std::fs::read_to_string(path.unwrap()).unwrap()
}

fn err(result: Result<Image, ImageError>) -> ImageError {
    match result {
        Ok(image) => panic!("expected an error, got {image:?}"),
        Err(e) => e,
    }
}

#[test]
fn pulls_shows_progress_and_starts_again_with_no_network() {
    let registry = Registry::start().unwrap();
    let host = registry.host();
    let written = push_busybox(&registry, "app:1", "one");
    let (_dir, store) = store(settings_for(&[&host]));
    let seen = Recorder::default();
    let image = store.pull(&format!("{host}/app:1"), &seen).unwrap();
    assert_eq!(image.digest, written.manifest);
    assert_eq!(marker(&image), "one");
    let busybox = layers::find(&image.rootfs, Path::new("bin/busybox")).unwrap();
    assert!(busybox.unwrap().is_file());
    assert_eq!(image.config.cmd, ["sh"]);
    let progress = seen.0.lock().unwrap().clone();
    let last = progress.last().copied().unwrap();
    assert!(last.total_bytes > 500_000, "{progress:?}");
    assert_eq!(last.done_bytes, last.total_bytes, "{progress:?}");
    assert_eq!(progress[0].done_bytes, 0, "{progress:?}");

    // By digest too, and with the registry gone the known tag still resolves.
    let by_digest = format!("{host}/app@{}", written.manifest);
    assert_eq!(store.ensure(&by_digest).unwrap().digest, written.manifest);
    drop(registry);
    let again = store.ensure(&format!("docker://{host}/app:1")).unwrap();
    assert_eq!(again, image);
    let e = err(store.ensure(&format!("{host}/app:2")));
    assert_eq!(e.reason(), "ErrImagePull", "{e}");
    assert!(
        e.to_string().contains(&format!("manifest 2 of {host}/app")),
        "{e}"
    );
}

#[test]
fn index_gives_the_device_its_platform_or_a_clear_error() {
    let registry = Registry::start().unwrap();
    let host = registry.host();
    let layout = tempfile::tempdir().unwrap();
    let other = if Platform::host().architecture == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let written = IndexBuilder::new()
        .image(
            Platform::linux("arm", Some("v7")),
            oci::busybox().file("etc/marker", "arm", 0o644),
        )
        .image(
            Platform::host(),
            oci::busybox().file("etc/marker", "host", 0o644),
        )
        .image(
            Platform::linux(other, None),
            oci::busybox().file("etc/marker", "other", 0o644),
        )
        .write_layout(layout.path(), "multi")
        .unwrap();
    registry.push(layout.path(), "multi", "multi:1").unwrap();
    let foreign = tempfile::tempdir().unwrap();
    IndexBuilder::new()
        .image(Platform::linux("arm", Some("v7")), oci::busybox())
        .image(Platform::linux("s390x", None), oci::busybox())
        .write_layout(foreign.path(), "f")
        .unwrap();
    registry.push(foreign.path(), "f", "foreign:1").unwrap();

    let (_dir, store) = store(settings_for(&[&host]));
    let image = store.ensure(&format!("{host}/multi:1")).unwrap();
    assert_eq!(image.digest, written.manifest);
    assert_eq!(marker(&image), "host");
    let e = err(store.ensure(&format!("{host}/foreign:1")));
    assert_eq!(e.reason(), "NoMatchingPlatform");
    let msg = e.to_string();
    assert!(msg.contains("linux/arm/v7, linux/s390x"), "{msg}");
    // Only the chosen platform's layers were downloaded.
    let blobs = std::fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .count();
    assert!(blobs <= 8, "{blobs} blobs stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_where_it_stopped_and_the_container_runs() {
    let registry = Registry::start().unwrap();
    let written = push_busybox(&registry, "app:1", "resumed");
    let layer = written.layers[0].clone();
    let layer_size = std::fs::metadata(registry.blob_file(&layer)).unwrap().len();
    // Manifests are a few KiB: the cut falls inside the big busybox layer.
    let proxy = CutProxy::start(registry.addr(), 300_000).unwrap();
    let host = proxy.host();
    let (dir, store) = store(settings_for(&[&host]));
    let reference = format!("{host}/app:1");
    let image = tokio::task::spawn_blocking({
        let reference = reference.clone();
        move || (store.ensure(&reference), store)
    })
    .await
    .unwrap();
    let (image, _store) = (image.0.unwrap(), image.1);
    let hex = layer.strip_prefix("sha256:").unwrap();
    let layer_gets: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.contains(hex))
        .collect();
    assert_eq!(layer_gets.len(), 2, "{layer_gets:#?}");
    assert!(!layer_gets[0].to_ascii_lowercase().contains("range:"));
    let range = layer_gets[1]
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("range: bytes=")
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no Range in {}", layer_gets[1]));
    let offset: u64 = range.trim_end_matches('-').trim().parse().unwrap();
    assert!(
        offset > 100_000 && offset < layer_size,
        "resumed at {offset} of {layer_size}"
    );
    // Everything went through once, not twice.
    assert!(
        proxy.sent() < layer_size + 200_000,
        "{} bytes for a {layer_size}-byte layer",
        proxy.sent()
    );
    assert_eq!(marker(&image), "resumed");

    use flotilla_agent::runtime::{ContainerConfig, Runtime};
    let rt = common::youki_runtime(dir.path(), &common::unique_cgroup_parent("pull"));
    let log = dir.path().join("c.log");
    let config = ContainerConfig {
        id: "pulled.main.00000000".into(),
        image_rootfs: image.rootfs.clone(),
        args: vec![
            "sh".into(),
            "-c".into(),
            "cat /etc/marker; echo ' ran'".into(),
        ],
        env: image.config.env.clone(),
        cwd: "/".into(),
        uid: 0,
        gid: 0,
        hostname: "pulled".into(),
        resources: Default::default(),
        log_path: log.clone(),
        mounts: vec![],
        security: Default::default(),
    };
    rt.start(&config).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), rt.wait(&config.id)).await;
    let _ = rt.delete(&config.id);
    assert_eq!(exit.unwrap().unwrap().code, 0);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "resumed ran\n");
}

#[test]
fn a_corrupt_blob_is_refused_and_nothing_else_is_touched() {
    let registry = Registry::start().unwrap();
    let host = registry.host();
    let good = push_busybox(&registry, "good:1", "good");
    let bad = push_busybox(&registry, "bad:1", "bad");
    let (_dir, store) = store(settings_for(&[&host]));
    let running = store.ensure(&format!("{host}/good:1")).unwrap();
    // Same size, other bytes: only the digest can tell.
    let top = bad.layers.last().unwrap();
    let file = registry.blob_file(top);
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let e = err(store.ensure(&format!("{host}/bad:1")));
    assert_eq!(e.reason(), "InvalidImage", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("blob {top}: digest mismatch")),
        "{msg}"
    );
    assert!(msg.contains("twice"), "{msg}");
    let hex = top.strip_prefix("sha256:").unwrap();
    assert!(!store.root().join("blobs/sha256").join(hex).exists());
    assert_eq!(marker(&running), "good");
    assert_eq!(store.ensure(&format!("{host}/good:1")).unwrap(), running);
    assert_eq!(running.digest, good.manifest);
}

#[test]
fn a_layer_escaping_its_directory_is_refused_or_contained() {
    let registry = Registry::start().unwrap();
    let host = registry.host();
    let outside = tempfile::tempdir().unwrap();
    let layout = tempfile::tempdir().unwrap();
    for (tag, entry) in [
        (
            "dotdot",
            RawEntry::file("../../../../../../../../tmp/flotilla-evil", "x"),
        ),
        (
            "link",
            RawEntry::symlink("etc/out", outside.path().to_str().unwrap()),
        ),
    ] {
        let mut image = oci::busybox().layer(oci::Compression::Gzip).raw(entry);
        if tag == "link" {
            image = image
                .layer(oci::Compression::Gzip)
                .file("etc/out/pwned", "x", 0o644);
        }
        image.write_layout(layout.path(), tag).unwrap();
        registry
            .push(layout.path(), tag, &format!("evil:{tag}"))
            .unwrap();
    }
    let (_dir, store) = store(settings_for(&[&host]));
    let e = err(store.ensure(&format!("{host}/evil:dotdot")));
    assert_eq!(e.reason(), "UnsafeLayer", "{e}");
    // Layers are unpacked apart: the upper layer's `etc/out/pwned` makes a
    // directory in that layer, shadowing the lower symlink, never following it.
    let image = store.ensure(&format!("{host}/evil:link")).unwrap();
    let pwned = layers::find(&image.rootfs, Path::new("etc/out/pwned")).unwrap();
    assert!(pwned.unwrap().starts_with(store.root()));
    assert!(!Path::new("/tmp/flotilla-evil").exists());
    assert!(!outside.path().join("pwned").exists());
}

#[test]
fn credentials_basic_and_token() {
    let registry = Registry::builder()
        .basic_auth("robot", "s3cret")
        .start()
        .unwrap();
    let host = registry.host();
    push_busybox(&registry, "private:1", "private");
    let with = |password: Option<&str>| {
        let mut s = PullSettings::default();
        s.min_free = 0;
        s.with_registry(
            &host,
            RegistrySettings {
                insecure: true,
                credentials: password.map(|p| Credentials {
                    username: "robot".into(),
                    password: p.into(),
                }),
                ..RegistrySettings::default()
            },
        )
    };
    let reference = format!("{host}/private:1");
    let (_d1, none) = store(with(None));
    let e = err(none.ensure(&reference));
    assert_eq!(e.reason(), "Unauthorized", "{e}");
    assert!(e.to_string().contains("none are configured"), "{e}");
    let (_d2, wrong) = store(with(Some("wrong")));
    let e = err(wrong.ensure(&reference));
    assert_eq!(e.reason(), "Unauthorized", "{e}");
    assert!(e.to_string().contains("credentials were refused"), "{e}");
    let (_d3, right) = store(with(Some("s3cret")));
    assert_eq!(marker(&right.ensure(&reference).unwrap()), "private");

    // Bearer: the registry sends clients to a token server.
    let tokens = TokenServer::start("robot", "t0ken").unwrap();
    let registry = Registry::builder()
        .token_auth(&tokens.realm())
        .start()
        .unwrap();
    let host = registry.host();
    let layout = tempfile::tempdir().unwrap();
    oci::busybox()
        .file("etc/marker", "token", 0o644)
        .write_layout(layout.path(), "t")
        .unwrap();
    // skopeo pushes with the same credentials through the same token server.
    push_with_creds(&registry, layout.path(), "robot:t0ken");
    let reference = format!("{host}/tok:1");
    let creds = |p: &str| {
        let mut s = PullSettings::default();
        s.min_free = 0;
        s.with_registry(
            &host,
            RegistrySettings {
                insecure: true,
                credentials: Some(Credentials {
                    username: "robot".into(),
                    password: p.into(),
                }),
                ..RegistrySettings::default()
            },
        )
    };
    let (_d4, bad) = store(creds("nope"));
    let refused_before = tokens.refused();
    let e = err(bad.ensure(&reference));
    assert_eq!(e.reason(), "Unauthorized", "{e}");
    assert!(tokens.refused() > refused_before);
    let (_d5, good) = store(creds("t0ken"));
    let granted_before = tokens.granted();
    assert_eq!(marker(&good.ensure(&reference).unwrap()), "token");
    assert!(tokens.granted() > granted_before);
}

/// A pod's pull secrets for `host`, one per (secret, password), in order.
fn pull_secrets(host: &str, secrets: &[(&str, &str)]) -> PullSecrets {
    let mut out = PullSecrets::none();
    for (name, password) in secrets {
        let json = format!(
            r#"{{"auths":{{"http://{host}/v2/":{{"username":"robot","password":"{password}"}}}}}}"#
        );
        out.add_docker_config(name, json.as_bytes()).unwrap();
    }
    out
}

#[test]
fn pull_secrets_come_before_the_registries_file() {
    let registry = Registry::builder()
        .basic_auth("robot", "s3cret")
        .start()
        .unwrap();
    let host = registry.host();
    push_busybox(&registry, "private:1", "private");
    let reference = format!("{host}/private:1");
    let with_file = |password: &str| {
        let mut s = PullSettings::default();
        s.min_free = 0;
        s.with_registry(
            &host,
            RegistrySettings {
                insecure: true,
                credentials: Some(Credentials {
                    username: "robot".into(),
                    password: password.into(),
                }),
                ..RegistrySettings::default()
            },
        )
    };
    // The secret opens what the file's wrong password does not.
    let (_d1, s1) = store(with_file("wrong"));
    let secrets = pull_secrets(&host, &[("regcred", "s3cret")]);
    let image = s1.pull_with(&reference, &secrets, &NoObserver).unwrap();
    assert_eq!(marker(&image), "private");
    // A wrong secret, then the file's right password.
    let (_d2, s2) = store(with_file("s3cret"));
    let secrets = pull_secrets(&host, &[("old", "expired")]);
    assert!(s2.pull_with(&reference, &secrets, &NoObserver).is_ok());
    // Every one refused: each is named, no password is.
    let (_d3, s3) = store(with_file("wrong"));
    let mut secrets = pull_secrets(&host, &[("a", "x1"), ("b", "x2")]);
    secrets.add_problem("pull secret \"c\" could not be used: secret \"c\" not found".into());
    let e = err(s3.pull_with(&reference, &secrets, &NoObserver));
    assert_eq!(e.reason(), "Unauthorized", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(
            "credentials were refused (pull secret \"a\", then pull secret \"b\", then the registries file)"
        ),
        "{msg}"
    );
    assert!(
        msg.ends_with("; pull secret \"c\" could not be used: secret \"c\" not found"),
        "{msg}"
    );
    assert!(!msg.contains("x1") && !msg.contains("wrong"), "{msg}");

    // Bearer: a refused secret, then the right one, at the token server.
    let tokens = TokenServer::start("robot", "t0ken").unwrap();
    let registry = Registry::builder()
        .token_auth(&tokens.realm())
        .start()
        .unwrap();
    let host = registry.host();
    let layout = tempfile::tempdir().unwrap();
    oci::busybox()
        .file("etc/marker", "token", 0o644)
        .write_layout(layout.path(), "t")
        .unwrap();
    push_with_creds(&registry, layout.path(), "robot:t0ken");
    let (_d4, s4) = store(settings_for(&[&host]));
    let reference = format!("{host}/tok:1");
    let e = err(s4.ensure(&reference));
    assert_eq!(e.reason(), "Unauthorized", "{e}");
    assert!(
        e.to_string().contains("anonymous access was refused"),
        "{e}"
    );
    let (refused, granted) = (tokens.refused(), tokens.granted());
    let secrets = pull_secrets(&host, &[("stale", "old"), ("fresh", "t0ken")]);
    let image = s4.pull_with(&reference, &secrets, &NoObserver).unwrap();
    assert_eq!(marker(&image), "token");
    assert!(tokens.refused() > refused);
    assert!(tokens.granted() > granted);
}

fn push_with_creds(registry: &Registry, layout: &Path, creds: &str) {
    let out = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            creds,
        ])
        .arg(format!("oci:{}:t", layout.display()))
        .arg(format!("docker://{}/tok:1", registry.host()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn https_with_a_configured_ca() {
    let registry = Registry::builder().tls().start().unwrap();
    let host = registry.host();
    push_busybox(&registry, "secure:1", "tls");
    let reference = format!("{host}/secure:1");
    let mut plain = PullSettings::default();
    plain.min_free = 0;
    let (_d1, untrusting) = store(plain.clone());
    let e = err(untrusting.ensure(&reference));
    assert_eq!(e.reason(), "ErrImagePull", "{e}");
    let toml = format!(
        "min_free = 0\n[[registry]]\nhost = \"{host}\"\nca_file = \"{}\"\n",
        registry.ca_pem().unwrap().display()
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), toml).unwrap();
    let settings = PullSettings::load(file.path()).unwrap();
    let (_d2, trusting) = store(settings);
    assert_eq!(marker(&trusting.ensure(&reference).unwrap()), "tls");
}

#[test]
fn mirrors_are_asked_first_and_the_origin_after() {
    let mirror = Registry::start().unwrap();
    let origin = Registry::start().unwrap();
    push_busybox(&mirror, "app:1", "from-mirror");
    push_busybox(&origin, "app:2", "from-origin");
    let mut settings = settings_for(&[&mirror.host()]);
    settings = settings.with_registry(
        &origin.host(),
        RegistrySettings {
            insecure: true,
            mirrors: vec![mirror.host()],
            ..RegistrySettings::default()
        },
    );
    let (_dir, store) = store(settings);
    let from_mirror = store.ensure(&format!("{}/app:1", origin.host())).unwrap();
    assert_eq!(marker(&from_mirror), "from-mirror");
    let from_origin = store.ensure(&format!("{}/app:2", origin.host())).unwrap();
    assert_eq!(marker(&from_origin), "from-origin");
}

/// A tmpfs of `size` mounted on a temp dir, unmounted when dropped.
struct Tmpfs(TempDir);

impl Tmpfs {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .unwrap();
        Self(dir)
    }

    fn path(&self) -> PathBuf {
        self.0.path().to_owned()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_small_disk_makes_the_pull_wait_or_fail_clearly() {
    let registry = Registry::start().unwrap();
    let host = registry.host();
    push_busybox(&registry, "app:1", "disk");
    let reference = format!("{host}/app:1");

    // The floor: refused before a byte is downloaded.
    let disk = Tmpfs::new("8m");
    let mut settings = settings_for(&[&host]);
    settings.min_free = 7 << 20;
    let store = ImageStore::with_settings(disk.path().join("images"), settings).unwrap();
    let e = err(store.ensure(&reference));
    assert_eq!(e.reason(), "InsufficientStorage", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("must leave 7.0 MiB free; waiting for space"),
        "{msg}"
    );
    let partials = std::fs::read_dir(disk.path().join("images/blobs/sha256"))
        .unwrap()
        .count();
    assert!(partials <= 2, "{partials} blobs written before the layers");

    // No floor and no room: the disk's own error, named.
    let tiny = Tmpfs::new("600k");
    let store =
        ImageStore::with_settings(tiny.path().join("images"), settings_for(&[&host])).unwrap();
    let e = err(store.ensure(&reference));
    assert!(e.to_string().contains("No space left on device"), "{e}");
}

#[test]
fn garbage_collection_keeps_current_and_previous_images() {
    let registry = Registry::start().unwrap();
    let host = registry.host();
    let w1 = push_busybox(&registry, "app:1", "1");
    let w2 = push_busybox(&registry, "app:2", "2");
    let w3 = push_busybox(&registry, "app:3", "3");
    let (_dir, store) = store(settings_for(&[&host]));
    let r = |n: u32| format!("{host}/app:{n}");
    let i1 = store.ensure(&r(1)).unwrap();
    assert!(store.gc(&[r(1)]).unwrap().ran);
    let i2 = store.ensure(&r(2)).unwrap();
    let report = store.gc(&[r(2)]).unwrap();
    assert_eq!(
        (report.images, report.blobs),
        (0, 0),
        "rollback target kept"
    );
    assert!(i1.rootfs.is_file() && i2.rootfs.is_file());
    let i3 = store.ensure(&r(3)).unwrap();
    let report = store.gc(&[r(3)]).unwrap();
    assert_eq!(report.images, 1, "{report:?}");
    assert!(!i1.rootfs.exists());
    assert!(i2.rootfs.is_file() && i3.rootfs.is_file());
    let blob = |d: &str| {
        store
            .root()
            .join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    };
    // Image 1's own layer and manifest went; the busybox layer they share stayed.
    assert!(!blob(w1.layers.last().unwrap()).exists());
    assert!(!blob(&w1.manifest).exists());
    assert!(blob(&w3.layers[0]).exists());
    assert!(blob(w2.layers.last().unwrap()).exists());
    // Gone from disk, image 1 is pulled again when asked for.
    assert_eq!(marker(&store.ensure(&r(1)).unwrap()), "1");
}

#[test]
fn imports_run_with_no_registry() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("app.tar");
    let written = oci::busybox()
        .file("etc/marker", "oci-archive", 0o644)
        .write_archive(&archive, "1.0")
        .unwrap();
    // Through the binary, as an operator would.
    let data = dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-agent"))
        .args([
            "image",
            "import",
            "--name",
            "registry.example:5000/app:1.0",
            "--data-dir",
        ])
        .arg(&data)
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("registry.example:5000/app:1.0 {}", written.digest)),
        "{stdout}"
    );
    // Nothing listens at registry.example: the pull works from the store alone.
    let store = ImageStore::with_settings(data.join("images"), settings_for(&[])).unwrap();
    let image = store.ensure("registry.example:5000/app:1.0").unwrap();
    assert_eq!(marker(&image), "oci-archive");
    // Imports survive garbage collection.
    store.gc(&[]).unwrap();
    store.gc(&["other:1".to_owned()]).unwrap();
    assert!(image.rootfs.is_file());

    // `docker save`: manifest.json, a config and plain tar layers.
    let layer = tar_of(&[("etc/marker", b"docker-save" as &[u8]), ("bin/true", b"")]);
    let config = serde_json::json!({
        "architecture": Platform::host().architecture, "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [oci::digest_of(&layer)]},
    });
    let manifest = serde_json::json!([{
        "Config": "abc.json", "RepoTags": ["example.org/tools/saved:2"], "Layers": ["l1/layer.tar"],
    }]);
    let saved = tar_of(&[
        (
            "manifest.json",
            serde_json::to_vec(&manifest).unwrap().as_slice(),
        ),
        ("abc.json", serde_json::to_vec(&config).unwrap().as_slice()),
        ("l1/layer.tar", layer.as_slice()),
    ]);
    let saved_path = dir.path().join("saved.tar");
    std::fs::write(&saved_path, saved).unwrap();
    let report = store.import(&saved_path, None).unwrap();
    assert_eq!(report.images.len(), 1, "{report:?}");
    assert_eq!(report.images[0].0, "example.org/tools/saved:2");
    let image = store.ensure("example.org/tools/saved:2").unwrap();
    assert_eq!(marker(&image), "docker-save");
    assert_eq!(image.config.cmd, ["/bin/true"]);
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap()
}
