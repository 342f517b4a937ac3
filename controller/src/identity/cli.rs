//! `flotilla token create` and `flotilla node revoke`: thin clients of the
//! identity routes.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::client::Client;

/// `flotilla token create`: prints the token alone on stdout. When the CLI
/// trusts the controller through a CA file, the token carries that CA's
/// fingerprint after a `.`, so `flotilla-agent join` can check the
/// controller's HTTPS certificate with nothing else on the device.
pub fn create_token(
    client: &Client,
    ttl: Duration,
    uses: u32,
    labels: &[String],
) -> anyhow::Result<()> {
    let mut map = serde_json::Map::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("label {l:?}: expected key=value"))?;
        map.insert(k.to_owned(), Value::from(v));
    }
    let answer = client.post_json(
        "/v1/tokens",
        &json!({ "ttlSecs": ttl.as_secs().max(1), "uses": uses, "labels": map }),
    )?;
    let token = answer["token"]
        .as_str()
        .context("the server's answer has no token")?;
    match client.ca_fingerprint() {
        Some(pin) => println!("{token}.{pin}"),
        None => println!("{token}"),
    }
    Ok(())
}

/// `flotilla node revoke NAME`.
pub fn revoke(client: &Client, node: &str) -> anyhow::Result<()> {
    client.post_json(&format!("/v1/nodes/{node}/revoke"), &json!({}))?;
    println!("node/{node} revoked");
    Ok(())
}
