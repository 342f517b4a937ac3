//! Fixtures shared by the agent's integration tests that run real
//! containers: a busybox root filesystem and a youki runtime in directories
//! and a cgroup parent of its own.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use flotilla_agent::runtime::youki::YoukiRuntime;

pub mod layered;
pub mod reconciler;
pub mod sealing;

/// Applets linked into the test root filesystem.
const APPLETS: &[&str] = &[
    "sh", "echo", "sleep", "cat", "true", "false", "head", "tr", "wc", "ls", "touch", "grep", "id",
    "test",
];

/// A busybox root filesystem under `dir/image`: `bin/busybox` with applet
/// symlinks, `/tmp` (1777), and `/etc/passwd` with root and nobody.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("image");
    for d in ["bin", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    root
}

/// A cgroup parent no other test (or test process) uses.
pub fn unique_cgroup_parent(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "flotilla-test-{tag}-{}-{}-{}/node",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// A youki runtime with its state and bundles under `dir`, using the agent
/// binary of this package as its create/exec helper.
pub fn youki_runtime(dir: &Path, cgroup_parent: &str) -> YoukiRuntime {
    YoukiRuntime::new(
        dir.join("state"),
        dir.join("work"),
        cgroup_parent.to_owned(),
    )
    .unwrap()
    .with_helper(env!("CARGO_BIN_EXE_flotilla-agent").into())
}
