//! Capabilities: Docker's default set, the set one container gets from it
//! and its security context, and checks against the host's bounding set.

use flotilla_proto::SecurityContext;
use oci_spec::runtime::Capability;

use super::SpecError;

/// Docker's default capability set.
pub fn default_capabilities() -> Vec<Capability> {
    use Capability::*;
    vec![
        Chown,
        DacOverride,
        Fsetid,
        Fowner,
        Mknod,
        NetRaw,
        Setgid,
        Setuid,
        Setfcap,
        Setpcap,
        NetBindService,
        SysChroot,
        Kill,
        AuditWrite,
    ]
}

/// The capability bounding set of this process, as a bit mask.
pub fn host_bounding_set() -> Result<u64, SpecError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(SpecError::BoundingSet)?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| SpecError::BoundingSet(std::io::Error::other("no parsable CapBnd line")))
}

/// Refuses capabilities outside `bounding`: libcontainer would fail on them
/// with an error that does not say which one.
pub fn check_capabilities(caps: &[Capability], bounding: u64) -> Result<(), SpecError> {
    for cap in caps {
        let name = cap.to_string();
        let bit = capability_number(&name)
            .ok_or_else(|| SpecError::UnknownCapability { name: name.clone() })?;
        if bounding & (1u64 << bit) == 0 {
            return Err(SpecError::CapabilityUnavailable { name });
        }
    }
    Ok(())
}

/// The capabilities as a bit mask (bit n for capability n), the form the
/// kernel shows in /proc/PID/status; names this runtime does not know are
/// left out ([`check_capabilities`] refuses them before any start).
pub fn capability_mask(caps: &[Capability]) -> u64 {
    caps.iter()
        .filter_map(|c| capability_number(&c.to_string()))
        .fold(0, |mask, bit| mask | (1u64 << bit))
}

/// Linux capability numbers, by the name oci-spec displays (no `CAP_`).
fn capability_number(name: &str) -> Option<u32> {
    CAPABILITY_NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u32::try_from(i).ok())
}

/// Capability names (as oci-spec displays them, no `CAP_`) by number.
use flotilla_proto::CAPABILITIES as CAPABILITY_NAMES;

/// The capabilities of one container: Docker's `defaults` changed by its
/// security context as Kubernetes does (`drop`, where `ALL` empties the
/// set, then `add`); a privileged container, or `add: [ALL]`, gets every
/// capability the host's `bounding` set has. Unknown names are refused.
pub fn container_capabilities(
    defaults: &[Capability],
    security: &SecurityContext,
    bounding: u64,
) -> Result<Vec<Capability>, SpecError> {
    let parse = |name: &String| -> Result<Option<Capability>, SpecError> {
        let bare = name.strip_prefix("CAP_").unwrap_or(name);
        if bare == "ALL" {
            return Ok(None);
        }
        match bare.parse::<Capability>() {
            Ok(cap) if capability_number(&cap.to_string()).is_some() => Ok(Some(cap)),
            _ => Err(SpecError::UnknownCapability { name: name.clone() }),
        }
    };
    let added = security
        .add_capabilities
        .iter()
        .map(parse)
        .collect::<Result<Vec<_>, _>>()?;
    let dropped = security
        .drop_capabilities
        .iter()
        .map(parse)
        .collect::<Result<Vec<_>, _>>()?;
    if security.privileged || added.contains(&None) {
        return Ok(all_capabilities()
            .into_iter()
            .filter(|c| capability_number(&c.to_string()).is_some_and(|n| bounding & (1 << n) != 0))
            .collect());
    }
    let mut caps: Vec<Capability> = if dropped.contains(&None) {
        Vec::new()
    } else {
        defaults
            .iter()
            .filter(|c| !dropped.contains(&Some(**c)))
            .copied()
            .collect()
    };
    for cap in added.into_iter().flatten() {
        if !caps.contains(&cap) {
            caps.push(cap);
        }
    }
    Ok(caps)
}

/// Every capability this runtime knows.
fn all_capabilities() -> Vec<Capability> {
    CAPABILITY_NAMES
        .iter()
        .filter_map(|n| n.parse::<Capability>().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_outside_the_bounding_set_are_named() {
        let all = u64::MAX;
        check_capabilities(&default_capabilities(), all).unwrap();
        let without_net_raw = all & !(1 << 13);
        let err = check_capabilities(&default_capabilities(), without_net_raw).unwrap_err();
        assert_eq!(
            err.to_string(),
            "capability CAP_NET_RAW is not in the host's capability bounding set"
        );
        for cap in [
            Capability::SysResource,
            Capability::CheckpointRestore,
            Capability::DacReadSearch,
        ] {
            assert!(capability_number(&cap.to_string()).is_some(), "{cap}");
        }
        assert_eq!(capability_number("SYS_RESOURCE"), Some(24));
    }

    #[test]
    fn security_contexts_change_the_default_set() {
        let defaults = default_capabilities();
        let ctx = |add: &[&str], drop: &[&str], privileged: bool| SecurityContext {
            privileged,
            add_capabilities: add.iter().map(|s| s.to_string()).collect(),
            drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
            ..SecurityContext::default()
        };
        let mask = |caps: Vec<Capability>| capability_mask(&caps);
        let all = u64::MAX;
        let base = capability_mask(&defaults);
        let net_admin = 1u64 << 12;
        let net_raw = 1u64 << 13;
        let get = |c: &SecurityContext| mask(container_capabilities(&defaults, c, all).unwrap());
        assert_eq!(get(&ctx(&[], &[], false)), base);
        assert_eq!(get(&ctx(&["NET_ADMIN"], &[], false)), base | net_admin);
        assert_eq!(
            get(&ctx(&["CAP_NET_ADMIN"], &["NET_RAW"], false)),
            (base | net_admin) & !net_raw
        );
        assert_eq!(get(&ctx(&["NET_ADMIN"], &["ALL"], false)), net_admin);
        assert_eq!(get(&ctx(&[], &["ALL"], false)), 0);
        let every = (1u64 << CAPABILITY_NAMES.len()) - 1;
        assert_eq!(get(&ctx(&[], &[], true)), every);
        assert_eq!(get(&ctx(&["ALL"], &[], false)), every);
        // Privileged gets what the host has, not more.
        let host = every & !(1 << 24);
        let privileged = container_capabilities(&defaults, &ctx(&[], &[], true), host).unwrap();
        assert_eq!(mask(privileged), host);
        let err = container_capabilities(&defaults, &ctx(&["NET_WIZARD"], &[], false), all)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "capability \"NET_WIZARD\": unknown to this runtime");
    }
}
