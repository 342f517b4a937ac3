//! Facts about this device for the status: architecture in OCI terms, CPU
//! count and total memory (from `/proc/meminfo`), boot id; and its health —
//! memory available, disk free under the data directory, load, uptime —
//! sampled by a task that reports it without asking for a status, unless a
//! value crossed a warning level.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_proto::{NodeHealth, NodeInfo};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NodeLabels;
use crate::report::ReportHandle;

/// How often health is sampled. Samples ride along with the next status
/// (the resync at the latest); only a crossed warning level sends one.
pub const HEALTH_EVERY: Duration = Duration::from_secs(60);
/// Below this share of the total (in percent), memory or disk is low.
const LOW_PERCENT: u64 = 10;
/// A low value is cleared only above this share, so a value hovering around
/// the warning level does not send a status at every sample.
const CLEAR_PERCENT: u64 = 12;

/// Why a fact about the node could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NodeInfoError {
    /// `/proc/meminfo` could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// `/proc/meminfo` has no usable `MemTotal:` line.
    #[error("{path}: expected a line \"MemTotal: N kB\"")]
    NoMemTotal { path: String },
    /// A `/proc` file does not hold what it should.
    #[error("{path}: expected {expected}")]
    Parse {
        path: &'static str,
        expected: &'static str,
    },
    /// The data directory's filesystem could not be asked for its size.
    #[error("statvfs {path}: {source}")]
    Statvfs { path: PathBuf, source: nix::Error },
}

/// The agent's version, as reported in presence and status.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Gathers the node's facts. A fact that cannot be read is reported as 0
/// (with a warning) rather than keeping the agent from starting.
pub fn gather(labels: &NodeLabels) -> NodeInfo {
    let memory_bytes = match mem_total(Path::new("/proc/meminfo")) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("node memory unknown: {e}");
            0
        }
    };
    NodeInfo {
        arch: oci_arch(std::env::consts::ARCH).to_owned(),
        os: "linux".to_owned(),
        agent_version: AGENT_VERSION.to_owned(),
        labels: labels.as_slice().to_vec(),
        // available_parallelism follows the CPU affinity mask, which is what
        // containers on this node can actually use.
        cpus: std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1),
        memory_bytes,
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
    }
}

/// Rust's architecture names in the OCI image-spec's terms.
pub fn oci_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
}

/// Samples the node's health. A value that cannot be read is 0 (and logged
/// at debug: it would be logged every minute otherwise).
pub fn health(data_dir: &Path) -> NodeHealth {
    fn or_zero<T: Default>(what: &str, r: Result<T, NodeInfoError>) -> T {
        r.unwrap_or_else(|e| {
            tracing::debug!("node health: {what}: {e}");
            T::default()
        })
    }
    let (disk_free_bytes, disk_total_bytes) = or_zero("disk", disk(data_dir));
    NodeHealth {
        memory_available_bytes: or_zero("memory", mem_available()),
        disk_free_bytes,
        disk_total_bytes,
        load_milli: or_zero("load", read_proc("/proc/loadavg", parse_load)),
        uptime_secs: or_zero("uptime", read_proc("/proc/uptime", parse_uptime)),
    }
}

/// Which warning levels a node is past.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Warnings {
    /// Memory available under 10 % of the total.
    pub memory_low: bool,
    /// Disk free under 10 % of the filesystem.
    pub disk_low: bool,
}

impl Warnings {
    /// The levels `health` is past, given the levels before (hysteresis:
    /// set under 10 %, cleared above 12 %). A value of 0 is unknown, not low.
    pub fn next(self, health: &NodeHealth, memory_total: u64) -> Self {
        let low = |was: bool, value: u64, total: u64| {
            if value == 0 || total == 0 {
                return false;
            }
            let percent = u128::from(value) * 100 / u128::from(total);
            if was {
                percent <= u128::from(CLEAR_PERCENT)
            } else {
                percent < u128::from(LOW_PERCENT)
            }
        };
        Self {
            memory_low: low(self.memory_low, health.memory_available_bytes, memory_total),
            disk_low: low(
                self.disk_low,
                health.disk_free_bytes,
                health.disk_total_bytes,
            ),
        }
    }
}

/// Samples health every [`HEALTH_EVERY`] and hands it to the reporter: as
/// urgent (a status goes out now) when a warning level was crossed, else to
/// ride along with the next status. The first sample is taken at once and is
/// urgent, so the first status carries health.
pub fn spawn_health(
    data_dir: PathBuf,
    memory_total: u64,
    reports: ReportHandle,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    tracker.spawn(async move {
        let mut warnings = Warnings::default();
        let mut first = true;
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let dir = data_dir.clone();
            let Ok(sample) = tokio::task::spawn_blocking(move || health(&dir)).await else {
                return;
            };
            let next = warnings.next(&sample, memory_total);
            let urgent = first || next != warnings;
            if next != warnings {
                tracing::warn!(
                    memory_low = next.memory_low,
                    disk_low = next.disk_low,
                    memory_available = sample.memory_available_bytes,
                    disk_free = sample.disk_free_bytes,
                    "node health crossed a warning level"
                );
            }
            warnings = next;
            first = false;
            if reports.health(sample, urgent).await.is_err() {
                return;
            }
        }
    });
}

