//! The host's cgroup hierarchies as the runtime needs them beyond what
//! libcontainer does: where a container's cgroup lives in each, its OOM-kill
//! counter, the v2 swap limit, which hierarchy controls devices, and
//! removing it with the empty parents that libcontainer leaves behind.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors from the cgroup helpers.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(io::Error),
    /// No cgroup filesystem is mounted.
    #[error("no cgroup hierarchy is mounted (expected cgroup v1 or v2 under /sys/fs/cgroup)")]
    NoCgroups,
    /// A cgroup directory could not be removed.
    #[error("removing cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    /// A cgroup file could not be written.
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The mounted cgroup hierarchies, found once at start.
#[derive(Debug, Clone)]
pub struct Hierarchies {
    /// Every cgroup v1 mount point (one per controller set, plus named ones).
    v1: Vec<PathBuf>,
    /// The v1 hierarchy holding the memory controller, if any.
    v1_memory: Option<PathBuf>,
    /// A v1 hierarchy holds the devices controller.
    v1_devices: bool,
    /// The cgroup2 mount point, if any (on hybrid hosts it may hold no
    /// controllers).
    unified: Option<PathBuf>,
}

/// How long a cgroup may stay busy after its last process exited.
const REMOVE_PATIENCE: Duration = Duration::from_secs(5);

impl Hierarchies {
    /// Reads the cgroup mounts from `/proc/self/mountinfo`.
    pub fn detect() -> Result<Self, CgroupError> {
        let text =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
        let found = Self::parse(&text);
        if found.v1.is_empty() && found.unified.is_none() {
            return Err(CgroupError::NoCgroups);
        }
        Ok(found)
    }

    fn parse(mountinfo: &str) -> Self {
        let mut v1 = Vec::new();
        let mut v1_memory = None;
        let mut v1_devices = false;
        let mut unified = None;
        for line in mountinfo.lines() {
            // `id parent maj:min root mountpoint options [optional...] - fstype source superoptions`
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let fstype = right.next().unwrap_or_default();
            let super_options = right.nth(1).unwrap_or_default();
            let path = PathBuf::from(unescape(mount_point));
            match fstype {
                "cgroup" => {
                    if super_options.split(',').any(|o| o == "memory") {
                        v1_memory = Some(path.clone());
                    }
                    v1_devices |= super_options.split(',').any(|o| o == "devices");
                    v1.push(path);
                }
                "cgroup2" => unified = Some(path),
                _ => {}
            }
        }
        Self {
            v1,
            v1_memory,
            v1_devices,
            unified,
        }
    }

    /// Every hierarchy root, v1 and v2.
    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        self.v1
            .iter()
            .map(PathBuf::as_path)
            .chain(self.unified.as_deref())
    }

    /// Whether memory is limited through cgroup v2 (no v1 memory controller).
    pub fn memory_on_v2(&self) -> bool {
        self.v1_memory.is_none() && self.unified.is_some()
    }

    /// The cgroup v2 root when device access is controlled there (no v1
    /// `devices` controller): by a BPF program per cgroup, which the
    /// runtime attaches itself.
    pub fn devices_on_v2(&self) -> Option<&Path> {
        self.unified.as_deref().filter(|_| !self.v1_devices)
    }

    /// Whether the kernel accounts swap, so a memory+swap limit can be set.
    pub fn swap_accounting(&self) -> bool {
        match (&self.v1_memory, &self.unified) {
            (Some(memory), _) => memory.join("memory.memsw.limit_in_bytes").exists(),
            (None, Some(unified)) => unified.join("cgroup.controllers").exists(),
            (None, None) => false,
        }
    }

    /// How many processes the OOM killer has killed in the cgroup `rel`
    /// (relative to each hierarchy root); `None` when that cannot be read,
    /// e.g. the cgroup is gone.
    pub fn oom_kills(&self, rel: &Path) -> Option<u64> {
        let (file, key) = match (&self.v1_memory, &self.unified) {
            (Some(memory), _) => (memory.join(rel).join("memory.oom_control"), "oom_kill"),
            (None, Some(unified)) => (unified.join(rel).join("memory.events"), "oom_kill"),
            (None, None) => return None,
        };
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// On cgroup v2, forbids swap for the cgroup `rel`: libcgroups skips the
    /// write when swap equals the memory limit, which leaves swap unlimited.
    pub fn forbid_swap_v2(&self, rel: &Path) -> Result<(), CgroupError> {
        let Some(unified) = self.unified.as_ref().filter(|_| self.memory_on_v2()) else {
            return Ok(());
        };
        let path = unified.join(rel).join("memory.swap.max");
        if !path.exists() {
            // No swap controller: swap is not possible anyway.
            return Ok(());
        }
        std::fs::write(&path, "0").map_err(|source| CgroupError::Write { path, source })
    }

    /// Removes `{parent}/{id}` from every hierarchy, then every directory of
    /// `parent` it leaves empty. Missing directories are fine; a parent that
    /// still holds other containers is kept.
    pub fn remove(&self, parent: &Path, id: &str) -> Result<(), CgroupError> {
        for root in self.roots() {
            let dir = root.join(parent).join(id);
            remove_dir_patiently(&dir)?;
            let mut up = dir.parent();
            while let Some(p) = up {
                if p == root || !p.starts_with(root) {
                    break;
                }
                match std::fs::remove_dir(p) {
                    Ok(()) => {}
                    // Siblings remain (or another hierarchy already removed it).
                    Err(_) => break,
                }
                up = p.parent();
            }
        }
        Ok(())
    }
}

