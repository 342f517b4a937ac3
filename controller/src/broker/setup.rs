//! Every rmqtt setting the embedded broker runs with, in one place: the
//! server context, the retainer plugin, the hooks, the TCP listener, and
//! with the fleet's identities the mTLS front (`tls.rs`) and the task that
//! drops a revoked node's live session.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use rmqtt::context::ServerContext;
use rmqtt::hook::Type;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;

use super::admission::{Admission, Policy, device_client_ids};
use super::tls::Front;
use super::{BoxError, BrokerConfig, BrokerError};
use crate::identity::Identity;

/// A task to run on the broker's runtime next to the server.
pub(super) type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The broker, built and bound, with what else runs beside it.
pub(super) struct Built {
    pub(super) server: MqttServer,
    pub(super) local_addr: SocketAddr,
    pub(super) tls_addr: Option<SocketAddr>,
    pub(super) tasks: Vec<Task>,
}

/// Name the retainer plugin is registered and configured under.
const RETAINER: &str = "rmqtt-retainer";

/// Longest client id accepted. Agents use their node name (a DNS label);
/// this leaves room for prefixes while keeping ids bounded.
const MAX_CLIENT_ID_LEN: usize = 256;

/// Deepest topic accepted. Flotilla's own topics have six levels under a
/// two-level prefix; a longer custom prefix still fits.
const MAX_TOPIC_LEVELS: usize = 32;

/// Binds the listener, then builds a broker ready to `run()`. Returns it with
/// the address actually bound (the real port when the config asked for 0).
pub(super) async fn build(config: &BrokerConfig, policy: Policy) -> Result<Built, BrokerError> {
    // Binding first is the port check: rmqtt's `bind()` returns an error for
    // a port in use, where `MqttServer::start()` would exit the process. The
    // listener id is the real port, unique since this context has one
    // listener, so `listener_by_id()` cannot panic on a duplicate.
    let listener = listener_builder(config)
        .bind()
        .map_err(|e| BrokerError::Bind {
            addr: config.listen,
            source: into_io(e),
        })?
        .tcp()
        .map_err(setup_error("tcp listener"))?;
    let local_addr = listener.local_addr().map_err(|e| BrokerError::Bind {
        addr: config.listen,
        source: into_io(e),
    })?;

    let mut tasks: Vec<Task> = Vec::new();
    let mut tls_addr = None;
    if let Some(material) = &config.tls {
        let Policy::Fleet { identity, .. } = &policy else {
            return Err(BrokerError::TlsWithoutIdentity);
        };
        let front = Front::bind(
            material,
            Arc::clone(identity),
            loopback(local_addr),
            config.max_connections,
        )
        .await?;
        tls_addr = Some(front.local_addr().map_err(|source| BrokerError::Bind {
            addr: material.listen,
            source,
        })?);
        tasks.push(Box::pin(front.run()));
    }

    let scx = ServerContext::new()
        // The busy check compares load in mismatched units and can refuse
        // CONNECTs under load (see notes/mqtt-brokers.md).
        .busy_check_enable(false)
        .plugins_config_map_add(RETAINER, retainer_config(config))
        .build()
        .await;

    rmqtt_retainer::register_named(&scx, RETAINER, true, false)
        .await
        .map_err(setup_error("retainer plugin"))?;

    let hooks = scx.extends.hook_mgr().register();
    // One handler per hook type, each with the same policy.
    for hook in [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
    ] {
        hooks
            .add(hook, Box::new(Admission::new(policy.clone())))
            .await;
    }
    hooks.start().await;

    if let Policy::Fleet { identity, .. } = &policy {
        tasks.push(Box::pin(drop_revoked(scx.clone(), Arc::clone(identity))));
    }

    let server = MqttServer::new(scx)
        .listener_by_id(listener, local_addr.port())
        .build();
    Ok(Built {
        server,
        local_addr,
        tls_addr,
        tasks,
    })
}

