#![allow(clippy::unwrap_used, clippy::expect_used)]
//! MQTT over mTLS with device certificates from the fleet CA, with real
//! rumqttc clients (rustls on ring): against the embedded broker's TLS
//! front, and against a real Mosquitto running the configuration `flotilla
//! broker-config mosquitto` writes. On both, a device reads only its own
//! desired state, writes only its own status, and a revoked device cannot
//! connect (the embedded broker also drops its live session at once).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use flotilla_controller::broker::{BrokerConfig, EmbeddedBroker, TlsMaterial};
use flotilla_controller::broker_config::{self, CRL_VALIDITY, MosquittoFiles};
use flotilla_controller::identity::ca::{Ca, P256PublicKey};
use flotilla_controller::identity::certs::Issuer;
use flotilla_controller::identity::{CONTROLLER_USERNAME, Identity};
use flotilla_proto::Topics;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::time::{Instant, timeout};

const DEADLINE: Duration = Duration::from_secs(10);

/// A certificate and its key, DER.
struct Creds {
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn identity_with_ca(dir: &Path) -> (Arc<Identity>, Vec<u8>, Ca) {
    let identity = Identity::open(dir, false).unwrap();
    let ca = Ca::ephemeral().unwrap();
    let ca_der = ca.cert_der().to_vec();
    // A second handle on the same CA is not possible (the key stays
    // inside), so the caller issues server certificates before giving it up.
    (identity, ca_der, ca)
}

fn give_ca(identity: &Identity, ca: Ca) {
    identity.set_issuer(Issuer {
        ca,
        lifetime: Duration::from_secs(3600),
        renew_grace: Duration::ZERO,
        broker_url: "mqtts://127.0.0.1:8883".into(),
    });
}

/// Joins `node` with a fresh key; returns its certificate and key.
fn enroll(identity: &Identity, token: &str, node: &str) -> Creds {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let public = P256PublicKey::new(key.public_key_raw().to_vec()).unwrap();
    let joined = identity.join_with_key(token, node, Some(&public)).unwrap();
    Creds {
        cert: joined.certificate.unwrap().cert.der,
        key: key.serialize_der(),
    }
}

fn tls_options(addr: SocketAddr, id: &str, ca_der: &[u8], creds: &Creds) -> MqttOptions {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from(creds.cert.clone())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(creds.key.clone())),
    )
    .unwrap();
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )));
    o
}

