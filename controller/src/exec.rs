//! `POST /v1/pods/{name}/exec`: a command run in a container on its node,
//! non-interactively (no input, no terminal). The request is signed with
//! the controller's key, bound to the node, a moment and a random nonce, so
//! that the agent runs only what this controller asked, once; it waits for
//! the answer as long as the command may run plus the link's way back. Each
//! exec is logged at info with the API token's name, pod, container and
//! command name (an audit trail), never the output.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_proto::{ExecEnd, ExecRequest, ExecResult, RpcCall, RpcResult};
use serde_json::{Value, json};

use crate::api::{LogTarget, log_target};
use crate::auth::Caller;
use crate::control::ControlHandle;
use crate::fleet::Readiness;
use crate::mqtt::MqttHandle;

/// The command's timeout when the body names none.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// How long past the command's timeout the answer may take to come back
/// (the agent kills the command at its timeout, then sends what it wrote
/// over what may be a slow link).
pub const ANSWER_MARGIN: Duration = Duration::from_secs(15);

/// An answer: a status and a JSON body.
struct Answer(StatusCode, Value);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Answer {
    Answer(status, json!({ "error": message.into() }))
}

/// What the body asks, checked.
struct Asked {
    container: Option<String>,
    argv: Vec<String>,
    timeout_secs: u64,
}

/// Reads `{"container": C, "command": [..], "timeoutSeconds": N}`.
fn parse(body: &str) -> Result<Asked, Answer> {
    let bad = |m: String| refuse(StatusCode::BAD_REQUEST, format!("exec: {m}"));
    let body: Value =
        serde_json::from_str(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let map = body
        .as_object()
        .ok_or_else(|| bad("expected an object".into()))?;
    for key in map.keys() {
        if !matches!(key.as_str(), "container" | "command" | "timeoutSeconds") {
            return Err(bad(format!(
                "unknown field {key:?} (expected container, command, timeoutSeconds)"
            )));
        }
    }
    let container = match map.get("container") {
        None | Some(Value::Null) => None,
        Some(c) => Some(
            c.as_str()
                .ok_or_else(|| bad("container: expected a string".into()))?
                .to_owned(),
        ),
    };
    let argv = map
        .get("command")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("command: expected a list of strings".into()))?
        .iter()
        .map(|a| a.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("command: expected a list of strings".into()))?;
    if let Some(problem) = ExecRequest::argv_problem(&argv) {
        return Err(bad(format!("command: {problem}")));
    }
    let max = u64::from(ExecRequest::MAX_TIMEOUT_MS / 1000);
    let timeout_secs = match map.get("timeoutSeconds") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_SECS,
        Some(t) => t
            .as_u64()
            .filter(|t| (1..=max).contains(t))
            .ok_or_else(|| bad(format!("timeoutSeconds: expected 1 to {max}")))?,
    };
    Ok(Asked {
        container,
        argv,
        timeout_secs,
    })
}

/// The container `asked` names in the pod `target`: the only one when it
/// names none.
fn choose_container(name: &str, target: &LogTarget, asked: Option<&str>) -> Result<String, Answer> {
    match (asked, target.containers.as_slice()) {
        (Some(c), names) if names.iter().any(|n| n == c) => Ok(c.to_owned()),
        (Some(c), names) => Err(refuse(
            StatusCode::NOT_FOUND,
            format!(
                "container {c:?} not found in pod {name} (its containers: {})",
                names.join(", ")
            ),
        )),
        (None, [only]) => Ok(only.clone()),
        (None, names) => Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "pod {name} has {} containers ({}): choose one with -c",
                names.len(),
                names.join(", ")
            ),
        )),
    }
}

/// The handler of `POST /v1/pods/{name}/exec`.
pub async fn exec(
    State(control): State<ControlHandle>,
    State(mqtt): State<MqttHandle>,
    Path(name): Path<String>,
    caller: Option<Extension<Caller>>,
    body: String,
) -> Response {
    match run(&control, &mqtt, &name, caller.map(|Extension(c)| c), &body).await {
        Ok(answer) | Err(answer) => answer.into_response(),
    }
}

async fn run(
    control: &ControlHandle,
    mqtt: &MqttHandle,
    name: &str,
    caller: Option<Caller>,
    body: &str,
) -> Result<Answer, Answer> {
    let asked = parse(body)?;
    let key = name.to_owned();
    let target = control
        .read(move |c| log_target(c, &key))
        .await
        .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .ok_or_else(|| refuse(StatusCode::NOT_FOUND, format!("pod \"{name}\" not found")))?;
    let container = choose_container(name, &target, asked.container.as_deref())?;
    if target.readiness == Readiness::NotReady {
        let seen = match target.last_seen_ms {
            0 => "never seen".to_owned(),
            ms => format!("last seen {} ago", crate::output::age(ms)),
        };
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("node {} is offline ({seen})", target.node),
        ));
    }
    tracing::info!(
        token = %caller.as_ref().map_or("-", |c| c.name.as_str()),
        pod = %name,
        container = %container,
        command = %asked.argv.first().map_or("", String::as_str),
        "exec"
    );
    let timeout = Duration::from_secs(asked.timeout_secs);
    let request = ExecRequest {
        node: target.node.clone(),
        pod: target.pod.clone(),
        container: container.clone(),
        argv: asked.argv,
        timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(ExecRequest::MAX_TIMEOUT_MS),
        issued_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        nonce: rand::random(),
    };
    let signed = mqtt
        .signer()
        .sign_exec(&request)
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let result = mqtt
        .request(&target.node, RpcCall::Exec(signed), timeout + ANSWER_MARGIN)
        .await
        .map_err(|e| refuse(crate::api::rpc_status(&e), e.to_string()))?;
    match result {
        RpcResult::Exec(result) => Ok(Answer(
            StatusCode::OK,
            view(name, &target.node, &container, asked.timeout_secs, &result),
        )),
        RpcResult::Error { message } => Err(refuse(
            StatusCode::BAD_GATEWAY,
            format!("node {}: {message}", target.node),
        )),
        RpcResult::Logs { .. } => Err(refuse(
            StatusCode::BAD_GATEWAY,
            format!(
                "node {} answered an exec request with log data",
                target.node
            ),
        )),
    }
}

