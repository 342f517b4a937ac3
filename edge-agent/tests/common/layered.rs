//! Layered images run as real containers: an image store and a youki
//! runtime in one temp dir, and a container run to its end with its output.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_agent::image::{Image, ImageStore, Images};
use flotilla_agent::runtime::youki::YoukiRuntime;
use flotilla_agent::runtime::{ContainerConfig, Exit, Runtime};
use flotilla_proto::Resources;
use flotilla_testkit::oci::ImageBuilder;

use super::{unique_cgroup_parent, youki_runtime};

const DEADLINE: Duration = Duration::from_secs(30);

/// A store at `{dir}/images` and a runtime under `{dir}`.
pub struct Layered {
    pub dir: tempfile::TempDir,
    pub store: ImageStore,
    pub rt: YoukiRuntime,
    ids: std::sync::Mutex<Vec<String>>,
}

impl Layered {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images")).unwrap();
        let rt = youki_runtime(dir.path(), &unique_cgroup_parent(tag));
        Self {
            dir,
            store,
            rt,
            ids: Default::default(),
        }
    }

    /// Writes `image` as a layout named `name` and makes it ready.
    pub fn image(&self, name: &str, image: ImageBuilder) -> Image {
        let layout = self.dir.path().join(format!("layout-{name}"));
        image.write_layout(&layout, "t").unwrap();
        self.store
            .ensure(&format!("oci:{}:t", layout.display()))
            .unwrap()
    }

    pub fn config(&self, id: &str, image: &Path, script: &str) -> ContainerConfig {
        ContainerConfig {
            id: id.into(),
            image_rootfs: image.to_path_buf(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "layered".into(),
            resources: Resources::default(),
            log_path: self.dir.path().join("logs").join(format!("{id}.log")),
            mounts: vec![],
            security: Default::default(),
        }
    }

    /// Starts a container of `image` running `script`.
    pub fn start(&self, id: &str, image: &Path, script: &str) -> ContainerConfig {
        let config = self.config(id, image, script);
        self.ids.lock().unwrap().push(id.to_owned());
        self.rt.start(&config).unwrap();
        config
    }

    /// Runs `script` in a container of `image` to its end: exit and output.
    pub async fn run(&self, id: &str, image: &Path, script: &str) -> (Exit, String) {
        let config = self.start(id, image, script);
        let exit = tokio::time::timeout(DEADLINE, self.rt.wait(id))
            .await
            .unwrap_or_else(|_| panic!("container {id} still runs after {DEADLINE:?}"))
            .unwrap();
        let out = std::fs::read_to_string(&config.log_path).unwrap_or_default();
        (exit, out)
    }

    /// The mountinfo line of container `id`'s root filesystem, if mounted.
    pub fn rootfs_mount(&self, id: &str) -> Option<String> {
        let rootfs = self.rt.bundle_of(id).join("rootfs");
        let text = rootfs.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(text.as_str()))
            .map(str::to_owned)
    }

    /// The store's unpacked layer directories.
    pub fn layer_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = match std::fs::read_dir(self.store.root().join("layers")) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        };
        dirs.sort();
        dirs
    }

    pub fn delete(&self, id: &str) {
        self.rt.delete(id).unwrap();
        self.ids.lock().unwrap().retain(|i| i != id);
    }
}

impl Drop for Layered {
    fn drop(&mut self) {
        for id in self.ids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Err(e) = self.rt.delete(id) {
                eprintln!("cleanup of {id} failed: {e}");
            }
        }
    }
}

/// Polls `f` every 20 ms until it gives a value; panics after 30 s.
pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Busybox, then a layer with `/etc/secret`, `/opt/lower/{x,sub/y}` and
/// `/opt/keep`, then one that whites out `/etc/secret` and makes
/// `/opt/lower` opaque, adding `/opt/lower/new`.
pub fn whiteout_image() -> ImageBuilder {
    flotilla_testkit::oci::busybox()
        .layer(flotilla_testkit::oci::Compression::Gzip)
        .file("etc/secret", "lower", 0o644)
        .file("opt/lower/x", "x", 0o644)
        .file("opt/lower/sub/y", "y", 0o644)
        .file("opt/keep", "kept", 0o644)
        .layer(flotilla_testkit::oci::Compression::Gzip)
        .whiteout("etc/secret")
        .opaque("opt/lower")
        .file("opt/lower/new", "new", 0o644)
}

/// What a container prints about [`whiteout_image`]'s files.
pub const WHITEOUT_SCRIPT: &str = "test -e /etc/secret && echo secret-visible; \
    ls -A /opt/lower | tr '\\n' ' '; echo; cat /opt/keep; echo; \
    echo changed > /opt/keep; cat /opt/keep";

/// What it must print.
pub const WHITEOUT_OUTPUT: &str = "new \nkept\nchanged\n";
