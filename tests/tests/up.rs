#![allow(clippy::unwrap_used, clippy::expect_used)]

//! `flotilla up`, the one-command local cluster: the controller, its broker
//! and store, and a local agent — and a workload applied to it runs at once.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn up_runs_a_local_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("busybox-layout");
    flotilla_testkit::oci::busybox()
        .write_layout(&layout, "latest")
        .unwrap();
    let node = unique_node("up");
    let api_port = free_port();
    let mut cmd = Command::new(bin("flotilla"));
    cmd.arg("up")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--api-listen")
        .arg(format!("127.0.0.1:{api_port}"))
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--node")
        .arg(&node)
        .arg("--label")
        .arg("site=home")
        .env("FLOTILLA_LOG", "debug,rmqtt=warn");
    let mut up = Proc::spawn(&mut cmd, dir.path().join("up.log"));
    let logs = [up.log.as_path()];
    let server = format!("https://127.0.0.1:{api_port}");
    // As on a machine after `scripts/up`: the CLI finds the admin token and
    // the CA in the data dir by itself.
    let cli = |args: &[&str]| {
        Command::new(bin("flotilla"))
            .args(args)
            .env("FLOTILLA_SERVER", &server)
            .env("FLOTILLA_DATA_DIR", dir.path().join("data"))
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_CA")
            .output()
            .unwrap()
    };

    wait_for(
        "the local node to be Ready",
        Duration::from_secs(60),
        &logs,
        || {
            let out = cli(&["get", "nodes", &node, "-o", "json"]);
            let n: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (n["status"] == "Ready" && n["labels"]["site"] == "home").then_some(())
        },
    );

    let manifest = dir.path().join("hello.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: hello}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  \
             - name: main\n    image: oci:{}:latest\n    command: [sh, -c, 'echo hello; exec sleep 3604']\n",
            layout.display()
        ),
    )
    .unwrap();
    let out = cli(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pod = format!("hello@{node}");
    wait_for("hello to run", Duration::from_secs(60), &logs, || {
        let out = cli(&["get", "pods", &pod, "-o", "json"]);
        let p: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (p["phase"] == "Running").then_some(())
    });
    let table = String::from_utf8_lossy(&cli(&["get", "pods"]).stdout).to_string();
    assert!(
        table.starts_with("NAME") && table.contains(&pod) && table.contains("Running"),
        "{table}"
    );
    let log = dir.path().join("data/agent/logs/hello/main.log");
    wait_for(
        "the container's output",
        Duration::from_secs(30),
        &logs,
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("hello"))
                .map(|_| ())
        },
    );

    assert!(cli(&["delete", "workload", "hello"]).status.success());
    wait_for(
        "the container to be removed",
        Duration::from_secs(60),
        &logs,
        || container_cgroups(&node).is_empty().then_some(()),
    );
    // Ctrl-C stops the controller and the agent.
    up.stop();
    assert!(
        up.child.try_wait().unwrap().is_some_and(|s| s.success()),
        "flotilla up did not exit cleanly"
    );
    kill_node_containers(&node);
}
