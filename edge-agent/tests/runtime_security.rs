//! Container hardening seen from inside real containers: the seccomp filter
//! (Docker's default profile) on the container and on commands exec'd into
//! it, the device cgroup allowlist, and the capability sets. Needs root,
//! namespaces, overlayfs and cgroups, as the agent does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_agent::runtime::youki::{YoukiRuntime, capability_mask, default_capabilities};
use flotilla_agent::runtime::{ContainerConfig, Exit, Runtime};
use flotilla_proto::Resources;
use tempfile::TempDir;

mod common;
use common::{busybox_rootfs, unique_cgroup_parent, youki_runtime};

const DEADLINE: Duration = Duration::from_secs(30);

/// Applets these tests need besides the common ones.
const MORE_APPLETS: &[&str] = &["unshare", "mknod", "wget", "dd"];

struct Fixture {
    rt: YoukiRuntime,
    dir: TempDir,
    image: PathBuf,
    ids: std::sync::Mutex<Vec<String>>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = busybox_rootfs(dir.path());
        for applet in MORE_APPLETS {
            symlink("busybox", image.join("bin").join(applet)).unwrap();
        }
        let rt = youki_runtime(dir.path(), &unique_cgroup_parent("sec"));
        Self {
            rt,
            dir,
            image,
            ids: Default::default(),
        }
    }

    fn config(&self, id: &str, script: &str) -> ContainerConfig {
        ContainerConfig {
            id: id.into(),
            image_rootfs: self.image.clone(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "box".into(),
            resources: Resources::default(),
            log_path: self.dir.path().join("logs").join(format!("{id}.log")),
            mounts: vec![],
            security: Default::default(),
        }
    }

    /// Runs `config` to its end: its exit and its output.
    async fn run(&self, config: &ContainerConfig) -> (Exit, String) {
        self.ids.lock().unwrap().push(config.id.clone());
        self.rt.start(config).unwrap();
        let exit = tokio::time::timeout(DEADLINE, self.rt.wait(&config.id))
            .await
            .unwrap_or_else(|_| panic!("{} still runs after {DEADLINE:?}", config.id))
            .unwrap();
        let log = std::fs::read_to_string(&config.log_path).unwrap_or_default();
        (exit, log)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for id in self.ids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Err(e) = self.rt.delete(id) {
                eprintln!("cleanup of {id} failed: {e}");
            }
        }
    }
}

/// An HTTP server on 127.0.0.1 answering every request with `body`.
fn http_server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// The value of `key` (e.g. `CapEff`) in a /proc/PID/status dump.
fn status_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
}

/// A block device of this host, as `(major, minor)`: a real one, so that
/// only the device cgroup stands between a container and it. The tests
/// open it without reading or writing a byte.
fn host_block_device() -> (u32, u32) {
    let mut devs: Vec<String> = std::fs::read_dir("/sys/dev/block")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    let first = devs.first().map_or("8:0", String::as_str);
    let (major, minor) = first.split_once(':').unwrap();
    (major.parse().unwrap(), minor.parse().unwrap())
}

#[tokio::test]
async fn seccomp_denies_what_dockers_profile_denies() {
    let f = Fixture::new();
    let port = http_server("hello from the host");
    // unshare(CLONE_NEWUSER) needs no capability: only the filter can
    // refuse it (the host allows it: checked below).
    let script = format!(
        "grep '^Seccomp:' /proc/self/status
         unshare -U true; echo \"unshare rc=$?\"
         ls /bin >/dev/null && cat /etc/passwd >/dev/null && sleep 0.1 && echo ordinary ok
         wget -q -O - http://127.0.0.1:{port}/; echo; echo \"wget rc=$?\""
    );
    let (exit, log) = f.run(&f.config("sec.seccomp.1", &script)).await;
    assert_eq!(exit.code, 0, "{log}");
    assert_eq!(
        status_field(&log, "Seccomp").as_deref(),
        Some("2"),
        "filter mode: {log}"
    );
    assert!(log.contains("unshare rc=1"), "{log}");
    assert!(
        log.contains("unshare(0x10000000): Operation not permitted"),
        "{log}"
    );
    assert!(log.contains("ordinary ok"), "{log}");
    assert!(log.contains("hello from the host"), "{log}");
    assert!(log.contains("wget rc=0"), "{log}");

    // The same call from the host succeeds: the refusal above is the filter.
    let host = std::process::Command::new("/bin/busybox")
        .args(["unshare", "-U", "true"])
        .status()
        .unwrap();
    assert!(host.success(), "unshare -U fails on the host too: {host}");
}

