//! Facts about this device for the status: architecture in OCI terms, CPU
//! count and total memory (from `/proc/meminfo`).

use std::path::Path;

use flotilla_proto::NodeInfo;

use crate::config::NodeLabels;

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

fn mem_total(path: &Path) -> Result<u64, NodeInfoError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| NodeInfoError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_mem_total(&text).ok_or(NodeInfoError::NoMemTotal { path: shown })
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
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
    }
}
