//! The emulated aarch64 machine that tests/tests/arm.rs and the footprint
//! bench (bench/footprint/arm-memory) boot: qemu-system-aarch64 (TCG,
//! `virt` board, Cortex-A72) with Debian's arm64 kernel, pure cgroup v2 and
//! an initramfs built here holding only busybox, the kernel modules it
//! needs, an arm64 busybox image (`oci:/images/busybox:latest`) and the
//! cross-built static agent, which connects to a controller on the host.
//!
//! The kernel and busybox packages are fetched once with `apt-get download`
//! (arm64, into `{cross}/arm`, never installed). The machine's network is
//! qemu's user-mode one with no default route: it reaches only the host's
//! loopback, as 10.0.2.2. What the machine's PID 1 runs once the agent is
//! started is the caller's (`Guest::then`): the test prints cgroups to the
//! serial console, the bench answers memory snapshots over TCP.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::oci::{ImageBuilder, Platform};

/// Loaded in this order (virtio_net needs net_failover needs failover).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_mmio.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "fs/overlayfs/overlay.ko",
];

/// The applets of the busybox image the machine's containers run.
const APPLETS: &[&str] = &["sh", "sleep", "cat", "echo", "true", "mknod", "dd"];

/// The workspace root.
pub fn repo() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

/// Where cross/build puts its size-tuned output (`FLOTILLA_CROSS_DIR`,
/// else `target/cross`): what the footprint bench measures.
pub fn cross_dir() -> PathBuf {
    std::env::var_os("FLOTILLA_CROSS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/cross"))
}

/// The size-tuned static aarch64 agent cross/build leaves (built or not).
pub fn agent_path() -> PathBuf {
    cross_dir().join(AARCH64_AGENT)
}

/// Runs `cross/build --stable --agent-only aarch64` — what scripts/test
/// builds before the tests, so this is a no-op there — and returns the
/// static agent it built (under `target/cross-stable`, apart from the
/// bench's size-tuned build). The tests check behaviour; the stable
/// toolchain is the one a fresh machine has.
pub fn cross_agent() -> Result<PathBuf> {
    run(
        "cross/build --stable --agent-only aarch64",
        Command::new(repo().join("cross/build")).args(["--stable", "--agent-only", "aarch64"]),
    )?;
    let dir = std::env::var_os("FLOTILLA_CROSS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/cross-stable"));
    Ok(dir.join(AARCH64_AGENT))
}

const AARCH64_AGENT: &str = "dist/aarch64-unknown-linux-musl/flotilla-agent";

fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Debian's arm64 kernel (its `Image`), its modules and static busybox,
/// unpacked under `{cross}/arm`.
#[derive(Debug, Clone)]
pub struct Kit {
    pub kernel: PathBuf,
    pub modules: PathBuf,
    pub busybox: PathBuf,
}

impl Kit {
    /// The kit, downloaded and unpacked the first time.
    pub fn fetch() -> Result<Kit> {
        let base = cross_dir().join("arm");
        let unpacked = base.join("unpacked");
        if let Some(kit) = Self::find(&unpacked) {
            return Ok(kit);
        }
        download(&base)?;
        let _ = fs::remove_dir_all(&unpacked);
        for deb in fs::read_dir(base.join("debs"))?.flatten() {
            run(
                "dpkg-deb -x",
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(deb.path())
                    .arg(&unpacked),
            )?;
        }
        Self::find(&unpacked).context("no kernel, modules or busybox after unpacking")
    }

    fn find(unpacked: &Path) -> Option<Kit> {
        let kernel = fs::read_dir(unpacked.join("boot"))
            .ok()?
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
    }
}

