//! The embedded broker's mTLS listener: a front that terminates TLS itself
//! (rustls on ring, clients verified against the fleet CA) and hands each
//! client to rmqtt's plain listener on loopback. rmqtt's own `tls` feature
//! would force rustls onto aws-lc, a C build the static cross builds cannot
//! do.
//!
//! The identity of a TLS client is its certificate: the front looks the
//! presented certificate up among those the controller issued (by the
//! sha256 of its DER; a revoked or unknown one is closed), reads the MQTT
//! CONNECT (capped), refuses a username other than the certificate's node,
//! and rewrites the CONNECT with that node as username and the front's own
//! admission secret as password. rmqtt's admission hook takes that secret
//! only as proof that the front vouched for the node, so nothing reaching
//! the plain listener directly can pose as a TLS device. The ACL hooks then
//! key on the username as for any device.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::identity::Identity;

/// Longest a TLS handshake plus the CONNECT may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest CONNECT accepted: a device's carries its name and a small will.
pub(super) const MAX_CONNECT: usize = 16 * 1024;

/// What the TLS listener needs: its certificate and key, and the CA whose
/// client certificates it accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// Address the TLS listener binds (port 0 picks one).
    pub listen: SocketAddr,
    /// The fleet CA's certificate, DER: the only client root.
    pub ca_der: Vec<u8>,
    /// The listener's certificate, DER (signed by the CA).
    pub cert_der: Vec<u8>,
    /// Its private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// Why the TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the certificates or the CA.
    #[error("tls config: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("mqtt tls listen address {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// A bound TLS front, ready to serve.
pub(super) struct Front {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    identity: Arc<Identity>,
    upstream: SocketAddr,
    permits: Arc<Semaphore>,
}

fn server_config(material: &TlsMaterial) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(material.ca_der.clone()))
        .map_err(|e| TlsError::Config(format!("fleet ca: {e}")))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(material.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(material.key_der.clone())),
        )
        .map_err(|e| TlsError::Config(format!("server certificate: {e}")))
}

impl Front {
    /// Binds the TLS listener; clients are handed to `upstream` (the plain
    /// listener, reached on loopback).
    pub(super) async fn bind(
        material: &TlsMaterial,
        identity: Arc<Identity>,
        upstream: SocketAddr,
        max_connections: usize,
    ) -> Result<Self, TlsError> {
        let config = server_config(material)?;
        let listener =
            TcpListener::bind(material.listen)
                .await
                .map_err(|source| TlsError::Bind {
                    addr: material.listen,
                    source,
                })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            identity,
            upstream,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
        })
    }

    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts clients until the runtime is dropped.
    pub(super) async fn run(self) {
        loop {
            let (socket, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, mostly: wait rather than spin.
                    tracing::warn!("mqtt tls accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                tracing::warn!(%peer, "mqtt tls: too many connections, closing one");
                continue;
            };
            let acceptor = self.acceptor.clone();
            let identity = Arc::clone(&self.identity);
            let upstream = self.upstream;
            tokio::spawn(async move {
                if let Err(reason) = serve(socket, acceptor, &identity, upstream).await {
                    tracing::warn!(%peer, "mqtt tls client closed: {reason}");
                }
                drop(permit);
            });
        }
    }
}

async fn serve(
    socket: TcpStream,
    acceptor: TlsAcceptor,
    identity: &Identity,
    upstream: SocketAddr,
) -> Result<(), String> {
    let _ = socket.set_nodelay(true);
    let (mut tls, connect) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut tls = acceptor
            .accept(socket)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let der = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        let node = identity
            .certificate_node(der.as_ref())
            .ok_or("certificate not issued here, or revoked")?;
        let packet = read_packet(&mut tls).await?;
        let connect = rewrite_connect(&packet, &node, identity.gate_password().as_bytes())
            .map_err(|e| format!("node {node}: {e}"))?;
        Ok::<_, String>((tls, connect))
    })
    .await
    .map_err(|_| format!("no handshake and connect within {HANDSHAKE_TIMEOUT:?}"))??;
    let mut plain = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("reaching the broker at {upstream}: {e}"))?;
    let _ = plain.set_nodelay(true);
    plain
        .write_all(&connect)
        .await
        .map_err(|e| format!("forwarding the connect: {e}"))?;
    // Ends when either side closes: a kicked session closes the plain side,
    // and so the device's TLS connection.
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
    let _ = tls.shutdown().await;
    Ok(())
}

