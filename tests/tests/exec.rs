#![allow(clippy::unwrap_used, clippy::expect_used)]

//! `flotilla exec` end to end with real processes: a command run in a real
//! busybox container through the controller, MQTT and the agent prints its
//! stdout and stderr and passes its exit code on; it runs under the
//! container's seccomp filter and capabilities; a command missing from the
//! image is a clear error; output past the cap is cut and says how much; a
//! timeout kills the command (gone from the container's cgroup); a viewer
//! token is refused before anything reaches the agent; the controller logs
//! who ran what, never the output. Then an MQTT client with every right
//! publishes exec requests straight to the device: unsigned, tampered and
//! replayed requests are refused and nothing runs.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use flotilla_proto::{
    ExecRequest, RpcCall, RpcRequest, SIGNATURE_LEN, Signature, SignedExec, decode, encode,
};
use rumqttc::{Event, Packet, QoS};

const T: Duration = Duration::from_secs(90);

fn workload(name: &str, image: &str, node: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  \
         nodeSelector: {{node: {node}}}\n  terminationGracePeriodSeconds: 1\n  containers:\n  \
         - name: main\n    image: {image}\n    command: [sh, -c, 'exec sleep 3600']\n"
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `flotilla exec POD [extra] -- argv` against `c`.
fn exec(c: &Controller, pod: &str, extra: &[&str], argv: &[&str]) -> Output {
    c.cli_command()
        .arg("exec")
        .arg(pod)
        .args(extra)
        .arg("--")
        .args(argv)
        .output()
        .unwrap()
}

/// The command lines of the processes in the node's container cgroups.
fn commands(node: &str) -> Vec<String> {
    container_cgroups(node)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|pid| std::fs::read(format!("/proc/{}/cmdline", pid.trim())).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

fn start(d: &Path, prefix: &str) -> (Controller, Agent, String, String) {
    let image = busybox_image(d);
    let controller = Controller::start(d, Broker::Embedded(free_port()));
    let node = unique_node(prefix);
    let agent = Agent::start(
        d,
        &node,
        &controller.broker_url(),
        &[&format!("node={node}")],
    );
    let out = controller.apply(d, &workload("shell", &image, &node));
    assert!(out.status.success(), "{}", stderr(&out));
    let pod = format!("shell@{node}");
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    wait_for("the pod to run", T, &logs, || {
        controller
            .pod(&pod)
            .filter(|p| p["phase"] == "Running")
            .map(|_| ())
    });
    (controller, agent, node, pod)
}

/// `flotilla exec POD --timeout TIMEOUT -- sleep SECONDS`, started in the
/// background and returned once the `sleep` runs in the node's containers.
fn sleeping(
    c: &Controller,
    pod: &str,
    timeout: &str,
    seconds: &str,
    node: &str,
    logs: &[&Path],
) -> std::process::Child {
    let child = c
        .cli_command()
        .args(["exec", pod, "--timeout", timeout, "--", "sleep", seconds])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let running = format!("sleep {seconds}");
    wait_for(
        &format!("{running} to run in the container"),
        T,
        logs,
        || {
            commands(node)
                .iter()
                .any(|c| c.starts_with(&running))
                .then_some(())
        },
    );
    child
}

fn count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[test]
fn exec_runs_commands_in_a_container_and_passes_their_exit_codes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (controller, mut agent, node, pod) = start(d, "exec");
    let _cleanup = Cleanup(node.clone());
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];

    // stdout to stdout, stderr to stderr, the exit code passed on.
    let out = exec(
        &controller,
        &pod,
        &[],
        &["sh", "-c", "echo out-7f3a; echo err-7f3a >&2; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out-7f3a\n");
    assert_eq!(stderr(&out), "err-7f3a\n");
    let out = exec(&controller, &pod, &["-c", "main"], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Inside the container, confined as its own process is: the same
    // seccomp mode and capabilities as its init (pid 1 there).
    let out = exec(
        &controller,
        &pod,
        &[],
        &[
            "sh",
            "-c",
            "grep -E '^(Seccomp|CapEff):' /proc/self/status; grep -E '^(Seccomp|CapEff):' /proc/1/status",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[..2], lines[2..], "exec'd and init differ: {lines:?}");
    assert!(lines.contains(&"Seccomp:\t2"), "{lines:?}");
    assert!(!lines.contains(&"CapEff:\t000001ffffffffff"), "{lines:?}");

    // A command the image lacks: a clear error.
    let out = exec(&controller, &pod, &[], &["no-such-tool", "-x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "error: node {node}: command \"no-such-tool\" not found in container main of pod shell (not in the image's $PATH)"
        )),
        "{}",
        stderr(&out)
    );
    // An unknown pod and an unknown container.
    let out = exec(&controller, &format!("nope@{node}"), &[], &["true"]);
    assert!(
        stderr(&out).contains(&format!("pod \"nope@{node}\" not found")),
        "{}",
        stderr(&out)
    );
    let out = exec(&controller, &pod, &["-c", "side"], &["true"]);
    assert!(
        stderr(&out).contains("container \"side\" not found in pod"),
        "{}",
        stderr(&out)
    );

    // Output past 64 KiB is cut, and the cut said.
    let out = exec(
        &controller,
        &pod,
        &[],
        &["sh", "-c", "yes abcdefghi | head -c 100000"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 65536);
    assert!(out.stdout.starts_with(b"abcdefghi\nabcdefghi\n"));
    assert!(
        stderr(&out).contains("stdout truncated: 34464 more bytes were cut"),
        "{}",
        stderr(&out)
    );

    // A timeout kills the command: it was in the container's cgroup, and
    // is gone from it once exec returns.
    let t0 = Instant::now();
    let slow = sleeping(&controller, &pod, "2s", "600", &node, &logs);
    let out = slow.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the command did not finish within 2s and was killed"),
        "{}",
        stderr(&out)
    );
    assert!(t0.elapsed() >= Duration::from_secs(2));
    let left = commands(&node);
    assert!(
        !left.iter().any(|c| c.starts_with("sleep 600")),
        "still running: {left:?}"
    );
    assert!(
        left.iter().any(|c| c.starts_with("sleep 3600")),
        "the container itself must still run: {left:?}"
    );

    // A viewer may not: refused by the API, nothing reaches the agent.
    let out = controller.cli(&["api-token", "create", "--role", "viewer", "--name", "look"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let viewer = stdout(&out).trim().to_owned();
    let before = count(&agent.proc.log, "flotilla_agent::exec");
    let out = controller
        .cli_command()
        .env("FLOTILLA_TOKEN", &viewer)
        .args(["exec", &pod, "--", "touch", "/tmp/viewer-was-here"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "POST /v1/pods/{name}/exec needs the operator role; api token \"look\" is viewer"
        ),
        "{}",
        stderr(&out)
    );
    // The next exec's two lines (run, finished) are the only new ones.
    let out = exec(
        &controller,
        &pod,
        &[],
        &["test", "-e", "/tmp/viewer-was-here"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(count(&agent.proc.log, "flotilla_agent::exec") - before, 2);

    // The audit trail: token, pod, container and command name; no output.
    let audit = std::fs::read_to_string(&controller.proc.log).unwrap();
    let line = audit
        .lines()
        .find(|l| l.contains(" exec ") && l.contains("command=no-such-tool"))
        .unwrap_or_else(|| panic!("no audit line in:\n{audit}"));
    assert!(
        line.contains("token=admin") && line.contains(&format!("pod={pod}")),
        "{line}"
    );
    assert!(line.contains("container=main"), "{line}");
    assert!(!line.contains("-x"), "arguments are not logged: {line}");
    for log in [&controller.proc.log, &agent.proc.log] {
        assert_eq!(count(log, "out-7f3a"), 0, "output in {}", log.display());
    }

    // A stopping agent does not wait for a running command's own timeout
    // (5 min here): it exits well before the harness's 15 s SIGKILL.
    let mut long = sleeping(&controller, &pod, "300s", "601", &node, &logs);
    let stopping = Instant::now();
    agent.proc.stop();
    let took = stopping.elapsed();
    let _ = long.kill();
    let _ = long.wait();
    assert!(
        took < Duration::from_secs(12),
        "the agent took {took:?} to stop with a command running"
    );
}

#[test]
fn exec_requests_published_straight_to_the_broker_run_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (controller, agent, node, pod) = start(d, "exec-trust");
    let _cleanup = Cleanup(node.clone());
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    let port = controller.mqtt_port;
    let topic = format!("flotilla/v1/node/{node}/rpc/req");

    // A genuine request, captured on its way as the broker sees it.
    let (listener, mut connection) = admin_client(port);
    listener.subscribe(&topic, QoS::AtLeastOnce).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(None);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Some(p.payload.to_vec()));
                    return;
                }
                Err(_) => return,
                _ => {}
            }
        }
    });
    assert_eq!(rx.recv_timeout(T).unwrap(), None, "not subscribed");
    let out = exec(
        &controller,
        &pod,
        &[],
        &["sh", "-c", "echo ran >> /tmp/runs; wc -l < /tmp/runs"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "1");
    let captured = rx.recv_timeout(T).unwrap().unwrap();
    let genuine = decode::<RpcRequest>(&captured).unwrap();
    let RpcCall::Exec(signed) = genuine.call.clone() else {
        panic!("not an exec request: {genuine:?}");
    };
    let request = decode::<ExecRequest>(&signed.payload).unwrap();
    assert_eq!(request.node, node);
    assert_eq!(request.argv[0], "sh");

    // What a broker (or anyone publishing there) could send.
    let mut evil = request.clone();
    evil.argv = vec!["touch".into(), "/tmp/pwned".into()];
    evil.nonce = [0x5a; 16];
    let frame = |id: u64, payload: Vec<u8>, signature: Signature| {
        encode(&RpcRequest {
            id,
            call: RpcCall::Exec(SignedExec { payload, signature }),
        })
        .unwrap()
    };
    let before = count(&agent.proc.log, "refused exec request");
    // Unsigned.
    publish(
        port,
        &topic,
        frame(1, encode(&evil).unwrap(), Signature([0; SIGNATURE_LEN])),
    );
    // The genuine signature over another command.
    publish(
        port,
        &topic,
        frame(2, encode(&evil).unwrap(), signed.signature),
    );
    // The genuine request again, as it was (and under another id).
    publish(port, &topic, captured.clone());
    publish(
        port,
        &topic,
        frame(3, signed.payload.clone(), signed.signature),
    );
    wait_for("the agent to refuse four requests", T, &logs, || {
        (count(&agent.proc.log, "refused exec request") - before >= 4).then_some(())
    });
    let text = std::fs::read_to_string(&agent.proc.log).unwrap();
    assert_eq!(text.matches("bad signature").count(), 2, "{text}");
    assert_eq!(text.matches("already seen (a replay)").count(), 2, "{text}");

    // Nothing ran: no file, and the genuine command ran once.
    let out = exec(
        &controller,
        &pod,
        &[],
        &["sh", "-c", "ls /tmp; cat /tmp/runs"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "runs\nran\n");
    assert!(agent_running(&agent));
}

fn agent_running(agent: &Agent) -> bool {
    let pid = nix::unistd::Pid::from_raw(agent.proc.child.id() as i32);
    nix::sys::signal::kill(pid, None).is_ok()
}
