//! Shared layers with real containers: images that share a base layer
//! store it once; a container's root filesystem is an overlay of the
//! image's layers, whiteouts and opaque directories honoured; many layers
//! fit the mount options; garbage collection keeps what a container uses;
//! a store written by an older agent (one merged rootfs per image) still
//! runs. The copy fallback is in `image_layers_copy.rs` (it needs its own
//! process environment).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::layered::{Layered, WHITEOUT_OUTPUT, WHITEOUT_SCRIPT, wait_until, whiteout_image};
use flotilla_agent::image::{ImageStore, Images, layers};
use flotilla_testkit::oci::{Compression, busybox};

fn with_file(name: &str) -> flotilla_testkit::oci::ImageBuilder {
    busybox().layer(Compression::Gzip).file(name, name, 0o644)
}

#[tokio::test]
async fn images_sharing_a_base_layer_store_it_once() {
    let l = Layered::new("share");
    let a = l.image("a", with_file("a"));
    let b = l.image("b", with_file("b"));
    assert_ne!(a.digest, b.digest);
    // busybox once, plus each image's own layer.
    assert_eq!(l.layer_dirs().len(), 3, "{:?}", l.layer_dirs());
    let (la, lb) = (
        layers::lower_dirs(&a.rootfs).unwrap(),
        layers::lower_dirs(&b.rootfs).unwrap(),
    );
    assert_eq!(la.len(), 2);
    assert_eq!(la[1], lb[1], "the base layer is the same directory");
    assert_ne!(la[0], lb[0]);
    let inode = |image: &Path| {
        let path = layers::find(image, Path::new("bin/busybox"))
            .unwrap()
            .unwrap();
        fs::metadata(path).unwrap().ino()
    };
    assert_eq!(inode(&a.rootfs), inode(&b.rootfs), "one busybox on disk");
    let (exit, out) = l
        .run("share.a.1", &a.rootfs, "cat /a; test -e /b || echo no-b")
        .await;
    assert_eq!((exit.code, out.as_str()), (0, "ano-b\n"));
    let (exit, out) = l.run("share.b.1", &b.rootfs, "cat /b").await;
    assert_eq!((exit.code, out.as_str()), (0, "b"));
}

#[tokio::test]
async fn whiteouts_and_opaque_directories_hold_in_a_running_container() {
    let l = Layered::new("wh");
    let image = l.image("wh", whiteout_image());
    let config = l.start(
        "wh.main.1",
        &image.rootfs,
        &format!("{WHITEOUT_SCRIPT}; sleep 30"),
    );
    // An overlay of the three layers, top first.
    let mount = wait_until("the rootfs mount", || l.rootfs_mount("wh.main.1"));
    assert!(mount.contains(" - overlay "), "{mount}");
    let lowers: Vec<String> = layers::lower_dirs(&image.rootfs)
        .unwrap()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        mount.contains(&format!("lowerdir={}", lowers.join(":"))),
        "{mount}"
    );
    wait_until("the script's output", || {
        let out = fs::read_to_string(&config.log_path).unwrap_or_default();
        (out == WHITEOUT_OUTPUT).then_some(())
    });
    // The write went to the container's own upper layer, not the image.
    let keep = layers::find(&image.rootfs, Path::new("opt/keep"))
        .unwrap()
        .unwrap();
    assert_eq!(fs::read_to_string(keep).unwrap(), "kept");
    l.delete("wh.main.1");
    assert!(l.rootfs_mount("wh.main.1").is_none());
}

