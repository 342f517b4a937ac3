//! `flotilla serve`: the controller process — store, embedded or external
//! broker, MQTT session, control loop and HTTP API — started together and
//! stopped together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_proto::Topics;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{BrokerConfig, EmbeddedBroker};
use crate::identity::{CONTROLLER_USERNAME, Identity, SigningKey};
use crate::store::Store;
use crate::{api, control, identity, mqtt};

/// Which MQTT broker the controller uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// Run the embedded broker, listening on this address.
    Embedded { listen: SocketAddr },
    /// Use a broker that runs elsewhere.
    External { host: String, port: u16 },
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// Address of the HTTP API.
    pub api_listen: SocketAddr,
    /// The broker.
    pub broker: BrokerChoice,
    /// Topic names.
    pub topics: Topics,
    /// A node not heard from for this long is marked NotReady.
    pub node_timeout: Duration,
    /// The embedded broker also admits clients without credentials (with
    /// every right, as before device identity): quick starts and old agents.
    pub allow_anonymous: bool,
}

/// Parses `mqtt://host:port` (port defaults to 1883).
pub fn parse_broker_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .with_context(|| format!("broker url {url:?}: expected mqtt://HOST[:PORT]"))?;
    let rest = rest.trim_end_matches('/');
    let port_of = |p: &str| {
        p.parse::<u16>()
            .with_context(|| format!("broker url {url:?}: bad port {p:?}"))
    };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("broker url {url:?}: unclosed '['"))?;
        match after.strip_prefix(':') {
            Some(p) => (host, port_of(p)?),
            None if after.is_empty() => (host, 1883),
            None => anyhow::bail!("broker url {url:?}: unexpected {after:?} after the address"),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((host, p)) => (host, port_of(p)?),
            None => (rest, 1883),
        }
    };
    anyhow::ensure!(!host.is_empty(), "broker url {url:?}: empty host");
    Ok((host.to_string(), port))
}

/// Runs the controller until `shutdown` is cancelled; nothing it started is
/// left running when it returns.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let store_path = config.data_dir.join("store.redb");
    let store = tokio::task::spawn_blocking(move || Store::open(&store_path)).await??;
    let store = Arc::new(store);
    let (signer, identity) = {
        let dir = config.data_dir.clone();
        let allow_anonymous = config.allow_anonymous;
        tokio::task::spawn_blocking(move || {
            let signer = SigningKey::load_or_create(&dir).context("desired-state signing key")?;
            let identity =
                Identity::open(&dir, allow_anonymous).context("opening the identity store")?;
            anyhow::Ok((Arc::new(signer), identity))
        })
        .await??
    };
    tracing::info!(key = %signer.public_base64(), "desired state signed with this key");

    let (broker, host, port) = match &config.broker {
        BrokerChoice::Embedded { listen } => {
            let listen = *listen;
            let identity = Arc::clone(&identity);
            let topics = config.topics.clone();
            let broker = tokio::task::spawn_blocking(move || {
                EmbeddedBroker::start_with_identity(BrokerConfig::new(listen), identity, topics)
            })
            .await?
            .context("starting the embedded broker")?;
            let addr = broker.local_addr();
            tracing::info!(%addr, "embedded MQTT broker listening");
            let host = if addr.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                addr.ip().to_string()
            };
            (Some(broker), host, addr.port())
        }
        BrokerChoice::External { host, port } => (None, host.clone(), *port),
    };

    // The controller's own credential exists only for the embedded broker;
    // an external one is configured on its own.
    let credentials = broker.as_ref().map(|_| {
        (
            CONTROLLER_USERNAME.to_owned(),
            identity.controller_password().to_owned(),
        )
    });
    let trust = Trust {
        signer,
        identity,
        credentials,
    };
    let result = run_services(&config, store, host, port, trust, shutdown).await;
    if let Some(broker) = broker {
        tokio::task::spawn_blocking(move || broker.shutdown()).await?;
    }
    result
}

/// The controller's keys and the fleet's identities.
struct Trust {
    signer: Arc<SigningKey>,
    identity: Arc<Identity>,
    credentials: Option<(String, String)>,
}

async fn run_services(
    config: &ServeConfig,
    store: Arc<Store>,
    host: String,
    port: u16,
    trust: Trust,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let stop = shutdown.child_token();

    // Unbounded on purpose: the MQTT event loop must never wait on the
    // control loop, which itself waits on the event loop's request queue
    // when it publishes; a bound here could deadlock the two under a burst
    // of statuses. What queues is bounded by what the broker delivers.
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    let mqtt_config = mqtt::MqttConfig {
        host,
        port,
        client_id: format!("flotilla-controller-{}", std::process::id()),
        topics: config.topics.clone(),
        keepalive: Duration::from_secs(30),
        signer: Arc::clone(&trust.signer),
        credentials: trust.credentials,
    };
    let (mqtt, mqtt_task) = mqtt::start(mqtt_config, incoming_tx, stop.clone());
    let (control, control_task) = control::start(
        store,
        mqtt.clone(),
        incoming_rx,
        config.node_timeout,
        stop.clone(),
    )?;

    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the API to {}", config.api_listen))?;
    tracing::info!(addr = %listener.local_addr()?, "API listening");

    tracker.spawn(mqtt_task);
    tracker.spawn(control_task);
    let api_stop = stop.clone();
    let app = api::router(control, mqtt).merge(identity::api::router(trust.identity, trust.signer));
    let api = tracker.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { api_stop.cancelled().await })
            .await
    });
    tracker.close();

    let api_result = tokio::select! {
        () = stop.cancelled() => Ok(()),
        r = api => r.context("API task").and_then(|r| r.context("API server")),
    };
    stop.cancel();
    tracker.wait().await;
    api_result
}

#[cfg(test)]
mod tests {
    use super::parse_broker_url;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://10.0.0.1:1884").unwrap(),
            ("10.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_broker_url("mqtt://broker.local").unwrap(),
            ("broker.local".into(), 1883)
        );
        assert_eq!(
            parse_broker_url("mqtt://[::1]:1883").unwrap(),
            ("::1".into(), 1883)
        );
        assert!(
            parse_broker_url("http://x")
                .unwrap_err()
                .to_string()
                .contains("expected mqtt://")
        );
        assert!(
            parse_broker_url("mqtt://x:port")
                .unwrap_err()
                .to_string()
                .contains("bad port")
        );
        assert!(parse_broker_url("mqtt://:1883").is_err());
    }
}