#[tokio::test]
async fn commands_execed_into_a_container_get_its_filter() {
    let f = Fixture::new();
    let config = f.config("sec.exec.1", "sleep 300");
    f.ids.lock().unwrap().push(config.id.clone());
    f.rt.start(&config).unwrap();
    let script = "grep -q '^Seccomp:[[:space:]]*2$' /proc/self/status || exit 3
                  unshare -U true 2>/dev/null && exit 4
                  exit 0";
    let argv: Vec<String> = ["sh", "-c", script].map(String::from).to_vec();
    let (rt, id) = (f.rt.clone(), config.id.clone());
    let code = tokio::task::spawn_blocking(move || rt.exec(&id, &argv, DEADLINE))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 0, "3: no filter; 4: unshare -U allowed");
}

#[tokio::test]
async fn devices_outside_the_allowlist_are_refused() {
    let f = Fixture::new();
    let (major, minor) = host_block_device();
    // dd with count=0 opens the device and moves no byte: the open is what
    // the device cgroup checks.
    let script = format!(
        "mknod /dev/sda b {major} {minor} && echo mknod ok
         dd if=/dev/sda of=/dev/null count=0 2>&1; echo \"read rc=$?\"
         dd if=/dev/zero of=/dev/sda count=0 2>&1; echo \"write rc=$?\"
         echo x > /dev/null && echo null ok
         echo x > /dev/zero && echo zero ok
         echo x > /dev/urandom && echo urandom ok
         head -c 4 /dev/urandom | wc -c
         echo x 2>&1 > /dev/tty; echo \"tty rc=$?\"
         echo \"timer_list bytes $(head -c 10 /proc/timer_list | wc -c)\""
    );
    let (exit, log) = f.run(&f.config("sec.devices.1", &script)).await;
    assert_eq!(exit.code, 0, "{log}");
    assert!(log.contains("mknod ok"), "{log}");
    assert!(log.contains("read rc=1"), "{log}");
    assert!(log.contains("write rc=1"), "{log}");
    assert!(
        log.contains("can't open '/dev/sda': Operation not permitted"),
        "the device cgroup, not the driver, refused: {log}"
    );
    for ok in ["null ok", "zero ok", "urandom ok"] {
        assert!(log.contains(ok), "{ok}: {log}");
    }
    assert!(log.lines().any(|l| l.trim() == "4"), "{log}");
    assert!(log.contains("timer_list bytes 0"), "masked: {log}");
    // No controlling terminal, so /dev/tty cannot be opened; but the
    // cgroup allows it, so the error is not EPERM.
    let tty = log
        .lines()
        .filter(|l| l.contains("/dev/tty"))
        .collect::<Vec<_>>();
    assert!(
        !tty.iter().any(|l| l.contains("Operation not permitted")),
        "{log}"
    );
}

