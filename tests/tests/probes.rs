#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Probes, volumes and the grace period end to end, with real processes
//! and real containers: an http readiness probe against a busybox `httpd`
//! flips `ready` as the served file comes and goes; an exec liveness probe
//! that starts failing restarts its container; a config volume's file is
//! readable (and read-only) in the container; a container that ignores
//! SIGTERM gets the pod's grace period — not the agent's default — before
//! SIGKILL, on a liveness restart and on removal.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
/// The pod's grace period; the agent's own default is 10 s.
const GRACE_SECS: u64 = 3;

fn busybox_image(dir: &Path) -> String {
    let layout = dir.join("busybox-layout");
    flotilla_testkit::oci::busybox()
        .write_layout(&layout, "latest")
        .unwrap();
    format!("oci:{}:latest", layout.display())
}

/// `web` serves `/state/www` (a scratch volume) with busybox httpd on
/// `port`; `worker` reads its config file, records its life in a host path
/// volume, is alive while `/state/healthy` exists, and ignores SIGTERM.
fn manifest(image: &str, port: u16, events: &Path) -> String {
    format!(
        r#"apiVersion: flotilla.dev/v1
kind: Workload
metadata:
  name: probed
spec:
  terminationGracePeriodSeconds: {GRACE_SECS}
  volumes:
  - name: conf
    config:
      files:
      - {{path: greeting.txt, content: "hello from config"}}
  - name: state
    emptyDir: {{}}
  - name: events
    hostPath: {{path: {events}}}
  containers:
  - name: web
    image: {image}
    command: [sh, -c, 'mkdir -p /state/www && exec busybox httpd -f -vv -p 127.0.0.1:{port} -h /state/www']
    volumeMounts:
    - {{name: state, mountPath: /state}}
    readinessProbe:
      httpGet: {{port: {port}, path: /ready.txt}}
      periodSeconds: 1
  - name: worker
    image: {image}
    command:
    - sh
    - -c
    - |
      echo started >> /events/log
      cat /etc/app/greeting.txt
      echo >> /etc/app/greeting.txt || echo config-is-read-only
      touch /state/healthy
      trap 'echo got-term >> /events/log' TERM
      while true; do sleep 1; done
    volumeMounts:
    - {{name: conf, mountPath: /etc/app}}
    - {{name: state, mountPath: /state}}
    - {{name: events, mountPath: /events}}
    livenessProbe:
      exec: {{command: [test, -f, /state/healthy]}}
      periodSeconds: 1
      failureThreshold: 2
"#,
        events = events.display()
    )
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

/// Lines of the events file written by the worker.
fn events(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Kills leftovers even when an assertion failed half-way.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        kill_node_containers(&self.0);
    }
}

#[test]
fn probes_volumes_and_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("probes");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start(dir.path(), &node, &controller.broker_url(), &[]);
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    wait_for("the node to be Ready", T, &logs, || {
        let n = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
        (n["status"] == "Ready").then_some(())
    });

    let events_dir = dir.path().join("events");
    std::fs::create_dir(&events_dir).unwrap();
    let events_log = events_dir.join("log");
    let port = free_port();
    let out = controller.apply(dir.path(), &manifest(&image, port, &events_dir));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod_name = format!("probed@{node}");
    let pod = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        wait_for(what, T, &logs, || {
            controller.pod(&pod_name).filter(|p| pred(p))
        })
    };

    // Both run; web serves nothing yet, so it is not ready.
    pod("both containers running", &|p| {
        p["phase"] == "Running"
            && container(p, "web")["state"] == "Running"
            && container(p, "worker")["state"] == "Running"
    });
    let scratch: PathBuf = agent.data_dir.join("pods/probed/scratch/state");
    // httpd -vv logs each answer: three probes answered 404 so far.
    wait_for("three readiness checks", T, &logs, || {
        let log = agent.container_log("probed", "web");
        (log.matches("response:404").count() >= 3).then_some(())
    });
    let p = controller.pod(&pod_name).unwrap();
    assert_eq!(container(&p, "web")["ready"], false, "{p:#}");
    assert_eq!(container(&p, "worker")["ready"], true, "{p:#}");
    assert_eq!(p["ready"], "1/2");

    // The file appears: ready. It goes: unready again, still running.
    std::fs::write(scratch.join("www/ready.txt"), "ok\n").unwrap();
    let p = pod("web ready", &|p| container(p, "web")["ready"] == true);
    assert_eq!(p["ready"], "2/2");
    std::fs::remove_file(scratch.join("www/ready.txt")).unwrap();
    let p = pod("web unready", &|p| container(p, "web")["ready"] == false);
    assert_eq!(container(&p, "web")["state"], "Running");
    assert_eq!(container(&p, "web")["restarts"], 0);

    // The config file was read, and could not be written.
    wait_for("the worker's output", T, &logs, || {
        let log = agent.container_log("probed", "worker");
        (log.contains("hello from config") && log.contains("config-is-read-only")).then_some(())
    });
    let config_file = agent.data_dir.join("pods/probed/config/conf/greeting.txt");
    assert_eq!(
        std::fs::read_to_string(&config_file).unwrap(),
        "hello from config"
    );
    assert_eq!(events(&events_log), ["started"]);

    // Liveness: the health file goes, two failed checks later the worker
    // gets SIGTERM, which it ignores: SIGKILL follows after the pod's grace
    // period, then a restart (1 s back-off).
    std::fs::remove_file(scratch.join("healthy")).unwrap();
    let term = wait_for("SIGTERM from the liveness probe", T, &logs, || {
        (events(&events_log) == ["started", "got-term"]).then(Instant::now)
    });
    wait_for("the worker to start again", T, &logs, || {
        (events(&events_log).len() == 3).then_some(())
    });
    let gap = term.elapsed();
    assert_eq!(events(&events_log), ["started", "got-term", "started"]);
    assert!(
        gap >= Duration::from_secs(GRACE_SECS) && gap < Duration::from_secs(GRACE_SECS + 8),
        "SIGKILL came {gap:?} after SIGTERM, expected the {GRACE_SECS} s grace period"
    );
    let p = pod("worker restarted and running", &|p| {
        let w = container(p, "worker");
        w["restarts"] == 1 && w["state"] == "Running"
    });
    assert_eq!(container(&p, "web")["restarts"], 0);

    // Removal: the same grace period, well under the agent's 10 s default,
    // and nothing of the pod is left on the device.
    let started = Instant::now();
    let out = controller.cli(&["delete", "workload", "probed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the pod to go", T, &logs, || {
        controller.pod(&pod_name).is_none().then_some(())
    });
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(GRACE_SECS) && took < Duration::from_secs(10),
        "removal took {took:?}, expected about the {GRACE_SECS} s grace period"
    );
    assert_eq!(
        events(&events_log).last().map(String::as_str),
        Some("got-term")
    );
    assert!(!agent.data_dir.join("pods/probed").exists());
    assert!(container_cgroups(&node).is_empty());
}
