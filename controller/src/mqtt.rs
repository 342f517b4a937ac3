//! The controller's MQTT session — the only module that touches rumqttc.
//! It subscribes to every node's status and presence, hands what arrives to
//! the control loop as raw frames, and publishes desired state signed and retained. It
//! also carries requests to agents (`rpc/req`, QoS 1, not retained) and
//! hands their responses (`…/node/+/rpc/res`) straight to the pending
//! requests of [`Rpc`], not through the control loop.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{RpcCall, RpcResult, TopicKind, Topics};
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::identity::SigningKey;
use crate::identity::signing::SigningError;
use crate::rpc::{Rpc, RpcError};

/// Largest MQTT packet accepted or sent (a desired state is at most 1 MiB).
const MAX_PACKET: usize = 2 * 1024 * 1024;

/// Where the broker is and how to talk to it.
#[derive(Clone)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id of the controller.
    pub client_id: String,
    /// Topic names.
    pub topics: Topics,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// Signs every desired state published.
    pub signer: Arc<SigningKey>,
    /// Username and password for the broker (the embedded one's controller
    /// credential), if it wants them.
    pub credentials: Option<(String, String)>,
    /// TLS to an external broker (`mqtts://`), with a client certificate.
    pub tls: Option<ClientTls>,
}

/// The controller's side of mTLS to an external broker.
#[derive(Clone)]
pub struct ClientTls {
    /// The only root: the fleet CA (DER), which signed the broker's certificate.
    pub ca_der: Vec<u8>,
    /// The controller's client certificate (DER).
    pub cert_der: Vec<u8>,
    /// Its key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

/// A rustls client config on ring for `tls`.
fn tls_transport(tls: &ClientTls) -> Result<rumqttc::Transport, rustls::Error> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(tls.ca_der.clone()))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from(tls.cert_der.clone())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(tls.key_der.clone())),
    )?;
    Ok(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ))
}

/// What the session hands to the control loop.
#[derive(Debug)]
pub enum Incoming {
    /// (Re)connected: every subscription is fresh and retained messages follow.
    Connected,
    /// A frame on a node's status topic.
    Status { node: String, frame: Vec<u8> },
    /// A frame on a node's presence topic.
    Presence { node: String, frame: Vec<u8> },
}

/// Errors from publishing.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The session's request queue is closed (the session stopped).
    #[error("mqtt session stopped: {0}")]
    Closed(#[from] rumqttc::ClientError),
    /// The desired state could not be signed into a frame.
    #[error("signing desired state: {0}")]
    Sign(#[from] SigningError),
}

/// Handle for publishing.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    topics: Topics,
    rpc: Rpc,
    signer: Arc<SigningKey>,
}

impl MqttHandle {
    /// Publishes a node's desired-state frame, signed, retained, QoS 1.
    /// Waits while the outgoing queue is full rather than dropping.
    pub async fn publish_desired(&self, node: &str, frame: Vec<u8>) -> Result<(), MqttError> {
        let frame = self.signer.sign_desired(frame)?;
        self.client
            .publish(self.topics.desired(node), QoS::AtLeastOnce, true, frame)
            .await?;
        Ok(())
    }

    /// The key desired states are signed with; exec requests too.
    pub fn signer(&self) -> &SigningKey {
        &self.signer
    }

    /// Asks `node`'s agent `call` and waits at most `timeout` for its answer.
    pub async fn request(
        &self,
        node: &str,
        call: RpcCall,
        timeout: Duration,
    ) -> Result<RpcResult, RpcError> {
        let topic = self.topics.node(node, TopicKind::RpcRequest);
        self.rpc
            .call(node, call, timeout, async |frame: Vec<u8>| {
                self.client
                    .publish(topic, QoS::AtLeastOnce, false, frame)
                    .await
            })
            .await
    }
}

/// Starts the session: returns the publish handle, and a task that runs the
/// event loop until `shutdown`, feeding `incoming`.
pub fn start(
    config: MqttConfig,
    incoming: mpsc::UnboundedSender<Incoming>,
    shutdown: CancellationToken,
) -> (MqttHandle, impl std::future::Future<Output = ()>) {
    let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    options.set_keep_alive(config.keepalive);
    if let Some((username, password)) = &config.credentials {
        options.set_credentials(username.clone(), password.clone());
    }
    if let Some(tls) = &config.tls {
        match tls_transport(tls) {
            Ok(transport) => {
                options.set_transport(transport);
            }
            // Certificates made by this process a moment ago: only a bug
            // gets here, and plain MQTT would be refused by the broker.
            Err(e) => tracing::error!("mqtt tls client config: {e}"),
        }
    }
    // A clean session: on every connect the controller subscribes afresh and
    // the broker replays every retained status and presence, so the control
    // loop rebuilds its view of the fleet from what the broker holds.
    options.set_clean_session(true);
    options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 4096);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(5);
    eventloop.set_network_options(network);

    let rpc = Rpc::new();
    let handle = MqttHandle {
        client: client.clone(),
        topics: config.topics.clone(),
        rpc: rpc.clone(),
        signer: Arc::clone(&config.signer),
    };
    let task = async move {
        tokio::select! {
            () = run(&config, &client, &mut eventloop, &incoming, &rpc) => {}
            () = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = client.disconnect().await;
                    // Drive the loop so the DISCONNECT is actually sent.
                    while eventloop.poll().await.is_ok() {}
                })
                .await;
            }
        }
    };
    (handle, task)
}

async fn run(
    config: &MqttConfig,
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    incoming: &mpsc::UnboundedSender<Incoming>,
    rpc: &Rpc,
) {
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                tracing::info!(broker = %format!("{}:{}", config.host, config.port), "connected to broker");
                for kind in [
                    TopicKind::Presence,
                    TopicKind::Status,
                    TopicKind::RpcResponse,
                ] {
                    if let Err(e) = client
                        .subscribe(config.topics.all_nodes(kind), QoS::AtLeastOnce)
                        .await
                    {
                        tracing::error!("subscribing: {e}");
                    }
                }
                if incoming.send(Incoming::Connected).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let Some((node, kind)) = config.topics.parse(&publish.topic) else {
                    tracing::debug!(topic = %publish.topic, "ignoring message on an unknown topic");
                    continue;
                };
                let node = node.to_string();
                let frame = publish.payload.to_vec();
                let msg = match kind {
                    TopicKind::Status => Incoming::Status { node, frame },
                    TopicKind::Presence => Incoming::Presence { node, frame },
                    TopicKind::RpcResponse => {
                        rpc.deliver(&node, &frame);
                        continue;
                    }
                    _ => continue,
                };
                if incoming.send(msg).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = backoff(failures);
                tracing::warn!(
                    "broker {}:{}: {e}; retrying in {delay:?}",
                    config.host,
                    config.port
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Jittered exponential back-off: 0.25 s doubling to 10 s, ±50 %.
fn backoff(failures: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << failures.min(6)).min(10_000);
    let jitter = rand::rng().random_range(0.5..1.5);
    Duration::from_millis((base as f64 * jitter) as u64)
}
