//! The API over HTTPS (rustls on ring): a certificate given by the operator,
//! or one the fleet CA issues at every start for this machine's names and
//! addresses; and the listener that hands axum connections whose TLS
//! handshake is done, each handshake on its own task with a deadline, so a
//! slow or silent client holds up no one else.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::identity::ca::{Ca, CaError};

/// How the API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiTls {
    /// HTTPS with a certificate from the fleet CA (`{data_dir}/ca.pem`), for
    /// this machine's names and addresses plus these.
    FleetCa { extra_names: Vec<String> },
    /// HTTPS with the operator's certificate chain and key (PEM files).
    Files { cert: PathBuf, key: PathBuf },
    /// Plain HTTP, on a loopback address only.
    Plain,
}

/// Longest certificate or key file read.
const MAX_PEM: u64 = 256 * 1024;
/// A TLS handshake not done in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// Why the API's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file holds no usable PEM certificate or key.
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    /// The fleet CA could not be loaded or could not issue.
    #[error("the api certificate: {0}")]
    Ca(#[from] CaError),
    /// rustls refused the certificate and key.
    #[error("the api certificate and key: {0}")]
    Rustls(#[from] rustls::Error),
    /// Plain HTTP on an address others can reach.
    #[error(
        "--api-plain: {0} is not a loopback address; api tokens would cross the network in the clear (serve https, the default)"
    )]
    PlainNotLoopback(SocketAddr),
}

fn read_capped(path: &Path) -> Result<Vec<u8>, TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_PEM)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Ok(bytes)
}

fn pem_err(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The names and addresses this controller may be reached by: loopback,
/// the host name (and `{host}.local`, as mDNS gives it), the listen address
/// or, on a wildcard listen, every address of this machine; then `extra`.
pub fn local_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim().to_ascii_lowercase();
    if !host.is_empty() && host != "localhost" {
        names.push(format!("{host}.local"));
        names.push(host);
    }
    if listen.ip().is_unspecified() {
        names.extend(interface_addresses().iter().map(IpAddr::to_string));
    } else {
        names.push(listen.ip().to_string());
    }
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The IPv4 and IPv6 addresses of this machine's interfaces.
fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return out;
    }
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*at };
        if !entry.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its
            // real type; we read it as that type only.
            let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: AF_INET: the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6: the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                // Link-local addresses need a zone, which a certificate cannot name.
                if ip.segments()[0] & 0xffc0 != 0xfe80 {
                    out.push(IpAddr::V6(ip));
                }
            }
        }
        at = entry.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    out
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server settings for `tls`, or `None` for plain HTTP (checked
/// to be on loopback). Blocking: reads files, may make the fleet CA.
pub fn server_config(
    tls: &ApiTls,
    data_dir: &Path,
    listen: SocketAddr,
) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    let (chain, key) = match tls {
        ApiTls::Plain if listen.ip().is_loopback() => return Ok(None),
        ApiTls::Plain => return Err(TlsError::PlainNotLoopback(listen)),
        ApiTls::Files { cert, key } => {
            let bytes = read_capped(cert)?;
            let chain = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(cert, e.to_string()))?;
            if chain.is_empty() {
                return Err(pem_err(cert, "no pem certificate in it"));
            }
            let key_der = PrivateKeyDer::from_pem_slice(&read_capped(key)?)
                .map_err(|e| pem_err(key, format!("no usable pem private key: {e}")))?;
            (chain, key_der)
        }
        ApiTls::FleetCa { extra_names } => {
            let ca = Ca::load_or_create(data_dir)?;
            let names = local_names(listen, extra_names);
            let issued = ca.issue_server(&names)?;
            tracing::info!(names = %names.join(","), "api certificate issued by the fleet ca");
            // The CA goes with the chain, so a device holding only its
            // fingerprint (from the join token) can find and pin it.
            let chain = vec![
                CertificateDer::from(issued.cert.der),
                CertificateDer::from(ca.cert_der().to_vec()),
            ];
            let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(issued.key_der));
            (chain, key)
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// A listener of TLS connections for `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` and handshakes with `config`; stops when the
    /// listener is dropped.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx));
        Ok(Self { ready, local })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            () = tx.closed() => return,
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as axum does.
                    tracing::warn!("api accept: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "api tls handshake: {e}"),
                Err(_) => tracing::debug!(%peer, "api tls handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop ends only when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_loopback_host_and_the_listen_address() {
        let names = local_names("10.1.2.3:7470".parse().unwrap(), &["ctl.example".into()]);
        for n in ["localhost", "127.0.0.1", "::1", "10.1.2.3", "ctl.example"] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        let wildcard = local_names("0.0.0.0:7470".parse().unwrap(), &[]);
        assert_eq!(
            wildcard.iter().filter(|n| *n == "127.0.0.1").count(),
            1,
            "deduplicated: {wildcard:?}"
        );
    }

    #[test]
    fn plain_http_only_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            server_config(&ApiTls::Plain, dir.path(), "127.0.0.1:1".parse().unwrap())
                .unwrap()
                .is_none()
        );
        let err =
            server_config(&ApiTls::Plain, dir.path(), "0.0.0.0:1".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not a loopback address"), "{err}");
        let err = server_config(
            &ApiTls::Files {
                cert: dir.path().join("nope.pem"),
                key: dir.path().join("nope.key"),
            },
            dir.path(),
            "127.0.0.1:1".parse().unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }
}