#[tokio::test]
async fn an_image_of_ninety_layers_runs_on_an_overlay() {
    let l = Layered::new("many");
    let mut builder = busybox();
    // 91 layers with the base: the descriptor form fits about 95 (each
    // layer `/proc/self/fd/NNN/<16 hex>/root:`, 4000 bytes in all).
    for i in 0..90 {
        builder =
            builder
                .layer(Compression::Plain)
                .file(&format!("l/{i:03}"), format!("{i}"), 0o644);
    }
    let image = l.image("many", builder);
    assert_eq!(layers::lower_dirs(&image.rootfs).unwrap().len(), 91);
    // Absolute paths would not fit in a page: the short names do.
    let absolute: usize = layers::lower_dirs(&image.rootfs)
        .unwrap()
        .iter()
        .map(|p| p.as_os_str().len() + 1)
        .sum();
    assert!(
        absolute > 4096,
        "{absolute} bytes: the test needs longer paths"
    );
    let config = l.start(
        "many.main.1",
        &image.rootfs,
        "ls /l | wc -l; cat /l/000 /l/089; sleep 30",
    );
    let mount = wait_until("the rootfs mount", || l.rootfs_mount("many.main.1"));
    assert!(mount.contains(" - overlay "), "{mount}");
    assert!(mount.contains("lowerdir=/proc/self/fd/"), "{mount}");
    wait_until("the script's output", || {
        let out = fs::read_to_string(&config.log_path).unwrap_or_default();
        (out.split_whitespace().collect::<Vec<_>>() == ["90", "089"]).then_some(())
    });
}

#[tokio::test]
async fn collection_keeps_what_a_container_uses_and_then_removes_it() {
    let l = Layered::new("gc");
    let a = l.image("a", with_file("a"));
    let b = l.image("b", with_file("b"));
    let layer_of = |image: &flotilla_agent::image::Image| {
        layers::lower_dirs(&image.rootfs).unwrap()[0]
            .parent()
            .unwrap()
            .to_owned()
    };
    let (own_a, own_b) = (layer_of(&a), layer_of(&b));
    l.start("gc.a.1", &a.rootfs, "sleep 60");
    // Neither image desired now nor before: b goes, a stays (in use).
    let report = l.store.gc(&[]).unwrap();
    assert_eq!((report.images, report.layers), (1, 1), "{report:?}");
    assert!(!b.rootfs.exists() && !own_b.exists());
    assert!(a.rootfs.is_file() && own_a.is_dir());
    assert_eq!(l.layer_dirs().len(), 2, "a's layer and the base");
    let (exit, out) = l.run("gc.a.2", &a.rootfs, "cat /a").await;
    assert_eq!((exit.code, out.as_str()), (0, "a"));
    // Once no container uses it, it goes with its layers.
    l.delete("gc.a.1");
    l.delete("gc.a.2");
    let report = l.store.gc(&[]).unwrap();
    assert_eq!((report.images, report.layers), (1, 2), "{report:?}");
    assert!(l.layer_dirs().is_empty());
    assert!(!a.rootfs.exists());
}

#[tokio::test]
async fn a_store_of_an_older_agent_still_runs() {
    let l = Layered::new("old");
    let image = l.image("old", whiteout_image());
    // What an older agent left: `sha256-…/rootfs` merged, no layer list,
    // no layers directory.
    let dir = image.rootfs.parent().unwrap().to_owned();
    let merged = dir.join("rootfs");
    fs::create_dir(&merged).unwrap();
    layers::merge(&layers::lower_dirs(&image.rootfs).unwrap(), &merged).unwrap();
    fs::remove_file(&image.rootfs).unwrap();
    fs::remove_dir_all(l.store.root().join("layers")).unwrap();
    let reference = format!("oci:{}:t", l.dir.path().join("layout-old").display());
    // A new agent on that store uses the old directory as it is.
    let store = ImageStore::new(l.store.root().to_owned()).unwrap();
    let again = store.ensure(&reference).unwrap();
    assert_eq!(again.rootfs, merged);
    assert!(l.layer_dirs().is_empty(), "nothing unpacked again");
    assert_eq!(again.digest, image.digest);
    let (exit, out) = l.run("old.main.1", &again.rootfs, WHITEOUT_SCRIPT).await;
    assert_eq!((exit.code, out.as_str()), (0, WHITEOUT_OUTPUT));
    l.delete("old.main.1");
    // Collected like any other image once nothing wants it.
    store.gc(&[]).unwrap();
    store.gc(&[]).unwrap();
    assert!(!dir.exists());
    let fresh: HashSet<_> = fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sha256-"))
        .collect();
    assert!(fresh.is_empty(), "{fresh:?}");
}
