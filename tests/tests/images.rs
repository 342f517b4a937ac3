#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Images end to end, through the real controller, agent, containers and a
//! real registry: a new version whose image cannot be pulled leaves the old
//! container running (same process) with the failure in its status, and the
//! switch happens once the image is pushed; a slow pull shows its progress
//! in every view; HTTPS trusts the system's roots.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use flotilla_testkit::registry::{CutProxy, Registry};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

/// The busybox test image with `/version` holding `version`.
fn push_version(registry: &Registry, dir: &Path, version: &str) {
    let layout = dir.join(format!("layout-{version}"));
    flotilla_testkit::oci::busybox()
        .layer(flotilla_testkit::oci::Compression::Gzip)
        .file("version", version, 0o644)
        .write_layout(&layout, version)
        .unwrap();
    registry
        .push(&layout, version, &format!("shop/app:{version}"))
        .unwrap();
}

fn manifest(image: &str) -> String {
    format!(
        r#"apiVersion: flotilla.dev/v1
kind: Workload
metadata:
  name: till
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {image}
    command: [sh, -c, 'cat /version; echo; exec sleep 3600']
"#
    )
}

/// Registries file: both hosts plain HTTP.
fn registries(dir: &Path, hosts: &[String]) -> std::path::PathBuf {
    let path = dir.join("registries.toml");
    let mut text = String::new();
    for h in hosts {
        text.push_str(&format!(
            "[[registry]]\nhost = \"{h}\"\ninsecure = true\n\n"
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// (container id, its processes) of every container of `node`.
fn containers(node: &str) -> Vec<(String, Vec<i32>)> {
    let mut out: Vec<(String, Vec<i32>)> = Vec::new();
    for dir in container_cgroups(node) {
        let id = dir.file_name().unwrap().to_string_lossy().into_owned();
        let pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            continue;
        }
        match out.iter_mut().find(|(i, _)| *i == id) {
            Some((_, p)) => p.extend(pids),
            None => out.push((id, pids)),
        }
    }
    for (_, p) in &mut out {
        p.sort();
        p.dedup();
    }
    out
}

fn app(pod: &Value) -> &Value {
    &pod["containers"][0]
}

#[test]
fn a_new_version_that_cannot_be_pulled_leaves_the_old_one_running() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start().unwrap();
    push_version(&registry, dir.path(), "v1");
    // Nothing listens there: a registry that is down.
    let down = format!("127.0.0.1:{}", free_port());
    let conf = registries(dir.path(), &[registry.host(), down.clone()]);
    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("images");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start_with(
        dir.path(),
        &node,
        &controller.broker_url(),
        &[],
        None,
        |cmd| {
            cmd.arg("--registries").arg(&conf);
        },
    );
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    let pod_name = format!("till@{node}");
    let pod = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        wait_for(what, T, &logs, || {
            controller.pod(&pod_name).filter(|p| pred(p))
        })
    };
    let apply = |image: &str| {
        let out = controller.apply(dir.path(), &manifest(image));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let v1 = format!("{}/shop/app:v1", registry.host());
    apply(&v1);
    pod("v1 running", &|p| {
        p["phase"] == "Running" && app(p)["state"] == "Running"
    });
    wait_for("v1's output", T, &logs, || {
        agent
            .container_log("till", "app")
            .contains("v1")
            .then_some(())
    });
    let before = containers(&node);
    assert_eq!(before.len(), 1, "{before:?}");

    // v2 on a registry that is down: v1 keeps running, the status says why.
    let v2 = format!("{down}/shop/app:v2");
    apply(&v2);
    let p = pod("v2's pull failing", &|p| {
        app(p)["state"] == "Running" && app(p)["next"]["reason"] == "ErrImagePull"
    });
    assert_eq!(p["phase"], "Running", "{p:#}");
    assert_eq!(app(&p)["ready"], true, "{p:#}");
    let message = app(&p)["next"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains(&v2), "{message}");
    assert!(app(&p)["next"]["retryAtMs"].is_u64(), "{p:#}");
    assert_eq!(containers(&node), before, "v1's process is untouched");
    let wide = controller.cli(&["get", "pods", "-o", "wide"]);
    let wide = String::from_utf8_lossy(&wide.stdout);
    assert!(
        wide.contains("app: running the previous version; next: ErrImagePull"),
        "{wide}"
    );
    let described = controller.cli(&["describe", "pod", &pod_name]);
    let described = String::from_utf8_lossy(&described.stdout);
    assert!(described.contains("Next:      Waiting"), "{described}");
    assert!(described.contains(&v2), "{described}");

    // v3 on the live registry, but not pushed yet: a wrong tag, same story.
    let v3 = format!("{}/shop/app:v3", registry.host());
    apply(&v3);
    let p = pod("v3 not found", &|p| {
        app(p)["state"] == "Running"
            && app(p)["next"]["reason"] == "ImageNotFound"
            && app(p)["next"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&v3))
    });
    assert_eq!(p["phase"], "Running", "{p:#}");
    assert_eq!(containers(&node), before, "v1's process is untouched");

    // Pushed: the next attempt switches.
    push_version(&registry, dir.path(), "v3");
    pod("v3 running", &|p| {
        p["phase"] == "Running" && app(p)["state"] == "Running" && app(p)["next"].is_null()
    });
    let after = wait_for("v1 gone, v3 running", T, &logs, || {
        let now = containers(&node);
        (now.len() == 1 && now[0].0 != before[0].0).then_some(now)
    });
    assert!(
        after[0].1.iter().all(|pid| !before[0].1.contains(pid)),
        "{before:?} {after:?}"
    );
    wait_for("v3's output", T, &logs, || {
        agent
            .container_log("till", "app")
            .contains("v3")
            .then_some(())
    });
    controller.delete_and_wait_gone(&["till"], &node, &logs);
}

/// A TLS registry on 127.0.0.1 whose certificate comes from a test CA: an
/// agent that has the CA among its system roots (`SSL_CERT_FILE`, which
/// rustls-native-certs reads instead of the distribution's bundle) pulls
/// with no `ca_file` in its registries file; one without it fails with a
/// certificate error that names the registry.
#[test]
fn https_with_the_system_roots() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::builder().tls().start().unwrap();
    push_version(&registry, dir.path(), "v1");
    let ca = registry.ca_pem().unwrap().to_owned();
    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let trusting = unique_node("roots");
    let doubting = unique_node("noroots");
    let _cleanup = (Cleanup(trusting.clone()), Cleanup(doubting.clone()));
    // No registries file at all: HTTPS, the system's roots.
    let a = Agent::start_with(
        dir.path(),
        &trusting,
        &controller.broker_url(),
        &[],
        None,
        |cmd| {
            cmd.env("SSL_CERT_FILE", &ca).env_remove("SSL_CERT_DIR");
        },
    );
    let b = Agent::start_with(
        dir.path(),
        &doubting,
        &controller.broker_url(),
        &[],
        None,
        |cmd| {
            cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
        },
    );
    let logs = [
        controller.proc.log.as_path(),
        a.proc.log.as_path(),
        b.proc.log.as_path(),
    ];
    let image = format!("{}/shop/app:v1", registry.host());
    let out = controller.apply(dir.path(), &manifest(&image));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the trusting node's pod running", T, &logs, || {
        let p = controller.pod(&format!("till@{trusting}"))?;
        (p["phase"] == "Running" && app(&p)["state"] == "Running").then_some(())
    });
    wait_for("its output", T, &logs, || {
        a.container_log("till", "app").contains("v1").then_some(())
    });
    let p = wait_for("the other node's pull failing", T, &logs, || {
        controller
            .pod(&format!("till@{doubting}"))
            .filter(|p| app(p)["reason"] == "ErrImagePull")
    });
    let message = app(&p)["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains(&registry.host()), "{message}");
    assert!(message.to_lowercase().contains("certificate"), "{message}");
    assert_eq!(p["phase"], "Pending", "{p:#}");
    controller.delete_and_wait_gone(&["till"], &trusting, &logs);
    wait_for("the other node's cgroups gone", T, &logs, || {
        container_cgroups(&doubting).is_empty().then_some(())
    });
}

