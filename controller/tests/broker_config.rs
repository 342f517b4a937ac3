#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `flotilla broker-config mosquitto` as the hourly unit runs it (settings
//! from the environment, the token from a file) against a real `flotilla
//! serve` with a fleet CA and a real Mosquitto dropping root for its own
//! user: the first run writes everything and runs the restart command; a
//! second run writes nothing (same inodes and mtimes, the certificate not
//! re-issued) and runs no command; after `node revoke` only crl.pem is
//! written and the reload command (SIGHUP) makes the running Mosquitto
//! refuse the revoked device while the others still connect; a reload
//! that failed is run again by the next run.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flotilla_controller::client::{Client, ClientOptions};
use flotilla_controller::identity::certs::join_message;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

const T: Duration = Duration::from_secs(30);
const FILES: [&str; 6] = [
    "server.key",
    "ca.pem",
    "server.pem",
    "acl",
    "crl.pem",
    "mosquitto.conf",
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Killed {
    let out = std::fs::File::create(log).unwrap();
    Killed(
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    )
}

/// What a file is on disk: content, inode, mtime.
type Snapshot = BTreeMap<&'static str, (Vec<u8>, u64, i64, i64)>;

fn snapshot(dir: &Path) -> Snapshot {
    FILES
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let meta = std::fs::metadata(&path).unwrap();
            (
                *name,
                (
                    std::fs::read(&path).unwrap(),
                    meta.ino(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                ),
            )
        })
        .collect()
}

fn written(out: &Output, dir: &Path) -> Vec<String> {
    let prefix = format!("wrote {}/", dir.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

/// Enrolls `node` with a fresh key; its certificate and key, DER.
fn join(client: &Client, token: &str, node: &str) -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let rng = SystemRandom::new();
    let signer =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der(), &rng)
            .unwrap();
    let proof = signer
        .sign(&rng, &join_message(token, node, key.public_key_raw()))
        .unwrap();
    let answer = client
        .post_json(
            "/v1/join",
            &json!({
                "token": token,
                "node": node,
                "publicKey": STANDARD.encode(key.public_key_raw()),
                "proof": STANDARD.encode(proof.as_ref()),
            }),
        )
        .unwrap();
    let pem = answer["certificate"].as_str().unwrap();
    let cert = flotilla_controller::identity::ca::pem_der(pem).unwrap();
    (cert, key.serialize_der())
}

