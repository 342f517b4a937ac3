//! `flotilla broker-config mosquitto --out DIR`: an external Mosquitto's
//! listener, TLS and ACL configuration, made from the fleet's identities.
//!
//! The CLI makes (or keeps) the broker's private key in DIR and sends only
//! its public half; the controller answers, through `POST
//! /v1/broker-config/mosquitto` (admin), a server certificate from the fleet
//! CA, the CA certificate, the ACL (per-device `pattern` rules on the
//! certificate's CN, the controller's own rights) and a revocation list of
//! every revoked device certificate not yet expired. Run it again after
//! `flotilla node revoke`, then send Mosquitto SIGHUP: it reads the ACL and
//! the revocation list again.

use std::fmt::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flotilla_proto::{TopicKind, Topics};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::Deserialize;
use serde_json::json;

use crate::client::Client;
use crate::identity::ca::P256PublicKey;
use crate::identity::{CONTROLLER_USERNAME, Identity};

/// The route the CLI calls.
pub const ROUTE: &str = "/v1/broker-config/mosquitto";
/// How long the revocation list is valid: Mosquitto refuses every client
/// once it is past, so this is the longest the config may go unrewritten.
pub const CRL_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most names in the broker's certificate.
const MAX_SANS: usize = 32;
/// Longest public key field accepted (base64 of a 65-byte point).
const MAX_KEY_BASE64: usize = 128;

/// Files written in DIR.
pub const CONF_FILE: &str = "mosquitto.conf";
const ACL_FILE: &str = "acl";
const CRL_FILE: &str = "crl.pem";
const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "server.pem";
const KEY_FILE: &str = "server.key";

#[derive(Clone)]
struct ConfigState {
    identity: Arc<Identity>,
    topics: Topics,
}

