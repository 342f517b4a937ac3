//! `flotilla-agent join`: trades a join token for the device's MQTT
//! credential and the controller's public key (`POST /v1/join`), and keeps
//! both under `{data_dir}/identity/`, readable by the owner only. The agent
//! then pins that key and connects with that credential on every start.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{CONTROLLER_KEY_FILE, JOIN_LABELS_FILE, PASSWORD_FILE, Trust, identity_dir};

/// Largest answer read from the controller.
const MAX_ANSWER: u64 = 64 * 1024;

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The controller could not be reached or answered badly.
    #[error("joining through {server}: {reason}")]
    Server { server: String, reason: String },
    /// The controller refused (a used, expired or unknown token).
    #[error("the controller refused to join: {0}")]
    Refused(String),
    /// What the controller sent is not usable.
    #[error("the controller's answer: {0}")]
    Answer(String),
    /// A file could not be written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    username: String,
    password: String,
    controller_key: String,
    /// The join token's labels, for the node.
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(flatten)]
    certificate: Option<CertAnswer>,
}

/// Joins `node` to the fleet of the controller at `server`
/// (`https://host:port`; `http://` on loopback only) with `token`, writing
/// the credential under `data_dir`. The controller's certificate is checked
/// against `ca`, else the CA fingerprint in the token, else the system's
/// roots ([`crate::join_tls`]). Blocking.
pub fn join(
    server: &str,
    token: &str,
    node: &str,
    data_dir: &Path,
    ca: Option<&Path>,
) -> Result<(), EnrollError> {
    let base = server.trim_end_matches('/');
    let url = format!("{base}/v1/join");
    let fail = |reason: String| EnrollError::Server {
        server: base.to_owned(),
        reason,
    };
    let (token, pin) = crate::join_tls::split_token(token).map_err(EnrollError::Refused)?;
    let agent = if base.starts_with("https://") {
        crate::join_tls::agent(base, ca, pin.as_ref()).map_err(fail)?
    } else if is_loopback(base) {
        crate::join_tls::plain_agent()
    } else {
        return Err(fail(
            "the join token would cross the network in the clear: use https://".into(),
        ));
    };
    // The device's MQTT key, made here and never sent: the controller gets
    // its public half and a proof of possession (`tls::DeviceKey`).
    let device_key = crate::tls::DeviceKey::generate().map_err(EnrollError::Answer)?;
    let proof = device_key
        .sign(&crate::tls::join_message(token, node, device_key.public()))
        .map_err(EnrollError::Answer)?;
    // A new sealing key at every join: re-enrolling rotates it.
    let sealing =
        crate::secrets::SealingKey::generate().map_err(|e| EnrollError::Answer(e.to_string()))?;
    let body = serde_json::json!({
        "token": token,
        "node": node,
        "sealingKey": sealing.public_base64(),
        "publicKey": b64(device_key.public()),
        "proof": b64(&proof),
    });
    let text =
        crate::join_tls::post_json(&agent, &url, &body, MAX_ANSWER).map_err(|e| match e {
            crate::join_tls::ApiCallError::Refused(message) => EnrollError::Refused(message),
            crate::join_tls::ApiCallError::Transport(reason) => fail(reason),
        })?;
    let answer: Answer =
        serde_json::from_str(&text).map_err(|e| EnrollError::Answer(e.to_string()))?;
    if answer.username != node {
        return Err(EnrollError::Answer(format!(
            "username {:?}, expected the node name {node:?}",
            answer.username
        )));
    }
    let dir = identity_dir(data_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| EnrollError::Io {
            op: "creating",
            path: dir.clone(),
            source,
        })?;
    let key = dir.join(CONTROLLER_KEY_FILE);
    write_private(
        &key,
        format!("{}\n", answer.controller_key.trim()).as_bytes(),
    )?;
    // Checked as the agent will read it, so a bad key fails the join, not the agent.
    Trust::load(&key).map_err(|e| EnrollError::Answer(e.to_string()))?;
    match &answer.certificate {
        // A device with a certificate always uses TLS: no password is kept.
        Some(cert) => {
            crate::tls::store(&dir, &device_key, cert, base).map_err(io_answer)?;
            remove(&dir.join(PASSWORD_FILE))?;
        }
        None => {
            write_private(&dir.join(PASSWORD_FILE), answer.password.as_bytes())?;
            crate::tls::forget(&dir).map_err(io_answer)?;
        }
    }
    // Checked as the agent will read them, so a bad label fails the join.
    let labels: Vec<String> = answer
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    crate::config::NodeLabels::parse(&labels).map_err(|e| EnrollError::Answer(e.to_string()))?;
    let labels_file = dir.join(JOIN_LABELS_FILE);
    if labels.is_empty() {
        remove(&labels_file)?;
    } else {
        write_private(&labels_file, format!("{}\n", labels.join("\n")).as_bytes())?;
    }
    sealing
        .save(&dir.join(crate::secrets::SEALING_KEY_FILE))
        .map_err(|e| EnrollError::Answer(e.to_string()))?;
    Ok(())
}

pub use crate::tls::CertAnswer;

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn io_answer(e: crate::tls::TlsFileError) -> EnrollError {
    EnrollError::Answer(e.to_string())
}

fn remove(path: &Path) -> Result<(), EnrollError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(EnrollError::Io {
            op: "removing",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Whether `http://host[:port]…` names this machine's loopback.
fn is_loopback(url: &str) -> bool {
    let authority = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), EnrollError> {
    crate::private_file::write(path, bytes).map_err(|source| EnrollError::Io {
        op: "writing",
        path: path.to_owned(),
        source,
    })
}
