#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The agent's promises, with real processes and containers: a device that
//! reboots with no network runs its last workloads; an agent killed at any
//! point comes back with exactly the desired containers and nothing leaked;
//! a link cut heals without restarting a healthy pod.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn sleeper(name: &str, image: &str, seconds: u32) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  \
         - name: main\n    image: {image}\n    command: [sleep, '{seconds}']\n"
    )
}

/// Pids in each of `node`'s container memory cgroups, by container id.
fn container_pids(node: &str) -> Vec<(String, Vec<u32>)> {
    container_cgroups(node)
        .into_iter()
        .filter(|p| p.starts_with("/sys/fs/cgroup/memory"))
        .map(|p| {
            let id = p.file_name().unwrap().to_string_lossy().to_string();
            let pids = std::fs::read_to_string(p.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            (id, pids)
        })
        .collect()
}

fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
        .trim()
        .to_string()
}

/// Unmounts what a reboot would: every mount under `dir`.
fn unmount_under(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_string_lossy().to_string();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_device_rebooted_offline_runs_its_last_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let mqtt_port = free_port();
    let mut controller = Controller::start(dir.path(), Broker::Embedded(mqtt_port));
    let api_port = controller.api_port();
    let node = unique_node("reboot");
    let _cleanup = Cleanup(node.clone());
    let mut agent = Agent::start(dir.path(), &node, &controller.broker_url(), &[]);
    let out = controller.apply(dir.path(), &sleeper("keep", &image, 3605));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    wait_for("keep to run", T, &logs, || {
        let pod = controller.pod(&format!("keep@{node}"))?;
        (pod["phase"] == "Running").then_some(())
    });

    // Power cut: the controller (and its broker) stays down; the agent and
    // every container die; what lived in /run and in mounts is gone.
    controller.proc.kill();
    agent.proc.kill();
    kill_node_containers(&node);
    wait_for("the containers to die", T, &[], || {
        container_pids(&node)
            .iter()
            .all(|(_, pids)| pids.is_empty())
            .then_some(())
    });
    unmount_under(&agent.data_dir);
    std::fs::remove_dir_all(&agent.run_dir).unwrap();

    // The device boots with no network: the agent runs what it was told last.
    let agent = Agent::start(dir.path(), &node, &controller.broker_url(), &[]);
    let logs = [agent.proc.log.as_path()];
    wait_for("the workload to run again, offline", T, &logs, || {
        let running = container_pids(&node);
        (running.len() == 1 && running[0].1.len() == 1 && cmdline(running[0].1[0]) == "sleep 3605")
            .then_some(())
    });

    // The network comes back: the controller sees the pod running.
    let controller = Controller::start_on(dir.path(), Broker::Embedded(mqtt_port), api_port);
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    wait_for("the controller to see it", T, &logs, || {
        let pod = controller.pod(&format!("keep@{node}"))?;
        (pod["phase"] == "Running" && pod["nodeStatus"] == "Ready").then_some(())
    });
    assert_eq!(container_pids(&node).len(), 1, "a duplicate container");
    controller.delete_and_wait_gone(&["keep"], &node, &logs);
}

/// A small deterministic generator: the kill points vary, the test repeats.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[test]
fn fifty_sigkills_leave_exactly_the_desired_containers() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("kill");
    let _cleanup = Cleanup(node.clone());
    let stable = format!(
        "{}---\n{}",
        sleeper("a", &image, 3606),
        sleeper("b", &image, 3607)
    );
    assert!(controller.apply(dir.path(), &stable).status.success());

    let mut rng = Lcg(0x5eed);
    let mut last_changed = 0;
    for round in 0..50 {
        // Every few rounds the third workload changes, so kills land while
        // containers are being replaced, not only while idle.
        if round % 5 == 0 {
            last_changed = 3700 + round;
            let out = controller.apply(dir.path(), &sleeper("c", &image, last_changed));
            assert!(out.status.success());
        }
        let mut agent = Agent::start(dir.path(), &node, &controller.broker_url(), &[]);
        std::thread::sleep(Duration::from_millis(100 + rng.next(1400)));
        agent.proc.kill();
    }

    let agent = Agent::start(dir.path(), &node, &controller.broker_url(), &[]);
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    wait_for(
        "the node to converge",
        Duration::from_secs(120),
        &logs,
        || {
            let node_json = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
            let synced = node_json["observedGeneration"] == node_json["desiredGeneration"];
            let pods = controller.json(&["get", "pods", "-o", "json"]);
            let running = pods["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p: &&Value| p["node"] == node && p["phase"] == "Running")
                .count();
            let cgroups = container_pids(&node);
            let one_each = cgroups.iter().all(|(_, pids)| pids.len() == 1);
            (synced && running == 3 && cgroups.len() == 3 && one_each).then_some(())
        },
    );

    // Exactly the desired processes, one each, and no cgroup of anything else
    // in any hierarchy.
    let mut commands: Vec<String> = container_pids(&node)
        .iter()
        .map(|(_, pids)| cmdline(pids[0]))
        .collect();
    commands.sort();
    assert_eq!(
        commands,
        [
            "sleep 3606".to_string(),
            "sleep 3607".to_string(),
            format!("sleep {last_changed}")
        ]
    );
    let ids: std::collections::BTreeSet<String> = container_cgroups(&node)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "leaked cgroups: {ids:?}");
    // The state file is whole and holds the newest generation.
    let frame = std::fs::read(agent.data_dir.join("state/desired.bin")).unwrap();
    let desired: flotilla_proto::DesiredState = flotilla_proto::decode(&frame).unwrap();
    assert_eq!(desired.pods.len(), 3);

    controller.delete_and_wait_gone(&["a", "b", "c"], &node, &logs);
}

