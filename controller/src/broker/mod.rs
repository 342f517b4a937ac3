//! The embedded MQTT broker (rmqtt 0.24): its fleet-sized settings, and its
//! lifecycle on a dedicated thread with its own tokio runtime.
//!
//! rmqtt has no stop API; aborting its task leaves connections open. So the
//! broker gets a runtime of its own, and stopping it shuts that runtime down,
//! which drops the listener and every connection. rmqtt keeps its state in
//! its `ServerContext`, not in globals, so several brokers can run in one
//! process (tests do).
//!
//! rmqtt logs through the `log` crate. Nothing is printed unless the process
//! installs a `log` logger (e.g. the `tracing-log` bridge).

mod admission;
mod probe;
mod setup;
mod tls;

pub use tls::{TlsError, TlsMaterial};

use std::io;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use std::sync::Arc;

use flotilla_proto::{DesiredState, Message, Topics};
use tokio::sync::oneshot;

use crate::identity::Identity;
use admission::Policy;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long `start` waits for the broker to answer an MQTT CONNECT.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long stopping waits for the broker's tasks to wind down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A desired-state frame plus its topic and MQTT header must fit in a packet.
const MIN_PACKET_SIZE: usize = DesiredState::MAX_BYTES + 64 * 1024;

/// Settings of the embedded broker. `BrokerConfig::new` gives values sized
/// for a fleet of tens of thousands of devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Address the MQTT listener binds. Port 0 picks a free port; the real
    /// one is `EmbeddedBroker::local_addr`.
    pub listen: SocketAddr,
    /// Largest MQTT packet accepted, in bytes; also the largest payload kept
    /// as a retained message. A desired state can be 1 MiB. Default 2 MiB.
    pub max_packet_size: u32,
    /// How long the session of a disconnected client (clean session off) is
    /// kept with its subscriptions and queued messages, for MQTT 3.1.1
    /// clients (MQTT 5 clients ask for their own). Default 7 days, so a
    /// device off the network for a week resumes where it left off.
    pub session_expiry: Duration,
    /// How long a message queued for a disconnected session is kept, unless
    /// an MQTT 5 publisher sets its own expiry. Zero keeps it until the
    /// session expires. Default 7 days. Retained messages never expire.
    pub message_expiry: Duration,
    /// Most messages queued per session while its client is away or slow.
    /// Default 200,000 (the controller's session takes every node's status).
    pub max_queued_messages: usize,
    /// Most QoS 1/2 messages in flight (unacknowledged) per client.
    /// Default 256.
    pub max_inflight: NonZeroU16,
    /// Most retained messages kept (a node uses three topics). When reached,
    /// retained messages on new topics are not stored. Default 1,000,000.
    pub max_retained_messages: usize,
    /// Most client connections at once. Default 100,000.
    pub max_connections: usize,
    /// Threads of the broker's own runtime. Default: the CPUs, at most 4.
    pub worker_threads: NonZeroUsize,
    /// An mTLS listener in front of the plain one (see `tls.rs`); only with
    /// the fleet's identities. Default: none.
    pub tls: Option<TlsMaterial>,
}

