//! The HTTP API (JSON over HTTP/1.1) that the CLI and anything else use.
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/apply` | body: manifests (YAML or JSON, several documents); all or none |
//! | `GET /v1/nodes[/{name}][?labelSelector=k=v,k2=v2]` | nodes (all labels given must match) |
//! | `POST /v1/nodes/{name}/labels` | body `{"set": {k: v}, "remove": [k]}`: labels set at the controller |
//! | `GET /v1/workloads[/{name}]` | workloads |
//! | `DELETE /v1/workloads/{name}` | delete a workload |
//! | `GET /v1/workloads/{name}/revisions` | its revisions, oldest first |
//! | `POST /v1/workloads/{name}/undo` | body `{"toRevision": N}` or `{}` (the one before the newest) |
//! | `GET /v1/workloads/{name}/rollout` | its rollout: waves, nodes switched, healthy, failed |
//! | `POST /v1/workloads/{name}/rollout/pause`, `…/resume` | hold or go on |
//! | `GET /v1/secrets[/{name}]` | Secrets: names, types, keys and sizes, never values |
//! | `DELETE /v1/secrets/{name}` | delete a Secret |
//! | `GET /v1/namespaces[/{name}]` | namespaces: what each allows, its workloads |
//! | `DELETE /v1/namespaces/{name}` | delete a namespace (refused while workloads are in it) |
//! | `GET /v1/pods[/{name}]` | pods (`{workload}@{node}`) |
//! | `GET /v1/pods/{name}/logs?container=&tail=&cursor=` | a piece of a container's log, fetched from its node |
//! | `POST /v1/pods/{name}/exec` | body `{"container": C, "command": [..], "timeoutSeconds": N}`: a command run in the container ([`crate::exec`]) |
//! | `GET /healthz` | liveness |
//!
//! Errors are `{"error": "…"}` with a 4xx/5xx status; a refused manifest also
//! lists every problem under `errors`. A manifest holding a `Namespace` needs
//! an admin token: namespaces decide which privileges containers may have.
//!
//! Every route needs a bearer API token of a least role, set in one table,
//! `crate::auth::ROUTES`; `serve` puts the check in front of this router,
//! and a route missing from that table is refused to every token: add a new
//! route there too.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRef, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use flotilla_proto::{
    LogCursor, LogsRequest, RpcCall, RpcResult, check_label_key, check_label_value,
};
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::control::{Cluster, ControlError, ControlHandle, NamespaceError};
use crate::fleet::Readiness;
use crate::identity::api_tokens::Role;
use crate::manifest;
use crate::manifest::namespace::Violation;
use crate::mqtt::MqttHandle;
use crate::rollout::RolloutError;
use crate::rpc::RpcError;
use crate::view;

/// Largest request body accepted (a manifest file).
const MAX_BODY: usize = 1024 * 1024;
/// How long an agent gets to answer a logs request.
const LOGS_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes asked of the agent per logs request (it sends at most 192 KiB).
pub const LOG_CHUNK: u32 = 128 * 1024;

/// What the handlers share.
#[derive(Clone)]
struct ApiState {
    control: ControlHandle,
    mqtt: MqttHandle,
}

impl FromRef<ApiState> for ControlHandle {
    fn from_ref(state: &ApiState) -> Self {
        state.control.clone()
    }
}

impl FromRef<ApiState> for MqttHandle {
    fn from_ref(state: &ApiState) -> Self {
        state.mqtt.clone()
    }
}

/// The router over a control loop handle and the MQTT session (for
/// requests to agents).
pub fn router(control: ControlHandle, mqtt: MqttHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/apply", post(apply))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(get_node))
        .route("/v1/nodes/{name}/labels", post(label_node))
        .route("/v1/workloads", get(list_workloads))
        .route(
            "/v1/workloads/{name}",
            get(get_workload).delete(delete_workload),
        )
        .route("/v1/workloads/{name}/revisions", get(revisions))
        .route("/v1/workloads/{name}/undo", post(undo))
        .route("/v1/workloads/{name}/rollout", get(rollout_status))
        .route("/v1/workloads/{name}/rollout/pause", post(rollout_pause))
        .route("/v1/workloads/{name}/rollout/resume", post(rollout_resume))
        .route("/v1/secrets", get(list_secrets))
        .route("/v1/secrets/{name}", get(get_secret).delete(delete_secret))
        .route("/v1/namespaces", get(list_namespaces))
        .route(
            "/v1/namespaces/{name}",
            get(get_namespace).delete(delete_namespace),
        )
        .route("/v1/pods", get(list_pods))
        .route("/v1/pods/{name}", get(get_pod))
        .route("/v1/pods/{name}/logs", get(pod_logs))
        .route("/v1/pods/{name}/exec", post(crate::exec::exec))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ApiState { control, mqtt })
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
            ControlError::NoSuchNode(_) => StatusCode::NOT_FOUND,
            ControlError::Rollout(RolloutError::NoWorkload(_)) => StatusCode::NOT_FOUND,
            ControlError::Rollout(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ControlError::Secret(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ControlError::Namespace(NamespaceError::Refused(v)) => {
                return refused(&v);
            }
            ControlError::Namespace(_) => StatusCode::CONFLICT,
        };
        ApiError(status, json!({ "error": e.to_string() }))
    }
}

/// The answer's status when a request to an agent failed.
pub(crate) fn rpc_status(e: &RpcError) -> StatusCode {
    match e {
        RpcError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        RpcError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        RpcError::Encode { .. } | RpcError::Send { .. } => StatusCode::BAD_GATEWAY,
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, json!({ "error": message.into() }))
}

fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        json!({ "error": format!("{kind} \"{name}\" not found") }),
    )
}

type ApiResult = Result<axum::Json<Value>, ApiError>;

/// Workloads their namespaces do not allow (in an applied manifest, or the
/// revision an undo goes back to), each named by workload and path.
fn refused(v: &[Violation]) -> ApiError {
    let list: Vec<Value> = v
        .iter()
        .map(|v| json!({ "workload": v.workload, "path": v.path, "message": v.message }))
        .collect();
    let text: Vec<String> = v.iter().map(ToString::to_string).collect();
    ApiError(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({ "error": format!("refused by namespace policy:\n{}", text.join("\n")), "errors": list }),
    )
}

async fn apply(
    State(control): State<ControlHandle>,
    caller: Option<Extension<Caller>>,
    body: String,
) -> ApiResult {
    let objects = manifest::parse_objects(&body).map_err(|errors| {
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
    if !objects.namespaces.is_empty() {
        // Whoever writes a namespace decides which privileges containers
        // get: an operator could otherwise grant itself a privileged one.
        let role = caller.as_ref().map(|Extension(c)| c.role);
        if role != Some(Role::Admin) {
            let who = caller.map_or_else(String::new, |Extension(c)| {
                format!("; api token {:?} is {}", c.name, c.role.as_str())
            });
            return Err(error(
                StatusCode::FORBIDDEN,
                format!("applying a Namespace needs the admin role{who}"),
            ));
        }
    }
    let done = control.apply_objects(objects).await?;
    let kinds = std::iter::repeat("Namespace")
        .zip(&done.namespaces)
        .chain(std::iter::repeat("Secret").zip(&done.secrets))
        .chain(std::iter::repeat("Workload").zip(&done.workloads));
    let list: Vec<Value> = kinds
        .map(|(kind, (name, a))| json!({ "kind": kind, "name": name, "result": a.as_str() }))
        .collect();
    let warnings: Vec<String> = done
        .warnings
        .iter()
        .map(|v| {
            format!("{v} (its pods keep running; its next change is refused until this is fixed)")
        })
        .collect();
    Ok(axum::Json(json!({ "applied": list, "warnings": warnings })))
}

async fn list_namespaces(State(control): State<ControlHandle>) -> ApiResult {
    read(&control, |c| json!({ "items": view::namespaces(c) })).await
}

async fn get_namespace(
    State(control): State<ControlHandle>,
    Path(name): Path<String>,
) -> ApiResult {
    read_one(&control, "namespace", name, view::namespace).await
}

async fn delete_namespace(
    State(control): State<ControlHandle>,
    Path(name): Path<String>,
) -> ApiResult {
    if control.delete_namespace(name.clone()).await? {
        Ok(axum::Json(
            json!({ "deleted": { "kind": "Namespace", "name": name } }),
        ))
    } else {
        Err(not_found("namespace", &name))
    }
}

async fn list_secrets(State(control): State<ControlHandle>) -> ApiResult {
    read(&control, |c| json!({ "items": view::secrets(c) })).await
}

async fn get_secret(State(control): State<ControlHandle>, Path(name): Path<String>) -> ApiResult {
    read_one(&control, "secret", name, view::secret).await
}

async fn delete_secret(
    State(control): State<ControlHandle>,
    Path(name): Path<String>,
) -> ApiResult {
    if control.delete_secret(name.clone()).await? {
        Ok(axum::Json(
            json!({ "deleted": { "kind": "Secret", "name": name } }),
        ))
    } else {
        Err(not_found("secret", &name))
    }
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

async fn list_nodes(
    State(control): State<ControlHandle>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let selector = match query.get("labelSelector") {
        Some(text) => parse_selector(text).map_err(|e| error(StatusCode::BAD_REQUEST, e))?,
        None => Vec::new(),
    };
    // Written out node by node (see `view::nodes_text`): a large fleet's
    // listing holds its text, not a tree of JSON values per node.
    let body = control
        .read(move |c| {
            view::nodes_text(c, |node| {
                let labels = node.labels();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
        })
        .await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// `k=v,k2=v2`: every pair must match.
fn parse_selector(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("label selector {pair:?}: expected key=value"))?;
            check_label_key(k).map_err(|e| format!("label selector key {k:?}: {e}"))?;
            check_label_value(v).map_err(|e| format!("label selector value {v:?}: {e}"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Most labels one request may set or remove.
const MAX_LABEL_CHANGES: usize = 64;

async fn label_node(
    State(control): State<ControlHandle>,
    Path(name): Path<String>,
    body: String,
) -> ApiResult {
    let bad = |m: String| error(StatusCode::UNPROCESSABLE_ENTITY, m);
    let body: Value = serde_json::from_str(&body)
        .map_err(|e| bad(format!("labels: the body is not JSON: {e}")))?;
    let mut set = std::collections::BTreeMap::new();
    let mut remove = Vec::new();
    if let Some(map) = body.get("set") {
        let map = map
            .as_object()
            .ok_or_else(|| bad("labels: set: expected an object of strings".into()))?;
        for (k, v) in map {
            let v = v
                .as_str()
                .ok_or_else(|| bad(format!("labels: set.{k}: expected a string")))?;
            check_label_key(k).map_err(|e| bad(format!("label key {k:?}: {e}")))?;
            check_label_value(v).map_err(|e| bad(format!("label value {v:?}: {e}")))?;
            set.insert(k.clone(), v.to_owned());
        }
    }
    if let Some(list) = body.get("remove") {
        let list = list
            .as_array()
            .ok_or_else(|| bad("labels: remove: expected a list of keys".into()))?;
        for k in list {
            let k = k
                .as_str()
                .ok_or_else(|| bad("labels: remove: expected a list of keys".into()))?;
            check_label_key(k).map_err(|e| bad(format!("label key {k:?}: {e}")))?;
            remove.push(k.to_owned());
        }
    }
    if set.len() + remove.len() > MAX_LABEL_CHANGES {
        return Err(bad(format!(
            "labels: at most {MAX_LABEL_CHANGES} changes in one request"
        )));
    }
    let labels = control.label(name.clone(), set, remove).await?;
    Ok(axum::Json(
        json!({ "node": name, "controllerLabels": labels }),
    ))
}

async fn revisions(State(control): State<ControlHandle>, Path(name): Path<String>) -> ApiResult {
    read_one(&control, "workload", name, view::revisions).await
}

async fn undo(
    State(control): State<ControlHandle>,
    Path(name): Path<String>,
    body: String,
) -> ApiResult {
    let bad = |m: String| error(StatusCode::UNPROCESSABLE_ENTITY, m);
    let body: Value = if body.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(&body).map_err(|e| bad(format!("undo: the body is not JSON: {e}")))?
    };
    let to = match &body["toRevision"] {
        Value::Null => None,
        v => Some(
            v.as_u64()
                .ok_or_else(|| bad("undo: toRevision: expected a positive whole number".into()))?,
        ),
    };
    let (applied, revision) = control.undo(name.clone(), to).await?;
    Ok(axum::Json(
        json!({ "workload": name, "result": applied.as_str(), "revision": revision }),
    ))
}

async fn rollout_status(
    State(control): State<ControlHandle>,
    Path(name): Path<String>,
) -> ApiResult {
    let key = name.clone();
    match control.read(move |c| view::rollout(c, &key)).await? {
        Some(v) => Ok(axum::Json(v)),
        None => Err(error(
            StatusCode::NOT_FOUND,
            format!("workload \"{name}\" has no rollout"),
        )),
    }
}

async fn rollout_pause(
    State(control): State<ControlHandle>,
    Path(name): Path<String>,
) -> ApiResult {
    control.hold(name.clone(), true).await?;
    Ok(axum::Json(json!({ "workload": name, "result": "paused" })))
}

async fn rollout_resume(
    State(control): State<ControlHandle>,
    Path(name): Path<String>,
) -> ApiResult {
    control.hold(name.clone(), false).await?;
    Ok(axum::Json(json!({ "workload": name, "result": "resumed" })))
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

/// Where a pod's logs are (and where its commands run): its node, its name
/// there, its containers.
pub(crate) struct LogTarget {
    pub(crate) node: String,
    pub(crate) pod: String,
    pub(crate) containers: Vec<String>,
    pub(crate) readiness: Readiness,
    pub(crate) last_seen_ms: u64,
}

/// The pod `{workload}@{node}`, desired there or still reported by it.
pub(crate) fn log_target(c: &Cluster, name: &str) -> Option<LogTarget> {
    let (workload, node_name) = name.rsplit_once('@')?;
    let node = c.fleet.get(node_name)?;
    let desired = c
        .desired
        .get(node_name)
        .and_then(|d| d.pods.iter().find(|p| p.workload() == workload))
        .map(|p| {
            let names = p
                .template
                .containers
                .iter()
                .map(|c| c.name.clone())
                .collect();
            (p.name.clone(), names)
        });
    let reported = || {
        node.status()?
            .pods
            .iter()
            .find(|p| p.workload == workload)
            .map(|p| {
                let names = p.containers.iter().map(|c| c.name.clone()).collect();
                (p.name.clone(), names)
            })
    };
    let (pod, containers) = desired.or_else(reported)?;
    Some(LogTarget {
        node: node_name.to_owned(),
        pod,
        containers,
        readiness: node.readiness,
        last_seen_ms: node.last_seen_ms,
    })
}

/// `{file_id}-{offset}`, as the API shows a cursor.
fn cursor_text(c: LogCursor) -> String {
    format!("{}-{}", c.file_id, c.offset)
}

fn parse_cursor(text: &str) -> Option<LogCursor> {
    let (file_id, offset) = text.split_once('-')?;
    Some(LogCursor {
        file_id: file_id.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

/// How many bytes at the end of `data` are the start of a character whose
/// other bytes are in the next piece (at most 3).
fn incomplete_tail(data: &[u8]) -> usize {
    match std::str::from_utf8(data) {
        Err(e) if e.error_len().is_none() => data.len() - e.valid_up_to(),
        _ => 0,
    }
}

async fn pod_logs(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    for key in query.keys() {
        if !matches!(key.as_str(), "container" | "tail" | "cursor") {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("unknown query parameter {key:?} (expected container, tail or cursor)"),
            ));
        }
    }
    let tail_lines = match query.get("tail") {
        None => None,
        Some(t) => Some(t.parse::<u32>().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("tail {t:?}: expected a number of lines"),
            )
        })?),
    };
    let from = match query.get("cursor") {
        None => None,
        Some(c) => Some(parse_cursor(c).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                format!("cursor {c:?}: expected the cursor of an earlier answer"),
            )
        })?),
    };
    let key = name.clone();
    let target = state
        .control
        .read(move |c| log_target(c, &key))
        .await?
        .ok_or_else(|| not_found("pod", &name))?;
    let container = match (query.get("container"), target.containers.as_slice()) {
        (Some(c), names) if names.contains(c) => c.clone(),
        (Some(c), names) => {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!(
                    "container {c:?} not found in pod {name} (its containers: {})",
                    names.join(", ")
                ),
            ));
        }
        (None, [only]) => only.clone(),
        (None, names) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "pod {name} has {} containers ({}): choose one with -c",
                    names.len(),
                    names.join(", ")
                ),
            ));
        }
    };
    if target.readiness == Readiness::NotReady {
        let seen = match target.last_seen_ms {
            0 => "never seen".to_owned(),
            ms => format!("last seen {} ago", crate::output::age(ms)),
        };
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("node {} is offline ({seen})", target.node),
        ));
    }
    let call = RpcCall::Logs(LogsRequest {
        pod: target.pod.clone(),
        container: container.clone(),
        tail_lines,
        from,
        max_bytes: LOG_CHUNK,
    });
    let result = state
        .mqtt
        .request(&target.node, call, LOGS_TIMEOUT)
        .await
        .map_err(|e| error(rpc_status(&e), e.to_string()))?;
    let (mut data, mut next) = match result {
        RpcResult::Logs { data, next } => (data, next),
        RpcResult::Error { message } => {
            return Err(error(
                StatusCode::BAD_GATEWAY,
                format!("node {}: {message}", target.node),
            ));
        }
        RpcResult::Exec(_) => {
            return Err(error(
                StatusCode::BAD_GATEWAY,
                format!(
                    "node {} answered a logs request with an exec result",
                    target.node
                ),
            ));
        }
    };
    let more = data.len() >= LOG_CHUNK as usize;
    // A character cut by the chunk's end is sent whole with the next piece.
    let cut = incomplete_tail(&data);
    if cut > 0 && cut < data.len() && next.offset >= cut as u64 {
        data.truncate(data.len() - cut);
        next.offset -= cut as u64;
    }
    Ok(axum::Json(json!({
        "pod": name,
        "node": target.node,
        "container": container,
        "data": String::from_utf8_lossy(&data),
        "cursor": cursor_text(next),
        "more": more,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answer for an apply and an undo: neither word in it.
    #[test]
    fn namespace_refusals_name_the_policy_and_each_workload() {
        let v = Violation {
            workload: "router".into(),
            path: "spec.containers[0].securityContext.privileged".into(),
            message: "namespace \"shop\" does not allow privileged containers".into(),
        };
        let ApiError(status, body) =
            ControlError::Namespace(NamespaceError::Refused(vec![v])).into();
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            body["error"],
            "refused by namespace policy:\nworkload \"router\": \
             spec.containers[0].securityContext.privileged: \
             namespace \"shop\" does not allow privileged containers"
        );
        assert_eq!(body["errors"][0]["workload"], "router");
    }

    #[test]
    fn cursors_and_characters_cut_in_two() {
        let c = LogCursor {
            file_id: 7 << 32 | 2,
            offset: 99,
        };
        assert_eq!(parse_cursor(&cursor_text(c)), Some(c));
        assert_eq!(parse_cursor("1"), None);
        assert_eq!(parse_cursor("a-1"), None);
        assert_eq!(parse_cursor("1--1"), None);
        let e = "é".as_bytes();
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail(&[b'a', e[0]]), 1);
        assert_eq!(incomplete_tail(&[b'a', 0xe2, 0x82]), 2);
        assert_eq!(incomplete_tail(&[b'a', 0xff]), 0, "invalid, not cut");
    }
}
