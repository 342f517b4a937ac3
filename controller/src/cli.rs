//! The kubectl-shaped CLI: a thin client of the HTTP API. Every command is
//! one request (`logs` one per piece); what it prints is computed from the
//! JSON the API returns.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

pub use crate::client::{Client, ClientOptions};
use crate::output::{self, Format};

/// Kinds of object the CLI knows, with kubectl-style aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Nodes.
    Node,
    /// Workloads.
    Workload,
    /// Pods.
    Pod,
    /// Secrets (names, keys and sizes only).
    Secret,
    /// Namespaces (what their workloads may ask for).
    Namespace,
}

impl Kind {
    /// Parses `node`, `nodes`, `no`, `workload`, `workloads`, `wl`, `pod`, `pods`, `po`.
    pub fn parse(s: &str) -> anyhow::Result<Kind> {
        Ok(match s {
            "node" | "nodes" | "no" => Kind::Node,
            "workload" | "workloads" | "wl" => Kind::Workload,
            "pod" | "pods" | "po" => Kind::Pod,
            "secret" | "secrets" => Kind::Secret,
            "namespace" | "namespaces" | "ns" => Kind::Namespace,
            other => bail!(
                "unknown resource type {other:?} (expected nodes, workloads, pods, secrets or namespaces)"
            ),
        })
    }

    fn path(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Workload => "workloads",
            Kind::Pod => "pods",
            Kind::Secret => "secrets",
            Kind::Namespace => "namespaces",
        }
    }

    fn singular(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Workload => "workload",
            Kind::Pod => "pod",
            Kind::Secret => "secret",
            Kind::Namespace => "namespace",
        }
    }
}

