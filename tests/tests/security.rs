#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Container privileges end to end: a workload gets a capability only
//! through a namespace that allows it. Against a real `flotilla serve`:
//! refused applies store nothing (not even the namespace of the same
//! file), only an admin writes namespaces, tightening one keeps the
//! workload but marks it, deletion is refused while workloads are in it,
//! and all of it survives a restart. With a real agent and containers:
//! NET_ADMIN shows in the container's `CapEff`, the default set does not
//! have it, and both run under the seccomp filter (`Seccomp: 2`).

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(90);

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

fn refused(out: Output) -> String {
    assert!(!out.status.success(), "accepted: {}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn namespace(name: &str, caps: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Namespace\nmetadata: {{name: {name}}}\n\
         spec: {{allowedCapabilities: [{caps}]}}\n---\n"
    )
}

/// A workload with one container; `meta` goes into its metadata, `fields`
/// into the container (YAML flow fields, e.g. `securityContext: {…}`).
fn workload(name: &str, meta: &str, image: &str, node: &str, script: &str, fields: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}{meta}}}\n\
         spec:\n  nodeSelector: {{node: {node}}}\n  terminationGracePeriodSeconds: 1\n  \
         containers:\n  - {{name: main, image: '{image}', command: [sh, -c, '{script}']{fields}}}\n---\n"
    )
}

const NET_ADMIN: &str = ", securityContext: {capabilities: {add: [CAP_NET_ADMIN]}}";