/// The broker-config route (merged into the API by `serve`).
pub fn router(identity: Arc<Identity>, topics: Topics) -> Router {
    Router::new()
        .route(ROUTE, post(mosquitto))
        .with_state(ConfigState { identity, topics })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigRequest {
    public_key: String,
    sans: Vec<String>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The ACL: devices (username = their certificate's CN, the node name) on
/// their own topics only; the controller on every topic under the prefix.
pub fn acl(topics: &Topics) -> String {
    let mut out = String::from(
        "# Written by `flotilla broker-config mosquitto`; rewrite it rather than edit.\n\
         # Devices: the username is the certificate's CN, the node name.\n",
    );
    for (access, kind) in [
        ("read", TopicKind::Desired),
        ("read", TopicKind::RpcRequest),
        ("write", TopicKind::Status),
        ("write", TopicKind::Presence),
        ("write", TopicKind::RpcResponse),
    ] {
        let _ = writeln!(out, "pattern {access} {}", topics.node("%u", kind));
    }
    let _ = write!(
        out,
        "\n# The controller.\nuser {CONTROLLER_USERNAME}\ntopic readwrite {}/#\n",
        topics.prefix()
    );
    out
}

async fn mosquitto(State(s): State<ConfigState>, Json(req): Json<ConfigRequest>) -> Response {
    if req.public_key.len() > MAX_KEY_BASE64 {
        return refuse(StatusCode::BAD_REQUEST, "publicKey: too long");
    }
    let key = match STANDARD
        .decode(&req.public_key)
        .map_err(|e| format!("publicKey: not base64: {e}"))
        .and_then(|raw| P256PublicKey::new(raw).map_err(|e| e.to_string()))
    {
        Ok(k) => k,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    if req.sans.is_empty() || req.sans.len() > MAX_SANS {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("sans: {} names, expected 1 to {MAX_SANS}", req.sans.len()),
        );
    }
    let identity = Arc::clone(&s.identity);
    let made = tokio::task::spawn_blocking(move || {
        let ca = identity
            .ca()
            .context("this controller has no fleet ca: start it with --broker mqtts://…")?;
        let cert = ca.issue_server_for(&req.sans, &key)?;
        let revoked = identity.revoked_certificates()?;
        let crl = ca.crl_pem(&revoked, CRL_VALIDITY)?;
        anyhow::Ok((ca.cert_pem().to_owned(), cert.pem, crl, revoked.len()))
    })
    .await;
    match made {
        Ok(Ok((ca, cert, crl, revoked))) => {
            tracing::info!(revoked, "mosquitto config made");
            Json(json!({
                "caCertificate": ca,
                "serverCertificate": cert,
                "acl": acl(&s.topics),
                "crl": crl,
            }))
            .into_response()
        }
        Ok(Err(e)) => refuse(StatusCode::CONFLICT, format!("{e:#}")),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The mosquitto.conf for files in `dir`.
pub fn mosquitto_conf(dir: &Path, listen_host: &str, port: u16) -> String {
    let file = |name: &str| dir.join(name).display().to_string();
    format!(
        "# Written by `flotilla broker-config mosquitto`; after `flotilla node revoke`\n\
         # run it again and send mosquitto SIGHUP.\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         acl_file {acl}\n\
         set_tcp_nodelay true\n\
         \n\
         listener {port} {listen_host}\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         crlfile {crl}\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         # The client id becomes the username too, so no device can take over\n\
         # another's persistent session.\n\
         use_username_as_clientid true\n\
         tls_version tlsv1.2\n",
        acl = file(ACL_FILE),
        ca = file(CA_FILE),
        cert = file(CERT_FILE),
        key = file(KEY_FILE),
        crl = file(CRL_FILE),
    )
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}

/// What the controller answers for a Mosquitto config.
#[derive(Debug, Clone)]
pub struct MosquittoFiles {
    /// The fleet CA, PEM.
    pub ca_pem: String,
    /// The broker's server certificate, PEM.
    pub cert_pem: String,
    /// The ACL file.
    pub acl: String,
    /// The revocation list, PEM.
    pub crl: String,
}

/// The broker's key in `dir`, made (owner-only) on first use. Mosquitto
/// started as root reads it before dropping privileges; chown it to the
/// broker's user otherwise.
pub fn broker_key(dir: &Path) -> anyhow::Result<KeyPair> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&key_path) {
        Ok(pem) => KeyPair::from_pem(&pem)
            .with_context(|| format!("{}: not a pem private key", key_path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            write(dir, KEY_FILE, &key.serialize_pem(), 0o600)?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", key_path.display())),
    }
}

/// Writes `files` and the mosquitto.conf that names them into `dir`; the
/// revocation list and the ACL last but one, the conf last, each atomically.
pub fn write_files(
    dir: &Path,
    files: &MosquittoFiles,
    listen_host: &str,
    port: u16,
) -> anyhow::Result<()> {
    write(dir, CA_FILE, &files.ca_pem, 0o644)?;
    write(dir, CERT_FILE, &files.cert_pem, 0o644)?;
    write(dir, ACL_FILE, &files.acl, 0o644)?;
    write(dir, CRL_FILE, &files.crl, 0o644)?;
    write(
        dir,
        CONF_FILE,
        &mosquitto_conf(dir, listen_host, port),
        0o644,
    )
}

/// `flotilla broker-config mosquitto`: writes the files into `dir`.
pub fn write_mosquitto(
    client: &Client,
    dir: &Path,
    listen: &str,
    sans: &[String],
) -> anyhow::Result<()> {
    let (host, port) = listen
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .with_context(|| format!("--listen {listen:?}: expected HOST:PORT"))?;
    anyhow::ensure!(
        !sans.is_empty(),
        "give at least one --san: the name devices use for the broker"
    );
    let key = broker_key(dir)?;
    let answer = client.post_json(
        ROUTE,
        &json!({
            "publicKey": STANDARD.encode(key.public_key_raw()),
            "sans": sans,
        }),
    )?;
    let field = |name: &str| {
        answer[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("the server's answer has no {name}"))
    };
    let files = MosquittoFiles {
        ca_pem: field("caCertificate")?,
        cert_pem: field("serverCertificate")?,
        acl: field("acl")?,
        crl: field("crl")?,
    };
    write_files(dir, &files, host, port)?;
    println!("{}", dir.join(CONF_FILE).display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_holds_devices_to_their_topics() {
        let text = acl(&Topics::new("fleet/x"));
        for line in [
            "pattern read fleet/x/node/%u/desired",
            "pattern read fleet/x/node/%u/rpc/req",
            "pattern write fleet/x/node/%u/status",
            "pattern write fleet/x/node/%u/presence",
            "pattern write fleet/x/node/%u/rpc/res",
            "user flotilla:controller\ntopic readwrite fleet/x/#",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(!text.contains("pattern readwrite"), "{text}");
    }

    #[test]
    fn conf_requires_certificates() {
        let conf = mosquitto_conf(Path::new("/etc/m"), "0.0.0.0", 8883);
        for line in [
            "allow_anonymous false",
            "listener 8883 0.0.0.0",
            "require_certificate true",
            "use_identity_as_username true",
            "crlfile /etc/m/crl.pem",
            "acl_file /etc/m/acl",
        ] {
            assert!(conf.contains(line), "{line} in\n{conf}");
        }
    }
}
