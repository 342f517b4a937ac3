#![allow(clippy::unwrap_used, clippy::expect_used)]

//! A staged rollout with `prefetch: true`, end to end: the real controller,
//! two agents with real containers, a real registry behind a throttling
//! proxy (a 4G link). The first wave's node downloads v2 while its v1
//! container keeps running (same process), and switches only once it
//! reports v2 present; the next wave downloads during the health gate.
//! From a registry that asks for a login, the download uses the
//! workload's image pull secret, sealed for the node with the prefetch.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use flotilla_testkit::registry::{CutProxy, Registry};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);
/// Bytes a second while the link is slow: v2's own layer takes about a
/// minute.
const CRAWL: u64 = 16 * 1024;

/// The busybox test image with `/version`, and `payload` in its own layer.
fn push(registry: &Registry, dir: &Path, version: &str, payload: &[u8]) {
    let layout = dir.join(format!("layout-{version}"));
    flotilla_testkit::oci::busybox()
        .layer(flotilla_testkit::oci::Compression::Gzip)
        .file("version", version, 0o644)
        .file("payload", payload, 0o644)
        .write_layout(&layout, version)
        .unwrap();
    registry
        .push(&layout, version, &format!("shop/app:{version}"))
        .unwrap();
}

/// Bytes gzip cannot shrink (xorshift), so the layer's size is what
/// crosses the link.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn manifest(image: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: till}}\nspec:\n  \
         strategy:\n    waves: [1]\n    maxUnavailable: 1\n    healthySeconds: 1\n    \
         progressDeadlineSeconds: 120\n    prefetch: true\n    prefetchTimeoutSeconds: 600\n  \
         terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {image}\n    \
         command: [sh, -c, 'cat /version; echo; exec sleep 3600']\n"
    )
}

/// The process of the `till` container on `node`, if one runs.
fn till_pid(node: &str) -> Option<i32> {
    container_cgroups(node)
        .iter()
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("till."))
        })
        .flat_map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .min()
}