/// `apt-get download`s the arm64 kernel and busybox-static into
/// `{base}/debs`, with a private apt state: the host's sources, nothing
/// installed.
fn download(base: &Path) -> Result<()> {
    let apt = base.join("apt");
    for d in ["lists/partial", "cache/archives/partial", "sources"] {
        fs::create_dir_all(apt.join(d))?;
    }
    for entry in fs::read_dir("/etc/apt/sources.list.d")?.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".sources") {
            fs::copy(entry.path(), apt.join("sources").join(name))?;
        }
    }
    if Path::new("/etc/apt/sources.list").exists() {
        fs::copy("/etc/apt/sources.list", apt.join("sources/host.list"))?;
    }
    let apt_command = |program: &str| {
        let mut cmd = Command::new(program);
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
        cmd
    };
    run(
        "apt-get update (arm64)",
        apt_command("apt-get").args(["-qq", "update"]),
    )?;
    let deps = run(
        "apt-cache depends",
        apt_command("apt-cache").args(["depends", "linux-image-arm64"]),
    )?;
    let kernel = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("no kernel package in: {deps}"))?
        .to_owned();
    let debs = base.join("debs");
    fs::create_dir_all(&debs)?;
    run(
        "apt-get download",
        apt_command("apt-get").current_dir(&debs).args([
            "-qq",
            "download",
            &kernel,
            "busybox-static",
        ]),
    )?;
    Ok(())
}

/// What the machine runs.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The node name (also the machine's host name).
    pub node: String,
    /// The controller's MQTT port on the host's loopback.
    pub broker_port: u16,
    /// Shell run by PID 1 once the agent is started, for as long as the
    /// machine runs; `$agent` holds the agent's pid.
    pub then: String,
}

impl Guest {
    /// The machine's PID 1: a tmpfs root, mounts, cgroup v2 with cpu, memory
    /// and pids for children, modules, network (the host only), a
    /// `FLOTILLA-VM-READY {arch} {cgroup controllers}` line on the console,
    /// the agent (its output to the console), then [`Guest::then`].
    pub fn init_script(&self) -> String {
        let modules: Vec<String> = MODULES
            .iter()
            .filter_map(|m| Path::new(m).file_name())
            .map(|name| format!("/modules/{}", name.to_string_lossy()))
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
FLOTILLA_LOG=info /flotilla-agent --broker mqtt://10.0.2.2:{port} --node {node} \
  --label board=qemu-virt --data-dir /var/lib/flotilla-agent --controller-key /etc/controller.pub \
  > /dev/console 2>&1 &
agent=$!
{then}
"#,
            modules = modules.join(" "),
            node = self.node,
            port = self.broker_port,
            then = self.then,
        )
    }

    /// Writes the initramfs (a gzip'd newc cpio owned by root) to
    /// `{dir}/initrd.gz`, staged in `{dir}/initramfs`: busybox, the
    /// modules, `agent`, the controller's signing key `controller_key` (the
    /// agent checks desired state against it), the arm64 busybox image and
    /// [`Guest::init_script`] as `/init`.
    pub fn initramfs(
        &self,
        kit: &Kit,
        agent: &Path,
        controller_key: &Path,
        dir: &Path,
    ) -> Result<PathBuf> {
        let staging = dir.join("initramfs");
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
            fs::create_dir_all(staging.join(d))?;
        }
        copy(&kit.busybox, &staging.join("bin/busybox"))?;
        copy(agent, &staging.join("flotilla-agent"))?;
        copy(controller_key, &staging.join("etc/controller.pub"))?;
        for m in MODULES {
            let name = Path::new(m).file_name().context("a module path")?;
            copy(&kit.modules.join(m), &staging.join("modules").join(name))?;
        }
        let init = staging.join("init");
        fs::write(&init, self.init_script())?;
        fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
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
            .write_layout(&staging.join("images/busybox"), "latest")?;
        let initrd = dir.join("initrd.gz");
        run(
            "cpio | gzip",
            Command::new("sh").arg("-c").arg(format!(
                "cd '{}' && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1 > '{}'",
                staging.display(),
                initrd.display()
            )),
        )?;
        Ok(initrd)
    }
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// The qemu command that boots `initrd` with the kit's kernel: 2 cores
/// (TCG, one host thread each), 1 GiB, serial console to the file
/// `console`, user-mode network.
pub fn qemu(kit: &Kit, initrd: &Path, console: &Path) -> Command {
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
    .args(["-accel", "tcg,thread=multi", "-display", "none"])
    .args(["-monitor", "none", "-no-reboot", "-kernel"])
    .arg(&kit.kernel)
    .arg("-initrd")
    .arg(initrd)
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
    qemu
}
