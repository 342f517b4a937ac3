//! `flotilla-agent join`: trades a join token for the device's MQTT
//! credential and the controller's public key (`POST /v1/join`), and keeps
//! both under `{data_dir}/identity/`, readable by the owner only. The agent
//! then pins that key and connects with that credential on every start.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{CONTROLLER_KEY_FILE, PASSWORD_FILE, Trust, identity_dir};

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
}

/// Joins `node` to the fleet of the controller at `server` (`http://host:port`)
/// with `token`, writing the credential under `data_dir`. Blocking.
pub fn join(server: &str, token: &str, node: &str, data_dir: &Path) -> Result<(), EnrollError> {
    let base = server.trim_end_matches('/');
    let url = format!("{base}/v1/join");
    let fail = |reason: String| EnrollError::Server {
        server: base.to_owned(),
        reason,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut response = agent
        .post(&url)
        .send_json(serde_json::json!({ "token": token, "node": node }))
        .map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER)
        .read_to_string()
        .map_err(|e| fail(e.to_string()))?;
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("status {status}"));
        return Err(EnrollError::Refused(message));
    }
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
    write_private(&dir.join(PASSWORD_FILE), answer.password.as_bytes())?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), EnrollError> {
    let io_err = |op| {
        move |source| EnrollError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("creating"))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err("writing"))?;
    fs::rename(&tmp, path).map_err(io_err("renaming to"))
}