fn rollout(c: &Controller) -> Value {
    c.json(&["rollout", "status", "till", "-o", "json"])
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_wave_switches_only_once_its_nodes_hold_the_new_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let registry = Registry::start().unwrap();
    push(&registry, d, "v1", b"one");
    let payload = noise(768 * 1024);
    push(&registry, d, "v2", &payload);
    // Fast for v1, slow from v2 on.
    let proxy = CutProxy::throttled(registry.addr(), CRAWL).unwrap();
    proxy.set_rate(0);
    let conf = d.join("registries.toml");
    let host = proxy.host();
    std::fs::write(
        &conf,
        format!("[[registry]]\nhost = \"{host}\"\ninsecure = true\n"),
    )
    .unwrap();

    let controller = Controller::start(d, Broker::Embedded(free_port()));
    let nodes = [unique_node("prefetch"), unique_node("prefetch")];
    let _cleanup = nodes.clone().map(Cleanup);
    let agents = nodes.clone().map(|n| {
        Agent::start_with(d, &n, &controller.broker_url(), &[], None, |cmd| {
            cmd.arg("--registries").arg(&conf);
        })
    });
    let logs = [
        controller.proc.log.as_path(),
        agents[0].proc.log.as_path(),
        agents[1].proc.log.as_path(),
    ];
    let apply = |image: &str| {
        let out = controller.apply(d, &manifest(image));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    apply(&format!("{host}/shop/app:v1"));
    let v1_pids = nodes.clone().map(|n| {
        wait_for("v1 running", T, &logs, || {
            let p = controller.pod(&format!("till@{n}"))?;
            (p["phase"] == "Running").then_some(())?;
            till_pid(&n)
        })
    });

    // v2 over the slow link: the first wave's node is given it to download.
    proxy.set_rate(CRAWL);
    apply(&format!("{host}/shop/app:v2"));
    let r = wait_for("the first wave prefetching", T, &logs, || {
        let r = rollout(&controller);
        (r["to"] == 2 && r["prefetching"].as_array()?.len() == 1).then_some(r)
    });
    let first = r["prefetching"][0]["node"].as_str().unwrap().to_owned();
    let i = nodes.iter().position(|n| *n == first).unwrap();
    assert_eq!(r["prefetching"][0]["ready"], false, "{r:#}");
    let text = String::from_utf8_lossy(&controller.cli(&["rollout", "status", "till"]).stdout)
        .into_owned();
    assert!(
        text.contains("wave 1: 1 node prefetching, 0 ready to switch"),
        "{text}"
    );
    // While bytes come in, nothing switches and v1 keeps running, the
    // same process.
    let start = proxy.sent();
    let t0 = Instant::now();
    wait_for("a good part of v2 through the link", T, &logs, || {
        (proxy.sent() > start + 200_000).then_some(())
    });
    let r = rollout(&controller);
    assert!(
        names(&r["switched"]).is_empty(),
        "switched while downloading: {r:#}"
    );
    assert_eq!(till_pid(&first), Some(v1_pids[i]), "v1 was restarted");
    assert!(t0.elapsed() > Duration::from_secs(5));

    // The link is back: the node reports v2 present and only then switches
    // (not at the timeout); its v1 process is replaced.
    proxy.set_rate(0);
    let r = wait_for("the first node switched", T, &logs, || {
        let r = rollout(&controller);
        names(&r["switched"]).contains(&first).then_some(r)
    });
    assert!(names(&r["prefetchTimedOut"]).is_empty(), "{r:#}");
    wait_for("v2 running on the first node", T, &logs, || {
        agents[i]
            .container_log("till", "app")
            .contains("v2")
            .then_some(())
    });
    assert_ne!(till_pid(&first), Some(v1_pids[i]));

    // The other node downloads while the first one's health gate runs,
    // then switches the same way; nobody waited for the timeout.
    let r = wait_for("the rollout complete", T, &logs, || {
        let r = rollout(&controller);
        (r["phase"] == "Complete").then_some(r)
    });
    assert!(names(&r["prefetchTimedOut"]).is_empty(), "{r:#}");
    wait_for("v2 running on the other node", T, &logs, || {
        agents[1 - i]
            .container_log("till", "app")
            .contains("v2")
            .then_some(())
    });
    assert_ne!(till_pid(&nodes[1 - i]), Some(v1_pids[1 - i]));
    let out = controller.cli(&["delete", "workload", "till"]);
    assert!(out.status.success());
    for n in &nodes {
        controller.delete_and_wait_gone(&[], n, &logs);
    }
}

/// A private registry: the workload's pull secret is what lets the node
/// download v2 ahead of the switch. The registries file has no
/// credentials, so a prefetch without the sealed secret would be refused
/// until the (here 600 s) timeout.
#[test]
fn a_private_image_is_prefetched_with_the_workloads_pull_secret() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let password = format!("pw-{}", unique_node("reg"));
    let registry = Registry::builder()
        .basic_auth("robot", &password)
        .start()
        .unwrap();
    push(&registry, d, "v1", b"one");
    push(&registry, d, "v2", &noise(64 * 1024));
    let host = registry.host();
    let conf = d.join("registries.toml");
    std::fs::write(
        &conf,
        format!("[[registry]]\nhost = \"{host}\"\ninsecure = true\n"),
    )
    .unwrap();

    // Enrolled with `join`, so the node has a sealing key.
    let controller = Controller::start(d, Broker::Embedded(free_port()));
    let node = unique_node("prefetch-sec");
    let _cleanup = Cleanup(node.clone());
    let out = controller.cli(&["token", "create"]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = std::process::Command::new(bin("flotilla-agent"))
        .args([
            "join",
            "--server",
            &controller.api,
            "--token",
            &token,
            "--node",
            &node,
        ])
        .arg("--data-dir")
        .arg(d.join(format!("agent-{node}")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = Agent::start_with(d, &node, &controller.broker_url(), &[], None, |cmd| {
        cmd.arg("--registries").arg(&conf);
    });
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: regcred}}\n\
         type: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: \
         '{{\"auths\":{{\"{host}\":{{\"username\":\"robot\",\"password\":\"{password}\"}}}}}}'\n"
    );
    let apply = |version: &str| {
        let workload = manifest(&format!("{host}/shop/app:{version}"))
            + "  imagePullSecrets: [{name: regcred}]\n";
        let out = controller.apply(d, &format!("{secret}---\n{workload}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    apply("v1");
    wait_for("v1 running", T, &logs, || {
        agent
            .container_log("till", "app")
            .contains("v1")
            .then_some(())
    });

    // v2: downloaded ahead with the sealed secret, reported present, and
    // only then switched — long before the timeout.
    apply("v2");
    let r = wait_for("the rollout complete", T, &logs, || {
        let r = rollout(&controller);
        (r["to"] == 2 && r["phase"] == "Complete").then_some(r)
    });
    assert!(names(&r["prefetchTimedOut"]).is_empty(), "{r:#}");
    wait_for("v2 running", T, &logs, || {
        agent
            .container_log("till", "app")
            .contains("v2")
            .then_some(())
    });
    let out = controller.cli(&["delete", "workload", "till"]);
    assert!(out.status.success());
    controller.delete_and_wait_gone(&[], &node, &logs);
}