/// A pull slowed by a throttling proxy between the agent and the registry
/// shows `Pulling` with bytes done and total in the JSON API, `get pods -o
/// wide` and `describe pod` while it runs, and the pod runs after.
#[test]
fn a_slow_pull_shows_its_progress_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start().unwrap();
    push_version(&registry, dir.path(), "v1");
    // 64 KiB/s: the busybox layer takes well over ten seconds.
    let proxy = CutProxy::throttled(registry.addr(), 64 * 1024).unwrap();
    let conf = registries(dir.path(), &[proxy.host()]);
    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("progress");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start_with(
        dir.path(),
        &node,
        &controller.broker_url(),
        &[],
        None,
        |cmd| {
            cmd.arg("--registries").arg(&conf);
        },
    );
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    let pod_name = format!("till@{node}");
    let out = controller.apply(
        dir.path(),
        &manifest(&format!("{}/shop/app:v1", proxy.host())),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pulling = |p: &Value| {
        let pull = &app(p)["pull"];
        let (done, total) = (pull["doneBytes"].as_u64()?, pull["totalBytes"].as_u64()?);
        (app(p)["reason"] == "Pulling" && done > 0 && done < total).then_some((done, total))
    };
    let (first, total) = wait_for("a pull under way", T, &logs, || {
        controller.pod(&pod_name).as_ref().and_then(pulling)
    });
    assert!(total > 500_000, "{total}");
    let (later, _) = wait_for("the pull to move on", T, &logs, || {
        let (done, _) = controller.pod(&pod_name).as_ref().and_then(pulling)?;
        (done > first).then_some((done, ()))
    });
    assert!(later > first);
    wait_for("Pulling in get pods -o wide", T, &logs, || {
        let out = controller.cli(&["get", "pods", "-o", "wide"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.contains("app: Pulling: pulling image") && text.contains(" MiB")).then_some(())
    });
    wait_for("Pulling in describe pod", T, &logs, || {
        let out = controller.cli(&["describe", "pod", &pod_name]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.contains("Reason:    Pulling") && text.contains(" MiB")).then_some(())
    });
    assert!(
        proxy.sent() < total,
        "still pulling: {} of {total}",
        proxy.sent()
    );
    proxy.set_rate(0);
    let p = wait_for("the pod running", T, &logs, || {
        controller
            .pod(&pod_name)
            .filter(|p| p["phase"] == "Running" && app(p)["state"] == "Running")
    });
    assert!(app(&p)["pull"].is_null(), "{p:#}");
    controller.delete_and_wait_gone(&["till"], &node, &logs);
}