/// Reads one MQTT packet (the CONNECT), at most [`MAX_CONNECT`] bytes.
async fn read_packet<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, String> {
    let mut packet = vec![0u8; 1];
    stream
        .read_exact(&mut packet)
        .await
        .map_err(|e| format!("reading the connect: {e}"))?;
    let mut length = 0usize;
    for i in 0..4 {
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| format!("reading the connect: {e}"))?;
        packet.push(byte[0]);
        length |= usize::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err("connect: malformed remaining length".into());
        }
    }
    if length > MAX_CONNECT {
        return Err(format!(
            "connect: {length} bytes, expected at most {MAX_CONNECT}"
        ));
    }
    let header = packet.len();
    packet.resize(header + length, 0);
    stream
        .read_exact(&mut packet[header..])
        .await
        .map_err(|e| format!("reading the connect: {e}"))?;
    Ok(packet)
}

/// Why a CONNECT was refused by the front.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum ConnectError {
    /// The first packet is not a CONNECT.
    #[error("first packet is not a connect (type byte {0:#04x})")]
    NotConnect(u8),
    /// The packet ends before a field it announces.
    #[error("connect: truncated at {0}")]
    Truncated(&'static str),
    /// An MQTT version the broker does not speak.
    #[error("connect: protocol level {0}, expected 3, 4 or 5")]
    Level(u8),
    /// The username is another node than the certificate's.
    #[error("connect: username {0:?} is not the certificate's node")]
    OtherUser(String),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ConnectError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(ConnectError::Truncated(what))?;
        let out = self
            .bytes
            .get(self.at..end)
            .ok_or(ConnectError::Truncated(what))?;
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ConnectError> {
        Ok(self.take(1, what)?[0])
    }

    /// A u16-length-prefixed field, prefix included.
    fn field(&mut self, what: &'static str) -> Result<&'a [u8], ConnectError> {
        let start = self.at;
        let len = self.take(2, what)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        self.take(len, what)?;
        Ok(&self.bytes[start..self.at])
    }

    /// An MQTT 5 property block (variable-length size, then the bytes).
    fn properties(&mut self, what: &'static str) -> Result<&'a [u8], ConnectError> {
        let start = self.at;
        let mut len = 0usize;
        for i in 0..4 {
            let b = self.u8(what)?;
            len |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                break;
            }
        }
        self.take(len, what)?;
        Ok(&self.bytes[start..self.at])
    }
}

fn push_field(out: &mut Vec<u8>, bytes: &[u8]) {
    // Both fields written here are short (a node name, a 43-byte secret).
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

/// The CONNECT `packet` with `node` as username and `secret` as password;
/// refused when it names another username.
pub(super) fn rewrite_connect(
    packet: &[u8],
    node: &str,
    secret: &[u8],
) -> Result<Vec<u8>, ConnectError> {
    let first = *packet.first().ok_or(ConnectError::Truncated("header"))?;
    if first != 0x10 {
        return Err(ConnectError::NotConnect(first));
    }
    // Skip the fixed header: the type byte and the remaining length.
    let mut at = 1;
    while packet.get(at).ok_or(ConnectError::Truncated("length"))? & 0x80 != 0 {
        at += 1;
    }
    let mut r = Reader {
        bytes: packet,
        at: at + 1,
    };
    let name = r.field("protocol name")?;
    let level = r.u8("protocol level")?;
    if !matches!(level, 3..=5) {
        return Err(ConnectError::Level(level));
    }
    let flags = r.u8("flags")?;
    let keepalive = r.take(2, "keepalive")?;
    let properties = if level == 5 {
        r.properties("properties")?
    } else {
        &[]
    };
    let client_id = r.field("client id")?;
    let will_start = r.at;
    if flags & 0x04 != 0 {
        if level == 5 {
            r.properties("will properties")?;
        }
        r.field("will topic")?;
        r.field("will payload")?;
    }
    let will = &packet[will_start..r.at];
    if flags & 0x80 != 0 {
        let user = r.field("username")?;
        let user = &user[2..];
        if user != node.as_bytes() {
            return Err(ConnectError::OtherUser(
                String::from_utf8_lossy(user).into_owned(),
            ));
        }
    }
    let mut body = Vec::with_capacity(packet.len() + node.len() + secret.len() + 4);
    body.extend_from_slice(name);
    body.push(level);
    // Username and password set, the reserved bit clear.
    body.push((flags | 0xC0) & 0xFE);
    body.extend_from_slice(keepalive);
    body.extend_from_slice(properties);
    body.extend_from_slice(client_id);
    body.extend_from_slice(will);
    push_field(&mut body, node.as_bytes());
    push_field(&mut body, secret);
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3.1.1 CONNECT built by hand: client id, optional will and username.
    fn connect(client: &str, will: Option<(&str, &[u8])>, user: Option<&str>) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
        let mut flags = 0x02;
        if will.is_some() {
            flags |= 0x04 | 0x08 | 0x20;
        }
        if user.is_some() {
            flags |= 0x80;
        }
        body.push(flags);
        body.extend_from_slice(&[0, 30]);
        push_field(&mut body, client.as_bytes());
        if let Some((topic, payload)) = will {
            push_field(&mut body, topic.as_bytes());
            push_field(&mut body, payload);
        }
        if let Some(u) = user {
            push_field(&mut body, u.as_bytes());
        }
        let mut out = vec![0x10, body.len() as u8];
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn connect_gets_the_certificates_node_and_the_secret() {
        let will: &[u8] = b"\x01\x01";
        let packet = connect("flotilla-agent-pi", Some(("t/pi/presence", will)), None);
        let out = rewrite_connect(&packet, "pi", b"s3cret").unwrap();
        let expected = {
            let mut c = connect(
                "flotilla-agent-pi",
                Some(("t/pi/presence", will)),
                Some("pi"),
            );
            // password flag, then the password after the username
            c[9] |= 0x40;
            push_field(&mut c, b"s3cret");
            c[1] = (c.len() - 2) as u8;
            c
        };
        assert_eq!(out, expected);

        // The same username passes; another is refused.
        assert!(rewrite_connect(&connect("c", None, Some("pi")), "pi", b"s").is_ok());
        assert_eq!(
            rewrite_connect(&connect("c", None, Some("other")), "pi", b"s"),
            Err(ConnectError::OtherUser("other".into()))
        );
    }

    #[test]
    fn malformed_connects_are_refused() {
        let packet = connect("c", Some(("t", b"x")), None);
        for cut in 1..packet.len() {
            assert!(
                rewrite_connect(&packet[..cut], "pi", b"s").is_err(),
                "cut at {cut}"
            );
        }
        assert_eq!(
            rewrite_connect(&[0x30, 0], "pi", b"s"),
            Err(ConnectError::NotConnect(0x30))
        );
        let mut level9 = packet.clone();
        level9[8] = 9;
        assert_eq!(
            rewrite_connect(&level9, "pi", b"s"),
            Err(ConnectError::Level(9))
        );
    }

    #[test]
    fn mqtt5_properties_are_kept() {
        // Level 5, no will, properties: session expiry interval (0x11) = 60.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30];
        body.extend_from_slice(&[5, 0x11, 0, 0, 0, 60]);
        push_field(&mut body, b"cid");
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend_from_slice(&body);
        let out = rewrite_connect(&packet, "pi", b"pw").unwrap();
        assert_eq!(&out[12..18], &[5, 0x11, 0, 0, 0, 60]);
        assert!(out.ends_with(b"\x00\x02pi\x00\x02pw"));
    }
}
