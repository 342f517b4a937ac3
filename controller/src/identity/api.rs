//! The HTTP routes of device identity, merged into the API by `serve`:
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/tokens` | body `{"ttlSecs":86400,"uses":1,"labels":{"k":"v"}}` (all optional): a join token, shown once |
//! | `POST /v1/join` | body `{"token":"flt_…","node":"NAME"}`: consumes a use of the token; answers the node's MQTT credential and the controller's public key |
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

use super::{Identity, IdentityError, SigningKey};

/// Longest token lifetime accepted: a year.
const MAX_TTL_SECS: u64 = 366 * 24 * 3600;
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
#[serde(deny_unknown_fields)]
struct JoinRequest {
    token: String,
    node: String,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn status_of(e: &IdentityError) -> StatusCode {
    match e {
        IdentityError::TokenRefused => StatusCode::FORBIDDEN,
        IdentityError::NodeName { .. } | IdentityError::ZeroUses => StatusCode::BAD_REQUEST,
        IdentityError::UnknownNode(_) => StatusCode::NOT_FOUND,
        IdentityError::Db { .. } | IdentityError::Random => StatusCode::INTERNAL_SERVER_ERROR,
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
    match blocking(move || identity.join(&req.token, &req.node)).await {
        Ok(e) => {
            tracing::info!(node = %node, "node enrolled");
            let labels: BTreeMap<String, String> = e.labels.into_iter().collect();
            Json(json!({
                "node": node,
                "username": e.username,
                "password": e.password,
                "controllerKey": s.signer.public_base64(),
                "labels": labels,
            }))
            .into_response()
        }
        Err(r) => {
            tracing::warn!(node = %node, "join refused");
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