fn read_proc<T>(path: &'static str, parse: fn(&str) -> Option<T>) -> Result<T, NodeInfoError> {
    let text = std::fs::read_to_string(path).map_err(|source| NodeInfoError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).ok_or(NodeInfoError::Parse {
        path,
        expected: "the kernel's format",
    })
}

fn mem_available() -> Result<u64, NodeInfoError> {
    read_proc("/proc/meminfo", |t| parse_meminfo(t, "MemAvailable:"))
}

// statvfs fields are `c_ulong`/`fsblkcnt_t`: u32 on 32-bit ARM, u64 here.
#[allow(clippy::useless_conversion)]
fn disk(dir: &Path) -> Result<(u64, u64), NodeInfoError> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(|source| NodeInfoError::Statvfs {
        path: dir.to_owned(),
        source,
    })?;
    let unit = u64::from(s.fragment_size());
    Ok((
        u64::from(s.blocks_available()).saturating_mul(unit),
        u64::from(s.blocks()).saturating_mul(unit),
    ))
}

/// The one-minute load average × 1000, from `/proc/loadavg`.
fn parse_load(text: &str) -> Option<u32> {
    let first = text.split_whitespace().next()?;
    let (whole, frac) = first.split_once('.').unwrap_or((first, "0"));
    let whole: u32 = whole.parse().ok()?;
    let frac = format!("{frac:0<3}");
    let milli: u32 = frac.get(..3)?.parse().ok()?;
    whole.checked_mul(1000)?.checked_add(milli)
}

/// Whole seconds since boot, from `/proc/uptime`.
fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    first.split('.').next()?.parse().ok()
}

fn mem_total(path: &Path) -> Result<u64, NodeInfoError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| NodeInfoError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_mem_total(&text).ok_or(NodeInfoError::NoMemTotal { path: shown })
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    parse_meminfo(meminfo, "MemTotal:")
}

/// A `Key: N kB` line of `/proc/meminfo`, in bytes.
fn parse_meminfo(meminfo: &str, key: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with(key))?;
    let mut words = line[key.len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let text = "MemTotal:        2014556 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_mem_total(text), Some(2014556 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: x kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 5\n"), None);
    }

    #[test]
    fn this_node() {
        let labels = NodeLabels::parse(&["b=2", "a=1"]).unwrap();
        let info = gather(&labels);
        assert_eq!(info.os, "linux");
        assert_eq!(info.agent_version, AGENT_VERSION);
        assert_eq!(info.labels[0].key, "a");
        assert!(info.cpus >= 1);
        assert!(info.memory_bytes > 1024 * 1024, "{}", info.memory_bytes);
        assert_eq!(oci_arch("aarch64"), "arm64");
        assert_eq!(oci_arch("x86_64"), "amd64");
        assert_eq!(info.boot_id.len(), 36, "{:?}", info.boot_id);
    }

    #[test]
    fn proc_formats() {
        assert_eq!(parse_load("0.52 0.58 0.59 1/467 12345\n"), Some(520));
        assert_eq!(parse_load("12.5 1 1 1/1 1\n"), Some(12500));
        assert_eq!(parse_load("3 1 1"), Some(3000));
        assert_eq!(parse_load("x 1 1"), None);
        assert_eq!(parse_load(""), None);
        assert_eq!(parse_uptime("350735.47 234388.90\n"), Some(350735));
        assert_eq!(parse_uptime("junk"), None);
        let text = "MemTotal: 4 kB\nMemAvailable:   2 kB\n";
        assert_eq!(parse_meminfo(text, "MemAvailable:"), Some(2048));
    }

    #[test]
    fn this_node_is_healthy_and_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let h = health(dir.path());
        let total = mem_total(Path::new("/proc/meminfo")).unwrap();
        assert!(h.memory_available_bytes > 0 && h.memory_available_bytes <= total);
        assert!(h.disk_total_bytes > 0 && h.disk_free_bytes <= h.disk_total_bytes);
        assert!(h.uptime_secs > 0);
        // Load may truly be 0.000 on an idle machine; it must parse, though.
        assert!(read_proc("/proc/loadavg", parse_load).is_ok());
    }

    #[test]
    fn warnings_have_hysteresis_and_ignore_unknown() {
        let h = |mem: u64, disk: u64| NodeHealth {
            memory_available_bytes: mem,
            disk_free_bytes: disk,
            disk_total_bytes: 1000,
            ..NodeHealth::default()
        };
        let w = Warnings::default().next(&h(500, 500), 1000);
        assert_eq!(w, Warnings::default());
        let w = w.next(&h(99, 50), 1000);
        assert_eq!(
            w,
            Warnings {
                memory_low: true,
                disk_low: true
            }
        );
        // Back to 11 %: still low (no flapping at the line).
        assert_eq!(w.next(&h(110, 110), 1000), w);
        // Above 12 %: cleared.
        assert_eq!(w.next(&h(130, 130), 1000), Warnings::default());
        // Zeros are unknown values, not low ones.
        assert_eq!(
            Warnings::default().next(&h(0, 0), 1000),
            Warnings::default()
        );
    }
}
