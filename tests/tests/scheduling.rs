#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Scheduling end to end: a real `flotilla serve` and several agents (the
//! fake runtime, plus one real agent running a real container). Replicas
//! spread across sites and stay put when a node joins, `everyNode` follows
//! the fleet, labels set with `flotilla label node` select nodes, a workload
//! that fits nowhere says why in `describe`, and a replica leaves a node
//! that stays NotReady past its toleration, counted from when it went away
//! even across a controller restart. Revisions survive a restart and
//! `rollout undo` brings pods back. Staged rollouts go in waves, pause,
//! resume after a controller is killed mid-rollout and let an offline node
//! catch up; a bad revision (a container exiting 1 on a real agent, then a
//! readiness probe that never passes) stops in the first wave and is rolled
//! back, the other nodes never touched.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

/// Starts an agent with the fake runtime (no containers, same state machine).
fn fake_agent(dir: &Path, node: &str, broker_url: &str, labels: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("flotilla-agent"));
    cmd.arg("--broker")
        .arg(broker_url)
        .arg("--node")
        .arg(node)
        .arg("--runtime")
        .arg("fake")
        .arg("--data-dir")
        .arg(dir.join(format!("agent-{node}")))
        .arg("--run-dir")
        .arg(dir.join(format!("run-{node}")))
        .args(trust_args(dir))
        .env("FLOTILLA_LOG", "debug");
    for l in labels {
        cmd.arg("--label").arg(l);
    }
    Proc::spawn(&mut cmd, dir.join(format!("agent-{node}.log")))
}

fn workload(name: &str, image: &str, spec: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n{spec}\
         \n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    \
         command: [sh, -c, 'sleep 3600']\n"
    )
}

/// Node → pod name on the node of the workload's desired pods, once all
/// of them are Running.
fn running(c: &Controller, workload: &str) -> Option<BTreeMap<String, String>> {
    let w = c.try_json(&["get", "workloads", workload, "-o", "json"])?;
    let pods = w["pods"].as_array()?;
    let desired: Vec<&Value> = pods.iter().filter(|p| p["desired"] == true).collect();
    // Pods no longer desired are left out: a node that went away keeps
    // reporting what it ran until it returns.
    if desired.iter().any(|p| p["phase"] != "Running") {
        return None;
    }
    Some(
        desired
            .iter()
            .map(|p| {
                (
                    p["node"].as_str().unwrap().to_owned(),
                    p["podName"].as_str().unwrap().to_owned(),
                )
            })
            .collect(),
    )
}

