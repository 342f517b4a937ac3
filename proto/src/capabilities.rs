//! The names of Linux capabilities as the wire carries them (no `CAP_`),
//! numbered as the kernel numbers them (`include/uapi/linux/capability.h`):
//! the controller checks manifests against this list and the agent maps
//! the names to bits with it.

/// Every Linux capability (as of Linux 5.9), without `CAP_`, by number.
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

#[cfg(test)]
mod tests {
    use super::CAPABILITIES;

    #[test]
    fn the_list_is_numbered_as_the_kernel_numbers_them() {
        // Spot checks against capability.h: a shifted entry would give a
        // name the bit of another capability.
        let at = |name: &str| CAPABILITIES.iter().position(|c| *c == name);
        assert_eq!(at("CHOWN"), Some(0));
        assert_eq!(at("NET_ADMIN"), Some(12));
        assert_eq!(at("SYS_ADMIN"), Some(21));
        assert_eq!(at("AUDIT_READ"), Some(37));
        assert_eq!(at("CHECKPOINT_RESTORE"), Some(40));
        for (i, a) in CAPABILITIES.iter().enumerate() {
            assert!(!CAPABILITIES[i + 1..].contains(a), "{a} is listed twice");
        }
    }
}