impl BrokerConfig {
    /// Defaults sized for a fleet, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        let cpus = thread::available_parallelism().map_or(2, NonZeroUsize::get);
        Self {
            listen,
            max_packet_size: 2 * 1024 * 1024,
            session_expiry: 7 * DAY,
            message_expiry: 7 * DAY,
            // The controller's one session receives every node's status: a
            // fleet-wide burst (an apply, a broker restart) must queue, not
            // drop. A device's session only ever queues its own desired
            // state and requests, so the cap costs nothing there.
            max_queued_messages: 200_000,
            max_inflight: NonZeroU16::new(256).unwrap_or(NonZeroU16::MIN),
            max_retained_messages: 1_000_000,
            max_connections: 100_000,
            worker_threads: NonZeroUsize::new(cpus.min(4)).unwrap_or(NonZeroUsize::MIN),
            tls: None,
        }
    }

    fn validate(&self) -> Result<(), BrokerError> {
        let packet = usize::try_from(self.max_packet_size).unwrap_or(usize::MAX);
        if packet < MIN_PACKET_SIZE {
            return Err(BrokerError::PacketSizeTooSmall {
                got: self.max_packet_size,
                min: MIN_PACKET_SIZE,
            });
        }
        if self.session_expiry.is_zero() {
            return Err(BrokerError::ZeroSessionExpiry);
        }
        Ok(())
    }
}

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// `max_packet_size` cannot carry a desired-state message.
    #[error(
        "mqtt broker config: max_packet_size: {got} bytes is too small, expected at least {min}"
    )]
    PacketSizeTooSmall { got: u32, min: usize },
    /// `session_expiry` is zero: sessions would end with every disconnect.
    #[error("mqtt broker config: session_expiry: zero, expected a positive duration")]
    ZeroSessionExpiry,
    /// The listen address could not be bound (in use, not local, no right).
    #[error("mqtt listen address {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    /// The broker's tokio runtime could not be built.
    #[error("mqtt broker runtime: {source}")]
    Runtime { source: io::Error },
    /// The broker's thread could not be spawned.
    #[error("mqtt broker thread: {source}")]
    Thread { source: io::Error },
    /// rmqtt refused part of its setup.
    #[error("mqtt broker setup: {step}: {source}")]
    Setup {
        step: &'static str,
        source: BoxError,
    },
    /// The broker did not answer an MQTT CONNECT in time.
    #[error("mqtt broker on {addr} did not answer a connect within {waited:?}: {source}")]
    NotReady {
        addr: SocketAddr,
        waited: Duration,
        source: io::Error,
    },
    /// The broker's thread ended before reporting (it panicked).
    #[error("mqtt broker thread exited before the broker was ready")]
    Exited,
    /// The TLS listener could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A TLS listener was asked without the fleet's identities to check
    /// certificates against.
    #[error("mqtt broker config: a tls listener needs the fleet's identities")]
    TlsWithoutIdentity,
}

/// A running embedded broker. Stopped by `shutdown` or on drop; both block
/// until the port is free again (at most a few seconds).
#[derive(Debug)]
pub struct EmbeddedBroker {
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts the broker and returns once it answers MQTT on its address.
    /// Blocks for that long (milliseconds usually, `START_TIMEOUT` at most):
    /// from async code, call it through `spawn_blocking`.
    pub fn start(config: BrokerConfig) -> Result<EmbeddedBroker, BrokerError> {
        Self::start_with(config, Policy::AllowAll)
    }

    /// Starts the broker with the fleet's identities: devices authenticate
    /// with the credential `join` gave them and may use only their own
    /// topics; the controller's session (`identity::CONTROLLER_USERNAME`)
    /// may use every topic. See `admission.rs`.
    pub fn start_with_identity(
        config: BrokerConfig,
        identity: Arc<Identity>,
        topics: Topics,
    ) -> Result<EmbeddedBroker, BrokerError> {
        Self::start_with(config, Policy::Fleet { identity, topics })
    }

    fn start_with(config: BrokerConfig, policy: Policy) -> Result<EmbeddedBroker, BrokerError> {
        config.validate()?;
        let listen = config.listen;
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = thread::Builder::new()
            .name("flotilla-broker".into())
            .spawn(move || serve(config, policy, ready_tx, stop_rx))
            .map_err(|source| BrokerError::Thread { source })?;

        // The thread enforces START_TIMEOUT itself; the margin only matters
        // if rmqtt's setup hangs before the probe even begins.
        let waited = START_TIMEOUT + SHUTDOWN_GRACE;
        match ready_rx.recv_timeout(waited) {
            Ok(Ok((local_addr, tls_addr))) => Ok(EmbeddedBroker {
                local_addr,
                tls_addr,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                join(thread);
                Err(e)
            }
            Err(RecvTimeoutError::Timeout) => {
                // Dropping the sender stops the thread whenever it gets
                // there; it is not joined, as it may be stuck.
                drop(stop_tx);
                Err(BrokerError::NotReady {
                    addr: listen,
                    waited,
                    source: io::Error::new(io::ErrorKind::TimedOut, "broker setup did not finish"),
                })
            }
            Err(RecvTimeoutError::Disconnected) => {
                join(thread);
                Err(BrokerError::Exited)
            }
        }
    }

    /// The address the broker listens on, with the real port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the mTLS listener, with the real port, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Stops the broker: closes every client connection (no wills are sent)
    /// and frees the port. Blocks until done.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the broker already stopped on its own.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            join(thread);
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn join(thread: JoinHandle<()>) {
    if thread.join().is_err() {
        tracing::error!("mqtt broker thread panicked");
    }
}

/// Body of the broker thread: build, serve until told to stop, shut down.
fn serve(
    config: BrokerConfig,
    policy: Policy,
    ready: SyncSender<Result<(SocketAddr, Option<SocketAddr>), BrokerError>>,
    stop: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.get())
        .thread_name("flotilla-broker-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(source) => {
            let _ = ready.send(Err(BrokerError::Runtime { source }));
            return;
        }
    };

