#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The simulated fleet on a small scale, so the path cannot rot: 200 real
//! agent state machines (fake runtime) against a real `flotilla serve`
//! converge on two applies, a workload for one site is published to that
//! site's nodes only, and all come back after a broker restart. It
//! asserts correctness, not timings; the figures are for `bench/swarm`.

mod common;

use std::process::Command;

use common::bin;

fn swarm(broker: &str) {
    let out = Command::new(bin("flotilla-swarm"))
        .args(["--nodes", "200", "--batch", "100", "--sample", "20"])
        .args([
            "--idle-secs",
            "2",
            "--timeout-secs",
            "90",
            "--broker",
            broker,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "swarm failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("connect and register: 200 agents"),
        "{stdout}"
    );
    assert!(stdout.contains("apply round 2: all 200 nodes"), "{stdout}");
    // Only the nodes whose desired state changed are published to: a
    // workload for one site of 50 reaches its 4 nodes, once each.
    assert!(
        stdout.contains(
            "targeted apply (a workload for site shop0): 4 desired states published, \
             one to each of its 4 nodes, none to the others"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("broker restart: all 200 agents reconnected"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAILED"), "{stdout}");
}

#[test]
fn two_hundred_agents_converge_with_the_embedded_broker() {
    swarm("embedded");
}

#[test]
fn two_hundred_agents_converge_through_mosquitto() {
    swarm("mosquitto");
}