/// Two network namespaces joined by a veth pair: the controller's and the
/// device's. The host's own network is not touched.
struct Link {
    ctl: String,
    dev: String,
    dev_if: String,
}

impl Link {
    const CTL_IP: &'static str = "10.99.0.1";
    const DEV_IP: &'static str = "10.99.0.2";

    fn new() -> Link {
        let tag = std::process::id() % 100_000;
        let link = Link {
            ctl: format!("fl{tag}c"),
            dev: format!("fl{tag}d"),
            dev_if: format!("v{tag}d"),
        };
        let ctl_if = format!("v{tag}c");
        ip(&["netns", "add", &link.ctl]);
        ip(&["netns", "add", &link.dev]);
        ip(&[
            "-n",
            &link.ctl,
            "link",
            "add",
            &ctl_if,
            "type",
            "veth",
            "peer",
            "name",
            &link.dev_if,
            "netns",
            &link.dev,
        ]);
        ip(&[
            "-n",
            &link.ctl,
            "addr",
            "add",
            &format!("{}/30", Self::CTL_IP),
            "dev",
            &ctl_if,
        ]);
        ip(&[
            "-n",
            &link.dev,
            "addr",
            "add",
            &format!("{}/30", Self::DEV_IP),
            "dev",
            &link.dev_if,
        ]);
        for (ns, dev) in [(&link.ctl, &ctl_if), (&link.dev, &link.dev_if)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        link
    }

    fn set(&self, up: bool) {
        ip(&[
            "-n",
            &self.dev,
            "link",
            "set",
            &self.dev_if,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ctl])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.dev])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_link_cut_for_a_minute_restarts_no_healthy_pod() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let link = Link::new();
    let controller = Controller::start_at(
        dir.path(),
        Broker::Embedded(free_port()),
        free_port(),
        Some(&link.ctl),
        Link::CTL_IP,
    );
    let node = unique_node("link");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start_in(
        dir.path(),
        &node,
        &controller.broker_url(),
        &[],
        Some(&link.dev),
    );
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    assert!(
        controller
            .apply(dir.path(), &sleeper("steady", &image, 3608))
            .status
            .success()
    );
    let pod = format!("steady@{node}");
    let before = wait_for("steady to run", T, &logs, || {
        let p = controller.pod(&pod)?;
        (p["phase"] == "Running").then_some(p)
    });

    // Cut the device off for a minute. The broker's keepalive check fires
    // the agent's last will (within 1.5 × the 30 s keepalive), and the
    // controller keeps publishing a change the device cannot hear yet.
    link.set(false);
    let cut = Instant::now();
    assert!(
        controller
            .apply(dir.path(), &sleeper("late", &image, 3609))
            .status
            .success()
    );
    wait_for(
        "the node to be marked NotReady",
        Duration::from_secs(58),
        &logs,
        || {
            let n = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
            (n["status"] == "NotReady").then_some(())
        },
    );
    while cut.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    link.set(true);

    wait_for(
        "the device to catch up",
        Duration::from_secs(90),
        &logs,
        || {
            let late = controller.pod(&format!("late@{node}"))?;
            let n = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
            (late["phase"] == "Running" && n["status"] == "Ready").then_some(())
        },
    );
    let after = controller.pod(&pod).unwrap();
    assert_eq!(after["phase"], "Running");
    assert_eq!(
        after["containers"][0]["startedAtMs"], before["containers"][0]["startedAtMs"],
        "the healthy pod was restarted"
    );
    assert_eq!(after["containers"][0]["restarts"], 0);

    controller.delete_and_wait_gone(&["steady", "late"], &node, &logs);
}
