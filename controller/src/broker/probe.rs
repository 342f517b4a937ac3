//! Readiness check for the embedded broker: one raw MQTT 3.1.1 CONNECT on
//! loopback, answered by a CONNACK. A TCP connect alone would succeed as soon
//! as the socket listens, before rmqtt's accept loop and handshake run.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

/// Client id of the probe; it connects with a clean session, so it leaves
/// nothing behind in the broker.
const PROBE_CLIENT_ID: &[u8] = b"flotilla-broker-probe";

/// Keepalive the probe announces: the broker refuses zero.
const PROBE_KEEPALIVE_SECS: u16 = 10;

/// Longest a single probe attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause between failed attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Polls `addr` with CONNECTs until one is answered with a CONNACK (accepted
/// or refused: both prove the broker serves MQTT), or `deadline` passes.
/// Returns the last failure on timeout.
pub(super) async fn until_ready(addr: SocketAddr, deadline: Instant) -> io::Result<()> {
    let target = dialable(addr);
    loop {
        let attempt = match timeout(
            ATTEMPT_TIMEOUT,
            connack_code(target, PROBE_CLIENT_ID, PROBE_KEEPALIVE_SECS),
        )
        .await
        {
            Ok(result) => result.map(|_code| ()),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no connack within the attempt timeout",
            )),
        };
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => sleep(RETRY_PAUSE).await,
        }
    }
}

/// A listener on the unspecified address is reached through loopback.
fn dialable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

/// Sends one CONNECT as `client_id` announcing `keepalive_secs` and returns
/// the CONNACK's return code (0 accepted, 5 not authorized, ...).
///
/// Callers other than the readiness probe must use a client id of their
/// own: a CONNECT with the id of a session still closing is a takeover,
/// which rmqtt answers with 3 ("server unavailable") when the old session
/// ends before acknowledging it.
pub(super) async fn connack_code(
    addr: SocketAddr,
    client_id: &[u8],
    keepalive_secs: u16,
) -> io::Result<u8> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream
        .write_all(&connect_packet(client_id, keepalive_secs)?)
        .await?;
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).await?;
    // CONNACK: packet type 2, remaining length 2.
    if ack[0] != 0x20 || ack[1] != 0x02 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected a connack, got bytes {ack:02x?}"),
        ));
    }
    // DISCONNECT, so the broker ends the session cleanly; the answer above is
    // all the probe needed, so a failure here does not matter.
    let _ = stream.write_all(&[0xE0, 0x00]).await;
    Ok(ack[3])
}

/// Longest client id `connect_packet` takes: the whole body must fit a
/// one-byte remaining length.
const MAX_CLIENT_ID: usize = 100;

/// An MQTT 3.1.1 CONNECT with a clean session, no credentials, no will.
fn connect_packet(client_id: &[u8], keepalive_secs: u16) -> io::Result<Vec<u8>> {
    let id_len = u8::try_from(client_id.len())
        .ok()
        .filter(|&len| usize::from(len) <= MAX_CLIENT_ID)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "client id of {} bytes, expected at most {MAX_CLIENT_ID}",
                    client_id.len()
                ),
            )
        })?;
    let mut body = Vec::with_capacity(12 + client_id.len());
    body.extend_from_slice(&[0x00, 0x04]);
    body.extend_from_slice(b"MQTT");
    body.push(0x04); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&keepalive_secs.to_be_bytes());
    body.extend_from_slice(&[0x00, id_len]);
    body.extend_from_slice(client_id);
    let mut packet = Vec::with_capacity(2 + body.len());
    packet.push(0x10);
    // At most 12 + MAX_CLIENT_ID bytes: under 128, one byte of length.
    packet.push(12 + id_len);
    packet.extend_from_slice(&body);
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packet_is_well_formed() {
        let packet = connect_packet(PROBE_CLIENT_ID, PROBE_KEEPALIVE_SECS).unwrap();
        assert_eq!(packet[0], 0x10);
        assert_eq!(usize::from(packet[1]), packet.len() - 2);
        assert!(packet.len() - 2 < 128, "remaining length must fit one byte");
        assert_eq!(&packet[2..8], b"\x00\x04MQTT");
        assert_eq!(&packet[10..12], &PROBE_KEEPALIVE_SECS.to_be_bytes());
        assert!(packet.ends_with(PROBE_CLIENT_ID));
    }

    #[test]
    fn unspecified_addresses_are_dialed_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:1883".parse().unwrap();
        assert_eq!(
            dialable(v4),
            "127.0.0.1:1883".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[::]:1883".parse().unwrap();
        assert_eq!(dialable(v6), "[::1]:1883".parse::<SocketAddr>().unwrap());
        let concrete: SocketAddr = "10.1.2.3:1883".parse().unwrap();
        assert_eq!(dialable(concrete), concrete);
    }
}
