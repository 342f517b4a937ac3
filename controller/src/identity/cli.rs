//! `flotilla token create` and `flotilla node revoke`: thin clients of the
//! identity routes.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

fn post(server: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let base = server.trim_end_matches('/');
    let url = format!("{base}{path}");
    let mut response = agent
        .post(&url)
        .send_json(body)
        .with_context(|| format!("cannot reach the flotilla API at {base}"))?;
    let status = response.status();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .with_context(|| format!("reading the response from {url}"))?;
    let value: Value = serde_json::from_str(&text).with_context(|| {
        format!("{url}: the server answered {status} with a body that is not JSON")
    })?;
    if !status.is_success() {
        bail!("{}", value["error"].as_str().unwrap_or("no message"));
    }
    Ok(value)
}

/// `flotilla token create`: prints the token alone on stdout.
pub fn create_token(
    server: &str,
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
    let answer = post(
        server,
        "/v1/tokens",
        &json!({ "ttlSecs": ttl.as_secs().max(1), "uses": uses, "labels": map }),
    )?;
    let token = answer["token"]
        .as_str()
        .context("the server's answer has no token")?;
    println!("{token}");
    Ok(())
}

/// `flotilla node revoke NAME`.
pub fn revoke(server: &str, node: &str) -> anyhow::Result<()> {
    post(server, &format!("/v1/nodes/{node}/revoke"), &json!({}))?;
    println!("node/{node} revoked");
    Ok(())
}
