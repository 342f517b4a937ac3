//! The OCI runtime spec (`config.json`) of one container, built from its
//! [`ContainerConfig`]: Docker-like defaults (namespaces, mounts,
//! capabilities, masked paths) with host networking, the container's
//! resource limits and its bind mounts (volumes).

use std::collections::HashSet;
use std::path::Path;

use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder, get_default_maskedpaths,
    get_default_readonly_paths,
};

use crate::runtime::{ContainerConfig, Mount as BindMount};

mod capabilities;

pub use self::capabilities::{
    capability_mask, check_capabilities, container_capabilities, default_capabilities,
    host_bounding_set,
};

/// Errors building a runtime spec. Each names the field that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// `args` is empty.
    #[error("args: empty, expected at least the executable")]
    NoArgs,
    /// A string holds a NUL byte, which exec cannot pass.
    #[error("{field}: contains a NUL byte")]
    Nul { field: &'static str },
    /// An environment entry is not `KEY=value`.
    #[error("env: {entry:?} is not KEY=value")]
    BadEnv { entry: String },
    /// The command line and environment are too large.
    #[error("args and env: {bytes} bytes, over the {max}-byte limit")]
    TooLarge { bytes: usize, max: usize },
    /// A host path is relative: libcontainer changes the process's working
    /// directory while it starts containers, so only absolute paths are safe.
    #[error("{field}: {path} is not an absolute path")]
    RelativeHostPath { field: &'static str, path: String },
    /// A bind mount's paths are unusable.
    #[error("mounts[{index}]: {reason}")]
    BadMount { index: usize, reason: String },
    /// The working directory is not absolute.
    #[error("cwd: {cwd:?} is not an absolute path")]
    RelativeCwd { cwd: String },
    /// The hostname cannot be set.
    #[error("hostname: {hostname:?} is not a valid hostname (1 to 64 letters, digits, '-' or '.')")]
    BadHostname { hostname: String },
    /// A resource limit is out of range.
    #[error("resources.{field}: {value} is below the minimum {min}")]
    LimitTooLow {
        field: &'static str,
        value: u64,
        min: u64,
    },
    /// A capability the container would get is not in the host's bounding
    /// set, so the kernel would refuse to grant it.
    #[error("capability CAP_{name} is not in the host's capability bounding set")]
    CapabilityUnavailable { name: String },
    /// A capability name this runtime does not know.
    #[error("capability {name:?}: unknown to this runtime")]
    UnknownCapability { name: String },
    /// /proc/self/status could not be read.
    #[error("reading the host capability bounding set from /proc/self/status: {0}")]
    BoundingSet(std::io::Error),
    /// oci-spec refused a value.
    #[error("building the OCI spec: {0}")]
    Oci(#[from] OciSpecError),
}

/// The PATH a process gets when its environment has none (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Cap on args plus env, well under the kernel's own limit for exec.
const MAX_EXEC_BYTES: usize = 256 * 1024;
/// CFS period for CPU limits, in microseconds.
const CPU_PERIOD: u64 = 100_000;
/// The kernel refuses CFS quotas under 1 ms; like the kubelet, smaller CPU
/// limits are raised to it rather than refused.
const MIN_CPU_QUOTA: i64 = 1_000;
/// Below this the container cannot even exec its process.
const MIN_MEMORY: u64 = 1024 * 1024;

/// Host facts the spec depends on.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    /// The kernel accounts swap: a memory+swap limit can be set.
    pub swap_accounting: bool,
}

/// The environment the process gets: `env` plus a default PATH when it has
/// none, because libcontainer refuses to start a process without one.
pub fn process_env(env: &[String]) -> Vec<String> {
    let mut out = env.to_vec();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    out
}

/// The PATH value of a process environment.
pub fn path_of(env: &[String]) -> &str {
    env.iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// Checks the parts of `config` that do not need the rootfs.
pub fn validate(config: &ContainerConfig) -> Result<(), SpecError> {
    if config.args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    for (field, path) in [
        ("image_rootfs", &config.image_rootfs),
        ("log_path", &config.log_path),
    ] {
        if !path.is_absolute() {
            return Err(SpecError::RelativeHostPath {
                field,
                path: path.display().to_string(),
            });
        }
    }
    let bytes: usize = config
        .args
        .iter()
        .chain(&config.env)
        .map(|s| s.len() + 1)
        .sum();
    if bytes > MAX_EXEC_BYTES {
        return Err(SpecError::TooLarge {
            bytes,
            max: MAX_EXEC_BYTES,
        });
    }
    if config.args.iter().any(|a| a.contains('\0')) {
        return Err(SpecError::Nul { field: "args" });
    }
    for entry in &config.env {
        if entry.contains('\0') {
            return Err(SpecError::Nul { field: "env" });
        }
        if entry.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(SpecError::BadEnv {
                entry: entry.clone(),
            });
        }
    }
    if !config.cwd.starts_with('/') || config.cwd.contains('\0') {
        return Err(SpecError::RelativeCwd {
            cwd: config.cwd.clone(),
        });
    }
    let h = &config.hostname;
    if h.is_empty()
        || h.len() > 64
        || !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(SpecError::BadHostname {
            hostname: h.clone(),
        });
    }
    for (index, m) in config.mounts.iter().enumerate() {
        check_mount(m).map_err(|reason| SpecError::BadMount { index, reason })?;
    }
    if let Some(m) = config.resources.memory_bytes.filter(|m| *m < MIN_MEMORY) {
        return Err(SpecError::LimitTooLow {
            field: "memory_bytes",
            value: m,
            min: MIN_MEMORY,
        });
    }
    if config.resources.pids == Some(0) {
        return Err(SpecError::LimitTooLow {
            field: "pids",
            value: 0,
            min: 1,
        });
    }
    Ok(())
}

