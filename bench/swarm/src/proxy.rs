//! A TCP proxy that counts the bytes it carries both ways: the MQTT traffic
//! of the agents that connect through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Bytes carried so far.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Total bytes, both directions.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Starts a proxy to `upstream` on a free loopback port; returns the port
/// and the byte counter.
pub async fn start(upstream: u16, shutdown: CancellationToken) -> anyhow::Result<(u16, Counter)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let counter = Counter::default();
    let c = counter.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((inbound, _)) = accepted else { continue };
            let c = c.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (in_r, in_w) = inbound.into_split();
                let (out_r, out_w) = outbound.into_split();
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = pump(in_r, out_w, c.clone()) => {}
                    () = pump(out_r, in_w, c) => {}
                }
            });
        }
    });
    Ok((port, counter))
}

/// Copies one direction, counting as it goes (so an idle window can be
/// measured on connections that stay open).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, counter: Counter) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                counter.0.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