fn applied(out: std::process::Output) {
    assert!(
        out.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn replicas_spread_stay_put_follow_labels_and_leave_lost_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = busybox_image(d);
    let controller = Controller::start(d, Broker::Embedded(free_port()));
    let broker = controller.broker_url();
    let a1 = unique_node("sched-a");
    let a2 = unique_node("sched-a");
    let b1 = unique_node("sched-b");
    let _cleanup = Cleanup(b1.clone());
    let mut fakes = BTreeMap::new();
    fakes.insert(a1.clone(), fake_agent(d, &a1, &broker, &["site=a"]));
    fakes.insert(a2.clone(), fake_agent(d, &a2, &broker, &["site=a"]));
    // The one real agent: its replica is a real container.
    let real = Agent::start(d, &b1, &broker, &["site=b"]);
    let logs = [controller.proc.log.as_path(), real.proc.log.as_path()];
    let ready = |nodes: &[&String]| {
        wait_for("the nodes to be Ready", T, &logs, || {
            nodes
                .iter()
                .all(|n| {
                    controller
                        .try_json(&["get", "nodes", n, "-o", "json"])
                        .is_some_and(|v| v["status"] == "Ready")
                })
                .then_some(())
        })
    };
    ready(&[&a1, &a2, &b1]);

    // Two replicas spread over the two sites; an everyNode workload everywhere.
    let web = workload(
        "web",
        &image,
        "  replicas: 2\n  spreadBy: site\n  tolerationSeconds: 3",
    );
    let all = workload("all", &image, "  everyNode: true");
    applied(controller.apply(d, &format!("{web}---\n{all}")));
    let placed = wait_for("web's replicas Running", T, &logs, || {
        running(&controller, "web").filter(|m| m.len() == 2)
    });
    assert!(
        placed.contains_key(&b1),
        "one replica on site b: {placed:?}"
    );
    let mut names: Vec<&String> = placed.values().collect();
    names.sort();
    assert_eq!(names, ["web-0", "web-1"]);
    let on_a = placed.keys().find(|n| **n != b1).unwrap().clone();
    // The real one runs as a real container, under its replica name.
    wait_for("the real container's pod directory", T, &logs, || {
        real.data_dir
            .join("logs")
            .join(&placed[&b1])
            .exists()
            .then_some(())
    });
    wait_for("all on every node", T, &logs, || {
        running(&controller, "all").filter(|m| m.len() == 3)
    });

    // A new node gets the everyNode pod and moves no replica.
    let a3 = unique_node("sched-a");
    fakes.insert(a3.clone(), fake_agent(d, &a3, &broker, &["site=a"]));
    ready(&[&a3]);
    wait_for("all on the new node", T, &logs, || {
        running(&controller, "all").filter(|m| m.contains_key(&a3))
    });
    assert_eq!(running(&controller, "web").unwrap(), placed, "no churn");

    // Labels set at the controller select nodes.
    let out = controller.cli(&["label", "node", &a3, "tier=gold"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gold = controller.json(&["get", "nodes", "-l", "tier=gold", "-o", "json"]);
    let gold: Vec<&str> = gold["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(gold, [a3.as_str()]);
    let site_a = controller.json(&["get", "nodes", "-l", "site=a,tier=gold", "-o", "json"]);
    assert_eq!(site_a["items"].as_array().unwrap().len(), 1);
    applied(controller.apply(
        d,
        &workload(
            "gold",
            &image,
            "  replicas: 1\n  nodeSelector: {tier: gold}",
        ),
    ));
    wait_for("gold on the labelled node", T, &logs, || {
        running(&controller, "gold").filter(|m| m.keys().eq([&a3]))
    });
    let out = controller.cli(&["label", "node", &a3, "tier-"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let why = wait_for("gold unschedulable once unlabelled", T, &logs, || {
        let out = controller.cli(&["describe", "workload", "gold"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("Unschedulable:").then_some(text)
    });
    assert!(
        why.contains(
            "Unschedulable: 0 of 1 replicas placed; of 4 nodes, 4 do not match the node selector"
        ),
        "{why}"
    );
    let bad = controller.cli(&["label", "node", "no-such-node", "a=b"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("node \"no-such-node\" not found"));

    // Too big for any node: a clear reason.
    applied(
        controller.apply(
            d,
            &workload(
                "huge",
                &image,
                "  replicas: 1\n  architectures: [arm64, amd64]",
            )
            .replace(
                "command:",
                "resources: {requests: {memory: 1000Ti}}\n    command:",
            ),
        ),
    );
    let why = wait_for("huge unschedulable", T, &logs, || {
        let out = controller.cli(&["describe", "workload", "huge"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("Unschedulable:").then_some(text)
    });
    assert!(why.contains("4 have too little memory left"), "{why}");

    // The site-a node holding a replica goes away: within the toleration
    // the replica waits, after it the replica moves to another site-a node.
    fakes.get_mut(&on_a).unwrap().stop();
    wait_for("the stopped node NotReady", T, &logs, || {
        controller
            .try_json(&["get", "nodes", &on_a, "-o", "json"])
            .filter(|v| v["status"] == "NotReady")
    });
    let moved = wait_for("web's replica moved", T, &logs, || {
        running(&controller, "web").filter(|m| m.len() == 2 && !m.contains_key(&on_a))
    });
    assert_eq!(moved[&b1], placed[&b1], "the replica on b stays");
    let new_a = moved.keys().find(|n| **n != b1).unwrap();
    assert_ne!(*new_a, on_a);
    assert_eq!(
        moved[new_a], placed[&on_a],
        "the moved replica keeps its index"
    );
    // The everyNode pod stays desired on the lost node.
    let w = controller.json(&["get", "workloads", "all", "-o", "json"]);
    assert!(
        w["pods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == on_a.as_str() && p["desired"] == true)
    );

    controller.delete_and_wait_gone(&["web", "all"], &b1, &logs);
}

#[test]
fn the_not_ready_clock_survives_a_controller_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mqtt_port = free_port();
    let controller = Controller::start(d, Broker::Embedded(mqtt_port));
    let api_port = controller.api_port();
    let (n1, n2) = (unique_node("clk"), unique_node("clk"));
    let mut agents: BTreeMap<String, Proc> = [&n1, &n2]
        .into_iter()
        .map(|n| {
            let agent = fake_agent(d, n, &controller.broker_url(), &["site=a"]);
            (n.clone(), agent)
        })
        .collect();
    let first_log = controller.proc.log.clone();
    let logs = [first_log.as_path()];
    applied(controller.apply(
        d,
        &workload(
            "solo",
            "oci:/img:1",
            "  replicas: 1\n  nodeSelector: {site: a}\n  tolerationSeconds: 4",
        ),
    ));
    let placed = wait_for("solo placed", T, &logs, || {
        running(&controller, "solo").filter(|m| m.len() == 1)
    });
    let (on, _) = placed.into_iter().next().unwrap();
    let other = if on == n1 { &n2 } else { &n1 };

    // The node goes away; the controller is killed and started again
    // before the toleration has passed.
    agents.get_mut(&on).unwrap().stop();
    let since = wait_for("the node NotReady", T, &logs, || {
        let v = controller.try_json(&["get", "nodes", &on, "-o", "json"])?;
        (v["status"] == "NotReady").then(|| v["notReadySinceMs"].as_u64())?
    });
    let mut controller = controller;
    controller.proc.kill();
    let controller = Controller::start_on(d, Broker::Embedded(mqtt_port), api_port);
    let logs = [first_log.as_path(), controller.proc.log.as_path()];
    // The node is NotReady from the store (the embedded broker restarted
    // with the controller and lost the retained Offline presence): the
    // clock goes on from the instant before the restart, not from now.
    let again = wait_for("the node NotReady again", T, &logs, || {
        let v = controller.try_json(&["get", "nodes", &on, "-o", "json"])?;
        (v["status"] == "NotReady").then(|| v["notReadySinceMs"].as_u64())?
    });
    assert_eq!(again, since, "NotReady since the same instant");
    let moved = wait_for("solo moved", T, &logs, || {
        running(&controller, "solo").filter(|m| m.contains_key(other.as_str()))
    });
    assert_eq!(moved.len(), 1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        now_ms >= since + 4000,
        "the replica waited out its toleration from {since}, now {now_ms}"
    );
}

#[test]
fn revisions_survive_a_restart_and_undo_brings_the_pods_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mqtt_port = free_port();
    let controller = Controller::start(d, Broker::Embedded(mqtt_port));
    let api_port = controller.api_port();
    let node = unique_node("rev");
    let _agent = fake_agent(d, &node, &controller.broker_url(), &["site=a"]);
    let first_log = controller.proc.log.clone();
    let logs = [first_log.as_path()];
    let v1 = workload("app", "oci:/img:1", "  replicas: 1");
    let v2 = workload("app", "oci:/img:2", "  replicas: 1");
    let image = |c: &Controller| {
        let w = c.json(&["get", "workloads", "app", "-o", "json"]);
        w["manifest"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let history = |c: &Controller| {
        let out = c.cli(&["rollout", "history", "app"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    applied(controller.apply(d, &v1));
    wait_for("app on the node", T, &logs, || {
        running(&controller, "app").filter(|m| m.contains_key(&node))
    });
    applied(controller.apply(d, &v2));
    // Where the pods go is not a revision.
    applied(controller.apply(
        d,
        &v2.replace("replicas: 1", "replicas: 1\n  tolerationSeconds: 9"),
    ));
    let text = history(&controller);
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(rows[0].starts_with("REVISION"), "{text}");
    assert!(
        rows[1].starts_with("1 ") && rows[1].ends_with("apply   oci:/img:1"),
        "{text}"
    );
    assert!(
        rows[2].starts_with("2 *") && rows[2].ends_with("oci:/img:2"),
        "{text}"
    );
    let generation = |c: &Controller| {
        let logs = [c.proc.log.as_path()];
        wait_for("the node in sync", T, &logs, || {
            let n = c.try_json(&["get", "nodes", &node, "-o", "json"])?;
            (n["status"] == "Ready" && n["desiredGeneration"] == n["observedGeneration"])
                .then(|| n["desiredGeneration"].as_u64().unwrap())
        })
    };
    let before = generation(&controller);

    // A restarted controller keeps the history and moves nothing.
    let mut controller = controller;
    controller.proc.kill();
    let controller = Controller::start_on(d, Broker::Embedded(mqtt_port), api_port);
    assert_eq!(history(&controller), text);
    assert_eq!(
        generation(&controller),
        before,
        "no new generation after a restart"
    );

    // Undo: revision 1's pods again, as revision 3.
    let out = controller.cli(&["rollout", "undo", "app"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "workload/app rolled back (now revision 3)\n"
    );
    assert_eq!(image(&controller), "oci:/img:1");
    let text = history(&controller);
    assert!(
        text.contains("3 *") && text.contains("undo to revision 1"),
        "{text}"
    );
    assert!(generation(&controller) > before);
    let w = controller.json(&["get", "workloads", "app", "-o", "json"]);
    assert_eq!(
        w["manifest"]["spec"]["tolerationSeconds"], 9,
        "placement kept"
    );
    assert_eq!(w["revision"], 3);

    let out = controller.cli(&["rollout", "undo", "app", "--to-revision", "2"]);
    assert!(out.status.success());
    assert_eq!(image(&controller), "oci:/img:2");
    let out = controller.cli(&["rollout", "undo", "app", "--to-revision", "9"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: workload app has no revision 9 (see `flotilla rollout history app`)\n"
    );
    let out = controller.cli(&["rollout", "history", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("workload \"nope\" not found"));
}

/// `get nodes NODE`'s desired generation, once the node is in sync with it.
fn synced_generation(c: &Controller, node: &str) -> u64 {
    let logs = [c.proc.log.as_path()];
    wait_for("the node in sync", T, &logs, || {
        let n = c.try_json(&["get", "nodes", node, "-o", "json"])?;
        (n["status"] == "Ready" && n["desiredGeneration"] == n["observedGeneration"])
            .then(|| n["desiredGeneration"].as_u64().unwrap())
    })
}

fn rollout(c: &Controller, workload: &str) -> Value {
    c.json(&["rollout", "status", workload, "-o", "json"])
}

const STRATEGY: &str = "  strategy:\n    waves: [1, 50%]\n    maxUnavailable: 1\n    \
                        healthySeconds: 1\n    failureThreshold: 1\n    progressDeadlineSeconds: 60";

#[test]
fn a_rollout_goes_in_waves_survives_a_restart_and_an_offline_node_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mqtt_port = free_port();
    let controller = Controller::start(d, Broker::Embedded(mqtt_port));
    let api_port = controller.api_port();
    let broker = controller.broker_url();
    let nodes: Vec<String> = (0..5).map(|_| unique_node("wave")).collect();
    let mut agents: Vec<Proc> = nodes
        .iter()
        .map(|n| fake_agent(d, n, &broker, &["site=a"]))
        .collect();
    let v1 = workload("app", "oci:/app:1", STRATEGY);
    applied(controller.apply(d, &v1));
    let logs = [controller.proc.log.as_path()];
    wait_for("app on every node", T, &logs, || {
        running(&controller, "app").filter(|m| m.len() == 5)
    });
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| synced_generation(&controller, n))
        .collect();

    // The last node goes away; its turn comes in the last wave.
    let offline = nodes[4].clone();
    agents[4].stop();
    wait_for("the node NotReady", T, &logs, || {
        controller
            .try_json(&["get", "nodes", &offline, "-o", "json"])
            .filter(|v| v["status"] == "NotReady")
    });

    applied(controller.apply(d, &workload("app", "oci:/app:2", STRATEGY)));
    // Waves: 1 node, then 3 (50 % of 5, rounded up), then all 5.
    let r = wait_for("the second wave", T, &logs, || {
        let r = rollout(&controller, "app");
        (r["switched"].as_array().unwrap().len() >= 2).then_some(r)
    });
    assert_eq!(r["waves"], serde_json::json!([1, 3, 5]));
    assert_eq!((r["from"].as_u64(), r["to"].as_u64()), (Some(1), Some(2)));
    assert_eq!(
        r["switched"][0],
        nodes[0].as_str(),
        "the first wave is one node"
    );
    let out = controller.cli(&["rollout", "pause", "app"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paused = wait_for("the switched nodes healthy", T, &logs, || {
        let r = rollout(&controller, "app");
        (r["phase"] == "Paused" && r["healthy"] == r["switched"]).then_some(r)
    });
    let switched = paused["switched"].as_array().unwrap().len();
    assert!(switched < 5, "paused before the end: {paused}");
    // Nodes not switched yet still run revision 1: untouched.
    for (i, n) in nodes.iter().enumerate().take(4) {
        if !paused["switched"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == n.as_str())
        {
            assert_eq!(
                synced_generation(&controller, n),
                before[i],
                "{n} untouched"
            );
        }
    }

    // A controller killed mid-rollout picks it up where it was.
    let mut controller = controller;
    controller.proc.kill();
    let controller = Controller::start_on(d, Broker::Embedded(mqtt_port), api_port);
    let logs = [controller.proc.log.as_path()];
    let again = rollout(&controller, "app");
    assert_eq!(again["phase"], "Paused");
    assert_eq!(again["switched"], paused["switched"]);
    let out = controller.cli(&["rollout", "resume", "app"]);
    assert!(out.status.success());
    let out = controller.cli(&["rollout", "status", "app", "--watch"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("revision 1 -> 2, Complete, wave 3/3"),
        "{text}"
    );
    // The offline node switched too (it is not holding the gate), but
    // cannot be healthy before it returns.
    assert!(
        text.contains("[########################++++++] 5/5 nodes switched, 4 healthy, 0 failed"),
        "{text}"
    );

    // The offline node catches up when it returns.
    agents[4] = fake_agent(d, &offline, &broker, &["site=a"]);
    let g = synced_generation(&controller, &offline);
    assert!(g > before[4], "the returning node got revision 2");
    wait_for("app Running everywhere", T, &logs, || {
        running(&controller, "app").filter(|m| m.len() == 5)
    });
    drop(agents);
}

#[test]
fn a_bad_revision_stops_in_the_first_wave_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = busybox_image(d);
    let controller = Controller::start(d, Broker::Embedded(free_port()));
    let broker = controller.broker_url();
    // Nodes switch in name order: the real agent ("bad-a…") goes first.
    let first = unique_node("bad-a");
    let _cleanup = Cleanup(first.clone());
    let real = Agent::start(d, &first, &broker, &["site=a"]);
    let others: Vec<String> = (0..3).map(|_| unique_node("bad-b")).collect();
    let _fakes: Vec<Proc> = others
        .iter()
        .map(|n| fake_agent(d, n, &broker, &["site=a"]))
        .collect();
    let logs = [controller.proc.log.as_path(), real.proc.log.as_path()];
    let good = workload(
        "svc",
        &image,
        &STRATEGY.replace("progressDeadlineSeconds: 60", "progressDeadlineSeconds: 5"),
    );
    applied(controller.apply(d, &good));
    wait_for("svc on every node", T, &logs, || {
        running(&controller, "svc").filter(|m| m.len() == 4)
    });
    let before: Vec<u64> = others
        .iter()
        .map(|n| synced_generation(&controller, n))
        .collect();
    let first_before = synced_generation(&controller, &first);

    // Revision 2's container exits 1: the first node fails, the rollout
    // stops and goes back, and the other nodes never see revision 2.
    applied(controller.apply(d, &good.replace("sleep 3600", "exit 1")));
    let out = controller.cli(&["rollout", "status", "svc", "--watch"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rollout of svc was rolled back"),
        "{text}"
    );
    let r = rollout(&controller, "svc");
    assert_eq!(r["phase"], "RolledBack");
    assert_eq!(r["switched"], serde_json::json!([first.as_str()]));
    let why = r["failed"][first.as_str()].as_str().unwrap();
    assert!(
        why.contains("exited with 1") || why.contains("BackOff"),
        "{why}"
    );
    for (n, g) in others.iter().zip(&before) {
        assert_eq!(synced_generation(&controller, n), *g, "{n} never touched");
    }
    assert!(synced_generation(&controller, &first) >= first_before + 2);
    wait_for("svc Running again everywhere", T, &logs, || {
        running(&controller, "svc").filter(|m| m.len() == 4)
    });
    let out = controller.cli(&["rollout", "history", "svc"]);
    let history = String::from_utf8_lossy(&out.stdout);
    assert!(
        history.contains(&format!("rollback: revision 2 failed on node {first}")),
        "{history}"
    );
    let w = controller.json(&["get", "workloads", "svc", "-o", "json"]);
    assert_eq!(w["revision"], 3);
    assert!(
        w["manifest"]["spec"]["containers"][0]["command"][2]
            .as_str()
            .unwrap()
            .contains("sleep 3600")
    );

    // Revision 4 runs but never passes its readiness probe: not healthy
    // within the deadline, rolled back too.
    let unready = good.replace(
        "command: [sh, -c, 'sleep 3600']",
        "command: [sh, -c, 'sleep 3600']\n    \
         readinessProbe: {exec: {command: [sh, -c, 'exit 1']}, periodSeconds: 1}",
    );
    applied(controller.apply(d, &unready));
    let r = wait_for("revision 4 rolled back", T, &logs, || {
        let r = rollout(&controller, "svc");
        (r["to"] == 4 && r["phase"] == "RolledBack").then_some(r)
    });
    assert_eq!(r["failed"][first.as_str()], "not healthy within 5s");
    assert_eq!(r["switched"], serde_json::json!([first.as_str()]));
    for (n, g) in others.iter().zip(&before) {
        assert_eq!(synced_generation(&controller, n), *g, "{n} never touched");
    }
    let w = controller.json(&["get", "workloads", "svc", "-o", "json"]);
    assert_eq!(w["revision"], 5);
    assert!(w["manifest"]["spec"]["containers"][0]["readinessProbe"].is_null());
    controller.delete_and_wait_gone(&["svc"], &first, &logs);
}