/// Checks that every mount's source exists: libcontainer's own error for a
/// missing one names neither the mount nor the path.
pub fn check_mount_sources(config: &ContainerConfig) -> Result<(), SpecError> {
    for (index, m) in config.mounts.iter().enumerate() {
        if let Err(e) = std::fs::metadata(&m.source) {
            return Err(SpecError::BadMount {
                index,
                reason: format!("source {}: {e}", m.source.display()),
            });
        }
    }
    Ok(())
}

/// Absolute paths on both sides, without NUL or `..`: libcontainer resolves
/// the destination inside the rootfs, but a `..` is never what was meant.
fn check_mount(m: &BindMount) -> Result<(), String> {
    let source = m.source.to_str().unwrap_or_default();
    for (side, path) in [("source", source), ("destination", m.destination.as_str())] {
        if !path.starts_with('/') {
            return Err(format!("{side} {path:?} is not an absolute path"));
        }
        if path.contains('\0') || path.split('/').any(|c| c == "..") {
            return Err(format!("{side} {path:?} holds NUL or \"..\""));
        }
    }
    if m.destination.trim_end_matches('/').is_empty() {
        return Err("destination \"/\" would hide the root filesystem".to_owned());
    }
    Ok(())
}

/// Builds the spec. `cgroups_path` is absolute within each hierarchy;
/// `config` must have passed [`validate`].
pub fn build(
    config: &ContainerConfig,
    cgroups_path: &str,
    caps: &[Capability],
    host: Host,
) -> Result<Spec, SpecError> {
    let privileged = config.security.privileged;
    let cap_set: HashSet<Capability> = caps.iter().copied().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(cap_set.clone())
        .effective(cap_set.clone())
        .permitted(cap_set)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(config.uid)
                .gid(config.gid)
                .build()?,
        )
        .args(config.args.clone())
        .env(process_env(&config.env))
        .cwd(config.cwd.clone())
        // Like Docker's --privileged, a privileged container may gain
        // privileges through setuid files.
        .no_new_privileges(!privileged)
        .capabilities(capabilities)
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .hard(1024u64)
                .soft(1024u64)
                .build()?,
        ])
        .build()?;

    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<Vec<_>, _>>()?;

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        // Deny every device, then libcgroups allows its default set; a
        // privileged container may use every device.
        LinuxDeviceCgroupBuilder::default()
            .allow(privileged)
            .access("rwm")
            .build()?,
    ]);
    let limits = &config.resources;
    if let Some(bytes) = limits.memory_bytes {
        let limit = i64::try_from(bytes).unwrap_or(i64::MAX);
        let mut memory = LinuxMemoryBuilder::default().limit(limit);
        if host.swap_accounting {
            // memory+swap equal to memory: no swap at all.
            memory = memory.swap(limit);
        }
        resources = resources.memory(memory.build()?);
    }
    if let Some(millis) = limits.cpu_millis {
        let quota = (i64::from(millis) * 100).max(MIN_CPU_QUOTA);
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD)
                .build()?,
        );
    }
    if let Some(pids) = limits.pids {
        resources = resources.pids(LinuxPidsBuilder::default().limit(i64::from(pids)).build()?);
    }

    let (masked, readonly) = if privileged {
        (Vec::new(), Vec::new())
    } else {
        let mut masked = get_default_maskedpaths();
        masked.push("/proc/interrupts".into());
        masked.push("/sys/devices/virtual/powercap".into());
        (masked, get_default_readonly_paths())
    };

    let linux = LinuxBuilder::default()
        .cgroups_path(cgroups_path)
        .namespaces(namespaces)
        .resources(resources.build()?)
        .masked_paths(masked)
        .readonly_paths(readonly)
        .build()?;

    Ok(SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(config.security.read_only_root_filesystem)
                .build()?,
        )
        .hostname(config.hostname.clone())
        .process(process)
        .mounts(mounts(&config.mounts, privileged)?)
        .linux(linux)
        .build()?)
}