/// `rmdir` of a cgroup, retried while the kernel still holds it busy (the
/// last task may be exiting).
fn remove_dir_patiently(dir: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + REMOVE_PATIENCE;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(b) = u8::try_from(value) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 24 0:35 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
41 40 0:36 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
42 40 0:37 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
43 40 0:38 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
44 40 0:39 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
45 30 0:50 / /mnt/with\\040space rw - cgroup cgroup rw,pids
";

    #[test]
    fn finds_v1_and_v2_hierarchies() {
        let h = Hierarchies::parse(HYBRID);
        let roots: Vec<_> = h.roots().map(Path::to_path_buf).collect();
        assert_eq!(
            roots,
            [
                "/sys/fs/cgroup/cpu",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/systemd",
                "/mnt/with space",
                "/sys/fs/cgroup/unified"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(h.v1_memory, Some(PathBuf::from("/sys/fs/cgroup/memory")));
        assert!(!h.memory_on_v2());
        // No v1 devices controller: the device programs go to cgroup v2.
        assert_eq!(h.devices_on_v2(), Some(Path::new("/sys/fs/cgroup/unified")));
        let with_devices =
            format!("{HYBRID}46 40 0:40 / /sys/fs/cgroup/devices rw - cgroup cgroup rw,devices\n");
        assert_eq!(Hierarchies::parse(&with_devices).devices_on_v2(), None);

        let v2 = Hierarchies::parse("1 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert!(v2.memory_on_v2());
        assert_eq!(v2.devices_on_v2(), Some(Path::new("/sys/fs/cgroup")));
        assert_eq!(v2.roots().count(), 1);
    }

    #[test]
    fn removes_the_container_and_its_empty_parents_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("memory");
        std::fs::create_dir_all(root.join("flotilla/node/a")).unwrap();
        std::fs::create_dir_all(root.join("flotilla/node/b")).unwrap();
        let h = Hierarchies {
            v1: vec![root.clone()],
            v1_memory: Some(root.clone()),
            v1_devices: false,
            unified: None,
        };
        h.remove(Path::new("flotilla/node"), "a").unwrap();
        assert!(!root.join("flotilla/node/a").exists());
        assert!(root.join("flotilla/node/b").exists());
        h.remove(Path::new("flotilla/node"), "b").unwrap();
        assert!(!root.join("flotilla").exists());
        assert!(root.exists());
        // Nothing left to remove is not an error.
        h.remove(Path::new("flotilla/node"), "b").unwrap();
    }

    #[test]
    fn reads_oom_counters() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p/c");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        let h = Hierarchies {
            v1: vec![tmp.path().to_path_buf()],
            v1_memory: Some(tmp.path().to_path_buf()),
            v1_devices: false,
            unified: None,
        };
        assert_eq!(h.oom_kills(Path::new("p/c")), Some(2));
        assert_eq!(h.oom_kills(Path::new("p/gone")), None);
    }
}
