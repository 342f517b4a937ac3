//! Whether the broker certificate and revocation list already in Mosquitto's
//! directory are still good, so that `broker-config`, run every hour, keeps
//! them instead of issuing new ones (and making Mosquitto reload) each time.
//!
//! Both are read back with x509-parser and checked against the fleet CA's
//! key (a new CA, after a lost data directory, makes them stale), then:
//! the certificate must be for the broker's key and exactly the names asked
//! for, with more than a third of its lifetime left; the revocation list must
//! list exactly the certificates revoked now and not expire within
//! `renew_within`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::identity::ca::{Ca, P256PublicKey, Revoked};

/// Why a file in place is not kept (logged; a new one is made instead).
#[derive(Debug, thiserror::Error)]
pub enum Stale {
    /// Not PEM, or not the expected DER inside.
    #[error("cannot be read: {0}")]
    Unreadable(String),
    /// Not signed by this controller's fleet CA.
    #[error("not signed by this fleet's ca")]
    OtherCa,
    /// The certificate is for another public key than the broker's.
    #[error("certificate for another key than server.key")]
    OtherKey,
    /// The certificate's names are not the ones asked for.
    #[error("certificate for {had:?}, expected {want:?}")]
    OtherNames { had: Vec<String>, want: Vec<String> },
    /// Too little of its validity left, or not valid yet.
    #[error("{what} valid until {until}s since the epoch: renewed")]
    Ageing { what: &'static str, until: i64 },
    /// The revocation list does not list what is revoked now.
    #[error("revocation list of {had} certificates, {want} revoked now")]
    OtherRevocations { had: usize, want: usize },
}

/// A name in a certificate, compared as a TLS client compares it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Name {
    Dns(String),
    Ip(IpAddr),
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dns(d) => f.write_str(d),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

fn asked(san: &str) -> Name {
    san.parse::<IpAddr>()
        .map_or_else(|_| Name::Dns(san.to_ascii_lowercase()), Name::Ip)
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .unwrap_or(0)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn der_of(pem: &str) -> Result<Vec<u8>, Stale> {
    let (_, pem) = parse_x509_pem(pem.as_bytes()).map_err(|e| Stale::Unreadable(e.to_string()))?;
    Ok(pem.contents)
}

/// Calls `check` with the CA's public key.
fn with_ca_key<T>(
    ca: &Ca,
    check: impl FnOnce(&SubjectPublicKeyInfo<'_>) -> Result<T, Stale>,
) -> Result<T, Stale> {
    let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der())
        .map_err(|e| Stale::Unreadable(format!("the fleet ca: {e}")))?;
    check(ca_cert.public_key())
}

/// Ok when `pem` is a certificate of `ca` for `key` and exactly `sans`,
/// valid now with more than a third of its lifetime left.
pub fn certificate(
    ca: &Ca,
    pem: &str,
    key: &P256PublicKey,
    sans: &[String],
    now: SystemTime,
) -> Result<(), Stale> {
    let der = der_of(pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| Stale::Unreadable(e.to_string()))?;
    with_ca_key(ca, |ca_key| {
        cert.verify_signature(Some(ca_key))
            .map_err(|_| Stale::OtherCa)
    })?;
    if cert.public_key().subject_public_key.data.as_ref() != key.as_bytes() {
        return Err(Stale::OtherKey);
    }
    let mut had = BTreeSet::new();
    if let Some(ext) = cert
        .subject_alternative_name()
        .map_err(|e| Stale::Unreadable(e.to_string()))?
    {
        for name in &ext.value.general_names {
            had.insert(match name {
                GeneralName::DNSName(d) => Name::Dns(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => match <[u8; 4]>::try_from(*b) {
                    Ok(v4) => Name::Ip(IpAddr::from(v4)),
                    Err(_) => match <[u8; 16]>::try_from(*b) {
                        Ok(v6) => Name::Ip(IpAddr::from(v6)),
                        Err(_) => Name::Dns(format!("{b:?}")),
                    },
                },
                other => Name::Dns(other.to_string()),
            });
        }
    }
    let want: BTreeSet<Name> = sans.iter().map(|s| asked(s)).collect();
    if had != want {
        let show = |set: &BTreeSet<Name>| set.iter().map(Name::to_string).collect();
        return Err(Stale::OtherNames {
            had: show(&had),
            want: show(&want),
        });
    }
    let (from, until) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let now = unix_secs(now);
    // Renewed with a third of its lifetime left, as devices renew theirs:
    // for the two-year broker certificate, eight months of margin for a
    // timer that stopped running.
    if now < from || until.saturating_sub(now).saturating_mul(3) <= until.saturating_sub(from) {
        return Err(Stale::Ageing {
            what: "certificate",
            until,
        });
    }
    Ok(())
}

/// Serial numbers as integers: DER may add a leading zero byte.
fn serial_key(raw: &[u8]) -> &[u8] {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    &raw[start..]
}

/// Ok when `pem` is a revocation list of `ca` listing exactly `revoked`,
/// issued already and valid for more than `renew_within` from `now`.
pub fn crl(
    ca: &Ca,
    pem: &str,
    revoked: &[Revoked],
    renew_within: Duration,
    now: SystemTime,
) -> Result<(), Stale> {
    let der = der_of(pem)?;
    let (_, list) =
        x509_parser::parse_x509_crl(&der).map_err(|e| Stale::Unreadable(e.to_string()))?;
    with_ca_key(ca, |ca_key| {
        list.verify_signature(ca_key).map_err(|_| Stale::OtherCa)
    })?;
    let now = unix_secs(now);
    let until = list.next_update().map_or(0, |t| t.timestamp());
    if list.last_update().timestamp() > now || until.saturating_sub(now) <= secs(renew_within) {
        return Err(Stale::Ageing {
            what: "revocation list",
            until,
        });
    }
    let had: BTreeSet<&[u8]> = list
        .iter_revoked_certificates()
        .map(|r| serial_key(r.raw_serial()))
        .collect();
    let want: BTreeSet<&[u8]> = revoked.iter().map(|r| serial_key(&r.serial)).collect();
    if had != want {
        return Err(Stale::OtherRevocations {
            had: had.len(),
            want: want.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn key() -> (KeyPair, P256PublicKey) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let public = P256PublicKey::new(key.public_key_raw().to_vec()).unwrap();
        (key, public)
    }

    #[test]
    fn a_fresh_certificate_is_kept_for_its_key_names_and_ca_only() {
        let ca = Ca::ephemeral().unwrap();
        let (k, public) = key();
        let sans = vec!["broker.local".to_owned(), "10.0.0.5".to_owned()];
        let pem = ca.issue_server_for(&sans, &k).unwrap().pem;
        let now = SystemTime::now();
        certificate(&ca, &pem, &public, &sans, now).unwrap();
        // Names compare as TLS compares them: any order, DNS in any case.
        let other_order = vec!["10.0.0.5".to_owned(), "Broker.Local".to_owned()];
        certificate(&ca, &pem, &public, &other_order, now).unwrap();

        let (_, other_key) = key();
        assert!(matches!(
            certificate(&ca, &pem, &other_key, &sans, now),
            Err(Stale::OtherKey)
        ));
        for names in [
            &sans[..1],
            &[sans[0].clone(), sans[1].clone(), "x".into()][..],
        ] {
            assert!(matches!(
                certificate(&ca, &pem, &public, names, now),
                Err(Stale::OtherNames { .. })
            ));
        }
        let other_ca = Ca::ephemeral().unwrap();
        assert!(matches!(
            certificate(&other_ca, &pem, &public, &sans, now),
            Err(Stale::OtherCa)
        ));
        assert!(matches!(
            certificate(&ca, "garbage", &public, &sans, now),
            Err(Stale::Unreadable(_))
        ));
    }

    #[test]
    fn a_certificate_is_renewed_with_a_third_of_its_lifetime_left() {
        let ca = Ca::ephemeral().unwrap();
        let (k, public) = key();
        let sans = vec!["broker.local".to_owned()];
        let pem = ca.issue_server_for(&sans, &k).unwrap().pem;
        let lifetime = crate::identity::ca::SERVER_LIFETIME;
        let now = SystemTime::now();
        let just_before = now + lifetime * 2 / 3 - DAY;
        certificate(&ca, &pem, &public, &sans, just_before).unwrap();
        let just_after = now + lifetime * 2 / 3 + DAY;
        assert!(matches!(
            certificate(&ca, &pem, &public, &sans, just_after),
            Err(Stale::Ageing { .. })
        ));
        assert!(matches!(
            certificate(&ca, &pem, &public, &sans, now - 2 * DAY),
            Err(Stale::Ageing { .. })
        ));
    }

    #[test]
    fn a_revocation_list_is_kept_while_it_lists_the_same_and_is_fresh() {
        let ca = Ca::ephemeral().unwrap();
        let revoked: Vec<Revoked> = (0..3u8)
            .map(|i| Revoked {
                // A high first byte: DER adds a zero in front.
                serial: vec![0x80 | i, 1, 2, 3, 4, 5, 6, 7],
                at_ms: 1_700_000_000_000,
            })
            .collect();
        let pem = ca.crl_pem(&revoked, 30 * DAY).unwrap();
        let now = SystemTime::now();
        crl(&ca, &pem, &revoked, 20 * DAY, now).unwrap();
        // Ten days on, less than twenty are left: signed again.
        assert!(matches!(
            crl(
                &ca,
                &pem,
                &revoked,
                20 * DAY,
                now + 10 * DAY + Duration::from_secs(60)
            ),
            Err(Stale::Ageing { .. })
        ));
        assert!(matches!(
            crl(&ca, &pem, &revoked[..2], 20 * DAY, now),
            Err(Stale::OtherRevocations { had: 3, want: 2 })
        ));
        let empty = ca.crl_pem(&[], 30 * DAY).unwrap();
        crl(&ca, &empty, &[], 20 * DAY, now).unwrap();
        assert!(matches!(
            crl(&ca, &empty, &revoked, 20 * DAY, now),
            Err(Stale::OtherRevocations { had: 0, want: 3 })
        ));
        let other_ca = Ca::ephemeral().unwrap();
        assert!(matches!(
            crl(&other_ca, &pem, &revoked, 20 * DAY, now),
            Err(Stale::OtherCa)
        ));
    }
}
