//! The MQTT session — the only module that touches rumqttc. A persistent
//! session (clean_session = false) with a retained `Offline` last will,
//! reconnecting forever with jittered exponential back-off. On every ConnAck
//! it announces `Online`, subscribes to the node's desired and `rpc/req`
//! topics when the broker lost the session, and sends the newest status.
//! Desired-state frames and rpc requests are handed on untouched; judging
//! them is the caller's business. Rpc responses given back are published on
//! `rpc/res` (QoS 1, not retained) while connected, and dropped otherwise:
//! their caller has a timeout.
//!
//! Three tasks: one polls the event loop and nothing else (its `poll` future
//! is never cancelled mid-write), one publishes statuses through the client
//! whenever the session is up and the status changed or the session is new,
//! one publishes rpc responses.
//!
//! With a device certificate (`mqtts://`) the session connects over TLS
//! (rustls on ring, the fleet CA as the only root, see `tls.rs`), a fourth
//! task renews the certificate, and a renewed one is loaded before the
//! next reconnect; a live connection keeps the certificate it began with.

use std::time::Duration;

use flotilla_proto::{EncodeError, NodeStatus, Presence, TopicKind, Topics, encode};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet,
    QoS,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BrokerAddr;
use crate::node_info::AGENT_VERSION;

/// Largest packet accepted from the broker: a desired state (1 MiB) with room.
const MAX_INCOMING: usize = 2 * 1024 * 1024 + 4096;
/// Largest packet sent: a status or rpc response (256 KiB each) with room.
const MAX_OUTGOING: usize = 512 * 1024;
/// First reconnect delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a clean shutdown waits for `Offline` and DISCONNECT to go out.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before queueing a status again after the client's queue was full.
const RETRY_QUEUE: Duration = Duration::from_millis(200);

/// What can go wrong in the session (all of it is logged and retried).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A message could not be encoded.
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        source: EncodeError,
    },
    /// The client's request queue refused a request.
    #[error("queueing {what}: {source}")]
    Queue {
        what: &'static str,
        source: rumqttc::ClientError,
    },
    /// The device certificate could not be loaded.
    #[error(transparent)]
    Certificate(#[from] crate::tls::TlsFileError),
}

/// What the session needs to know.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The broker.
    pub broker: BrokerAddr,
    /// This node's name (client id `flotilla-agent-{node}`).
    pub node: String,
    /// Topic names.
    pub topics: Topics,
    /// MQTT keepalive.
    pub keepalive: Duration,
    /// Random id of this agent process, sent in `Online`.
    pub instance: u64,
    /// MQTT password from enrollment; the username is the node name.
    pub password: Option<String>,
}

/// The rpc side of the session: requests out to the agent, response
/// frames back from it.
#[derive(Debug)]
pub struct RpcChannels {
    /// Request payloads from the broker; a full channel drops the request.
    pub requests: mpsc::Sender<Vec<u8>>,
    /// Encoded responses to publish.
    pub responses: mpsc::Receiver<Vec<u8>>,
}

/// Starts the session. Desired-state payloads arrive on `desired`; the
/// newest value of `status` is published whenever it changes and after
/// every (re)connect.
pub fn spawn(
    config: SessionConfig,
    status: watch::Receiver<NodeStatus>,
    desired: mpsc::Sender<Vec<u8>>,
    rpc: RpcChannels,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let presence_topic = config.topics.presence(&config.node);
    let offline = encode(&Presence::Offline).map_err(|source| SessionError::Encode {
        what: "presence",
        source,
    })?;
    let mut options = MqttOptions::new(
        format!("flotilla-agent-{}", config.node),
        config.broker.host.clone(),
        config.broker.port,
    );
    if let Some(password) = &config.password {
        options.set_credentials(config.node.clone(), password.clone());
    }
    options
        .set_clean_session(false)
        .set_keep_alive(config.keepalive)
        .set_max_packet_size(MAX_INCOMING, MAX_OUTGOING)
        .set_request_channel_capacity(16)
        .set_last_will(LastWill::new(
            presence_topic,
            offline,
            QoS::AtLeastOnce,
            true,
        ));
    let mut renewed = None;
    if let Some(dir) = &config.broker.tls {
        options.set_transport(tls_transport(dir)?);
        let (tx, rx) = watch::channel(0u64);
        crate::tls::spawn_renewal(
            dir.clone(),
            config.node.clone(),
            tx,
            tracker,
            shutdown.clone(),
        );
        renewed = Some(rx);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let mut network = NetworkOptions::new();
    // Without TCP_NODELAY each QoS 1 round trip stalls ~44 ms (Nagle plus
    // delayed ACK).
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);

    let (connected_tx, connected_rx) = watch::channel(None);
    let looper = EventLoopTask {
        config: config.clone(),
        client: client.clone(),
        desired,
        rpc_requests: rpc.requests,
        connected: connected_tx,
        renewed,
    };
    let token = shutdown.clone();
    tracker.spawn(async move { looper.run(&mut eventloop, token).await });
    let responder = ResponsePublisher {
        topic: config.topics.node(&config.node, TopicKind::RpcResponse),
        client: client.clone(),
    };
    let (token, connected) = (shutdown.clone(), connected_rx.clone());
    tracker.spawn(async move { responder.run(rpc.responses, connected, token).await });
    let publisher = StatusPublisher {
        topic: config.topics.status(&config.node),
        client,
        seq: 0,
    };
    tracker.spawn(async move { publisher.run(status, connected_rx, shutdown).await });
    Ok(())
}

