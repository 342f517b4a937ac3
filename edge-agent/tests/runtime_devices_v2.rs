//! The cgroup v2 device program on this machine's real kernel: compiled from
//! the rules every unprivileged container gets, stored and read back as the
//! runtime helper does, attached to a fresh cgroup v2 directory, and proved
//! by a process in that cgroup that makes a node for a real block device of
//! the host and cannot open it, while `/dev/null` still opens. The same
//! process in a cgroup without the program opens the device (so the test
//! can fail). Hosts on cgroup v1 have a cgroup2 mount too (here
//! `/sys/fs/cgroup/unified`, with no controllers); device programs attach
//! there all the same. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flotilla_agent::runtime::youki::devices_v2::{FILE_NAME, Filter, Program};
use oci_spec::runtime::LinuxDeviceCgroupBuilder;

/// The cgroup2 mount point, from mountinfo.
fn unified_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            right
                .starts_with("cgroup2 ")
                .then(|| PathBuf::from(mount_point))
        })
        .expect("a cgroup2 mount (cgroup v2, or the unified hierarchy of a hybrid host)")
}

/// A new cgroup v2 directory, removed (once its processes are gone) on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = unified_root().join(format!(
            "flotilla-test-devices-{tag}-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The last process may still be leaving the cgroup.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A block device of this host, as `major:minor`: a real one, so that only
/// the device program stands between the process and it.
fn host_block_device() -> String {
    let mut devs: Vec<String> = std::fs::read_dir("/sys/dev/block")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    devs.into_iter()
        .next()
        .expect("a block device under /sys/dev/block")
}

/// Runs a shell that moves itself into `cgroup`, makes a node for the
/// block device `dev` in `dir`, and opens it and `/dev/null` with `dd
/// count=0`, which moves no byte: the open is what the program decides.
fn probe(cgroup: &Path, dir: &Path, dev: &str) -> String {
    let (major, minor) = dev.split_once(':').unwrap();
    let node = dir.join(format!(
        "blk-{}",
        cgroup.file_name().unwrap().to_string_lossy()
    ));
    let script = format!(
        "echo $$ > {procs} || exit 9
         mknod {node} b {major} {minor} && echo mknod ok
         dd if={node} of=/dev/null count=0 2>&1; echo \"block rc=$?\"
         dd if=/dev/null of=/dev/null count=0 2>&1 && echo null ok
         rm -f {node}",
        procs = cgroup.join("cgroup.procs").display(),
        node = node.display(),
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_program_refuses_host_block_devices_and_keeps_dev_null() {
    let dir = tempfile::tempdir().unwrap();
    let dev = host_block_device();

    // Without the program the device opens: this is what a container on
    // cgroup v2 could do before.
    let open = Cgroup::new("open");
    let log = probe(&open.0, dir.path(), &dev);
    assert!(log.contains("mknod ok"), "{log}");
    assert!(log.contains("block rc=0"), "without a program: {log}");
    assert!(log.contains("null ok"), "{log}");

    // What spec.rs gives an unprivileged container, through the bundle file
    // as the runtime helper reads it.
    let deny_all = LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .unwrap();
    let filter = Filter::for_container(&[deny_all]).unwrap();
    let file = dir.path().join(FILE_NAME);
    filter.program().unwrap().save(&file).unwrap();
    let confined = Cgroup::new("confined");
    Program::load(&file).unwrap().attach(&confined.0).unwrap();

    let log = probe(&confined.0, dir.path(), &dev);
    assert!(log.contains("mknod ok"), "mknod stays allowed: {log}");
    assert!(
        log.contains("Operation not permitted") && log.contains("block rc=1"),
        "the block device must be refused: {log}"
    );
    assert!(log.contains("null ok"), "/dev/null must open: {log}");
}

#[test]
fn attach_failures_name_the_cgroup() {
    let deny_all = LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .unwrap();
    let program = Filter::for_container(&[deny_all])
        .unwrap()
        .program()
        .unwrap();

    let missing = unified_root().join("flotilla-test-devices-missing");
    let err = program.attach(&missing).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "opening cgroup {} to attach the device program:",
            missing.display()
        )),
        "{err}"
    );

    // A directory that is no cgroup: the kernel loads the program (the
    // verifier accepts it) but refuses the attachment.
    let dir = tempfile::tempdir().unwrap();
    let err = program.attach(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "attaching the device program to cgroup {} (bpf BPF_PROG_ATTACH):",
            dir.path().display()
        )),
        "{err}"
    );
}