/// `flotilla apply -f FILE…` (`-` reads standard input).
pub fn apply(client: &Client, files: &[String]) -> anyhow::Result<()> {
    for file in files {
        let text = if file == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading standard input")?;
            s
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
        };
        let answer = client
            .call("POST", "/v1/apply", Some(text))
            .with_context(|| file.clone())?;
        for item in answer["applied"].as_array().into_iter().flatten() {
            println!(
                "{}/{} {}",
                item["kind"].as_str().unwrap_or("").to_lowercase(),
                item["name"].as_str().unwrap_or(""),
                item["result"].as_str().unwrap_or("")
            );
        }
        for warning in answer["warnings"].as_array().into_iter().flatten() {
            eprintln!("warning: {}", warning.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// `flotilla get KIND [NAME] [-l k=v[,k2=v2]] [-o FORMAT]`; the label
/// selector applies to nodes only.
pub fn get(
    client: &Client,
    kind: Kind,
    name: Option<&str>,
    selector: Option<&str>,
    format: Format,
) -> anyhow::Result<()> {
    if selector.is_some() && (kind != Kind::Node || name.is_some()) {
        bail!("-l selects among nodes: use it with `get nodes` and no name");
    }
    let value = match (name, selector) {
        (Some(name), _) => client.call("GET", &format!("/v1/{}/{name}", kind.path()), None)?,
        (None, Some(sel)) => client.call(
            "GET",
            &format!("/v1/{}?labelSelector={}", kind.path(), escape(sel)),
            None,
        )?,
        (None, None) => client.call("GET", &format!("/v1/{}", kind.path()), None)?,
    };
    let items: Vec<Value> = match name {
        Some(_) => vec![value.clone()],
        None => value["items"].as_array().cloned().unwrap_or_default(),
    };
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Format::Yaml => print!("{}", serde_norway::to_string(&value)?),
        Format::Table | Format::Wide => {
            if items.is_empty() {
                eprintln!("No {} found.", kind.path());
                return Ok(());
            }
            let wide = format == Format::Wide;
            let table = match kind {
                Kind::Node => output::nodes_table(&items, wide),
                Kind::Workload => output::workloads_table(&items, wide),
                Kind::Pod => output::pods_table(&items, wide),
                Kind::Secret => output::secrets_table(&items),
                Kind::Namespace => output::namespaces_table(&items),
            };
            print!("{table}");
        }
    }
    Ok(())
}

/// `flotilla describe KIND NAME`.
pub fn describe(client: &Client, kind: Kind, name: &str) -> anyhow::Result<()> {
    let value = client.call("GET", &format!("/v1/{}/{name}", kind.path()), None)?;
    let text = match kind {
        Kind::Node => output::describe_node(&value),
        Kind::Workload => output::describe_workload(&value)?,
        Kind::Pod => output::describe_pod(&value),
        Kind::Secret => output::secrets_table(std::slice::from_ref(&value)),
        Kind::Namespace => output::describe_namespace(&value),
    };
    print!("{text}");
    Ok(())
}

/// `flotilla delete KIND NAME`.
pub fn delete(client: &Client, kind: Kind, name: &str) -> anyhow::Result<()> {
    if !matches!(kind, Kind::Workload | Kind::Secret | Kind::Namespace) {
        bail!(
            "only workloads, secrets and namespaces can be deleted (nodes and pods follow from them)"
        );
    }
    client.call("DELETE", &format!("/v1/{}/{name}", kind.path()), None)?;
    println!("{}/{name} deleted", kind.singular());
    Ok(())
}

/// `flotilla label node NAME k=v… k-…`: sets (`k=v`) and removes (`k-`)
/// labels kept at the controller, over the agent's own.
pub fn label(client: &Client, kind: Kind, name: &str, changes: &[String]) -> anyhow::Result<()> {
    if kind != Kind::Node {
        bail!("only nodes can be labelled");
    }
    let mut set = serde_json::Map::new();
    let mut remove = Vec::new();
    for change in changes {
        match (change.split_once('='), change.strip_suffix('-')) {
            (Some((k, v)), _) => {
                set.insert(k.to_owned(), Value::String(v.to_owned()));
            }
            (None, Some(k)) => remove.push(Value::String(k.to_owned())),
            (None, None) => bail!("{change:?}: expected key=value to set or key- to remove"),
        }
    }
    let body = serde_json::json!({"set": set, "remove": remove}).to_string();
    let path = format!("/v1/nodes/{}/labels", escape(name));
    let answer = client.call("POST", &path, Some(body))?;
    println!(
        "node/{name} labelled ({})",
        output::labels(&answer["controllerLabels"])
    );
    Ok(())
}

/// `flotilla rollout history WORKLOAD`.
pub fn rollout_history(client: &Client, workload: &str) -> anyhow::Result<()> {
    let path = format!("/v1/workloads/{}/revisions", escape(workload));
    let answer = client.call("GET", &path, None)?;
    let items = answer["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        eprintln!("No revisions of workload {workload}.");
        return Ok(());
    }
    print!("{}", output::revisions_table(&items));
    Ok(())
}

/// `flotilla rollout undo WORKLOAD [--to-revision N]`.
pub fn rollout_undo(client: &Client, workload: &str, to: Option<u64>) -> anyhow::Result<()> {
    let body = match to {
        Some(n) => serde_json::json!({ "toRevision": n }),
        None => serde_json::json!({}),
    };
    let path = format!("/v1/workloads/{}/undo", escape(workload));
    let answer = client.call("POST", &path, Some(body.to_string()))?;
    match answer["result"].as_str() {
        Some("unchanged") => println!(
            "workload/{workload} unchanged (revision {} already runs those pods)",
            answer["revision"]
        ),
        _ => println!(
            "workload/{workload} rolled back (now revision {})",
            answer["revision"]
        ),
    }
    Ok(())
}

/// `flotilla rollout pause|resume WORKLOAD`.
pub fn rollout_hold(client: &Client, workload: &str, pause: bool) -> anyhow::Result<()> {
    let verb = if pause { "pause" } else { "resume" };
    let path = format!("/v1/workloads/{}/rollout/{verb}", escape(workload));
    let answer = client.call("POST", &path, Some(String::new()))?;
    let result = answer["result"].as_str().unwrap_or_default();
    println!("workload/{workload} rollout {result}");
    Ok(())
}

/// `flotilla rollout status WORKLOAD [--watch] [-o json|yaml]`: a progress bar; `--watch`
/// prints a new one on every change until the rollout ends, and fails when
/// it was rolled back.
pub fn rollout_status(
    client: &Client,
    workload: &str,
    watch: bool,
    format: Format,
) -> anyhow::Result<()> {
    let path = format!("/v1/workloads/{}/rollout", escape(workload));
    let mut last = String::new();
    loop {
        let answer = client.call("GET", &path, None)?;
        let text = match format {
            Format::Json => format!("{}\n", serde_json::to_string_pretty(&answer)?),
            Format::Yaml => serde_norway::to_string(&answer)?,
            Format::Table | Format::Wide => output::rollout_status(&answer),
        };
        if text != last {
            print!("{text}");
            std::io::stdout()
                .flush()
                .context("writing to standard output")?;
            last = text;
        }
        let phase = answer["phase"].as_str().unwrap_or_default();
        if !watch || !matches!(phase, "Progressing" | "Paused") {
            if watch && phase == "RolledBack" {
                bail!("rollout of {workload} was rolled back");
            }
            return Ok(());
        }
        std::thread::sleep(FOLLOW_EVERY);
    }
}

/// How often `logs -f` asks for new output.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// What `flotilla logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct LogsOptions {
    /// The container (default: the pod's only one).
    pub container: Option<String>,
    /// Start this many lines before the end (default: the whole log kept).
    pub tail: Option<u32>,
    /// Keep printing new output.
    pub follow: bool,
}

/// `flotilla logs POD [-c CONTAINER] [--tail N] [-f]`: fetches the log in
/// pieces, each continuing at the cursor of the one before; `-f` then asks
/// again every second.
pub fn logs(client: &Client, pod: &str, options: &LogsOptions) -> anyhow::Result<()> {
    let mut cursor: Option<String> = None;
    let stdout = std::io::stdout();
    loop {
        let mut query = Vec::new();
        if let Some(c) = &options.container {
            query.push(format!("container={}", escape(c)));
        }
        match &cursor {
            Some(c) => query.push(format!("cursor={}", escape(c))),
            None => {
                if let Some(n) = options.tail {
                    query.push(format!("tail={n}"));
                }
            }
        }
        let mut path = format!("/v1/pods/{}/logs", escape(pod));
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        let answer = client.call("GET", &path, None)?;
        let data = answer["data"].as_str().unwrap_or_default();
        {
            let mut out = stdout.lock();
            out.write_all(data.as_bytes())
                .and_then(|()| out.flush())
                .context("writing to standard output")?;
        }
        let next = answer["cursor"]
            .as_str()
            .context("the server's answer has no cursor")?;
        cursor = Some(next.to_owned());
        if answer["more"] == true {
            continue;
        }
        if !options.follow {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_EVERY);
    }
}

/// What `flotilla exec` asks besides the pod.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The container (default: the pod's only one).
    pub container: Option<String>,
    /// The command is killed after this long.
    pub timeout: Duration,
    /// The command and its arguments.
    pub command: Vec<String>,
}