fn names(v: &serde_json::Value) -> Vec<String> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn namespace_policy_is_checked_at_apply_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let api_port = free_port();
    let broker = free_port();
    let mut c = Controller::start_on(dir.path(), Broker::Embedded(broker), api_port);
    let d = dir.path();
    let net = |caps: &str| namespace("net", caps);
    let router = workload(
        "router",
        ", namespace: net",
        "busybox",
        "x",
        "true",
        NET_ADMIN,
    );

    // Privileges in `default`: refused with the path, nothing stored.
    let priv_default = workload(
        "root",
        "",
        "busybox",
        "x",
        "true",
        ", securityContext: {privileged: true}",
    );
    let err = refused(c.apply(d, &priv_default));
    assert!(
        err.contains(
            "workload \"root\": spec.containers[0].securityContext.privileged: \
             namespace \"default\" does not allow privileged containers"
        ),
        "{err}"
    );
    // A namespace that does not grant enough, in the same file: the whole
    // file is refused, the namespace too.
    let err = refused(c.apply(d, &format!("{}{router}", net("NET_RAW"))));
    assert!(
        err.contains(
            "spec.containers[0].securityContext.capabilities.add[0]: \
             namespace \"net\" does not allow adding capability NET_ADMIN"
        ),
        "{err}"
    );
    // …and one that does not exist.
    let err = refused(c.apply(d, &router));
    assert!(
        err.contains("metadata.namespace: namespace \"net\" not found"),
        "{err}"
    );
    assert!(names(&c.json(&["get", "workloads", "-o", "json"])).is_empty());
    assert_eq!(names(&c.json(&["get", "ns", "-o", "json"])), ["default"]);

    // Only an admin writes a namespace: it decides who gets privileges.
    let out = c.cli(&["api-token", "create", "--role", "operator", "--name", "ops"]);
    ok(out.clone());
    let token = String::from_utf8(out.stdout).unwrap();
    let file = d.join("net.yaml");
    std::fs::write(&file, net("NET_ADMIN")).unwrap();
    let out = c
        .cli_command()
        .env("FLOTILLA_TOKEN", token.trim())
        .args(["apply", "-f", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = refused(out);
    assert!(
        err.contains("applying a Namespace needs the admin role; api token \"ops\" is operator"),
        "{err}"
    );

    // Granted: the workload first in the file, its namespace applied with it.
    let out = ok(c.apply(d, &format!("{router}{}", net("NET_ADMIN, SYS_TIME"))));
    assert!(
        out.contains("namespace/net created\nworkload/router created"),
        "{out}"
    );
    let table = ok(c.cli(&["get", "namespaces"]));
    let rows: Vec<String> = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        rows,
        [
            "NAME WORKLOADS ALLOWS",
            "default 0 nothing",
            "net 1 capabilities NET_ADMIN,SYS_TIME"
        ],
        "{table}"
    );
    let described = ok(c.cli(&["describe", "namespace", "net"]));
    assert!(described.contains("Workloads:  router"), "{described}");
    let yaml = ok(c.cli(&["get", "namespace", "net", "-o", "yaml"]));
    assert!(yaml.contains("- NET_ADMIN\n"), "{yaml}");
    let w = c.json(&["get", "workload", "router", "-o", "json"]);
    assert_eq!(w["namespace"], "net");
    assert_eq!(
        w["manifest"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN"])
    );

    // Tightening keeps the workload, says so, and marks it.
    let out = ok(c.apply(d, &net("SYS_TIME")));
    assert!(
        out.contains(
            "warning: workload \"router\": spec.containers[0].securityContext.capabilities.add[0]: \
             namespace \"net\" does not allow adding capability NET_ADMIN"
        ),
        "{out}"
    );
    let described = ok(c.cli(&["describe", "workload", "router"]));
    assert!(described.contains("Namespace: net"), "{described}");
    assert!(
        described.contains("not allowed by its namespace any more"),
        "{described}"
    );
    // Its next change is refused.
    refused(c.apply(d, &router.replace("true", "exit 0")));

    // Deleting a namespace with workloads in it, or `default`, is refused.
    let err = refused(c.cli(&["delete", "namespace", "net"]));
    assert!(
        err.contains("namespace \"net\" still holds workloads router"),
        "{err}"
    );
    let err = refused(c.cli(&["delete", "ns", "default"]));
    assert!(err.contains("cannot be deleted"), "{err}");

    // Kept across a restart, the mark too.
    c.proc.stop();
    c = Controller::start_on(dir.path(), Broker::Embedded(broker), api_port);
    let ns = c.json(&["get", "ns", "net", "-o", "json"]);
    assert_eq!(ns["allowedCapabilities"], serde_json::json!(["SYS_TIME"]));
    let w = c.json(&["get", "workload", "router", "-o", "json"]);
    assert_eq!(w["policyViolations"].as_array().unwrap().len(), 1, "{w}");

    ok(c.cli(&["delete", "workload", "router"]));
    let out = ok(c.cli(&["delete", "namespace", "net"]));
    assert!(out.contains("namespace/net deleted"), "{out}");
    refused(c.cli(&["get", "ns", "net"]));
}

/// `key` (e.g. `CapEff`) in a /proc/PID/status dump.
fn status_field(log: &str, key: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
}

/// Bit 12 of a `CapEff` mask: CAP_NET_ADMIN.
fn has_net_admin(log: &str) -> bool {
    let eff = u64::from_str_radix(&status_field(log, "CapEff").unwrap(), 16).unwrap();
    eff & (1 << 12) != 0
}

#[test]
fn a_capability_reaches_the_container_only_through_its_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("caps");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start(
        dir.path(),
        &node,
        &c.broker_url(),
        &[&format!("node={node}")],
    );
    let logs = [c.proc.log.as_path(), agent.proc.log.as_path()];
    let image = busybox_image(dir.path());
    let script = "grep -E \"^(CapEff|Seccomp):\" /proc/1/status; sleep 3600";
    let admin = workload(
        "netadm",
        ", namespace: lab",
        &image,
        &node,
        script,
        NET_ADMIN,
    );
    let plain = workload("plain", "", &image, &node, script, "");
    ok(c.apply(
        dir.path(),
        &format!("{}{admin}{plain}", namespace("lab", "NET_ADMIN")),
    ));

    let log_of = |pod: &str| {
        wait_for(
            &format!("{pod}'s container to print its status"),
            T,
            &logs,
            || {
                let log = agent.container_log(pod, "main");
                log.contains("Seccomp:").then_some(log)
            },
        )
    };
    let granted = log_of("netadm");
    assert!(has_net_admin(&granted), "{granted}");
    assert_eq!(status_field(&granted, "Seccomp").as_deref(), Some("2"));
    let default = log_of("plain");
    assert!(!has_net_admin(&default), "{default}");
    assert_eq!(status_field(&default, "Seccomp").as_deref(), Some("2"));

    let running = || {
        let w = c.json(&["get", "workload", "netadm", "-o", "json"]);
        (w["runningPods"] == 1).then_some(w)
    };
    wait_for("netadm to be reported running", T, &logs, running);

    // The same workload moved to `default` is refused; it keeps running
    // where it was.
    let moved = admin.replace(", namespace: lab", "");
    let err = refused(c.apply(dir.path(), &moved));
    assert!(
        err.contains(
            "workload \"netadm\": spec.containers[0].securityContext.capabilities.add[0]: \
             namespace \"default\" does not allow adding capability NET_ADMIN"
        ),
        "{err}"
    );
    let w = c.json(&["get", "workload", "netadm", "-o", "json"]);
    assert_eq!(w["namespace"], "lab");
    assert_eq!(w["runningPods"], 1, "{w}");

    c.delete_and_wait_gone(&["netadm", "plain"], &node, &logs);
}
