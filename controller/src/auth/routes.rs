//! The API-token routes, merged into the API by `serve` (admin only, as
//! [`super::ROUTES`] says):
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/api-tokens` | body `{"role":"viewer","name":"ci","ttlSecs":86400}` (`name`, `ttlSecs` optional): a token, shown once |
//! | `GET /v1/api-tokens` | names, roles, creation and expiry; never the tokens |
//! | `DELETE /v1/api-tokens/{name}` | the token is refused from now on |

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Caller;
use crate::identity::api_tokens::{ApiTokenError, ApiTokenInfo, ApiTokens, Role};

/// Longest token lifetime accepted: ten years.
const MAX_TTL_SECS: u64 = 10 * 366 * 24 * 3600;

/// The API-token routes.
pub fn router(tokens: Arc<ApiTokens>) -> Router {
    Router::new()
        .route("/v1/api-tokens", get(list).post(create))
        .route("/v1/api-tokens/{name}", delete(revoke))
        .with_state(tokens)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateRequest {
    role: String,
    name: Option<String>,
    ttl_secs: Option<u64>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn status_of(e: &ApiTokenError) -> StatusCode {
    match e {
        ApiTokenError::BadRole(_) | ApiTokenError::BadName { .. } => StatusCode::BAD_REQUEST,
        ApiTokenError::Exists(_) => StatusCode::CONFLICT,
        ApiTokenError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiTokenError::Db { .. } | ApiTokenError::Random | ApiTokenError::Io { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiTokenError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(refuse(status_of(&e), e.to_string())),
        Err(e) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn view(t: &ApiTokenInfo) -> Value {
    json!({
        "name": t.name,
        "role": t.role.as_str(),
        "createdAtMs": t.created_ms,
        "expiresAtMs": t.expires_ms,
    })
}

/// `{role}-{8 hex digits}`, for a token made without a name.
fn default_name(role: Role) -> Option<String> {
    let mut bytes = [0u8; 4];
    SystemRandom::new().fill(&mut bytes).ok()?;
    Some(format!(
        "{}-{:08x}",
        role.as_str(),
        u32::from_be_bytes(bytes)
    ))
}

async fn create(
    State(tokens): State<Arc<ApiTokens>>,
    caller: Option<Extension<Caller>>,
    Json(req): Json<CreateRequest>,
) -> Response {
    let role = match Role::parse(&req.role) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(ttl) = req.ttl_secs.filter(|t| *t > MAX_TTL_SECS) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("ttlSecs: {ttl}, expected at most {MAX_TTL_SECS}"),
        );
    }
    let Some(name) = req.name.or_else(|| default_name(role)) else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "no randomness");
    };
    let ttl_ms = req.ttl_secs.map(|s| s * 1000);
    let t = Arc::clone(&tokens);
    match blocking(move || t.create(&name, role, ttl_ms)).await {
        Ok(new) => {
            let by = caller.map(|Extension(c)| c.name).unwrap_or_default();
            tracing::info!(token = %new.info.name, role = role.as_str(), by = %by, "api token created");
            let mut answer = view(&new.info);
            answer["token"] = Value::from(new.token);
            Json(answer).into_response()
        }
        Err(r) => r,
    }
}

async fn list(State(tokens): State<Arc<ApiTokens>>) -> Response {
    let items: Vec<Value> = tokens.list().iter().map(view).collect();
    Json(json!({ "items": items })).into_response()
}

async fn revoke(
    State(tokens): State<Arc<ApiTokens>>,
    caller: Option<Extension<Caller>>,
    Path(name): Path<String>,
) -> Response {
    let t = Arc::clone(&tokens);
    let key = name.clone();
    match blocking(move || t.revoke(&key)).await {
        Ok(()) => {
            let by = caller.map(|Extension(c)| c.name).unwrap_or_default();
            tracing::info!(token = %name, by = %by, "api token revoked");
            Json(json!({ "revoked": name })).into_response()
        }
        Err(r) => r,
    }
}
