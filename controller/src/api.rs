//! The HTTP API (JSON over HTTP/1.1) that the CLI and anything else use.
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/apply` | body: manifests (YAML or JSON, several documents); all or none |
//! | `GET /v1/nodes[/{name}]` | nodes |
//! | `GET /v1/workloads[/{name}]` | workloads |
//! | `DELETE /v1/workloads/{name}` | delete a workload |
//! | `GET /v1/pods[/{name}]` | pods (`{workload}@{node}`) |
//! | `GET /healthz` | liveness |
//!
//! Errors are `{"error": "…"}` with a 4xx/5xx status; a refused manifest also
//! lists every problem under `errors`.

use std::future::Future;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::control::{Cluster, ControlError, ControlHandle};
use crate::manifest;
use crate::view;

/// Largest request body accepted (a manifest file).
const MAX_BODY: usize = 1024 * 1024;

/// The router over a control loop handle.
pub fn router(control: ControlHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/apply", post(apply))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(get_node))
        .route("/v1/workloads", get(list_workloads))
        .route(
            "/v1/workloads/{name}",
            get(get_workload).delete(delete_workload),
        )
        .route("/v1/pods", get(list_pods))
        .route("/v1/pods/{name}", get(get_pod))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(control)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    control: ControlHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(control))
        .with_graceful_shutdown(shutdown)
        .await
}

/// An API error: a status and a message.
struct ApiError(StatusCode, Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match e {
            ControlError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::TooLarge { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ControlError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, json!({ "error": e.to_string() }))
    }
}

fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        json!({ "error": format!("{kind} \"{name}\" not found") }),
    )
}

type ApiResult = Result<axum::Json<Value>, ApiError>;

async fn apply(State(control): State<ControlHandle>, body: String) -> ApiResult {
    let workloads = manifest::parse(&body).map_err(|errors| {
        let list: Vec<Value> = errors
            .0
            .iter()
            .map(|e| json!({ "document": e.document, "path": e.path, "message": e.message }))
            .collect();
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "error": format!("manifest refused:\n{errors}"), "errors": list }),
        )
    })?;
    let applied = control.apply(workloads).await?;
    let list: Vec<Value> = applied
        .iter()
        .map(|(name, a)| json!({ "kind": "Workload", "name": name, "result": a.as_str() }))
        .collect();
    Ok(axum::Json(json!({ "applied": list })))
}

async fn read(
    control: &ControlHandle,
    f: impl FnOnce(&Cluster) -> Value + Send + 'static,
) -> ApiResult {
    Ok(axum::Json(control.read(f).await?))
}

async fn read_one(
    control: &ControlHandle,
    kind: &'static str,
    name: String,
    f: fn(&Cluster, &str) -> Option<Value>,
) -> ApiResult {
    let key = name.clone();
    match control.read(move |c| f(c, &key)).await? {
        Some(v) => Ok(axum::Json(v)),
        None => Err(not_found(kind, &name)),
    }
}

async fn list_nodes(State(control): State<ControlHandle>) -> ApiResult {
    read(&control, |c| json!({ "items": view::nodes(c) })).await
}

async fn get_node(State(control): State<ControlHandle>, Path(name): Path<String>) -> ApiResult {
    read_one(&control, "node", name, view::node).await
}

async fn list_workloads(State(control): State<ControlHandle>) -> ApiResult {
    read(&control, |c| json!({ "items": view::workloads(c) })).await
}

async fn get_workload(State(control): State<ControlHandle>, Path(name): Path<String>) -> ApiResult {
    read_one(&control, "workload", name, view::workload).await
}

async fn delete_workload(
    State(control): State<ControlHandle>,
    Path(name): Path<String>,
) -> ApiResult {
    if control.delete(name.clone()).await? {
        Ok(axum::Json(
            json!({ "deleted": { "kind": "Workload", "name": name } }),
        ))
    } else {
        Err(not_found("workload", &name))
    }
}

async fn list_pods(State(control): State<ControlHandle>) -> ApiResult {
    read(&control, |c| json!({ "items": view::pods(c) })).await
}

async fn get_pod(State(control): State<ControlHandle>, Path(name): Path<String>) -> ApiResult {
    read_one(&control, "pod", name, view::pod).await
}