struct EventLoopTask {
    config: SessionConfig,
    client: AsyncClient,
    desired: mpsc::Sender<Vec<u8>>,
    rpc_requests: mpsc::Sender<Vec<u8>>,
    /// `Some(n)` while connected, `n` counting connections.
    connected: watch::Sender<Option<u64>>,
    /// Bumped by the renewal task when a new certificate is stored.
    renewed: Option<watch::Receiver<u64>>,
}

/// Resolves once the renewal task has stored a certificate this session has
/// not loaded yet; never without one. A device the broker refuses for an
/// expired certificate (switched off past its expiry) so reconnects as soon
/// as it is renewed, not at the end of a back-off grown meanwhile. Waits on
/// a clone: the session's own receiver still sees the change and loads it.
async fn renewal(renewed: Option<&watch::Receiver<u64>>) {
    if let Some(mut renewed) = renewed.cloned() {
        if renewed.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// The TLS transport from the certificate files in `dir`.
fn tls_transport(dir: &std::path::Path) -> Result<rumqttc::Transport, SessionError> {
    let config = crate::tls::client_config(dir)?;
    Ok(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(config),
    ))
}

impl EventLoopTask {
    async fn run(mut self, eventloop: &mut EventLoop, shutdown: CancellationToken) {
        let desired_topic = self.config.topics.desired(&self.config.node);
        let rpc_topic = self
            .config
            .topics
            .node(&self.config.node, TopicKind::RpcRequest);
        let mut backoff = Backoff::new();
        let mut connections = 0u64;
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    connections += 1;
                    tracing::info!(
                        broker = %self.config.broker.host,
                        port = self.config.broker.port,
                        session_present = ack.session_present,
                        "connected to broker"
                    );
                    // The first connection of this process subscribes even
                    // into a kept session: subscribing makes the broker send
                    // the retained desired state again, which a device whose
                    // data directory was wiped would otherwise never get.
                    let subscribe = !ack.session_present || connections == 1;
                    if let Err(e) = self.on_connected(subscribe, &[&desired_topic, &rpc_topic]) {
                        tracing::warn!("{e}");
                    }
                    self.connected.send_replace(Some(connections));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == rpc_topic {
                        // Never wait on a busy rpc handler here: the event
                        // loop also carries the keepalive.
                        if let Err(e) = self.rpc_requests.try_send(p.payload.to_vec()) {
                            tracing::warn!("dropping an rpc request: {e}");
                        }
                        continue;
                    }
                    if p.topic != desired_topic {
                        tracing::debug!(topic = %p.topic, "ignoring a message on another topic");
                        continue;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        sent = self.desired.send(p.payload.to_vec()) => {
                            if sent.is_err() { break }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.connected.send_replace(None);
                    let delay = backoff.next_delay();
                    if matches!(e, ConnectionError::RequestsDone) {
                        break;
                    }
                    tracing::warn!(
                        broker = %self.config.broker.host,
                        port = self.config.broker.port,
                        "mqtt connection: {e}; retrying in {} ms",
                        delay.as_millis()
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                        () = renewal(self.renewed.as_ref()) => {}
                    }
                    self.reload_certificate(eventloop);
                }
            }
        }
        if self.connected.borrow().is_some() {
            self.goodbye(eventloop).await;
        }
        self.connected.send_replace(None);
    }

    /// Before a reconnect: a renewed certificate replaces the old one.
    fn reload_certificate(&mut self, eventloop: &mut EventLoop) {
        let (Some(renewed), Some(dir)) = (&mut self.renewed, &self.config.broker.tls) else {
            return;
        };
        if !renewed.has_changed().unwrap_or(false) {
            return;
        }
        renewed.borrow_and_update();
        match tls_transport(dir) {
            Ok(transport) => {
                eventloop.mqtt_options.set_transport(transport);
                tracing::info!("connecting with the renewed certificate");
            }
            Err(e) => tracing::warn!("keeping the old certificate: {e}"),
        }
    }

    fn on_connected(&self, subscribe: bool, topics: &[&str]) -> Result<(), SessionError> {
        let online = Presence::Online {
            instance: self.config.instance,
            agent_version: AGENT_VERSION.to_owned(),
        };
        let online = encode(&online).map_err(|source| SessionError::Encode {
            what: "presence",
            source,
        })?;
        let presence_topic = self.config.topics.presence(&self.config.node);
        self.client
            .try_publish(presence_topic, QoS::AtLeastOnce, true, online)
            .map_err(|source| SessionError::Queue {
                what: "presence",
                source,
            })?;
        // The broker kept our subscription when it kept the session;
        // rumqttc does not resubscribe by itself when it did not.
        if subscribe {
            for topic in topics {
                self.client
                    .try_subscribe(*topic, QoS::AtLeastOnce)
                    .map_err(|source| SessionError::Queue {
                        what: "subscription",
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// A clean exit: retained `Offline`, then DISCONNECT (which tells the
    /// broker not to send the will), bounded in time.
    async fn goodbye(&self, eventloop: &mut EventLoop) {
        let topic = self.config.topics.presence(&self.config.node);
        let Ok(offline) = encode(&Presence::Offline) else {
            return;
        };
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, offline)
            .and_then(|()| self.client.try_disconnect())
            .is_err()
        {
            return;
        }
        let flushed = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if flushed.is_err() {
            tracing::warn!("broker did not take the disconnect in time");
        }
    }
}

struct StatusPublisher {
    topic: String,
    client: AsyncClient,
    seq: u64,
}

impl StatusPublisher {
    async fn run(
        mut self,
        mut status: watch::Receiver<NodeStatus>,
        mut connected: watch::Receiver<Option<u64>>,
        shutdown: CancellationToken,
    ) {
        // The connection the newest status went out on; a new connection
        // gets the status again even if nothing changed.
        let mut sent_on: Option<u64> = None;
        let mut dirty = true;
        loop {
            let connection = *connected.borrow_and_update();
            let mut retry = false;
            if let Some(c) = connection {
                if dirty || sent_on != Some(c) {
                    let latest = status.borrow_and_update().clone();
                    match self.publish(latest).await {
                        Ok(()) => {
                            sent_on = Some(c);
                            dirty = false;
                        }
                        Err(e) => {
                            tracing::warn!("status not sent, retrying: {e}");
                            retry = true;
                        }
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY_QUEUE), if retry => {}
                changed = status.changed() => {
                    if changed.is_err() { return }
                    dirty = true;
                }
                changed = connected.changed() => {
                    if changed.is_err() { return }
                }
            }
        }
    }

    async fn publish(&mut self, mut status: NodeStatus) -> Result<(), SessionError> {
        self.seq += 1;
        status.seq = self.seq;
        let frame = encode(&status).map_err(|source| SessionError::Encode {
            what: "status",
            source,
        })?;
        // Non-blocking: while the event loop is backing off the queue is not
        // drained, and a status that cannot be queued is superseded by the
        // one sent on the next connection anyway.
        self.client
            .try_publish(self.topic.as_str(), QoS::AtLeastOnce, true, frame)
            .map_err(|source| SessionError::Queue {
                what: "status",
                source,
            })?;
        tracing::debug!(seq = status.seq, pods = status.pods.len(), "status queued");
        Ok(())
    }
}

struct ResponsePublisher {
    topic: String,
    client: AsyncClient,
}

impl ResponsePublisher {
    async fn run(
        self,
        mut responses: mpsc::Receiver<Vec<u8>>,
        connected: watch::Receiver<Option<u64>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let frame = tokio::select! {
                () = shutdown.cancelled() => return,
                frame = responses.recv() => frame,
            };
            let Some(frame) = frame else { return };
            // While the link is down a queued response would only go out
            // after its caller gave up.
            if connected.borrow().is_none() {
                tracing::debug!("link down: dropping an rpc response");
                continue;
            }
            if let Err(e) =
                self.client
                    .try_publish(self.topic.as_str(), QoS::AtLeastOnce, false, frame)
            {
                tracing::warn!("rpc response not sent: {e}");
            }
        }
    }
}

/// Reconnect delays: doubling from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], each
/// jittered by ±50 % so that a fleet does not reconnect in lockstep after a
/// broker restart.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        base.mul_f64(rand::random_range(0.5..1.5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut b = Backoff::new();
        let mut bases = Vec::new();
        for _ in 0..10 {
            let base = b.next;
            let d = b.next_delay();
            assert!(
                d >= base.mul_f64(0.5) && d <= base.mul_f64(1.5),
                "{d:?} vs {base:?}"
            );
            bases.push(base.as_millis());
        }
        assert_eq!(
            bases,
            [
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
        b.reset();
        assert_eq!(b.next, BACKOFF_MIN);
    }
}
