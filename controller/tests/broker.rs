//! The embedded broker against real rumqttc clients: retained messages,
//! persistent sessions, last wills, shutdown and restart on the same port,
//! port conflicts, and desired-state-sized payloads.
// Clippy's test allowance covers `#[test]` bodies, not the helpers here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_controller::broker::{BrokerConfig, BrokerError, EmbeddedBroker};
use flotilla_proto::{DesiredState, Message};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, MqttOptions, NetworkOptions,
    Outgoing, Packet, Publish, QoS,
};
use tokio::time::{Instant, timeout};

/// Generous bound on every wait; conditions are polled, not slept on.
const DEADLINE: Duration = Duration::from_secs(20);

/// Client-side packet cap, above the broker's.
const CLIENT_MAX_PACKET: usize = 4 * 1024 * 1024;

fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Unique per test run, so parallel tests never share names.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// `start` blocks until the broker answers: keep it off the async thread.
async fn start(config: BrokerConfig) -> Result<EmbeddedBroker, BrokerError> {
    tokio::task::spawn_blocking(move || EmbeddedBroker::start(config))
        .await
        .expect("start task")
}

async fn start_default() -> EmbeddedBroker {
    start(BrokerConfig::new(loopback_any_port()))
        .await
        .expect("broker starts")
}

async fn shutdown(broker: EmbeddedBroker) {
    tokio::task::spawn_blocking(move || broker.shutdown())
        .await
        .expect("shutdown task");
}

fn options(addr: SocketAddr, id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(CLIENT_MAX_PACKET, CLIENT_MAX_PACKET);
    options
}

