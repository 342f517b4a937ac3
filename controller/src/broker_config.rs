//! `flotilla broker-config mosquitto --out DIR`: an external Mosquitto's
//! listener, TLS and ACL configuration, made from the fleet's identities.
//!
//! The CLI makes (or keeps) the broker's private key in DIR and sends only
//! its public half, with the certificate and revocation list DIR holds; the
//! controller answers, through `POST /v1/broker-config/mosquitto` (admin), a
//! server certificate from the fleet CA, the CA certificate, the ACL
//! (per-device `pattern` rules on the certificate's CN, the controller's own
//! rights) and a revocation list of every revoked device certificate not yet
//! expired — the certificate and the list it was sent back unchanged while
//! they are still good (`keep.rs`). The CLI writes only files whose content
//! changed, names them, and runs `--reload-cmd` (or `--restart-cmd`) only
//! then, so a timer can run it every hour: a revocation reaches Mosquitto
//! within the hour and the list never expires.

mod keep;

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
/// A revocation list is signed again once it is this old, so a broker whose
/// timer stopped still has twenty days before every device is locked out.
pub const CRL_RESIGN_AFTER: Duration = Duration::from_secs(10 * 24 * 3600);
/// Most names in the broker's certificate.
const MAX_SANS: usize = 32;
/// Longest public key field accepted (base64 of a 65-byte point).
const MAX_KEY_BASE64: usize = 128;
/// Longest certificate sent back to be kept.
const MAX_CERT_PEM: usize = 16 * 1024;
/// Longest revocation list sent back to be kept (about 14,000 revoked
/// certificates; past it a new list is signed on every run). The API's
/// body limit is 1 MiB.
const MAX_CRL_PEM: usize = 768 * 1024;