/// The standard mounts, plus the host's resolver files read-only since the
/// container shares the host's network, as `docker --network host` does,
/// then the container's bind mounts (after `/dev` and the rest, so that a
/// volume can be mounted below them). `/sys` is read-only unless the
/// container is privileged, as in Docker.
fn mounts(binds: &[BindMount], privileged: bool) -> Result<Vec<Mount>, SpecError> {
    let m = |dest: &str, typ: &str, source: &str, opts: &[&str]| {
        MountBuilder::default()
            .destination(dest)
            .typ(typ)
            .source(source)
            .options(opts.iter().map(|o| o.to_string()).collect::<Vec<_>>())
            .build()
    };
    let mut out = vec![
        m("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        m(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        m(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        m(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        m(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        m(
            "/sys",
            "sysfs",
            "sysfs",
            &[
                "nosuid",
                "noexec",
                "nodev",
                if privileged { "rw" } else { "ro" },
            ],
        )?,
    ];
    for file in ["/etc/resolv.conf", "/etc/hosts"] {
        if Path::new(file).is_file() {
            out.push(m(
                file,
                "bind",
                file,
                &["rbind", "ro", "nosuid", "nodev", "noexec"],
            )?);
        }
    }
    for b in binds {
        // Read-only mounts are not recursive: `ro` applies to the top mount
        // only, and a writable mount below the source must not show through.
        let mut opts = if b.read_only {
            vec!["bind", "ro"]
        } else {
            vec!["rbind", "rw"]
        };
        if b.agent_owned {
            opts.extend(["nosuid", "nodev"]);
        }
        let source = b.source.to_str().ok_or_else(|| SpecError::BadMount {
            index: 0,
            reason: format!("source {} is not UTF-8", b.source.display()),
        })?;
        out.push(m(&b.destination, "bind", source, &opts)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use flotilla_proto::Resources;

    use super::*;

    fn config() -> ContainerConfig {
        ContainerConfig {
            id: "web.app.1".into(),
            image_rootfs: PathBuf::from("/img"),
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["A=b".into()],
            cwd: "/".into(),
            uid: 1000,
            gid: 1001,
            hostname: "web".into(),
            resources: Resources {
                cpu_millis: Some(250),
                memory_bytes: Some(64 << 20),
                pids: Some(32),
            },
            log_path: PathBuf::from("/tmp/log"),
            mounts: vec![
                BindMount {
                    source: PathBuf::from("/srv/data"),
                    destination: "/data".into(),
                    read_only: false,
                    agent_owned: false,
                },
                BindMount {
                    source: PathBuf::from("/var/lib/flotilla/pods/web/config/conf"),
                    destination: "/etc/app".into(),
                    read_only: true,
                    agent_owned: true,
                },
            ],
            security: Default::default(),
        }
    }

    #[test]
    fn spec_carries_process_and_limits() {
        let spec = build(
            &config(),
            "/flotilla/n/web.app.1",
            &default_capabilities(),
            Host {
                swap_accounting: true,
            },
        )
        .unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.user().uid(), 1000);
        assert_eq!(p.user().gid(), 1001);
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"A=b".to_string()));
        assert!(env.contains(&format!("PATH={DEFAULT_PATH}")));
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p.capabilities().as_ref().unwrap();
        assert!(
            caps.bounding()
                .as_ref()
                .unwrap()
                .contains(&Capability::NetRaw)
        );
        assert!(
            !caps
                .bounding()
                .as_ref()
                .unwrap()
                .contains(&Capability::SysAdmin)
        );

        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/flotilla/n/web.app.1"))
        );
        let ns: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert!(!ns.contains(&LinuxNamespaceType::Network));
        assert!(ns.contains(&LinuxNamespaceType::Pid));
        let r = linux.resources().as_ref().unwrap();
        let cpu = r.cpu().as_ref().unwrap();
        assert_eq!((cpu.quota(), cpu.period()), (Some(25_000), Some(100_000)));
        let mem = r.memory().as_ref().unwrap();
        assert_eq!((mem.limit(), mem.swap()), (Some(64 << 20), Some(64 << 20)));
        assert_eq!(r.pids().as_ref().unwrap().limit(), 32);
        assert!(spec.mounts().as_ref().unwrap().iter().any(|m| {
            m.destination() == Path::new("/sys")
                && m.options().as_ref().unwrap().contains(&"ro".to_string())
        }));
        let binds: Vec<_> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|m| m.typ().as_deref() == Some("bind"))
            .filter(|m| {
                !["/etc/hosts", "/etc/resolv.conf"].contains(&m.destination().to_str().unwrap())
            })
            .map(|m| {
                (
                    m.destination().display().to_string(),
                    m.source().as_ref().unwrap().display().to_string(),
                    m.options().as_ref().unwrap().join(","),
                )
            })
            .collect();
        assert_eq!(
            binds,
            [
                ("/data".into(), "/srv/data".into(), "rbind,rw".into()),
                (
                    "/etc/app".into(),
                    "/var/lib/flotilla/pods/web/config/conf".into(),
                    "bind,ro,nosuid,nodev".into()
                ),
            ] as [(String, String, String); 2]
        );
    }

    #[test]
    fn privileged_containers_lose_the_hardening() {
        let host = Host {
            swap_accounting: false,
        };
        let hardened = build(&config(), "/x/y", &default_capabilities(), host).unwrap();
        let mut c = config();
        c.security.privileged = true;
        c.security.read_only_root_filesystem = true;
        let open = build(&c, "/x/y", &default_capabilities(), host).unwrap();
        let facts = |spec: &Spec| {
            let linux = spec.linux().as_ref().unwrap();
            let devices = linux
                .resources()
                .as_ref()
                .unwrap()
                .devices()
                .as_ref()
                .unwrap();
            let sys = spec
                .mounts()
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.destination() == Path::new("/sys"))
                .unwrap()
                .options()
                .as_ref()
                .unwrap()
                .contains(&"ro".to_string());
            (
                linux.masked_paths().as_ref().unwrap().is_empty(),
                linux.readonly_paths().as_ref().unwrap().is_empty(),
                devices[0].allow(),
                spec.process().as_ref().unwrap().no_new_privileges(),
                spec.root().as_ref().unwrap().readonly(),
                sys,
            )
        };
        assert_eq!(
            facts(&hardened),
            (false, false, false, Some(true), Some(false), true)
        );
        assert_eq!(
            facts(&open),
            (true, true, true, Some(false), Some(true), false)
        );
    }

    #[test]
    fn tiny_cpu_limits_are_raised_to_the_kernel_minimum() {
        let mut c = config();
        c.resources.cpu_millis = Some(1);
        let spec = build(
            &c,
            "/x/y",
            &[],
            Host {
                swap_accounting: false,
            },
        )
        .unwrap();
        let r = spec.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(1_000));
        assert_eq!(r.memory().as_ref().unwrap().swap(), None);
    }

    #[test]
    fn validation_names_the_bad_field() {
        type Edit = fn(&mut ContainerConfig);
        let cases: [(Edit, &str); 11] = [
            (
                |c| c.mounts[0].source = "srv".into(),
                "mounts[0]: source \"srv\" is not an absolute path",
            ),
            (
                |c| c.mounts[1].destination = "/etc/../x".into(),
                "mounts[1]: destination \"/etc/../x\" holds NUL or \"..\"",
            ),
            (
                |c| c.mounts[1].destination = "//".into(),
                "mounts[1]: destination \"/\"",
            ),
            (
                |c| c.log_path = "logs/x.log".into(),
                "log_path: logs/x.log is not an absolute path",
            ),
            (|c| c.args.clear(), "args: empty"),
            (
                |c| c.env.push("novalue".into()),
                "env: \"novalue\" is not KEY=value",
            ),
            (
                |c| c.cwd = "srv".into(),
                "cwd: \"srv\" is not an absolute path",
            ),
            (|c| c.hostname = "a b".into(), "hostname: \"a b\""),
            (|c| c.hostname = "x".repeat(65), "hostname:"),
            (
                |c| c.resources.memory_bytes = Some(4096),
                "resources.memory_bytes: 4096 is below the minimum 1048576",
            ),
            (|c| c.resources.pids = Some(0), "resources.pids: 0"),
        ];
        for (edit, want) in cases {
            let mut c = config();
            edit(&mut c);
            let err = validate(&c).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
        validate(&config()).unwrap();
    }
}
