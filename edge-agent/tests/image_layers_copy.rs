//! The copy fallback of container root filesystems, forced with
//! `FLOTILLA_ROOTFS=copy` (its own test binary: the switch is read from the
//! process environment): the image's layers are merged into a private copy,
//! whiteouts and opaque directories applied, and nothing is mounted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;

use common::layered::{Layered, WHITEOUT_OUTPUT, WHITEOUT_SCRIPT};
use flotilla_agent::image::layers;

#[tokio::test]
async fn the_copy_fallback_merges_layers_with_their_whiteouts() {
    // SAFETY: the only test of this binary sets it before any container
    // starts; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("FLOTILLA_ROOTFS", "copy") };
    let l = Layered::new("copy");
    let image = l.image("wh", common::layered::whiteout_image());
    let config = l.start(
        "copy.main.1",
        &image.rootfs,
        &format!("{WHITEOUT_SCRIPT}; sleep 30"),
    );
    common::layered::wait_until("the script's output", || {
        let out = fs::read_to_string(&config.log_path).unwrap_or_default();
        (out == WHITEOUT_OUTPUT).then_some(())
    });
    assert_eq!(l.rootfs_mount("copy.main.1"), None, "a copy, not a mount");
    let rootfs = l.rt.bundle_of("copy.main.1").join("rootfs");
    assert!(!rootfs.join("etc/secret").exists());
    assert!(rootfs.join("opt/lower/new").exists() && !rootfs.join("opt/lower/x").exists());
    // The image itself is untouched.
    let keep = layers::find(&image.rootfs, Path::new("opt/keep"))
        .unwrap()
        .unwrap();
    assert_eq!(fs::read_to_string(keep).unwrap(), "kept");
    l.delete("copy.main.1");
    assert!(!rootfs.exists());
}
