//! `flotilla api-token create|list|revoke`: thin clients of the API-token
//! routes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Value, json};

use crate::client::Client;
use crate::output;

/// `flotilla api-token create --role R [--name N] [--ttl D]`: prints the
/// token alone on stdout (it is shown this once).
pub fn create(
    client: &Client,
    role: &str,
    name: Option<&str>,
    ttl: Option<Duration>,
) -> anyhow::Result<()> {
    let mut body = json!({ "role": role });
    if let Some(n) = name {
        body["name"] = Value::from(n);
    }
    if let Some(t) = ttl {
        body["ttlSecs"] = Value::from(t.as_secs().max(1));
    }
    let answer = client.post_json("/v1/api-tokens", &body)?;
    let token = answer["token"]
        .as_str()
        .context("the server's answer has no token")?;
    eprintln!(
        "api token {} ({}) made; it is shown only now:",
        answer["name"].as_str().unwrap_or_default(),
        answer["role"].as_str().unwrap_or_default()
    );
    println!("{token}");
    Ok(())
}

/// When `ms` (ms since the epoch) comes, as `in 5h`, or `expired 3m ago`.
fn until(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    if ms <= now {
        format!("expired {} ago", output::age(ms))
    } else {
        // age() counts back from now; the same units, forward.
        let ahead = now.saturating_sub(ms - now);
        format!("in {}", output::age(ahead.max(1)))
    }
}

/// `flotilla api-token list`: names, roles, age and expiry; never tokens.
pub fn list(client: &Client) -> anyhow::Result<()> {
    let answer = client.call("GET", "/v1/api-tokens", None)?;
    let rows: Vec<[String; 4]> = answer["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            [
                t["name"].as_str().unwrap_or_default().to_owned(),
                t["role"].as_str().unwrap_or_default().to_owned(),
                output::age(t["createdAtMs"].as_u64().unwrap_or(0)),
                t["expiresAtMs"]
                    .as_u64()
                    .map_or_else(|| "never".to_owned(), until),
            ]
        })
        .collect();
    let header = ["NAME", "ROLE", "AGE", "EXPIRES"].map(str::to_owned);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let [a, b, c, d] = row;
        println!(
            "{a:<w0$}   {b:<w1$}   {c:<w2$}   {d}",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    Ok(())
}

/// `flotilla api-token revoke NAME`.
pub fn revoke(client: &Client, name: &str) -> anyhow::Result<()> {
    let escaped: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    client.call("DELETE", &format!("/v1/api-tokens/{escaped}"), None)?;
    println!("api-token/{name} revoked");
    Ok(())
}
