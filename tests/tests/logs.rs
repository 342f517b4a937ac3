#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Container logs and node health, end to end with real processes: a real
//! container's output rotated at a small cap without losing a line,
//! `flotilla logs` (tail, -c, -f) fetched from the device over MQTT, clear
//! errors for unknown pods and containers and for an offline or silent
//! node, a bad rpc payload refused without harm, health in `get nodes`, and
//! a node marked NotReady by its last will after missed keepalives and by
//! the controller's own timeout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
/// The agents' log cap in these tests, and the rotated files they keep.
const CAP: u64 = 64 * 1024;
const KEPT: u64 = 2;

fn busybox_image(dir: &Path) -> String {
    let layout = dir.join("busybox-layout");
    flotilla_testkit::oci::busybox()
        .write_layout(&layout, "latest")
        .unwrap();
    format!("oci:{}:latest", layout.display())
}

/// A workload of `containers` (name, shell script), on the node `node`.
fn workload(name: &str, image: &str, node: &str, containers: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  \
         nodeSelector: {{node: {node}}}\n  containers:\n"
    );
    for (c, script) in containers {
        text.push_str(&format!(
            "  - name: {c}\n    image: {image}\n    command: [sh, -c, '{script}']\n"
        ));
    }
    text
}

/// Starts an agent with extra flags (the shared harness has none).
fn start_agent(dir: &Path, node: &str, broker: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("flotilla-agent"));
    cmd.arg("--broker")
        .arg(broker)
        .arg("--node")
        .arg(node)
        .arg("--label")
        .arg(format!("node={node}"))
        .arg("--data-dir")
        .arg(dir.join(format!("agent-{node}")))
        .arg("--run-dir")
        .arg(dir.join(format!("run-{node}")))
        .args(common::trust_args(dir))
        .args(extra)
        .env("FLOTILLA_LOG", "debug");
    Proc::spawn(&mut cmd, dir.join(format!("agent-{node}.log")))
}

fn agent_data(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("agent-{node}"))
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The numbers of lines `{prefix} N`, in order.
fn numbers(text: &str, prefix: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix)?.split(' ').next()?.parse().ok())
        .collect()
}

fn node_json(c: &Controller, node: &str) -> Option<Value> {
    c.try_json(&["get", "nodes", node, "-o", "json"])
}

fn wait_status(c: &Controller, node: &str, status: &str, logs: &[&Path]) -> Value {
    wait_for(&format!("node {node} to be {status}"), T, logs, || {
        node_json(c, node).filter(|n| n["status"] == status)
    })
}

/// Kills leftovers even when an assertion failed half-way.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        kill_node_containers(&self.0);
    }
}

/// Publishes one QoS 0 message with a bare MQTT 3.1.1 client: the tests
/// crate has no MQTT library, and a hostile publisher needs no more.
fn mqtt_publish(port: u16, topic: &str, payload: &[u8]) {
    fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                break;
            }
        }
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let client_id = unique_node("hostile");
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    s.write_all(&packet).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(
        connack,
        [0x20, 2, 0, 0],
        "the broker refused the connection"
    );
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    let mut packet = vec![0x30];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    packet.extend_from_slice(&[0xe0, 0]);
    s.write_all(&packet).unwrap();
}