/// Polls until the CONNACK; `true` when accepted.
async fn connected(eventloop: &mut EventLoop) -> bool {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        match timeout(DEADLINE, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                return ack.code == rumqttc::ConnectReturnCode::Success;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
    false
}

/// Publishes received within `window`.
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

/// Whether the connection ends within `within` (polling errors out).
async fn dropped(eventloop: &mut EventLoop, within: Duration) -> bool {
    timeout(within, async {
        loop {
            if eventloop.poll().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// The ACL checks both brokers must pass: `dev` is a's connected session,
/// `ctl` the controller's, subscribed to every status; b's and a's desired
/// states are retained already.
async fn acl_checks(
    topics: &Topics,
    a: &str,
    b: &str,
    dev: &AsyncClient,
    dev_loop: &mut EventLoop,
    ctl_loop: &mut EventLoop,
) {
    dev.subscribe(topics.desired(b), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.subscribe(topics.desired(a), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.publish(
        topics.status(b),
        QoS::AtLeastOnce,
        false,
        b"forged".to_vec(),
    )
    .await
    .unwrap();
    dev.publish(topics.status(a), QoS::AtLeastOnce, false, b"mine".to_vec())
        .await
        .unwrap();
    let got = drain(dev_loop, Duration::from_millis(1000)).await;
    assert_eq!(got, vec![(topics.desired(a), b"for-a".to_vec())]);
    let seen = drain(ctl_loop, Duration::from_millis(800)).await;
    assert_eq!(seen, vec![(topics.status(a), b"mine".to_vec())]);
}

async fn controller_publishes(ctl: &AsyncClient, topics: &Topics, a: &str, b: &str) {
    ctl.subscribe(
        format!("{}/node/+/status", topics.prefix()),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    for (node, body) in [(b, b"for-b".to_vec()), (a, b"for-a".to_vec())] {
        ctl.publish(topics.desired(node), QoS::AtLeastOnce, true, body)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_holds_tls_devices_to_their_topics_and_drops_revoked_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (identity, ca_der, ca) = identity_with_ca(dir.path());
    let server = ca.issue_server(&["127.0.0.1".to_owned()]).unwrap();
    let stranger_ca = Ca::ephemeral().unwrap();
    give_ca(&identity, ca);
    let token = identity.create_token(60_000, 3, &[]).unwrap().token;
    let a = enroll(&identity, &token, "tls-a");
    let _b = enroll(&identity, &token, "tls-b");
    let topics = Topics::default();

    let mut config = BrokerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.tls = Some(TlsMaterial {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ca_der: ca_der.clone(),
        cert_der: server.cert.der,
        key_der: server.key_der,
    });
    let broker = {
        let (identity, topics) = (Arc::clone(&identity), topics.clone());
        tokio::task::spawn_blocking(move || {
            EmbeddedBroker::start_with_identity(config, identity, topics)
        })
        .await
        .unwrap()
        .unwrap()
    };
    let plain = broker.local_addr();
    let tls = broker.tls_addr().unwrap();

    let mut o = MqttOptions::new("ctl", plain.ip().to_string(), plain.port());
    o.set_keep_alive(Duration::from_secs(5));
    o.set_credentials(CONTROLLER_USERNAME, identity.controller_password());
    let (ctl, mut ctl_loop) = AsyncClient::new(o, 64);
    assert!(connected(&mut ctl_loop).await);
    controller_publishes(&ctl, &topics, "tls-a", "tls-b").await;
    drain(&mut ctl_loop, Duration::from_millis(300)).await;

    // Device a over TLS, no username: the certificate says who it is.
    let (dev, mut dev_loop) =
        AsyncClient::new(tls_options(tls, "flotilla-agent-tls-a", &ca_der, &a), 64);
    assert!(connected(&mut dev_loop).await, "a tls device is admitted");
    acl_checks(
        &topics,
        "tls-a",
        "tls-b",
        &dev,
        &mut dev_loop,
        &mut ctl_loop,
    )
    .await;

    // Its certificate with another node's name as username, or another
    // node's client id: refused.
    let mut o = tls_options(tls, "tls-a", &ca_der, &a);
    o.set_credentials("tls-b", "x");
    let (_c, mut l) = AsyncClient::new(o, 8);
    assert!(!connected(&mut l).await, "username of another node");
    let (_c, mut l) = AsyncClient::new(tls_options(tls, "flotilla-agent-tls-b", &ca_der, &a), 8);
    assert!(!connected(&mut l).await, "client id of another node");
    // A certificate of another CA: no handshake.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let public = P256PublicKey::new(key.public_key_raw().to_vec()).unwrap();
    let forged = Creds {
        cert: stranger_ca
            .issue_device("tls-a", &public, Duration::from_secs(60))
            .unwrap()
            .der,
        key: key.serialize_der(),
    };
    let (_c, mut l) = AsyncClient::new(tls_options(tls, "tls-a", &ca_der, &forged), 8);
    assert!(!connected(&mut l).await, "certificate of another ca");
    // The plain listener cannot be used to pose as a TLS device.
    for password in ["", "guess"] {
        let mut o = MqttOptions::new("tls-a", plain.ip().to_string(), plain.port());
        o.set_keep_alive(Duration::from_secs(5));
        o.set_credentials("tls-a", password);
        let (_c, mut l) = AsyncClient::new(o, 8);
        assert!(!connected(&mut l).await, "plain with password {password:?}");
    }

    // Revoked: the live session is dropped within a second or two, and the
    // certificate no longer connects.
    let revoked_at = Instant::now();
    identity.revoke("tls-a").unwrap();
    assert!(
        dropped(&mut dev_loop, Duration::from_secs(2)).await,
        "the revoked device's live session was not dropped"
    );
    eprintln!("revoked session dropped after {:?}", revoked_at.elapsed());
    let (_c, mut l) = AsyncClient::new(tls_options(tls, "flotilla-agent-tls-a", &ca_der, &a), 8);
    assert!(!connected(&mut l).await, "a revoked certificate connects");

    tokio::task::spawn_blocking(move || broker.shutdown())
        .await
        .unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes the broker-config files for the identity's current revocations.
fn write_config(dir: &Path, identity: &Identity, key: &KeyPair, port: u16) {
    let ca = identity.ca().unwrap();
    let files = MosquittoFiles {
        ca_pem: ca.cert_pem().to_owned(),
        cert_pem: ca
            .issue_server_for(&["127.0.0.1".to_owned()], key)
            .unwrap()
            .pem,
        acl: broker_config::acl(&Topics::default()),
        crl: ca
            .crl_pem(&identity.revoked_certificates().unwrap(), CRL_VALIDITY)
            .unwrap(),
    };
    broker_config::write_files(dir, &files, "127.0.0.1", port).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_the_written_config_holds_devices_and_refuses_revoked_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (identity, ca_der, ca) = identity_with_ca(dir.path());
    let own = ca
        .issue_client(CONTROLLER_USERNAME, Duration::from_secs(3600))
        .unwrap();
    give_ca(&identity, ca);
    let token = identity.create_token(60_000, 3, &[]).unwrap().token;
    let a = enroll(&identity, &token, "mq-a");
    let b = enroll(&identity, &token, "mq-b");
    let topics = Topics::default();

    let conf_dir = dir.path().join("mosquitto");
    let (key, _) = broker_config::broker_key(&conf_dir).unwrap();
    let port = free_port();
    write_config(&conf_dir, &identity, &key, port);
    // Started as root, Mosquitto would drop to its own user, which cannot
    // read this temp dir; the written config itself is used unchanged.
    let conf = conf_dir.join(broker_config::CONF_FILE);
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("user root\nlog_dest stderr\n");
    let test_conf = dir.path().join("test.conf");
    std::fs::write(&test_conf, text).unwrap();
    let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
    let mosquitto = Mosquitto(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&test_conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let ctl_creds = Creds {
        cert: own.cert.der,
        key: own.key_der,
    };
    let (ctl, mut ctl_loop) = AsyncClient::new(tls_options(addr, "ctl", &ca_der, &ctl_creds), 64);
    assert!(
        connected(&mut ctl_loop).await,
        "the controller's certificate"
    );
    controller_publishes(&ctl, &topics, "mq-a", "mq-b").await;
    drain(&mut ctl_loop, Duration::from_millis(300)).await;

    let (dev, mut dev_loop) = AsyncClient::new(tls_options(addr, "mq-a", &ca_der, &a), 64);
    assert!(connected(&mut dev_loop).await, "a device certificate");
    acl_checks(&topics, "mq-a", "mq-b", &dev, &mut dev_loop, &mut ctl_loop).await;

    // b connects; then it is revoked, the config written again and
    // Mosquitto told to reload it: b's certificate is refused.
    let (_c, mut l) = AsyncClient::new(tls_options(addr, "mq-b", &ca_der, &b), 8);
    assert!(connected(&mut l).await, "b before its revocation");
    drop(l);
    identity.revoke("mq-b").unwrap();
    write_config(&conf_dir, &identity, &key, port);
    nix_kill_hup(&mosquitto);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_c, mut l) = AsyncClient::new(tls_options(addr, "mq-b", &ca_der, &b), 8);
        if !connected(&mut l).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a revoked certificate still connects after SIGHUP: {}",
            std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a is untouched by b's revocation.
    let (_c, mut l) = AsyncClient::new(tls_options(addr, "mq-a", &ca_der, &a), 8);
    assert!(connected(&mut l).await, "a after b's revocation");
}

fn nix_kill_hup(m: &Mosquitto) {
    let pid = i32::try_from(m.0.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}
