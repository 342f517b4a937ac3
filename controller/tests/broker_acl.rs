#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Per-device ACLs of the embedded broker, with real rumqttc clients: a
//! device reads only its own desired state, writes only its own status,
//! cannot carry a will on another's topic, and a revoked or anonymous client
//! cannot connect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_controller::broker::{BrokerConfig, EmbeddedBroker};
use flotilla_controller::identity::{CONTROLLER_USERNAME, Identity};
use flotilla_proto::Topics;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, MqttOptions, Packet, QoS,
};
use tokio::time::{Instant, timeout};

const DEADLINE: Duration = Duration::from_secs(10);

fn options(addr: SocketAddr, id: &str, user: Option<(&str, &str)>) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    if let Some((u, p)) = user {
        o.set_credentials(u, p);
    }
    o
}

/// Polls until the CONNACK and returns its code (or None when the
/// connection itself failed).
async fn connack(eventloop: &mut EventLoop) -> Option<ConnectReturnCode> {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        match timeout(DEADLINE, eventloop.poll()).await.ok()? {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => return Some(ack.code),
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Some(code),
            Err(_) => return None,
        }
    }
    None
}

/// Collects publishes received within `window`.
async fn drain(eventloop: &mut EventLoop, window: Duration) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let end = Instant::now() + window;
    while let Ok(Ok(event)) = timeout(
        end.saturating_duration_since(Instant::now()),
        eventloop.poll(),
    )
    .await
    {
        if let Event::Incoming(Packet::Publish(p)) = event {
            got.push((p.topic.clone(), p.payload.to_vec()));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_held_to_their_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::open(dir.path(), false).unwrap();
    let token = identity.create_token(60_000, 3, &[]).unwrap().token;
    let a = identity.join(&token, "acl-a").unwrap();
    let b = identity.join(&token, "acl-b").unwrap();
    let topics = Topics::default();
    let broker = {
        let identity = Arc::clone(&identity);
        let topics = topics.clone();
        tokio::task::spawn_blocking(move || {
            EmbeddedBroker::start_with_identity(
                BrokerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))),
                identity,
                topics,
            )
        })
        .await
        .unwrap()
        .unwrap()
    };
    let addr = broker.local_addr();

    // The controller: every topic.
    let password = identity.controller_password().to_owned();
    let (ctl, mut ctl_loop) = AsyncClient::new(
        options(addr, "ctl", Some((CONTROLLER_USERNAME, &password))),
        64,
    );
    assert_eq!(
        connack(&mut ctl_loop).await,
        Some(ConnectReturnCode::Success)
    );
    ctl.subscribe(
        format!("{}/node/+/status", topics.prefix()),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    ctl.publish(
        topics.desired("acl-b"),
        QoS::AtLeastOnce,
        true,
        b"for-b".to_vec(),
    )
    .await
    .unwrap();
    ctl.publish(
        topics.desired("acl-a"),
        QoS::AtLeastOnce,
        true,
        b"for-a".to_vec(),
    )
    .await
    .unwrap();
    drain(&mut ctl_loop, Duration::from_millis(300)).await;

    // Device a reads its own desired state, not b's.
    let (dev, mut dev_loop) = AsyncClient::new(
        options(addr, "flotilla-agent-acl-a", Some(("acl-a", &a.password))),
        64,
    );
    assert_eq!(
        connack(&mut dev_loop).await,
        Some(ConnectReturnCode::Success)
    );
    dev.subscribe(topics.desired("acl-b"), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.subscribe(topics.desired("acl-a"), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.subscribe(format!("{}/#", topics.prefix()), QoS::AtLeastOnce)
        .await
        .unwrap();
    // It writes its own status, not b's.
    dev.publish(
        topics.status("acl-b"),
        QoS::AtLeastOnce,
        false,
        b"forged".to_vec(),
    )
    .await
    .unwrap();
    dev.publish(
        topics.status("acl-a"),
        QoS::AtLeastOnce,
        false,
        b"mine".to_vec(),
    )
    .await
    .unwrap();
    let got = drain(&mut dev_loop, Duration::from_millis(800)).await;
    assert_eq!(got, vec![(topics.desired("acl-a"), b"for-a".to_vec())]);
    let seen = drain(&mut ctl_loop, Duration::from_millis(500)).await;
    assert_eq!(seen, vec![(topics.status("acl-a"), b"mine".to_vec())]);

    // A will on another device's topic is refused at CONNECT.
    let mut o = options(addr, "acl-b", Some(("acl-b", &b.password)));
    o.set_last_will(LastWill::new(
        topics.presence("acl-a"),
        b"x".to_vec(),
        QoS::AtLeastOnce,
        true,
    ));
    let (_c, mut l) = AsyncClient::new(o, 8);
    assert_ne!(connack(&mut l).await, Some(ConnectReturnCode::Success));

    // Another device's client id (its persistent session) with a good
    // credential: refused.
    let (_c, mut l) = AsyncClient::new(
        options(addr, "flotilla-agent-acl-a", Some(("acl-b", &b.password))),
        8,
    );
    assert_ne!(connack(&mut l).await, Some(ConnectReturnCode::Success));

    // Wrong password, anonymous, and another's password: refused.
    for user in [
        Some(("acl-b", "nope")),
        None,
        Some(("acl-b", a.password.as_str())),
    ] {
        let (_c, mut l) = AsyncClient::new(options(addr, "intruder", user), 8);
        assert_ne!(
            connack(&mut l).await,
            Some(ConnectReturnCode::Success),
            "{user:?}"
        );
    }

    // Revoked: the live session is dropped at once, a new one is refused.
    identity.revoke("acl-a").unwrap();
    let dropped = timeout(Duration::from_secs(2), async {
        loop {
            if dev_loop.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        dropped.is_ok(),
        "the revoked device's session was not dropped"
    );
    dev.publish(
        topics.status("acl-a"),
        QoS::AtLeastOnce,
        false,
        b"after".to_vec(),
    )
    .await
    .unwrap();
    let _ = drain(&mut dev_loop, Duration::from_millis(300)).await;
    assert!(
        drain(&mut ctl_loop, Duration::from_millis(500))
            .await
            .is_empty()
    );
    let (_c, mut l) = AsyncClient::new(options(addr, "acl-a", Some(("acl-a", &a.password))), 8);
    assert_ne!(connack(&mut l).await, Some(ConnectReturnCode::Success));

    tokio::task::spawn_blocking(move || broker.shutdown())
        .await
        .unwrap();
}