#[test]
fn logs_are_rotated_and_fetched_with_tail_container_and_follow() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = busybox_image(d);
    let controller = Controller::start(d, Broker::Embedded(free_port()));
    let node = unique_node("logs");
    let _cleanup = Cleanup(node.clone());
    let mut agent = start_agent(
        d,
        &node,
        &controller.broker_url(),
        &["--log-max-size", "64Ki", "--log-kept-files", "2"],
    );
    let agent_log = agent.log.clone();
    let logs = [controller.proc.log.as_path(), agent_log.as_path()];
    let logs = &logs[..];
    wait_status(&controller, &node, "Ready", logs);

    // `chatty` writes ~30 KB/s at most (50 lines, then at least 0.1 s of
    // sleep); `two` has a fast and a slow container.
    let chatty = "i=0; while true; do echo \"chatty $i ........................................\"; \
                  i=$((i+1)); if [ $((i % 50)) = 0 ]; then sleep 0.1; fi; done";
    let out = controller.apply(
        d,
        &format!(
            "{}---\n{}",
            workload("chatty", &image, &node, &[("main", chatty)]),
            workload(
                "two",
                &image,
                &node,
                &[
                    (
                        "a",
                        "i=0; while true; do echo \"a $i\"; i=$((i+1)); sleep 0.2; done"
                    ),
                    (
                        "b",
                        "for i in 1 2 3 4 5 6 7 8 9 10; do echo \"b $i\"; done; exec sleep 3600"
                    ),
                ]
            )
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let chatty_pod = format!("chatty@{node}");
    let two_pod = format!("two@{node}");
    wait_for("both pods to run", T, logs, || {
        let a = controller.pod(&chatty_pod)?;
        let b = controller.pod(&two_pod)?;
        (a["phase"] == "Running" && b["phase"] == "Running").then_some(())
    });

    // -c picks a container; --tail counts lines from the end.
    let b = wait_for("b's ten lines", T, logs, || {
        let out = controller.cli(&["logs", &two_pod, "-c", "b"]);
        (out.status.success() && numbers(&stdout(&out), "b ").len() == 10).then(|| stdout(&out))
    });
    assert_eq!(numbers(&b, "b "), (1..=10).collect::<Vec<_>>());
    let out = controller.cli(&["logs", &two_pod, "-c", "b", "--tail", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "b 8\nb 9\nb 10\n");

    // Clear errors: several containers and none chosen, an unknown
    // container, an unknown pod.
    let out = controller.cli(&["logs", &two_pod]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "pod {two_pod} has 2 containers (a, b): choose one with -c"
        )),
        "{}",
        stderr(&out)
    );
    let out = controller.cli(&["logs", &two_pod, "-c", "nope"]);
    assert!(
        stderr(&out).contains(&format!(
            "container \"nope\" not found in pod {two_pod} (its containers: a, b)"
        )),
        "{}",
        stderr(&out)
    );
    let out = controller.cli(&["logs", &format!("nope@{node}")]);
    assert!(
        stderr(&out).contains(&format!("pod \"nope@{node}\" not found")),
        "{}",
        stderr(&out)
    );

    // -f prints what the container writes after it started following.
    let follow_out = d.join("follow.out");
    let mut follow = Proc::spawn(
        controller
            .cli_command()
            .args(["logs", "-f", "--tail", "1", &two_pod, "-c", "a"]),
        follow_out.clone(),
    );
    let first = wait_for("logs -f to print a line", T, logs, || {
        let text = std::fs::read_to_string(&follow_out).ok()?;
        numbers(&text, "a ").first().copied()
    });
    let followed = wait_for("logs -f to print ten new lines", T, logs, || {
        let text = std::fs::read_to_string(&follow_out).ok()?;
        let n = numbers(&text, "a ");
        (n.len() >= 11).then_some(n)
    });
    follow.kill();
    assert_eq!(
        followed[..11],
        (first..first + 11).collect::<Vec<_>>(),
        "-f skipped or repeated lines"
    );

    // Rotation at the cap: the live file and two rotated ones, each
    // rotated file within the cap, the whole within the cap times three
    // plus what the container writes in the one second between checks.
    let pod_dir = agent_data(d, &node).join("logs").join("chatty");
    let bound = (1 + KEPT) * CAP + 32 * 1024;
    let mut max_seen = 0;
    wait_for("three rotations of chatty's log", T, logs, || {
        let mut total = 0;
        let mut newest = 0;
        for e in std::fs::read_dir(&pod_dir).ok()?.flatten() {
            let len = e.metadata().ok()?.len();
            total += len;
            let name = e.file_name().into_string().ok()?;
            if name != "main.log" {
                assert!(len <= CAP, "{name}: {len} bytes, over the cap");
            }
            if let Some(g) = name.strip_prefix("main.log.") {
                newest = newest.max(g.parse().unwrap_or(0));
            }
        }
        max_seen = max_seen.max(total);
        assert!(total <= bound, "{total} bytes of logs, over {bound}");
        (newest >= 3).then_some(())
    });
    let files: Vec<String> = std::fs::read_dir(&pod_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".tmp"))
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
    // Everything kept comes back in order, with no line lost or doubled
    // across the rotations (ext4 collapses the head in place).
    let out = controller.cli(&["logs", &chatty_pod]);
    assert!(out.status.success(), "{}", stderr(&out));
    let n = numbers(&stdout(&out), "chatty ");
    assert!(
        n.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap or a repeat in {} lines",
        n.len()
    );
    assert!(
        stdout(&out).len() as u64 > 2 * CAP,
        "only {} bytes kept",
        stdout(&out).len()
    );
    eprintln!(
        "logs: {} lines fetched, {} bytes on disk at most (bound {bound})",
        n.len(),
        max_seen
    );

    // Health: plausible values, the same boot id as this machine's.
    let nj = node_json(&controller, &node).unwrap();
    let h = &nj["health"];
    let mem = h["memoryAvailableBytes"].as_u64().unwrap();
    assert!(
        mem > 0 && mem <= nj["memoryBytes"].as_u64().unwrap(),
        "{nj}"
    );
    let free = h["diskFreeBytes"].as_u64().unwrap();
    assert!(
        free > 0 && free <= h["diskTotalBytes"].as_u64().unwrap(),
        "{nj}"
    );
    assert!(h["uptimeSecs"].as_u64().unwrap() > 0, "{nj}");
    assert!(h["load"].as_f64().unwrap() >= 0.0, "{nj}");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(nj["bootId"], boot_id.trim());
    let out = controller.cli(&["get", "nodes", "-o", "wide"]);
    let wide = stdout(&out);
    assert!(wide.contains("DISK-FREE") && wide.contains(boot_id.split('-').next().unwrap()));
    let out = controller.cli(&["describe", "node", &node]);
    assert!(
        stdout(&out).contains("memory available,"),
        "{}",
        stdout(&out)
    );

    // A bad rpc payload is refused; the agent goes on answering.
    let topic = format!("flotilla/v1/node/{node}/rpc/req");
    mqtt_publish(
        controller.mqtt_port,
        &topic,
        b"\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    );
    mqtt_publish(controller.mqtt_port, &topic, &[1, 42, 9, 9]);
    mqtt_publish(controller.mqtt_port, &topic, &[]);
    wait_for("the agent to refuse the bad requests", T, logs, || {
        let text = std::fs::read_to_string(&agent_log).ok()?;
        (text.matches("refused an rpc request").count() >= 3).then_some(())
    });
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent died");
    let out = controller.cli(&["logs", &two_pod, "-c", "b", "--tail", "1"]);
    assert_eq!(stdout(&out), "b 10\n", "{}", stderr(&out));

    // An offline node: a clear error, at once.
    agent.kill();
    wait_status(&controller, &node, "NotReady", logs);
    let t0 = Instant::now();
    let out = controller.cli(&["logs", &chatty_pod]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("node {node} is offline (last seen")),
        "{}",
        stderr(&out)
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

#[test]
fn missed_keepalives_make_a_node_not_ready_and_a_silent_agent_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let controller = Controller::start(d, Broker::Embedded(free_port()));
    let node = unique_node("ka");
    let mut agent = start_agent(
        d,
        &node,
        &controller.broker_url(),
        &["--runtime", "fake", "--keepalive", "6s"],
    );
    let logs = [controller.proc.log.as_path(), agent.log.as_path()];
    let logs = &logs[..];
    wait_status(&controller, &node, "Ready", logs);
    let out = controller.apply(
        d,
        &workload("quiet", "oci:/nonexistent", &node, &[("main", "true")]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let pod = format!("quiet@{node}");
    wait_for("the pod to be reported", T, logs, || {
        controller.pod(&pod).filter(|p| p["podGeneration"].is_u64())
    });
    let out = controller.cli(&["logs", &pod]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A frozen agent keeps its TCP connection open but sends no keepalive:
    // a request gets no answer, and the broker's will marks the node
    // NotReady within 1.5 keepalives (9 s for 6 s).
    let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let silent = controller
        .cli_command()
        .args(["logs", &pod])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_status(&controller, &node, "NotReady", logs);
    let took = stopped.elapsed();
    let answer = silent.wait_with_output().unwrap();
    let asked_for = stopped.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        took < Duration::from_secs(9) + Duration::from_millis(1500),
        "NotReady after {took:?}"
    );
    assert!(!answer.status.success());
    assert!(
        stderr(&answer).contains(&format!("node {node} did not answer within 10 s")),
        "{}",
        stderr(&answer)
    );
    assert!(asked_for >= Duration::from_secs(10), "{asked_for:?}");
    let out = controller.cli(&["logs", &pod]);
    assert!(stderr(&out).contains("is offline"), "{}", stderr(&out));

    // Thawed, it reconnects and answers again.
    wait_status(&controller, &node, "Ready", logs);
    let out = controller.cli(&["logs", &pod]);
    assert!(out.status.success(), "{}", stderr(&out));
    agent.stop();
}

#[test]
fn a_node_not_heard_from_for_the_node_timeout_is_not_ready_until_it_speaks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let api_port = free_port();
    let mqtt_port = free_port();
    let mut cmd = Command::new(bin("flotilla"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(d.join("controller"))
        .arg("--api-listen")
        .arg(format!("127.0.0.1:{api_port}"))
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{mqtt_port}"))
        .args(["--node-timeout", "3s", "--allow-anonymous"])
        .env("FLOTILLA_LOG", "debug,rmqtt=warn,rmqtt_net=warn,redb=warn");
    let controller_proc = Proc::spawn(&mut cmd, d.join("controller.log"));
    let api = format!("https://127.0.0.1:{api_port}");
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(bin("flotilla"));
        api_env(&mut cmd, &api, &d.join("controller"));
        cmd.args(args).output().unwrap()
    };
    // The agent pins the controller's key, written before the API answers.
    wait_for(
        "the controller's API",
        T,
        &[controller_proc.log.as_path()],
        || cli(&["get", "nodes"]).status.success().then_some(()),
    );
    let node = unique_node("quiet");
    // The agent resyncs every 30 minutes: between changes it is silent.
    let mut agent = start_agent(
        d,
        &node,
        &format!("mqtt://127.0.0.1:{mqtt_port}"),
        &["--runtime", "fake"],
    );
    let logs = [controller_proc.log.as_path(), agent.log.as_path()];
    let logs = &logs[..];
    let node_status = || {
        let out = cli(&["get", "nodes", &node, "-o", "json"]);
        serde_json::from_slice::<Value>(&out.stdout).ok()
    };
    wait_for("the node to be Ready", T, logs, || {
        node_status().filter(|n| n["status"] == "Ready")
    });
    let n = wait_for(
        "the node to be NotReady after 3 s of silence",
        T,
        logs,
        || node_status().filter(|n| n["status"] == "NotReady"),
    );
    assert_eq!(n["statusReason"], "NoContact");
    let out = cli(&["describe", "node", &node]);
    assert!(
        stdout(&out).contains("NotReady (NoContact)"),
        "{}",
        stdout(&out)
    );

    // A change makes the agent speak: Ready again.
    let file = d.join("w.yaml");
    std::fs::write(
        &file,
        workload("w", "oci:/nonexistent", &node, &[("main", "true")]),
    )
    .unwrap();
    let out = cli(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the node to be Ready again", T, logs, || {
        node_status().filter(|n| n["status"] == "Ready")
    });
    agent.stop();
}
