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

use crate::auth::tls::ApiTls;
use crate::broker::{BrokerConfig, EmbeddedBroker, TlsMaterial};
use crate::identity::ca::Ca;
use crate::identity::certs::Issuer;
use crate::identity::{CONTROLLER_USERNAME, Identity, SigningKey};
use crate::store::Store;
use crate::{api, auth, broker_config, control, identity, mqtt};

/// Which MQTT broker the controller uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// Run the embedded broker, listening on this address.
    Embedded { listen: SocketAddr },
    /// Use a broker that runs elsewhere; `tls`: `mqtts://`, with the
    /// controller's own client certificate from the fleet CA.
    External { host: String, port: u16, tls: bool },
}

/// MQTT over TLS: device certificates and the embedded broker's mTLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTls {
    /// The embedded broker's mTLS listener; `None`: none (devices then join
    /// with passwords, unless the external broker is `mqtts://`).
    pub listen: Option<SocketAddr>,
    /// Names and addresses in the embedded broker's server certificate;
    /// empty: the listen address, or for an unspecified one the host name,
    /// `localhost` and `127.0.0.1`. The first is the one advertised.
    pub sans: Vec<String>,
    /// The broker address devices are told at join; default
    /// `mqtts://{first SAN}:{port}` (embedded) or the `--broker` address.
    pub advertise: Option<String>,
    /// How long a device certificate is valid.
    pub cert_lifetime: Duration,
    /// How long after expiry a device may still renew with its key.
    pub renew_grace: Duration,
}

impl Default for MqttTls {
    fn default() -> Self {
        Self {
            listen: None,
            sans: Vec::new(),
            advertise: None,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            renew_grace: DEFAULT_RENEW_GRACE,
        }
    }
}

/// Default lifetime of device certificates: 90 days.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// Default renewal grace: 180 days, so a device switched off for a season
/// (a shop closed, a machine in storage) comes back without a new token.
pub const DEFAULT_RENEW_GRACE: Duration = Duration::from_secs(180 * 24 * 3600);
/// Lifetime of the controller's own client certificate for an external
/// broker (made at every start, kept in memory only).
const CONTROLLER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

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
    /// HTTPS for the API (or plain HTTP on loopback).
    pub api_tls: ApiTls,
    /// MQTT over TLS.
    pub mqtt_tls: MqttTls,
}

/// Parses `mqtt://host:port` (port defaults to 1883) or `mqtts://host:port`
/// (8883); the flag says which.
pub fn parse_broker_url(url: &str) -> anyhow::Result<(String, u16, bool)> {
    let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true, 8883)
    } else {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .with_context(|| {
                format!("broker url {url:?}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
            })?;
        (rest, false, 1883)
    };
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
            None if after.is_empty() => (host, default_port),
            None => anyhow::bail!("broker url {url:?}: unexpected {after:?} after the address"),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((host, p)) => (host, port_of(p)?),
            None => (rest, default_port),
        }
    };
    anyhow::ensure!(!host.is_empty(), "broker url {url:?}: empty host");
    Ok((host.to_string(), port, tls))
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

    let tls = &config.mqtt_tls;
    let ca = if tls.listen.is_some()
        || matches!(config.broker, BrokerChoice::External { tls: true, .. })
    {
        let dir = config.data_dir.clone();
        let ca = tokio::task::spawn_blocking(move || Ca::load_or_create(&dir))
            .await?
            .context("the fleet ca")?;
        Some(ca)
    } else {
        None
    };
    let mut client_tls = None;
    let (broker, host, port) = match &config.broker {
        BrokerChoice::Embedded { listen } => {
            let mut settings = BrokerConfig::new(*listen);
            let mut sans = tls.sans.clone();
            if let (Some(tls_listen), Some(ca)) = (tls.listen, &ca) {
                if sans.is_empty() {
                    sans = default_sans(tls_listen);
                }
                let server = ca.issue_server(&sans).context("the broker's certificate")?;
                settings.tls = Some(TlsMaterial {
                    listen: tls_listen,
                    ca_der: ca.cert_der().to_vec(),
                    cert_der: server.cert.der,
                    key_der: server.key_der,
                });
            }
            let hooks = Arc::clone(&identity);
            let topics = config.topics.clone();
            let broker = tokio::task::spawn_blocking(move || {
                EmbeddedBroker::start_with_identity(settings, hooks, topics)
            })
            .await?
            .context("starting the embedded broker")?;
            let addr = broker.local_addr();
            tracing::info!(%addr, "embedded MQTT broker listening");
            if let (Some(tls_addr), Some(ca)) = (broker.tls_addr(), ca) {
                let first = sans.first().map_or("localhost", String::as_str);
                let url = tls
                    .advertise
                    .clone()
                    .unwrap_or_else(|| format!("mqtts://{}:{}", url_host(first), tls_addr.port()));
                tracing::info!(addr = %tls_addr, advertised = %url, ?sans, "embedded MQTT broker's mTLS listener");
                identity.set_issuer(Issuer {
                    ca,
                    lifetime: tls.cert_lifetime,
                    renew_grace: tls.renew_grace,
                    broker_url: url,
                });
            }
            let host = if addr.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                addr.ip().to_string()
            };
            (Some(broker), host, addr.port())
        }
        BrokerChoice::External {
            host,
            port,
            tls: external_tls,
        } => {
            if let (true, Some(ca)) = (*external_tls, ca) {
                let own = ca
                    .issue_client(CONTROLLER_USERNAME, CONTROLLER_CERT_LIFETIME)
                    .context("the controller's client certificate")?;
                client_tls = Some(mqtt::ClientTls {
                    ca_der: ca.cert_der().to_vec(),
                    cert_der: own.cert.der,
                    key_der: own.key_der,
                });
                let url = tls
                    .advertise
                    .clone()
                    .unwrap_or_else(|| format!("mqtts://{}:{port}", url_host(host)));
                identity.set_issuer(Issuer {
                    ca,
                    lifetime: tls.cert_lifetime,
                    renew_grace: tls.renew_grace,
                    broker_url: url,
                });
            }
            (None, host.clone(), *port)
        }
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
        client_tls,
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
    client_tls: Option<mqtt::ClientTls>,
}

