#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The proof on ARM: an emulated aarch64 machine (qemu-system-aarch64, TCG,
//! `virt` board, Cortex-A72) boots Debian's arm64 kernel with pure cgroup v2
//! and an initramfs built here, holding only busybox, the kernel modules it
//! needs, an arm64 busybox image and the cross-built static agent. The agent
//! connects to a controller on this host, runs a real container with its
//! limits in force — memory.max, cpu.max and pids.max read back inside the
//! machine, and a second container over its memory limit is OOM-killed — and
//! both are reported back through `flotilla get pods`.
//!
//! qemu-user cannot do this (its clone refuses CLONE_PARENT): cross_smoke.rs
//! is the quick check. The boot itself takes about 2 s here (TCG, two
//! threads), so this runs with the suite. The kernel and busybox packages
//! are fetched once with `apt-get download` (arm64, into target/cross/arm,
//! never installed). The machine's network is qemu's user-mode one, with no
//! default route: it reaches only the host's loopback, through 10.0.2.2.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use flotilla_testkit::oci::{ImageBuilder, Platform};

/// Boot under TCG is ~20 s; the first container also waits for the unpack.
const T: Duration = Duration::from_secs(240);
/// Loaded in this order (virtio_net needs net_failover needs failover).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_mmio.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "fs/overlayfs/overlay.ko",
];
const APPLETS: &[&str] = &["sh", "sleep", "cat", "echo", "true"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cross_dir() -> PathBuf {
    std::env::var_os("FLOTILLA_CROSS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/cross"))
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cross/build --agent-only aarch64`; the static agent it built.
fn cross_agent() -> PathBuf {
    run(
        "cross/build --agent-only aarch64",
        Command::new(repo().join("cross/build")).args(["--agent-only", "aarch64"]),
    );
    cross_dir().join("dist/aarch64-unknown-linux-musl/flotilla-agent")
}

/// Debian's arm64 kernel (its `Image`, modules) and static busybox, unpacked
/// under `{cross}/arm`; downloaded only the first time.
struct Kit {
    kernel: PathBuf,
    modules: PathBuf,
    busybox: PathBuf,
}

fn kit() -> Kit {
    let base = cross_dir().join("arm");
    let unpacked = base.join("unpacked");
    let find = || -> Option<Kit> {
        let boot = std::fs::read_dir(unpacked.join("boot")).ok()?;
        let kernel = boot
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("/vmlinuz-"))?;
        let release = kernel
            .file_name()?
            .to_str()?
            .strip_prefix("vmlinuz-")?
            .to_owned();
        let modules = unpacked.join("lib/modules").join(release).join("kernel");
        let busybox = unpacked.join("bin/busybox");
        (modules.is_dir() && busybox.is_file()).then_some(Kit {
            kernel,
            modules,
            busybox,
        })
    };
    if let Some(kit) = find() {
        return kit;
    }
    // A private apt state for arm64: the host's sources, nothing installed.
    let apt = base.join("apt");
    for d in ["lists/partial", "cache/archives/partial", "sources"] {
        std::fs::create_dir_all(apt.join(d)).unwrap();
    }
    for entry in std::fs::read_dir("/etc/apt/sources.list.d")
        .unwrap()
        .flatten()
    {
        let name = entry.file_name();
        if name.to_str().unwrap().ends_with(".sources") {
            std::fs::copy(entry.path(), apt.join("sources").join(name)).unwrap();
        }
    }
    if Path::new("/etc/apt/sources.list").exists() {
        std::fs::copy("/etc/apt/sources.list", apt.join("sources/host.list")).unwrap();
    }
    let opts = |cmd: &mut Command| {
        for (k, v) in [
            ("Dir::Etc::SourceList", "/dev/null".into()),
            ("Dir::Etc::SourceParts", apt.join("sources")),
            ("Dir::State::Lists", apt.join("lists")),
            ("Dir::Cache", apt.join("cache")),
            ("Dir::State::status", "/dev/null".into()),
            ("APT::Architecture", "arm64".into()),
            ("APT::Architectures::", "arm64".into()),
            ("APT::Sandbox::User", "root".into()),
        ] {
            cmd.arg("-o").arg(format!("{k}={}", v.display()));
        }
    };
    let mut update = Command::new("apt-get");
    opts(&mut update);
    run("apt-get update (arm64)", update.args(["-qq", "update"]));
    let mut depends = Command::new("apt-cache");
    opts(&mut depends);
    let deps = run(
        "apt-cache depends",
        depends.args(["depends", "linux-image-arm64"]),
    );
    let kernel_pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .unwrap_or_else(|| panic!("no kernel package in: {deps}"))
        .to_owned();
    let debs = base.join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    let mut download = Command::new("apt-get");
    opts(&mut download);
    run(
        "apt-get download",
        download
            .current_dir(&debs)
            .args(["-qq", "download", &kernel_pkg, "busybox-static"]),
    );
    let _ = std::fs::remove_dir_all(&unpacked);
    for deb in std::fs::read_dir(&debs).unwrap().flatten() {
        run(
            "dpkg-deb -x",
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb.path())
                .arg(&unpacked),
        );
    }
    find().expect("the kernel, its modules and busybox after unpacking")
}

/// The machine's PID 1: a tmpfs root, mounts, cgroup v2 with cpu, memory and pids for
/// children, modules, network (host only), then the agent, and every two
/// seconds one line per container cgroup with its limits and processes.
fn init_script(node: &str, broker_port: u16) -> String {
    let modules: Vec<String> = MODULES
        .iter()
        .map(|m| {
            format!(
                "/modules/{}",
                Path::new(m).file_name().unwrap().to_str().unwrap()
            )
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
# pivot_root (which every container start does) refuses the initramfs'
# rootfs as the old root: move into a tmpfs first.
if [ ! -e /.in-tmpfs ]; then
  /bin/busybox mkdir -p /newroot
  /bin/busybox mount -t tmpfs -o size=768m root /newroot
  for f in /*; do
    case $f in /newroot|/proc|/sys|/dev) ;; *) /bin/busybox cp -a $f /newroot/ ;; esac
  done
  /bin/busybox mkdir -p /newroot/proc /newroot/sys /newroot/dev
  /bin/busybox touch /newroot/.in-tmpfs
  exec /bin/busybox switch_root /newroot /init
fi
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t tmpfs data /var/lib/flotilla-agent
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo '+cpu +memory +pids' > /sys/fs/cgroup/cgroup.subtree_control
for m in {modules}; do insmod $m || echo "FLOTILLA-VM: insmod $m failed"; done
hostname {node}
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
echo "FLOTILLA-VM-READY $(uname -m) $(cat /sys/fs/cgroup/cgroup.controllers)"
FLOTILLA_LOG=info /flotilla-agent --broker mqtt://10.0.2.2:{broker_port} --node {node} \
  --label board=qemu-virt --data-dir /var/lib/flotilla-agent --controller-key /etc/controller.pub \
  > /dev/console 2>&1 &
while true; do
  sleep 2
  for d in /sys/fs/cgroup/flotilla/{node}/*/; do
    [ -f "$d/memory.max" ] || continue
    echo "FLOTILLA-CGROUP $(basename $d) memory.max=$(cat $d/memory.max) cpu.max=$(cat $d/cpu.max | tr ' ' /) pids.max=$(cat $d/pids.max) swap.max=$(cat $d/memory.swap.max 2>/dev/null || echo absent) procs=$(wc -l < $d/cgroup.procs)"
  done
done
"#,
        modules = modules.join(" "),
    )
}

/// A gzip'd newc cpio of `staging`, owned by root.
fn pack_initramfs(staging: &Path, out: &Path) {
    run(
        "cpio | gzip",
        Command::new("sh").arg("-c").arg(format!(
            "cd '{}' && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1 > '{}'",
            staging.display(),
            out.display()
        )),
    );
}

fn workload(name: &str, limits: &str, policy: &str, script: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  \
         nodeSelector: {{board: qemu-virt}}\n  restartPolicy: {policy}\n  containers:\n  \
         - name: main\n    image: oci:/images/busybox:latest\n    command: [sh, -c, '{script}']\n    \
         resources:\n      limits: {limits}\n"
    )
}

#[test]
fn emulated_aarch64_machine_runs_a_limited_container_for_the_controller() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let agent_bin = cross_agent();
    let kit = kit();
    let prepared = started.elapsed();

    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("emu-arm64");

    // The initramfs: busybox, modules, the agent, an arm64 busybox image.
    let staging = dir.path().join("initramfs");
    for d in [
        "bin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "modules",
        "images",
        "var/lib/flotilla-agent",
        "etc",
    ] {
        std::fs::create_dir_all(staging.join(d)).unwrap();
    }
    std::fs::copy(&kit.busybox, staging.join("bin/busybox")).unwrap();
    std::fs::copy(&agent_bin, staging.join("flotilla-agent")).unwrap();
    // The agent checks desired state against the controller's pinned key.
    std::fs::copy(
        dir.path().join("controller/signing.pub"),
        staging.join("etc/controller.pub"),
    )
    .unwrap();
    for m in MODULES {
        let name = Path::new(m).file_name().unwrap();
        std::fs::copy(kit.modules.join(m), staging.join("modules").join(name)).unwrap();
    }
    let init = staging.join("init");
    std::fs::write(&init, init_script(&node, controller.mqtt_port)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut image = ImageBuilder::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("tmp", 0o1777)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("dev", 0o755)
        .host_file("bin/busybox", &kit.busybox, 0o755)
        .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644)
        .file("etc/group", "root:x:0:\n", 0o644);
    for applet in APPLETS {
        image = image.symlink(&format!("bin/{applet}"), "busybox");
    }
    image
        .env(&["PATH=/bin"])
        .platform(Platform::linux("arm64", None))
        .write_layout(&staging.join("images/busybox"), "latest")
        .unwrap();
    let initrd = dir.path().join("initrd.gz");
    pack_initramfs(&staging, &initrd);

    let console = dir.path().join("console.log");
    let mut qemu = Command::new("qemu-system-aarch64");
    qemu.args([
        "-M",
        "virt",
        "-cpu",
        "cortex-a72",
        "-smp",
        "2",
        "-m",
        "1024",
    ])
    .args([
        "-accel",
        "tcg,thread=multi",
        "-display",
        "none",
        "-monitor",
        "none",
    ])
    .args(["-no-reboot", "-kernel"])
    .arg(&kit.kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args([
        "-append",
        "console=ttyAMA0 rdinit=/init panic=-1 cgroup_no_v1=all loglevel=4",
    ])
    .args([
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-device,netdev=n0",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .stdin(Stdio::null());
    let boot = Instant::now();
    let vm = Proc::spawn(&mut qemu, dir.path().join("qemu.log"));
    let logs = [
        controller.proc.log.as_path(),
        vm.log.as_path(),
        console.as_path(),
    ];
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();

    let ready = wait_for("the emulated machine to boot", T, &logs, || {
        console_text()
            .lines()
            .find(|l| l.starts_with("FLOTILLA-VM-READY"))
            .map(str::to_owned)
    });
    let booted = boot.elapsed();
    assert!(ready.contains(" aarch64 "), "{ready}");
    for controller_name in ["cpu", "memory", "pids"] {
        assert!(
            ready.split_whitespace().any(|w| w == controller_name),
            "cgroup v2 controller {controller_name} missing: {ready}"
        );
    }
    assert!(
        !console_text().contains("insmod"),
        "a module failed to load"
    );

    wait_for("the emulated node to be Ready", T, &logs, || {
        let n = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
        (n["status"] == "Ready" && n["arch"] == "arm64").then_some(())
    });
    let registered = boot.elapsed();

    let out = controller.apply(
        dir.path(),
        &format!(
            "{}---\n{}",
            workload(
                "limited",
                "{cpu: 250m, memory: 32Mi, pids: 20}",
                "Always",
                "echo up; exec sleep 3600"
            ),
            workload(
                "hog",
                "{memory: 16Mi}",
                "Never",
                "x=aaaaaaaa; while true; do x=$x$x; done"
            ),
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = Instant::now();

    wait_for("the limited pod to be Running", T, &logs, || {
        let p = controller.pod(&format!("limited@{node}"))?;
        (p["phase"] == "Running" && p["containers"][0]["state"] == "Running").then_some(())
    });
    let running = applied.elapsed();
    // Inside the machine: the container's own cgroup, its limits, its process.
    // libcontainer leaves swap unlimited when it equals the memory limit;
    // the runtime closes it on cgroup v2. The machine prints the cgroup
    // every few seconds: wait for a line written after the limits were set.
    let wants = [
        "memory.max=33554432",
        "cpu.max=25000/100000",
        "pids.max=20",
        "swap.max=0",
        "procs=1",
    ];
    let last_line = || {
        console_text()
            .lines()
            .rev()
            .find(|l| l.starts_with("FLOTILLA-CGROUP limited."))
            .map(str::to_owned)
    };
    let limited = wait_for("the limited container's cgroup limits", T, &logs, || {
        let line = last_line()?;
        wants
            .iter()
            .all(|want| line.split_whitespace().any(|w| w == *want))
            .then_some(line)
    });
    let hog = wait_for("the hog to be OOM-killed", T, &logs, || {
        let p = controller.pod(&format!("hog@{node}"))?;
        (p["phase"] == "Failed").then_some(p)
    });
    assert_eq!(hog["containers"][0]["reason"], "OOMKilled", "{hog}");
    assert_eq!(hog["containers"][0]["exitCode"], 137, "{hog}");

    println!(
        "emulated aarch64: prepared in {prepared:.1?}, booted in {booted:.1?}, node Ready \
         {registered:.1?} after qemu started, pod Running {running:.1?} after apply; {limited}"
    );
}