fn client(options: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Polls `eventloop` until `pick` returns something, failing the test at the
/// deadline or on a connection error.
async fn until<T>(
    eventloop: &mut EventLoop,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let waited = timeout(DEADLINE, async {
        loop {
            match eventloop.poll().await {
                Ok(event) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                Err(e) => panic!("waiting for {what}: connection error: {e}"),
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("waiting for {what}: nothing within {DEADLINE:?}"))
}

/// Waits for the CONNACK; returns `session_present`.
async fn connected(eventloop: &mut EventLoop) -> bool {
    until(eventloop, "connack", |event| match event {
        Event::Incoming(Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, ConnectReturnCode::Success, "connection refused");
            Some(ack.session_present)
        }
        _ => None,
    })
    .await
}

async fn subscribed(client: &AsyncClient, eventloop: &mut EventLoop, topic: &str) {
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    until(eventloop, "suback", |event| {
        matches!(event, Event::Incoming(Packet::SubAck(_))).then_some(())
    })
    .await;
}

async fn published(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    retain: bool,
    payload: Vec<u8>,
) {
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
        .expect("queue publish");
    until(eventloop, "puback", |event| {
        matches!(event, Event::Incoming(Packet::PubAck(_))).then_some(())
    })
    .await;
}

async fn message_on(eventloop: &mut EventLoop, topic: &str) -> Publish {
    until(
        eventloop,
        &format!("a message on {topic}"),
        |event| match event {
            Event::Incoming(Packet::Publish(p)) if p.topic == topic => Some(p.clone()),
            _ => None,
        },
    )
    .await
}

/// A connected, subscribed client.
async fn subscriber(addr: SocketAddr, topic: &str) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = client(options(addr, &unique("sub")));
    connected(&mut eventloop).await;
    subscribed(&client, &mut eventloop, topic).await;
    (client, eventloop)
}

/// A connected client that only publishes.
async fn publisher(addr: SocketAddr) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = client(options(addr, &unique("pub")));
    connected(&mut eventloop).await;
    (client, eventloop)
}

#[tokio::test]
async fn retained_qos1_message_reaches_a_later_subscriber() {
    let broker = start_default().await;
    let topic = unique("flotilla/v1/node/n1/desired");

    let (pub_client, mut pub_loop) = publisher(broker.local_addr()).await;
    published(
        &pub_client,
        &mut pub_loop,
        &topic,
        true,
        b"generation 7".to_vec(),
    )
    .await;

    let (_sub, mut sub_loop) = subscriber(broker.local_addr(), &topic).await;
    let got = message_on(&mut sub_loop, &topic).await;
    assert_eq!(&got.payload[..], b"generation 7");
    assert!(
        got.retain,
        "a retained message must arrive flagged retained"
    );
    assert_eq!(got.qos, QoS::AtLeastOnce);

    shutdown(broker).await;
}

#[tokio::test]
async fn persistent_session_gets_what_was_published_while_away() {
    let broker = start_default().await;
    let addr = broker.local_addr();
    let topic = unique("flotilla/v1/node/n2/rpc/req");
    let device_id = unique("device");
    let mut device_options = options(addr, &device_id);
    device_options.set_clean_session(false);

    let (device, mut device_loop) = client(device_options.clone());
    assert!(!connected(&mut device_loop).await, "a new session");
    subscribed(&device, &mut device_loop, &topic).await;
    device.disconnect().await.expect("queue disconnect");
    until(&mut device_loop, "disconnect sent", |event| {
        matches!(event, Event::Outgoing(Outgoing::Disconnect)).then_some(())
    })
    .await;
    drop(device_loop);

    let (pub_client, mut pub_loop) = publisher(addr).await;
    published(
        &pub_client,
        &mut pub_loop,
        &topic,
        false,
        b"while away".to_vec(),
    )
    .await;

    let (_device, mut device_loop) = client(device_options);
    assert!(
        connected(&mut device_loop).await,
        "the broker must have kept the session"
    );
    let got = message_on(&mut device_loop, &topic).await;
    assert_eq!(&got.payload[..], b"while away");
    assert!(!got.retain);

    shutdown(broker).await;
}

/// A device whose connection dies without DISCONNECT: its will is published.
#[tokio::test]
async fn last_will_is_published_when_the_connection_drops_abruptly() {
    let broker = start_default().await;
    let addr = broker.local_addr();
    let will_topic = unique("flotilla/v1/node/n3/presence");
    let (_watcher, mut watch_loop) = subscriber(addr, &will_topic).await;

    let mut device_options = options(addr, &unique("device"));
    device_options.set_last_will(LastWill::new(
        &will_topic,
        b"offline".to_vec(),
        QoS::AtLeastOnce,
        true,
    ));
    let (_device, mut device_loop) = client(device_options);
    connected(&mut device_loop).await;
    // Dropping the event loop closes the socket with no DISCONNECT sent.
    drop(device_loop);

    let will = message_on(&mut watch_loop, &will_topic).await;
    assert_eq!(&will.payload[..], b"offline");

    shutdown(broker).await;
}

/// A device that goes silent with its socket still open (a half-open link
/// looks the same to the broker): keepalive expiry publishes its will.
#[tokio::test]
async fn last_will_is_published_when_a_link_goes_silent() {
    let broker = start_default().await;
    let addr = broker.local_addr();
    let will_topic = unique("flotilla/v1/node/n4/presence");
    let (_watcher, mut watch_loop) = subscriber(addr, &will_topic).await;

    let mut device_options = options(addr, &unique("device"));
    device_options
        .set_keep_alive(Duration::from_secs(1))
        .set_last_will(LastWill::new(
            &will_topic,
            b"offline".to_vec(),
            QoS::AtLeastOnce,
            true,
        ));
    let (_device, mut device_loop) = client(device_options);
    connected(&mut device_loop).await;
    // Not polled from here on: no PINGREQ goes out, the socket stays open.
    let silent_since = Instant::now();

    let will = message_on(&mut watch_loop, &will_topic).await;
    assert_eq!(&will.payload[..], b"offline");
    assert!(
        silent_since.elapsed() >= Duration::from_secs(1),
        "the will came before the keepalive could have expired"
    );
    drop(device_loop);

    shutdown(broker).await;
}

#[tokio::test]
async fn shutdown_closes_connections_and_frees_the_port_for_a_new_broker() {
    let broker = start_default().await;
    let addr = broker.local_addr();
    assert_ne!(addr.port(), 0, "the real port is reported");
    let topic = unique("flotilla/v1/node/n5/status");
    let (_client, mut client_loop) = subscriber(addr, &topic).await;

    shutdown(broker).await;

    let closed = timeout(DEADLINE, async {
        loop {
            if let Err(e) = client_loop.poll().await {
                return e;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "client connection still open after shutdown"
    );

    TcpListener::bind(addr).expect("the port is free right after shutdown");

    let second = start(BrokerConfig::new(addr))
        .await
        .expect("a second broker starts on the same port");
    assert_eq!(second.local_addr(), addr);
    let (pub_client, mut pub_loop) = publisher(addr).await;
    published(&pub_client, &mut pub_loop, &topic, true, b"again".to_vec()).await;

    shutdown(second).await;
}

#[tokio::test]
async fn a_port_in_use_is_an_error_naming_the_address() {
    let taken = TcpListener::bind(loopback_any_port()).expect("bind a port");
    let addr = taken.local_addr().expect("local addr");

    let err = start(BrokerConfig::new(addr))
        .await
        .expect_err("the port is taken");
    assert!(
        matches!(&err, BrokerError::Bind { addr: a, .. } if *a == addr),
        "{err:?}"
    );
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    drop(taken);
}

/// A desired state can be 1 MiB; with its signature it is a bit more. It
/// must go through live and be kept as the retained message.
#[tokio::test]
async fn desired_state_sized_payload_goes_through_and_is_retained() {
    let broker = start_default().await;
    let addr = broker.local_addr();
    let topic = unique("flotilla/v1/node/n6/desired");
    let payload: Vec<u8> = (0..DesiredState::MAX_BYTES + 4096)
        .map(|i| (i % 251) as u8)
        .collect();

    let (_live, mut live_loop) = subscriber(addr, &topic).await;
    let live_topic = topic.clone();
    let live = tokio::spawn(async move { message_on(&mut live_loop, &live_topic).await });

    let (pub_client, mut pub_loop) = publisher(addr).await;
    published(&pub_client, &mut pub_loop, &topic, true, payload.clone()).await;
    let got = live.await.expect("live subscriber task");
    assert!(got.payload[..] == payload[..], "live copy differs");

    let (_later, mut later_loop) = subscriber(addr, &topic).await;
    let kept = message_on(&mut later_loop, &topic).await;
    assert!(kept.retain);
    assert!(kept.payload[..] == payload[..], "retained copy differs");

    shutdown(broker).await;
}

/// Message expiry applies to queued messages, never to retained ones: a
/// node's desired state stays until it is replaced.
#[tokio::test]
async fn retained_messages_outlive_the_message_expiry() {
    let mut config = BrokerConfig::new(loopback_any_port());
    config.message_expiry = Duration::from_secs(1);
    let broker = start(config).await.expect("broker starts");
    let addr = broker.local_addr();
    let topic = unique("flotilla/v1/node/n7/desired");

    let (pub_client, mut pub_loop) = publisher(addr).await;
    published(
        &pub_client,
        &mut pub_loop,
        &topic,
        true,
        b"keep me".to_vec(),
    )
    .await;
    // The condition under test is the passing of time itself.
    tokio::time::sleep_until(Instant::now() + Duration::from_millis(2500)).await;

    let (_sub, mut sub_loop) = subscriber(addr, &topic).await;
    let got = message_on(&mut sub_loop, &topic).await;
    assert_eq!(&got.payload[..], b"keep me");

    shutdown(broker).await;
}

/// rmqtt keeps its state per server, so brokers in one process (as in this
/// test binary) do not see each other's messages.
#[tokio::test]
async fn two_brokers_run_side_by_side() {
    let first = start_default().await;
    let second = start_default().await;
    assert_ne!(first.local_addr(), second.local_addr());
    let topic = unique("flotilla/v1/node/n8/desired");

    for (broker, payload) in [(&first, b"first"), (&second, b"other")] {
        let (pub_client, mut pub_loop) = publisher(broker.local_addr()).await;
        published(&pub_client, &mut pub_loop, &topic, true, payload.to_vec()).await;
    }
    for (broker, payload) in [(&first, b"first"), (&second, b"other")] {
        let (_sub, mut sub_loop) = subscriber(broker.local_addr(), &topic).await;
        let got = message_on(&mut sub_loop, &topic).await;
        assert_eq!(&got.payload[..], payload);
    }

    shutdown(first).await;
    shutdown(second).await;
}