/// The API's JSON for an exec's result. Output is shown as UTF-8 (invalid
/// bytes replaced).
fn view(pod: &str, node: &str, container: &str, timeout_secs: u64, r: &ExecResult) -> Value {
    let (exit_code, signal) = match r.end {
        ExecEnd::Exited(code) => (Some(code), None),
        ExecEnd::Signaled(signal) => (None, Some(signal)),
        ExecEnd::TimedOut => (None, None),
    };
    json!({
        "pod": pod,
        "node": node,
        "container": container,
        "exitCode": exit_code,
        "signal": signal,
        "timedOut": r.end == ExecEnd::TimedOut,
        "timeoutSeconds": timeout_secs,
        "stdout": String::from_utf8_lossy(&r.stdout),
        "stderr": String::from_utf8_lossy(&r.stderr),
        "stdoutCut": r.stdout_cut,
        "stderrCut": r.stderr_cut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(body: &str) -> String {
        match parse(body) {
            Ok(_) => String::new(),
            Err(Answer(status, v)) => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                v["error"].as_str().unwrap().to_owned()
            }
        }
    }

    #[test]
    fn bodies_are_checked() {
        let a = parse(r#"{"command": ["ls", "-l"]}"#).ok().unwrap();
        assert_eq!(a.argv, ["ls", "-l"]);
        assert_eq!(a.container, None);
        assert_eq!(a.timeout_secs, DEFAULT_TIMEOUT_SECS);
        let a = parse(r#"{"container": "b", "command": ["true"], "timeoutSeconds": 300}"#)
            .ok()
            .unwrap();
        assert_eq!((a.container.as_deref(), a.timeout_secs), (Some("b"), 300));
        assert_eq!(
            problem(r#"{"command": []}"#),
            "exec: command: empty command"
        );
        assert_eq!(
            problem(r#"{"command": "ls"}"#),
            "exec: command: expected a list of strings"
        );
        assert_eq!(
            problem(r#"{"command": ["ls", 1]}"#),
            "exec: command: expected a list of strings"
        );
        assert_eq!(
            problem(r#"{"command": ["ls"], "timeoutSeconds": 301}"#),
            "exec: timeoutSeconds: expected 1 to 300"
        );
        assert_eq!(
            problem(r#"{"command": ["ls"], "timeoutSeconds": 0}"#),
            "exec: timeoutSeconds: expected 1 to 300"
        );
        assert_eq!(
            problem(r#"{"command": ["ls"], "tty": true}"#),
            "exec: unknown field \"tty\" (expected container, command, timeoutSeconds)"
        );
        let many = format!(r#"{{"command": [{}]}}"#, vec![r#""a""#; 65].join(","));
        assert_eq!(problem(&many), "exec: command: more than 64 arguments");
    }

    /// What the agent checks: the controller's key over the exec context
    /// and the request's frame, nothing else.
    #[test]
    fn requests_are_signed_over_the_exec_context() {
        use ring::signature::{ED25519, UnparsedPublicKey};
        let key = crate::identity::SigningKey::ephemeral().unwrap();
        let request = ExecRequest {
            node: "n".into(),
            pod: "w".into(),
            container: "main".into(),
            argv: vec!["true".into()],
            timeout_ms: 1000,
            issued_at_ms: 1,
            nonce: [1; 16],
        };
        let signed = key.sign_exec(&request).unwrap();
        assert_eq!(
            flotilla_proto::decode::<ExecRequest>(&signed.payload).unwrap(),
            request
        );
        let public = UnparsedPublicKey::new(&ED25519, key.public());
        let message = flotilla_proto::SignedExec::signed_bytes(&signed.payload);
        assert!(public.verify(&message, &signed.signature.0).is_ok());
        assert!(public.verify(&signed.payload, &signed.signature.0).is_err());
        let desired = flotilla_proto::SignedDesired::signed_bytes(&signed.payload);
        assert!(public.verify(&desired, &signed.signature.0).is_err());
    }

    #[test]
    fn results_show_how_the_command_ended() {
        let mut r = ExecResult {
            end: ExecEnd::Exited(3),
            stdout: b"out\n".to_vec(),
            stderr: vec![b'e', 0xff],
            stdout_cut: 0,
            stderr_cut: 7,
        };
        let v = view("w@n", "n", "main", 30, &r);
        assert_eq!(v["exitCode"], 3);
        assert_eq!(v["signal"], Value::Null);
        assert_eq!(v["timedOut"], false);
        assert_eq!(v["stdout"], "out\n");
        assert_eq!(v["stderr"], "e\u{fffd}");
        assert_eq!(v["stderrCut"], 7);
        r.end = ExecEnd::Signaled(9);
        let v = view("w@n", "n", "main", 30, &r);
        assert_eq!(
            (v["exitCode"].clone(), v["signal"].clone()),
            (Value::Null, json!(9))
        );
        r.end = ExecEnd::TimedOut;
        assert_eq!(view("w@n", "n", "main", 30, &r)["timedOut"], true);
    }
}
