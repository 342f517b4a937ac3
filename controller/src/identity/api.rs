//! The HTTP routes of device identity, merged into the API by `serve`:
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/tokens` | body `{"ttlSecs":86400,"uses":1,"labels":{"k":"v"}}` (all optional): a join token, shown once |
//! | `POST /v1/join` | body `{"token":"flt_…","node":"NAME"}`: consumes a use of the token; answers the node's MQTT credential and the controller's public key. With `"publicKey"` (base64 of a raw P-256 point) and `"proof"` (base64 of that key's ASN.1 ECDSA signature over `certs::join_message`), answers a certificate instead of a password |
//! | `POST /v1/renew` | body `{"node","publicKey","timeMs","signature"}` (signed by the node's current key, `certs::renew_message`): a new certificate, no token |
//! | `POST /v1/nodes/{name}/revoke` | the node's credential is refused from now on |

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::ca::P256PublicKey;
use super::certs::DeviceCert;
use super::{Identity, IdentityError, SigningKey};

/// Longest token lifetime accepted: a year.
const MAX_TTL_SECS: u64 = 366 * 24 * 3600;
/// Longest base64 field accepted (keys and signatures are under 100 bytes).
const MAX_BASE64: usize = 512;
/// Most labels a token may carry.
const MAX_LABELS: usize = 64;

#[derive(Clone)]
struct TrustState {
    identity: Arc<Identity>,
    signer: Arc<SigningKey>,
}

/// The identity routes.
pub fn router(identity: Arc<Identity>, signer: Arc<SigningKey>) -> Router {
    Router::new()
        .route("/v1/tokens", post(create_token))
        .route("/v1/join", post(join))
        .route("/v1/renew", post(renew))
        .route("/v1/nodes/{name}/revoke", post(revoke))
        .with_state(TrustState { identity, signer })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokenRequest {
    ttl_secs: Option<u64>,
    uses: Option<u32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JoinRequest {
    token: String,
    node: String,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    proof: Option<String>,
    /// The device's X25519 key for sealed secrets (base64).
    #[serde(default)]
    sealing_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RenewRequest {
    node: String,
    public_key: String,
    time_ms: u64,
    signature: String,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn status_of(e: &IdentityError) -> StatusCode {
    match e {
        IdentityError::TokenRefused => StatusCode::FORBIDDEN,
        IdentityError::NodeName { .. } | IdentityError::ZeroUses => StatusCode::BAD_REQUEST,
        IdentityError::UnknownNode(_) => StatusCode::NOT_FOUND,
        IdentityError::BadProof => StatusCode::BAD_REQUEST,
        IdentityError::RenewRefused(_) => StatusCode::FORBIDDEN,
        IdentityError::NoTls => StatusCode::CONFLICT,
        IdentityError::Db { .. } | IdentityError::Random | IdentityError::Certificate(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IdentityError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(refuse(status_of(&e), e.to_string())),
        Err(e) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn create_token(State(s): State<TrustState>, Json(req): Json<TokenRequest>) -> Response {
    let ttl = req.ttl_secs.unwrap_or(24 * 3600);
    if ttl > MAX_TTL_SECS {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("ttlSecs: {ttl}, expected at most {MAX_TTL_SECS}"),
        );
    }
    if req.labels.len() > MAX_LABELS {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("labels: more than {MAX_LABELS}"),
        );
    }
    for (k, v) in &req.labels {
        if let Err(e) = flotilla_proto::check_label_key(k) {
            return refuse(StatusCode::BAD_REQUEST, format!("label key {k:?}: {e}"));
        }
        if let Err(e) = flotilla_proto::check_label_value(v) {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("label {k:?} value {v:?}: {e}"),
            );
        }
    }
    let labels: Vec<(String, String)> = req.labels.into_iter().collect();
    let uses = req.uses.unwrap_or(1);
    let identity = Arc::clone(&s.identity);
    match blocking(move || identity.create_token(ttl * 1000, uses, &labels)).await {
        Ok(t) => Json(json!({
            "token": t.token,
            "expiresAtMs": t.expires_ms,
            "uses": t.uses,
        }))
        .into_response(),
        Err(r) => r,
    }
}

async fn join(State(s): State<TrustState>, Json(req): Json<JoinRequest>) -> Response {
    let identity = Arc::clone(&s.identity);
    let node = req.node.clone();
    let device_key = match (&req.public_key, &req.proof) {
        // A password fleet: the agent's key is not needed (it keeps it unused).
        _ if !s.identity.issues_certificates() => None,
        (None, None) => None,
        (Some(key), Some(proof)) => match device_key(key, proof, &req.token, &req.node) {
            Ok(key) => Some(key),
            Err((status, message)) => return refuse(status, message),
        },
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "publicKey and proof: give both or neither",
            );
        }
    };
    let sealing_key = match req
        .sealing_key
        .as_deref()
        .map(super::sealing::parse_sealing_key)
    {
        Some(Err(e)) => return refuse(StatusCode::BAD_REQUEST, e),
        Some(Ok(key)) => Some(key),
        None => None,
    };
    match blocking(move || {
        let enrolled = identity.join_with_key(&req.token, &req.node, device_key.as_ref())?;
        if let Some(key) = sealing_key {
            identity.set_sealing_key(&req.node, key)?;
        }
        Ok(enrolled)
    })
    .await
    {
        Ok(e) => {
            tracing::info!(node = %node, tls = e.certificate.is_some(), "node enrolled");
            let labels: BTreeMap<String, String> = e.labels.into_iter().collect();
            let mut answer = json!({
                "node": node,
                "username": e.username,
                "password": e.password,
                "controllerKey": s.signer.public_base64(),
                "labels": labels,
            });
            if let Some(cert) = &e.certificate {
                add_certificate(&mut answer, cert);
            }
            Json(answer).into_response()
        }
        Err(r) => {
            tracing::warn!(node = %node, "join refused");
            r
        }
    }
}

/// A refusal before anything is done: status and message.
type Refusal = (StatusCode, String);

/// The device's public key, once its proof of possession checks out.
fn device_key(key: &str, proof: &str, token: &str, node: &str) -> Result<P256PublicKey, Refusal> {
    let key = public_key(key)?;
    let proof = decode64("proof", proof)?;
    Identity::check_join_proof(token, node, &key, &proof)
        .map_err(|e| (status_of(&e), e.to_string()))?;
    Ok(key)
}

fn public_key(text: &str) -> Result<P256PublicKey, Refusal> {
    P256PublicKey::new(decode64("publicKey", text)?)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("publicKey: {e}")))
}

fn decode64(field: &str, text: &str) -> Result<Vec<u8>, Refusal> {
    use base64::Engine;
    if text.len() > MAX_BASE64 {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("{field}: longer than {MAX_BASE64} characters"),
        ));
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{field}: not base64: {e}")))
}

fn add_certificate(answer: &mut serde_json::Value, cert: &DeviceCert) {
    answer["certificate"] = cert.cert.pem.clone().into();
    answer["certificateExpiresAtMs"] = cert.cert.expires_ms.into();
    answer["caCertificate"] = cert.ca_pem.clone().into();
    answer["broker"] = cert.broker_url.clone().into();
}

async fn renew(State(s): State<TrustState>, Json(req): Json<RenewRequest>) -> Response {
    let checked = public_key(&req.public_key)
        .and_then(|key| Ok((key, decode64("signature", &req.signature)?)));
    let (key, signature) = match checked {
        Ok(k) => k,
        Err((status, message)) => return refuse(status, message),
    };
    let identity = Arc::clone(&s.identity);
    let node = req.node.clone();
    match blocking(move || identity.renew(&req.node, &key, req.time_ms, &signature)).await {
        Ok(cert) => {
            tracing::info!(node = %node, "certificate renewed");
            let mut answer = json!({ "node": node });
            add_certificate(&mut answer, &cert);
            Json(answer).into_response()
        }
        Err(r) => {
            tracing::warn!(node = %node, "renewal refused");
            r
        }
    }
}

async fn revoke(State(s): State<TrustState>, Path(name): Path<String>) -> Response {
    let identity = Arc::clone(&s.identity);
    let node = name.clone();
    match blocking(move || identity.revoke(&node)).await {
        Ok(()) => {
            tracing::info!(node = %name, "node revoked");
            Json(json!({ "revoked": name })).into_response()
        }
        Err(r) => r,
    }
}