/// Whether Mosquitto at `addr` accepts `node`'s certificate (a CONNACK
/// with success).
async fn admits(addr: SocketAddr, ca_der: &[u8], node: &str, creds: &(Vec<u8>, Vec<u8>)) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from(creds.0.clone())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(creds.1.clone())),
    )
    .unwrap();
    let mut o = MqttOptions::new(node, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )));
    let (_client, mut eventloop) = AsyncClient::new(o, 8);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                return ack.code == rumqttc::ConnectReturnCode::Success;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hourly_run_writes_only_what_changed_and_reloads_mosquitto_for_a_revocation() {
    let tmp = tempfile::tempdir().unwrap();
    // Mosquitto drops root for its own user, which must reach its files.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = tmp.path().join("controller");
    let conf_dir = tmp.path().join("mosquitto");
    let (api_port, mqtt_port) = (free_port(), free_port());
    let api = format!("https://127.0.0.1:{api_port}");
    let _serve = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg("--broker")
            .arg(format!("mqtts://127.0.0.1:{mqtt_port}"))
            .env("FLOTILLA_LOG", "info"),
        &tmp.path().join("serve.log"),
    );
    let token_file = data.join("admin.token");
    let ca_file = data.join("ca.pem");
    let deadline = Instant::now() + T;
    let admin = loop {
        let client = Client::new(&ClientOptions {
            server: api.clone(),
            token: None,
            token_file: Some(token_file.clone()),
            ca: Some(ca_file.clone()),
        });
        if let Ok(c) = client {
            if c.call("GET", "/v1/nodes", None).is_ok() {
                break c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the API did not answer: {}",
            std::fs::read_to_string(tmp.path().join("serve.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ca_der =
        flotilla_controller::identity::ca::pem_der(&std::fs::read_to_string(&ca_file).unwrap())
            .unwrap();
    let token = admin
        .post_json("/v1/tokens", &json!({"ttlSecs": 600, "uses": 2}))
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = join(&admin, &token, "bc-a");
    let b = join(&admin, &token, "bc-b");

    let marks = tmp.path().join("marks");
    // As flotilla-mosquitto-config.service runs it: every setting from the
    // environment file, the token from a file.
    let try_run = |reload: &str| {
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["broker-config", "mosquitto"])
            .env("FLOTILLA_SERVER", &api)
            .env("FLOTILLA_TOKEN_FILE", &token_file)
            .env("FLOTILLA_CA", &ca_file)
            .env("FLOTILLA_MOSQUITTO_DIR", &conf_dir)
            .env("FLOTILLA_MOSQUITTO_SANS", "127.0.0.1,localhost")
            .env(
                "FLOTILLA_MOSQUITTO_LISTEN",
                format!("127.0.0.1:{mqtt_port}"),
            )
            .env("FLOTILLA_MOSQUITTO_KEY_OWNER", "mosquitto")
            .env("FLOTILLA_MOSQUITTO_RELOAD", reload)
            .env(
                "FLOTILLA_MOSQUITTO_RESTART",
                format!("echo restart >>{}", marks.display()),
            )
            .env_remove("FLOTILLA_TOKEN")
            .output()
            .unwrap()
    };
    let run = |reload: &str| {
        let out = try_run(reload);
        assert!(out.status.success(), "{out:?}");
        out
    };
    let marked = || std::fs::read_to_string(&marks).unwrap_or_default();
    let echo_reload = format!("echo reload >>{}", marks.display());

    // First run: everything is new; the restart command runs (the CA and
    // the listener are not re-read on SIGHUP).
    let out = run(&echo_reload);
    assert_eq!(written(&out, &conf_dir), FILES, "{out:?}");
    assert_eq!(marked(), "restart\n");
    let first = snapshot(&conf_dir);
    let key_meta = std::fs::metadata(conf_dir.join("server.key")).unwrap();
    let mosquitto_uid: u32 = String::from_utf8(
        Command::new("id")
            .args(["-u", "mosquitto"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    assert_eq!(
        key_meta.uid(),
        mosquitto_uid,
        "server.key given to mosquitto"
    );
    assert_eq!(key_meta.permissions().mode() & 0o777, 0o600);

    // Second run, nothing changed: nothing written, nothing run.
    let out = run(&echo_reload);
    assert!(written(&out, &conf_dir).is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("up to date"),
        "{out:?}"
    );
    assert_eq!(marked(), "restart\n");
    assert_eq!(snapshot(&conf_dir), first, "a run with nothing new wrote");

    // Mosquitto on the written config, as root: it drops to its user.
    let mosquitto = spawn_logged(
        Command::new("mosquitto")
            .arg("-c")
            .arg(conf_dir.join("mosquitto.conf")),
        &tmp.path().join("mosquitto.log"),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], mqtt_port));
    let mosquitto_log = || std::fs::read_to_string(tmp.path().join("mosquitto.log")).unwrap();
    let deadline = Instant::now() + T;
    while !admits(addr, &ca_der, "bc-a", &a).await {
        assert!(
            Instant::now() < deadline,
            "mosquitto does not admit bc-a: {}",
            mosquitto_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        admits(addr, &ca_der, "bc-b", &b).await,
        "bc-b before revoke"
    );

    // Revoked: the next run writes only the revocation list and SIGHUPs
    // the running Mosquitto, which then refuses bc-b.
    admin
        .post_json("/v1/nodes/bc-b/revoke", &json!({}))
        .unwrap();
    // The reload fails first: the list is written, the reload owed.
    let out = try_run("exit 3");
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(written(&out, &conf_dir), ["crl.pem"], "{out:?}");
    // Mosquitto has not read it yet: bc-b still gets in.
    assert!(
        admits(addr, &ca_der, "bc-b", &b).await,
        "bc-b refused before the reload"
    );
    // The next run has nothing to write but still reloads.
    let out = run(&format!("kill -HUP {}", mosquitto.0.id()));
    assert!(written(&out, &conf_dir).is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reload: kill -HUP"),
        "{out:?}"
    );
    let after = snapshot(&conf_dir);
    for name in FILES {
        if name == "crl.pem" {
            assert_ne!(after[name], first[name]);
        } else {
            assert_eq!(after[name], first[name], "{name} was rewritten");
        }
    }
    let deadline = Instant::now() + T;
    while admits(addr, &ca_der, "bc-b", &b).await {
        assert!(
            Instant::now() < deadline,
            "the revoked bc-b still connects after the reload: {}",
            mosquitto_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admits(addr, &ca_der, "bc-a", &a).await, "bc-a after revoke");
    let mut mosquitto = mosquitto;
    assert!(
        mosquitto.0.try_wait().unwrap().is_none(),
        "mosquitto exited: {}",
        mosquitto_log()
    );

    // And the new list is kept from then on.
    let out = run(&echo_reload);
    assert!(written(&out, &conf_dir).is_empty(), "{out:?}");
    assert_eq!(snapshot(&conf_dir), after);
    assert_eq!(marked(), "restart\n");
}

#[test]
fn a_token_file_that_cannot_be_used_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    for (file, expected) in [
        (empty, "empty, expected an api token"),
        (
            PathBuf::from("/nonexistent/x.token"),
            "reading the token file",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["get", "nodes", "--server", "https://127.0.0.1:1"])
            .arg("--token-file")
            .arg(&file)
            .env_remove("FLOTILLA_TOKEN")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{err}");
    }
}
