//! The `.dockerconfigjson` of an image pull secret, checked when it is
//! applied so that a bad one is refused at once rather than failing pulls
//! on the devices: `{"auths": {"HOST": {"auth": base64("user:pass")} |
//! {"username": …, "password": …}}}`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

/// Most registries in one pull secret.
const MAX_REGISTRIES: usize = 32;

/// Checks Docker's config JSON; the error says what is wrong, never a value.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: line {}", e.line()))?;
    let auths = value
        .get("auths")
        .and_then(Value::as_object)
        .ok_or("expected an object \"auths\" of registries")?;
    if auths.is_empty() {
        return Err("\"auths\" names no registry".into());
    }
    if auths.len() > MAX_REGISTRIES {
        return Err(format!("\"auths\": more than {MAX_REGISTRIES} registries"));
    }
    for (host, entry) in auths {
        if host.is_empty() || host.len() > 255 {
            return Err(format!("\"auths\": registry {host:?} is not a host name"));
        }
        let text = |k: &str| entry.get(k).and_then(Value::as_str);
        match (text("auth"), text("username"), text("password")) {
            (Some(auth), _, _) => {
                let decoded = STANDARD
                    .decode(auth)
                    .map_err(|_| format!("\"auths\".{host:?}.auth: not base64"))?;
                if !decoded.contains(&b':') {
                    return Err(format!(
                        "\"auths\".{host:?}.auth: expected base64 of \"user:password\""
                    ));
                }
            }
            (None, Some(_), Some(_)) => {}
            _ => {
                return Err(format!(
                    "\"auths\".{host:?}: expected \"auth\", or \"username\" and \"password\""
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_docker_shapes_and_names_what_is_wrong() {
        let auth = STANDARD.encode("robot:pw");
        assert_eq!(
            check(format!(r#"{{"auths":{{"r.local:5000":{{"auth":"{auth}"}}}}}}"#).as_bytes()),
            Ok(())
        );
        assert_eq!(
            check(br#"{"auths":{"r":{"username":"u","password":"p"}}}"#),
            Ok(())
        );
        assert!(check(b"{").unwrap_err().starts_with("not JSON"));
        assert!(check(br#"{"auths":{}}"#).is_err());
        assert!(check(br#"{"x":1}"#).unwrap_err().contains("auths"));
        let e = check(br#"{"auths":{"r":{"auth":"!!"}}}"#).unwrap_err();
        assert_eq!(e, "\"auths\".\"r\".auth: not base64");
        let e = check(br#"{"auths":{"r":{"username":"u"}}}"#).unwrap_err();
        assert!(e.contains("expected \"auth\""), "{e}");
    }
}
