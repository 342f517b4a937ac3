#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The spine, end to end with real parts: a manifest applied at `flotilla
//! serve` runs as a real container on a `flotilla-agent`, its status comes
//! back through `flotilla get pods`, a changed spec replaces it, and a
//! deleted workload leaves no container and no cgroup behind.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn workload(name: &str, image: &str, selector: &str, script: &str, policy: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  \
         nodeSelector: {{{selector}}}\n  restartPolicy: {policy}\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    \
         image: {image}\n    command: [sh, -c, '{script}']\n    \
         resources:\n      limits: {{cpu: 200m, memory: 32Mi, pids: 64}}\n"
    )
}

fn container(pod: &Value) -> &Value {
    &pod["containers"][0]
}

fn logs<'a>(c: &'a Controller, a: &'a Agent) -> [&'a Path; 2] {
    [c.proc.log.as_path(), a.proc.log.as_path()]
}

#[test]
fn workload_runs_is_replaced_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("spine");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start(dir.path(), &node, &controller.broker_url(), &["site=shop1"]);
    let logs = logs(&controller, &agent);

    // The node registers with its labels and architecture.
    wait_for("the node to be Ready", T, &logs, || {
        let n = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
        (n["status"] == "Ready" && n["labels"]["site"] == "shop1" && n["arch"].is_string())
            .then_some(())
    });

    // A workload for another site does not land here; ours does.
    let out = controller.apply(
        dir.path(),
        &format!(
            "{}---\n{}",
            workload(
                "web",
                &image,
                "site: shop1",
                "echo started-v1; exec sleep 3600",
                "Always"
            ),
            workload("elsewhere", &image, "site: shop2", "sleep 3600", "Always"),
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "workload/web created\nworkload/elsewhere created\n"
    );

    let pod_name = format!("web@{node}");
    let v1 = wait_for("web to run", T, &logs, || {
        let pod = controller.pod(&pod_name)?;
        (pod["phase"] == "Running" && container(&pod)["state"] == "Running").then_some(pod)
    });
    assert_eq!(
        controller.pod(&format!("elsewhere@{node}")),
        None,
        "a selector for another site matched"
    );
    wait_for("the container's output in its log file", T, &logs, || {
        agent
            .container_log("web", "main")
            .contains("started-v1")
            .then_some(())
    });
    // It is a real container: a process of its own, in cgroups of its own, with the limits applied.
    let cgroups = container_cgroups(&node);
    assert!(
        !cgroups.is_empty(),
        "no cgroup for the container under flotilla/{node}"
    );
    let memory = cgroups
        .iter()
        .find(|p| p.starts_with("/sys/fs/cgroup/memory"))
        .expect("a memory cgroup");
    let limit = std::fs::read_to_string(memory.join("memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim(), (32u64 << 20).to_string());
    let pids = pids_in_memory_cgroups(&node);
    assert_eq!(pids.len(), 1, "one process in the container: {pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cmdline),
        concat!("sleep\0", "3600\0")
    );

    // Applying the same file again changes nothing.
    let same = workload(
        "web",
        &image,
        "site: shop1",
        "echo started-v1; exec sleep 3600",
        "Always",
    );
    let out = controller.apply(dir.path(), &same);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "workload/web unchanged\n"
    );

    // A changed command replaces the container.
    let out = controller.apply(
        dir.path(),
        &workload(
            "web",
            &image,
            "site: shop1",
            "echo started-v2; exec sleep 3601",
            "Always",
        ),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "workload/web configured\n"
    );
    wait_for("the new container to run", T, &logs, || {
        let pod = controller.pod(&pod_name)?;
        let started = &container(&pod)["startedAtMs"];
        (pod["phase"] == "Running" && started.is_u64() && *started != container(&v1)["startedAtMs"])
            .then_some(())
    });
    wait_for("v2 output", T, &logs, || {
        agent
            .container_log("web", "main")
            .contains("started-v2")
            .then_some(())
    });
    wait_for("the old container to be gone", T, &logs, || {
        (pids_in_memory_cgroups(&node).len() == 1).then_some(())
    });

    // Deleting the workload removes the container and its cgroups.
    let out = controller.cli(&["delete", "workload", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the pod to leave the listing", T, &logs, || {
        controller.pod(&pod_name).is_none().then_some(())
    });
    wait_for("the cgroups to be removed", T, &logs, || {
        container_cgroups(&node).is_empty().then_some(())
    });
    let out = controller.cli(&["delete", "workload", "web"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("workload \"web\" not found"));
}

/// Pids of every process in `node`'s container memory cgroups.
fn pids_in_memory_cgroups(node: &str) -> Vec<u32> {
    container_cgroups(node)
        .iter()
        .filter(|p| p.starts_with("/sys/fs/cgroup/memory"))
        .flat_map(|p| {
            std::fs::read_to_string(p.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn bad_manifest_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let good = workload("keep", "oci:/nowhere:1", "site: none", "true", "Always");
    assert!(controller.apply(dir.path(), &good).status.success());

    // Two documents: the first valid, the second with three problems. Nothing is applied.
    let bad = format!(
        "{}---\napiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: Bad_Name}}\n\
         spec:\n  containers:\n  - name: main\n    imagee: x\n",
        workload("new", "oci:/x:1", "site: none", "true", "Always")
    );
    let out = controller.apply(dir.path(), &bad);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("metadata.name"), "{stderr}");
    assert!(
        stderr.contains("spec.containers[0].image: required"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.containers[0].imagee: unknown field"),
        "{stderr}"
    );

    let names: Vec<String> = controller.json(&["get", "workloads", "-o", "json"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["keep"], "a refused file must change nothing");

    // A file that is not YAML at all.
    let out = controller.apply(dir.path(), "kind: [unclosed");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn failures_are_reported_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("fail");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start(dir.path(), &node, &controller.broker_url(), &[]);
    let logs = logs(&controller, &agent);

    let missing = format!("oci:{}/no-such-layout:1", dir.path().display());
    let manifests = format!(
        "{}---\n{}---\n{}---\n{}",
        workload("noimage", &missing, "", "true", "Always"),
        workload("exits", &image, "", "echo bye; exit 3", "Never"),
        // Doubles a string until the 32 MiB limit stops it.
        workload(
            "hog",
            &image,
            "",
            "x=aaaaaaaa; while true; do x=$x$x; done",
            "Never"
        ),
        workload("flaky", &image, "", "exit 1", "OnFailure"),
    );
    let out = controller.apply(dir.path(), &manifests);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pod = wait_for("the missing image to be reported", T, &logs, || {
        let pod = controller.pod(&format!("noimage@{node}"))?;
        (container(&pod)["reason"] == "ImageNotFound").then_some(pod)
    });
    assert_eq!(pod["phase"], "Pending");
    assert!(
        container(&pod)["message"]
            .as_str()
            .unwrap()
            .contains("no-such-layout"),
        "{pod}"
    );

    let pod = wait_for("the exit code to be reported", T, &logs, || {
        let pod = controller.pod(&format!("exits@{node}"))?;
        (pod["phase"] == "Failed").then_some(pod)
    });
    assert_eq!(container(&pod)["state"], "Terminated");
    assert_eq!(container(&pod)["exitCode"], 3);
    assert_eq!(
        container(&pod)["restarts"],
        0,
        "restartPolicy Never restarted it"
    );

    let pod = wait_for("the OOM kill to be reported", T, &logs, || {
        let pod = controller.pod(&format!("hog@{node}"))?;
        (pod["phase"] == "Failed").then_some(pod)
    });
    assert_eq!(container(&pod)["reason"], "OOMKilled", "{pod}");
    assert_eq!(container(&pod)["exitCode"], 137);

    // A failing container under OnFailure waits in back-off, with the time
    // of the next attempt.
    let pod = wait_for("the back-off to be reported", T, &logs, || {
        let pod = controller.pod(&format!("flaky@{node}"))?;
        let c = container(&pod);
        (c["reason"] == "BackOff" && c["restarts"].as_u64()? >= 1).then_some(pod)
    });
    let c = container(&pod);
    assert!(c["retryAtMs"].as_u64().is_some(), "{pod}");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("exited with code 1"),
        "{pod}"
    );

    // describe shows the same, for people.
    let out = controller.cli(&["describe", "pod", &format!("exits@{node}")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Phase:       Failed") && text.contains("Exit Code: 3"),
        "{text}"
    );

    for name in ["noimage", "exits", "hog", "flaky"] {
        assert!(
            controller
                .cli(&["delete", "workload", name])
                .status
                .success()
        );
    }
    wait_for("the pods to go", T, &logs, || {
        controller.json(&["get", "pods", "-o", "json"])["items"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    wait_for("the cgroups to be removed", T, &logs, || {
        container_cgroups(&node).is_empty().then_some(())
    });
}

#[test]
fn runs_through_an_external_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let mosquitto = Mosquitto::start(dir.path());
    let controller = Controller::start(dir.path(), Broker::External(mosquitto.port));
    let node = unique_node("mosq");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start(dir.path(), &node, &controller.broker_url(), &[]);
    let logs = [
        controller.proc.log.as_path(),
        agent.proc.log.as_path(),
        mosquitto.proc.log.as_path(),
    ];

    let out = controller.apply(
        dir.path(),
        &workload("web", &image, "", "exec sleep 3602", "Always"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("web to run via mosquitto", T, &logs, || {
        let pod = controller.pod(&format!("web@{node}"))?;
        (pod["phase"] == "Running").then_some(())
    });
    controller.delete_and_wait_gone(&["web"], &node, &logs);
}

#[test]
fn controller_restart_republishes_and_restarts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let mqtt_port = free_port();
    let mut controller = Controller::start(dir.path(), Broker::Embedded(mqtt_port));
    let api_port = controller.api_port();
    let node = unique_node("restart");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start(dir.path(), &node, &controller.broker_url(), &[]);

    let out = controller.apply(
        dir.path(),
        &workload("web", &image, "", "exec sleep 3603", "Always"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod_name = format!("web@{node}");
    let before = wait_for("web to run", T, &logs(&controller, &agent), || {
        let pod = controller.pod(&pod_name)?;
        (pod["phase"] == "Running").then_some(pod)
    });

    // The controller dies with its embedded broker: every retained message is gone.
    controller.proc.kill();
    let controller = Controller::start_on(dir.path(), Broker::Embedded(mqtt_port), api_port);
    let logs = logs(&controller, &agent);
    let after = wait_for("the node to report again", T, &logs, || {
        let n = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
        let pod = controller.pod(&pod_name)?;
        (n["status"] == "Ready" && pod["phase"] == "Running").then_some(pod)
    });
    assert_eq!(
        container(&after)["startedAtMs"],
        container(&before)["startedAtMs"],
        "the container was restarted"
    );
    assert_eq!(container(&after)["restarts"], 0);
    assert_eq!(
        after["desiredGeneration"], before["desiredGeneration"],
        "the store kept the generation"
    );

    controller.delete_and_wait_gone(&["web"], &node, &logs);
}