#[tokio::test]
async fn capabilities_are_dockers_default_set() {
    let f = Fixture::new();
    let (exit, log) = f
        .run(&f.config("sec.caps.1", "grep '^Cap' /proc/1/status"))
        .await;
    assert_eq!(exit.code, 0, "{log}");
    let want = capability_mask(&default_capabilities());
    // Kernel numbers (linux/capability.h): CAP_CHOWN is 0, CAP_SYS_ADMIN 21.
    assert_eq!(want & 1, 1);
    assert_eq!(want & (1 << 21), 0);
    let field = |key| {
        let hex = status_field(&log, key).unwrap_or_else(|| panic!("no {key}: {log}"));
        u64::from_str_radix(&hex, 16).unwrap()
    };
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(field(key), want, "{key}: {log}");
    }
    for key in ["CapInh", "CapAmb"] {
        assert_eq!(field(key), 0, "{key}: {log}");
    }
}

/// The bounding set of this (root) process: what a privileged container
/// gets.
fn host_bounding_set() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    u64::from_str_radix(&status_field(&status, "CapBnd").unwrap(), 16).unwrap()
}

#[tokio::test]
async fn privileged_containers_get_every_capability_device_and_syscall() {
    let f = Fixture::new();
    let (major, minor) = host_block_device();
    let script = format!(
        "grep -E '^(Seccomp|Cap)' /proc/self/status
         unshare -U true; echo \"unshare rc=$?\"
         mknod /dev/sda b {major} {minor}
         dd if=/dev/sda of=/dev/null count=0 2>&1; echo \"read rc=$?\"
         echo \"timer_list bytes $(head -c 10 /proc/timer_list | wc -c)\""
    );
    let mut config = f.config("sec.privileged.1", &script);
    config.security.privileged = true;
    let (exit, log) = f.run(&config).await;
    assert_eq!(exit.code, 0, "{log}");
    assert_eq!(status_field(&log, "Seccomp").as_deref(), Some("0"), "{log}");
    // Every capability this kernel knows (CAP_LAST_CAP is 40 or less) that
    // the host has: the host's whole bounding set.
    let host = host_bounding_set();
    assert_eq!(host & !((1 << 41) - 1), 0, "a capability past 40: {host:x}");
    let eff = u64::from_str_radix(&status_field(&log, "CapEff").unwrap(), 16).unwrap();
    assert_eq!(eff, host, "{log}");
    assert!(log.contains("unshare rc=0"), "{log}");
    assert!(log.contains("read rc=0"), "{log}");
    assert!(log.contains("timer_list bytes 10"), "nothing masked: {log}");
}

#[tokio::test]
async fn security_contexts_change_one_thing_each() {
    let f = Fixture::new();
    let probe = "grep -E '^(Seccomp|CapEff)' /proc/self/status
                 unshare -U true 2>/dev/null; echo \"unshare rc=$?\"
                 touch /new-file; echo \"touch rc=$?\"";

    let mut unconfined = f.config("sec.unconfined.1", probe);
    unconfined.security.seccomp_unconfined = true;
    let (exit, log) = f.run(&unconfined).await;
    assert_eq!(exit.code, 0, "{log}");
    assert_eq!(status_field(&log, "Seccomp").as_deref(), Some("0"), "{log}");
    let default_mask = capability_mask(&default_capabilities());
    let eff = |log: &str| u64::from_str_radix(&status_field(log, "CapEff").unwrap(), 16).unwrap();
    assert_eq!(eff(&log), default_mask, "capabilities unchanged: {log}");
    assert!(log.contains("unshare rc=0"), "{log}");

    let mut caps = f.config("sec.caps.2", probe);
    caps.security.add_capabilities = vec!["NET_ADMIN".into()];
    caps.security.drop_capabilities = vec!["ALL".into()];
    caps.security.read_only_root_filesystem = true;
    let (exit, log) = f.run(&caps).await;
    assert_eq!(exit.code, 0, "{log}");
    assert_eq!(eff(&log), 1 << 12, "only CAP_NET_ADMIN: {log}");
    assert_eq!(status_field(&log, "Seccomp").as_deref(), Some("2"), "{log}");
    assert!(log.contains("unshare rc=1"), "{log}");
    assert!(log.contains("Read-only file system"), "{log}");
    assert!(log.contains("touch rc=1"), "{log}");
}