    runtime.block_on(async move {
        let built = match setup::build(&config, policy).await {
            Ok(built) => built,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let local_addr = built.local_addr;
        let tls_addr = built.tls_addr;
        let serving = tokio::spawn(built.server.run());
        for task in built.tasks {
            tokio::spawn(task);
        }
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        if let Err(source) = probe::until_ready(local_addr, deadline).await {
            let _ = ready.send(Err(BrokerError::NotReady {
                addr: local_addr,
                waited: START_TIMEOUT,
                source,
            }));
            return;
        }
        if ready.send(Ok((local_addr, tls_addr))).is_err() {
            return; // `start` gave up waiting
        }
        tracing::debug!(addr = %local_addr, "mqtt broker answering");
        tokio::select! {
            _ = stop => {}
            outcome = serving => {
                tracing::error!(?outcome, "mqtt broker stopped serving on its own");
            }
        }
    });

    // Dropping every task closes the listener and all client connections.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    tracing::debug!("mqtt broker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[test]
    fn defaults_are_fleet_sized() {
        let config = BrokerConfig::new(loopback());
        assert!(config.validate().is_ok());
        assert!(config.max_packet_size >= 2 * 1024 * 1024);
        assert!(config.session_expiry >= 7 * DAY);
        assert!(config.message_expiry >= 7 * DAY);
    }

    #[test]
    fn too_small_packets_are_refused_before_starting() {
        let mut config = BrokerConfig::new(loopback());
        config.max_packet_size = 1024 * 1024;
        let err = EmbeddedBroker::start(config).unwrap_err();
        assert!(
            matches!(err, BrokerError::PacketSizeTooSmall { got: 1048576, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("max_packet_size"), "{err}");
    }

    #[test]
    fn zero_session_expiry_is_refused() {
        let mut config = BrokerConfig::new(loopback());
        config.session_expiry = Duration::ZERO;
        let err = EmbeddedBroker::start(config).unwrap_err();
        assert!(matches!(err, BrokerError::ZeroSessionExpiry), "{err}");
    }

    /// Not the readiness probe's id: see `probe::connack_code`.
    const TEST_CLIENT_ID: &[u8] = b"flotilla-broker-test";

    fn connack(broker: &EmbeddedBroker, keepalive_secs: u16) -> u8 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(probe::connack_code(
            broker.local_addr(),
            TEST_CLIENT_ID,
            keepalive_secs,
        ))
        .unwrap()
    }

    /// With rmqtt's default `allow_anonymous = true`, a client without a
    /// username never reaches the authenticate hook. Proven here by a policy
    /// that refuses everyone: anonymous clients must be refused too.
    #[test]
    fn anonymous_clients_go_through_admission() {
        let refusing =
            EmbeddedBroker::start_with(BrokerConfig::new(loopback()), Policy::DenyAll).unwrap();
        assert_eq!(connack(&refusing, 30), 5, "expected 'not authorized'");
        refusing.shutdown();

        let admitting = EmbeddedBroker::start(BrokerConfig::new(loopback())).unwrap();
        assert_eq!(connack(&admitting, 30), 0, "expected 'accepted'");
        admitting.shutdown();
    }

    /// Without keepalive a half-open link is never noticed and the device's
    /// will (its Offline presence) never published.
    #[test]
    fn zero_keepalive_is_refused() {
        let broker = EmbeddedBroker::start(BrokerConfig::new(loopback())).unwrap();
        assert_ne!(connack(&broker, 0), 0, "keepalive 0 must not be accepted");
        assert_eq!(connack(&broker, 5), 0);
    }
}