/// How `flotilla exec` ends when it is not with success: the command's own
/// exit code (128 + N for signal N, 124 for a timeout), and what to say
/// first, if anything. `main` exits with it.
#[derive(Debug)]
pub struct CommandExit {
    /// The exit code.
    pub code: u8,
    /// Printed as an error before exiting.
    pub message: Option<String>,
}

impl std::fmt::Display for CommandExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.message {
            Some(m) => f.write_str(m),
            None => write!(f, "the command exited with code {}", self.code),
        }
    }
}

impl std::error::Error for CommandExit {}

/// Extra time the CLI waits past the command's timeout: the controller's
/// own margin for the answer's way back, and some.
const EXEC_MARGIN: Duration = Duration::from_secs(30);

/// `flotilla exec POD [-c CONTAINER] [--timeout D] -- CMD [ARGS...]`: runs
/// the command in the container, prints its stdout and stderr to ours, and
/// ends with its exit code ([`CommandExit`]).
pub fn exec(client: &Client, pod: &str, options: &ExecOptions) -> anyhow::Result<()> {
    let secs = options.timeout.as_secs();
    let mut body = serde_json::json!({ "command": options.command, "timeoutSeconds": secs });
    if let Some(c) = &options.container {
        body["container"] = Value::from(c.as_str());
    }
    let path = format!("/v1/pods/{}/exec", escape(pod));
    let answer = client.post_json_within(&path, &body, options.timeout + EXEC_MARGIN)?;
    let text = |key: &str| answer[key].as_str().unwrap_or_default().to_owned();
    std::io::stdout()
        .write_all(text("stdout").as_bytes())
        .and_then(|()| std::io::stdout().flush())
        .context("writing to standard output")?;
    let mut err = std::io::stderr();
    let _ = err.write_all(text("stderr").as_bytes());
    for stream in ["stdout", "stderr"] {
        let cut = answer[format!("{stream}Cut")].as_u64().unwrap_or(0);
        if cut > 0 {
            let _ = writeln!(
                err,
                "flotilla exec: {stream} truncated: {cut} more bytes were cut (at most {} KiB are kept)",
                flotilla_proto::ExecRequest::MAX_OUTPUT / 1024
            );
        }
    }
    if answer["timedOut"] == true {
        return Err(CommandExit {
            code: 124,
            message: Some(format!(
                "the command did not finish within {secs}s and was killed"
            )),
        }
        .into());
    }
    if let Some(signal) = answer["signal"].as_u64() {
        return Err(CommandExit {
            code: u8::try_from(128 + signal.min(127)).unwrap_or(255),
            message: Some(format!("the command was killed by signal {signal}")),
        }
        .into());
    }
    let code = answer["exitCode"]
        .as_i64()
        .context("the server's answer has no exit code")?;
    match code {
        0 => Ok(()),
        // As a shell shows it: the low byte.
        code => Err(CommandExit {
            code: (code & 0xff) as u8,
            message: None,
        }
        .into()),
    }
}

/// Percent-encodes all but unreserved characters (and `@`, which pod names
/// hold), so a name cannot change the path or the query.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_change_the_url() {
        assert_eq!(escape("web@pi-1"), "web@pi-1");
        assert_eq!(escape("a/b?c=d&e f"), "a%2Fb%3Fc%3Dd%26e%20f");
        assert_eq!(escape("é"), "%C3%A9");
    }
}