/// The plain listener as the TLS front reaches it.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// Disconnects the live session of every node revoked from now on (the
/// admission hook refuses it at its next CONNECT). The session is removed
/// with its subscriptions, so nothing queued for it is delivered later.
async fn drop_revoked(scx: ServerContext, identity: Arc<Identity>) {
    let mut revocations = identity.revocations();
    loop {
        let node = match revocations.recv().await {
            Ok(node) => node,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("{n} revocations came faster than sessions were dropped");
                continue;
            }
        };
        for client_id in device_client_ids(&node) {
            let id = rmqtt::types::Id::new(
                scx.node.id(),
                0,
                None,
                None,
                client_id.clone().into(),
                Some(node.clone().into()),
            );
            let mut entry = scx.extends.shared().await.entry(id);
            if !entry.exist() {
                continue;
            }
            match entry.kick(true, true, true).await {
                Ok(_) => tracing::info!(%node, client = %client_id, "revoked: session dropped"),
                Err(e) => {
                    tracing::warn!(%node, client = %client_id, "revoked, but dropping its session failed: {e}")
                }
            }
        }
    }
}

fn listener_builder(config: &BrokerConfig) -> Builder {
    Builder::new()
        .name("flotilla/tcp")
        .laddr(config.listen)
        // A freshly stopped broker leaves its closed connections in
        // TIME_WAIT; without SO_REUSEADDR the next one could not bind.
        .reuseaddr(Some(true))
        // Without it QoS 1 round trips stall ~40 ms (Nagle + delayed ACK).
        .nodelay(true)
        .max_connections(config.max_connections)
        .max_packet_size(config.max_packet_size)
        // Anonymous clients would otherwise skip the `ClientAuthenticate`
        // hook; `Admission` decides for everyone instead.
        .allow_anonymous(false)
        // Keepalive is how a half-open link is noticed and the will (a
        // device's Offline presence) published; zero would disable it.
        .allow_zero_keepalive(false)
        .max_inflight(config.max_inflight)
        .max_mqueue_len(config.max_queued_messages)
        .max_clientid_len(MAX_CLIENT_ID_LEN)
        .max_topic_levels(MAX_TOPIC_LEVELS)
        .session_expiry_interval(config.session_expiry)
        .message_expiry_interval(config.message_expiry)
}

/// The retainer keeps retained messages in memory. Its defaults would both
/// expire retained messages with the message expiry (a node's desired state
/// must stay until replaced) and silently store payloads over 1 MB as
/// ordinary messages (a desired state can be 1 MiB plus its frame).
fn retainer_config(config: &BrokerConfig) -> String {
    format!(
        "max_retained_messages = {max}\n\
         max_payload_size = \"{size}B\"\n\
         retained_message_ttl = \"0s\"\n\
         \n\
         [storage]\n\
         type = \"ram\"\n",
        max = config.max_retained_messages,
        size = config.max_packet_size,
    )
}

/// rmqtt reports errors as `anyhow::Error`; socket errors underneath are
/// `io::Error` and are kept as such.
fn into_io(e: rmqtt::Error) -> io::Error {
    match e.downcast::<io::Error>() {
        Ok(io) => io,
        Err(other) => io::Error::other(BoxError::from(other)),
    }
}

fn setup_error(step: &'static str) -> impl FnOnce(rmqtt::Error) -> BrokerError {
    move |e| BrokerError::Setup {
        step,
        source: BoxError::from(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retainer_config_keeps_retained_messages_forever_and_large() {
        let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap());
        config.max_packet_size = 3 * 1024 * 1024;
        config.max_retained_messages = 7;
        let text = retainer_config(&config);
        assert!(text.contains("retained_message_ttl = \"0s\""), "{text}");
        assert!(text.contains("max_payload_size = \"3145728B\""), "{text}");
        assert!(text.contains("max_retained_messages = 7"), "{text}");
        assert!(text.contains("type = \"ram\""), "{text}");
    }
}