/// Files written in DIR.
pub const CONF_FILE: &str = "mosquitto.conf";
const ACL_FILE: &str = "acl";
const CRL_FILE: &str = "crl.pem";
const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "server.pem";
const KEY_FILE: &str = "server.key";
/// Present while a reload (or restart) is owed: the command failed after
/// the files were written, so the next run runs it again.
const PENDING_FILE: &str = ".reload-pending";

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
    /// The broker's certificate in use: sent back unchanged while good.
    #[serde(default)]
    server_certificate: Option<String>,
    /// The revocation list in use: sent back unchanged while good.
    #[serde(default)]
    crl: Option<String>,
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
    if req.server_certificate.as_ref().map_or(0, String::len) > MAX_CERT_PEM
        || req.crl.as_ref().map_or(0, String::len) > MAX_CRL_PEM
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "serverCertificate or crl: too long, expected at most {MAX_CERT_PEM} and {MAX_CRL_PEM} bytes"
            ),
        );
    }
    let identity = Arc::clone(&s.identity);
    let made = tokio::task::spawn_blocking(move || {
        let ca = identity
            .ca()
            .context("this controller has no fleet ca: start it with --broker mqtts://…")?;
        let now = std::time::SystemTime::now();
        let kept_cert = req.server_certificate.filter(|pem| {
            keep::certificate(ca, pem, &key, &req.sans, now)
                .inspect_err(|why| tracing::info!(%why, "mosquitto's certificate is renewed"))
                .is_ok()
        });
        let cert = match kept_cert {
            Some(pem) => pem,
            None => ca.issue_server_for(&req.sans, &key)?.pem,
        };
        let revoked = identity.revoked_certificates()?;
        let kept_crl = req.crl.filter(|pem| {
            keep::crl(ca, pem, &revoked, CRL_VALIDITY - CRL_RESIGN_AFTER, now)
                .inspect_err(|why| tracing::info!(%why, "mosquitto's revocation list is renewed"))
                .is_ok()
        });
        let crl = match kept_crl {
            Some(pem) => pem,
            None => ca.crl_pem(&revoked, CRL_VALIDITY)?,
        };
        anyhow::Ok((ca.cert_pem().to_owned(), cert, crl, revoked.len()))
    })
    .await;
    match made {
        Ok(Ok((ca, cert, crl, revoked))) => {
            tracing::debug!(revoked, "mosquitto config made");
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
        "# Written by `flotilla broker-config mosquitto` (run hourly by\n\
         # flotilla-mosquitto-config.timer); rewrite it rather than edit.\n\
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

/// Largest file of DIR read back (our own files; a bigger one is rewritten).
const MAX_READ: u64 = 4 * 1024 * 1024;

/// The content of `dir/name` if it is there and not oversized.
fn read_back(dir: &Path, name: &str) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(dir.join(name))
        .and_then(|f| f.take(MAX_READ + 1).read_to_end(&mut bytes))
        .ok()
        .filter(|n| (*n as u64) <= MAX_READ)
        .map(|_| bytes)
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

/// Writes `dir/name` unless it already holds `text` with `mode`; whether it
/// changed. An unchanged file keeps its inode and mtime.
fn write_if_changed(dir: &Path, name: &str, text: &str, mode: u32) -> anyhow::Result<bool> {
    if read_back(dir, name).is_some_and(|old| old == text.as_bytes()) {
        let path = dir.join(name);
        let meta =
            std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if meta.permissions().mode() & 0o7777 == mode {
            return Ok(false);
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        return Ok(true);
    }
    write(dir, name, text, mode)?;
    Ok(true)
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

/// The broker's key in `dir`, made (owner-only) on first use; and whether
/// it was made now. Mosquitto 2 reads it after dropping root for its own
/// user (and again on SIGHUP), so that user must own it: `--key-owner`.
pub fn broker_key(dir: &Path) -> anyhow::Result<(KeyPair, bool)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&key_path) {
        Ok(pem) => KeyPair::from_pem(&pem)
            .map(|k| (k, false))
            .with_context(|| format!("{}: not a pem private key", key_path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            write(dir, KEY_FILE, &key.serialize_pem(), 0o600)?;
            Ok((key, true))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", key_path.display())),
    }
}

/// The uid and gid of `user`, as `id` answers (so NSS users work too).
fn user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = std::process::Command::new("id")
            .arg(flag)
            .arg(user)
            .stdin(std::process::Stdio::null())
            .output()
            .context("running id")?;
        anyhow::ensure!(
            out.status.success(),
            "--key-owner {user}: no such user ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("id {flag} {user}: not a number"))
    };
    Ok((id("-u")?, id("-g")?))
}

/// Gives the key to `owner` (kept 0600); whether that changed anything.
fn own_key(dir: &Path, owner: Option<&str>) -> anyhow::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(KEY_FILE);
    let meta = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
    let Some(owner) = owner else {
        if meta.uid() == 0 {
            eprintln!(
                "warning: {} is root's and owner-only: Mosquitto 2 reads it after dropping \
                 root, so give --key-owner mosquitto (its user)",
                path.display()
            );
        }
        return Ok(false);
    };
    let (uid, gid) = user_ids(owner)?;
    if (meta.uid(), meta.gid()) == (uid, gid) {
        return Ok(false);
    }
    std::os::unix::fs::chown(&path, Some(uid), Some(gid))
        .with_context(|| format!("giving {} to {owner}", path.display()))?;
    Ok(true)
}

/// Writes what changed of `files` and the mosquitto.conf that names them
/// into `dir`, each atomically, the conf last; the names of the files
/// written, in that order.
pub fn write_files(
    dir: &Path,
    files: &MosquittoFiles,
    listen_host: &str,
    port: u16,
) -> anyhow::Result<Vec<&'static str>> {
    let conf = mosquitto_conf(dir, listen_host, port);
    let mut changed = Vec::new();
    for (name, text) in [
        (CA_FILE, files.ca_pem.as_str()),
        (CERT_FILE, &files.cert_pem),
        (ACL_FILE, &files.acl),
        (CRL_FILE, &files.crl),
        (CONF_FILE, &conf),
    ] {
        if write_if_changed(dir, name, text, 0o644)? {
            changed.push(name);
        }
    }
    Ok(changed)
}

/// `flotilla broker-config mosquitto`'s settings.
#[derive(Debug, Clone, Default)]
pub struct MosquittoOptions {
    /// Where the files go.
    pub dir: std::path::PathBuf,
    /// The TLS listener, HOST:PORT.
    pub listen: String,
    /// Names in the broker's certificate.
    pub sans: Vec<String>,
    /// The user the broker's key is given to.
    pub key_owner: Option<String>,
    /// Run (by `sh -c`) when a file Mosquitto reads again on SIGHUP changed.
    pub reload_cmd: Option<String>,
    /// Run instead when the CA or mosquitto.conf changed, which SIGHUP
    /// does not reload.
    pub restart_cmd: Option<String>,
}

fn run(what: &str, cmd: &str) -> anyhow::Result<()> {
    println!("{what}: {cmd}");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running the {what} command {cmd:?}"))?;
    anyhow::ensure!(
        status.success(),
        "the {what} command {cmd:?} failed: {status}"
    );
    Ok(())
}

/// `flotilla broker-config mosquitto`: writes what changed into the
/// directory, prints each file written (or that all are up to date), then
/// runs the reload or restart command if anything changed. The names of
/// the files written.
pub fn write_mosquitto(
    client: &Client,
    options: &MosquittoOptions,
) -> anyhow::Result<Vec<&'static str>> {
    let (dir, listen, sans) = (&options.dir, &options.listen, &options.sans);
    let (host, port) = listen
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .with_context(|| format!("--listen {listen:?}: expected HOST:PORT"))?;
    anyhow::ensure!(
        !sans.is_empty(),
        "give at least one --san: the name devices use for the broker"
    );
    let (key, made) = broker_key(dir)?;
    let key_changed = own_key(dir, options.key_owner.as_deref())? || made;
    // What is in place goes back to be kept while good; a new key needs a
    // new certificate anyway.
    let current = |name: &str, max: usize| {
        read_back(dir, name)
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|t| t.len() <= max && !made)
    };
    let answer = client.post_json(
        ROUTE,
        &json!({
            "publicKey": STANDARD.encode(key.public_key_raw()),
            "sans": sans,
            "serverCertificate": current(CERT_FILE, MAX_CERT_PEM),
            "crl": current(CRL_FILE, MAX_CRL_PEM),
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
    let mut changed = write_files(dir, &files, host, port)?;
    if key_changed {
        changed.insert(0, KEY_FILE);
    }
    // A reload that failed last time (Mosquitto's unit broken, systemctl
    // down) is owed still, though the files are now up to date.
    let owed = read_back(dir, PENDING_FILE);
    if changed.is_empty() && owed.is_none() {
        println!("{}: up to date", dir.display());
        return Ok(changed);
    }
    for name in &changed {
        println!("wrote {}", dir.join(name).display());
    }
    let restart = changed.iter().any(|n| [CA_FILE, CONF_FILE].contains(n))
        || owed.is_some_and(|o| o.starts_with(b"restart"));
    if options.reload_cmd.is_none() && options.restart_cmd.is_none() {
        return Ok(changed);
    }
    write(
        dir,
        PENDING_FILE,
        if restart { "restart\n" } else { "reload\n" },
        0o600,
    )?;
    match (&options.restart_cmd, &options.reload_cmd) {
        (Some(cmd), _) if restart => run("restart", cmd)?,
        (Some(cmd), None) => run("restart", cmd)?,
        (_, Some(cmd)) => {
            if restart {
                eprintln!(
                    "warning: Mosquitto reads its CA and listeners again only when \
                     restarted (give --restart-cmd)"
                );
            }
            run("reload", cmd)?;
        }
        (None, None) => {}
    }
    std::fs::remove_file(dir.join(PENDING_FILE))
        .with_context(|| format!("removing {}", dir.join(PENDING_FILE).display()))?;
    Ok(changed)
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
