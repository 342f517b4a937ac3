//! Registry authentication: parsing `WWW-Authenticate` challenges (Basic,
//! and Bearer with realm, service and scope, as the distribution token
//! spec has it) and token responses.

use base64::Engine as _;
use serde::Deserialize;

/// Longest challenge header parsed.
const MAX_CHALLENGE: usize = 4096;
/// Longest token accepted.
const MAX_TOKEN: usize = 64 * 1024;

/// What a registry's 401 asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// A user name and password on every request.
    Basic,
    /// A token from `realm`, for `service` and `scope`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value; `None` when it is neither Basic nor a
/// Bearer challenge with an http(s) realm.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    if header.len() > MAX_CHALLENGE {
        return None;
    }
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let realm = get("realm").filter(|r| r.starts_with("https://") || r.starts_with("http://"))?;
    Some(Challenge::Bearer {
        realm,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `key="value", key=value` pairs; commas inside quotes belong to the value.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

/// The `Authorization` value for basic authentication.
pub(crate) fn basic(username: &str, password: &str) -> String {
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved bytes).
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The token in a token server's JSON answer (`token`, or OAuth's
/// `access_token`).
pub(crate) fn parse_token(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct TokenJson {
        token: Option<String>,
        access_token: Option<String>,
    }
    let json: TokenJson =
        serde_json::from_slice(body).map_err(|e| format!("malformed token response: {e}"))?;
    let token = json
        .token
        .or(json.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "token response holds no token".to_owned())?;
    // The token goes into a header: refuse what would break it.
    if token.len() > MAX_TOKEN || token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err("token response holds a token that is too long or not printable".to_owned());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=http://127.0.0.1:1/t"),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm="file:///etc/passwd""#),
            None
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn basic_encoding_and_query_escaping() {
        assert_eq!(basic("robot", "pa:ss"), "Basic cm9ib3Q6cGE6c3M=");
        assert_eq!(encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }

    #[test]
    fn tokens() {
        assert_eq!(parse_token(br#"{"token":"abc"}"#), Ok("abc".to_owned()));
        assert_eq!(
            parse_token(br#"{"access_token":"xyz","expires_in":60}"#),
            Ok("xyz".to_owned())
        );
        assert!(parse_token(br#"{"token":""}"#).is_err());
        assert!(parse_token(b"{\"token\":\"a\\nb\"}").is_err());
        assert!(parse_token(b"<html>").is_err());
    }
}