/// The broker certificate's names when none are given.
fn default_sans(listen: SocketAddr) -> Vec<String> {
    if !listen.ip().is_unspecified() {
        return vec![listen.ip().to_string()];
    }
    let mut sans = Vec::new();
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let name = name.trim();
        if !name.is_empty() && name != "localhost" {
            sans.push(name.to_owned());
        }
    }
    sans.extend(["localhost".to_owned(), "127.0.0.1".to_owned()]);
    sans
}

/// A host as it goes in a URL (IPv6 in brackets).
fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
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
        tls: trust.client_tls,
    };
    let (mqtt, mqtt_task) = mqtt::start(mqtt_config, incoming_tx, stop.clone());
    let sealer = {
        let dir = config.data_dir.clone();
        let identity = Arc::clone(&trust.identity);
        tokio::task::spawn_blocking(move || crate::secrets::Sealer::open(&dir, identity))
            .await?
            .context("the secrets key")?
    };
    let (control, control_task) = control::start(
        store,
        mqtt.clone(),
        incoming_rx,
        config.node_timeout,
        Arc::new(sealer),
        stop.clone(),
    )?;

    let guard = {
        let identity = Arc::clone(&trust.identity);
        let dir = config.data_dir.clone();
        let (tls, listen) = (config.api_tls.clone(), config.api_listen);
        tokio::task::spawn_blocking(move || auth::prepare(identity, &dir, &tls, listen))
            .await?
            .context("api tokens and tls")?
    };
    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the API to {}", config.api_listen))?;
    let scheme = if guard.tls.is_some() { "https" } else { "http" };
    tracing::info!(addr = %listener.local_addr()?, scheme, "API listening");

    tracker.spawn(mqtt_task);
    tracker.spawn(control_task);
    let api_stop = stop.clone();
    let app = api::router(control, mqtt)
        .merge(broker_config::router(
            Arc::clone(&trust.identity),
            config.topics.clone(),
        ))
        .merge(identity::api::router(trust.identity, trust.signer));
    let api = tracker.spawn(async move {
        auth::serve(listener, guard, app, async move {
            api_stop.cancelled().await;
        })
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
            ("10.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_broker_url("mqtt://broker.local").unwrap(),
            ("broker.local".into(), 1883, false)
        );
        assert_eq!(
            parse_broker_url("mqtts://broker.local").unwrap(),
            ("broker.local".into(), 8883, true)
        );
        assert_eq!(
            parse_broker_url("mqtt://[::1]:1883").unwrap(),
            ("::1".into(), 1883, false)
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
