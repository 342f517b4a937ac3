#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The proof on ARM: the emulated aarch64 machine of
//! `flotilla_testkit::machine` (qemu-system-aarch64, TCG, Debian's arm64
//! kernel with pure cgroup v2, an initramfs built here) runs the cross-built
//! static agent, which connects to a controller on this host and runs a real
//! container with its limits in force — memory.max, cpu.max and pids.max
//! read back inside the machine, a block device refused by the agent's
//! device program (cgroup v2 has no devices controller), and a second
//! container over its memory limit OOM-killed — and both are reported back
//! through `flotilla get pods`.
//!
//! qemu-user cannot do this (its clone refuses CLONE_PARENT): cross_smoke.rs
//! is the quick check. The boot itself takes about 2 s here (TCG, two
//! threads), so this runs with the suite.

mod common;

use std::time::{Duration, Instant};

use common::*;
use flotilla_testkit::machine::{self, Guest, Kit};

/// Boot under TCG is ~20 s; the first container also waits for the unpack.
const T: Duration = Duration::from_secs(240);

/// The limited container's script: makes a block device node and opens it
/// and `/dev/null` with `dd count=0`, which moves no byte (the open is what
/// the device program decides), then says `up` and sleeps.
const DEVICE_PROBE: &str = "mknod /dev/blk b 8 0 && echo mknod ok; \
     dd if=/dev/blk of=/dev/null count=0 2>&1; echo \"block rc=$?\"; \
     dd if=/dev/null of=/dev/null count=0 2>&1 && echo null ok; echo up; exec sleep 3600";

/// Every two seconds, one console line per container cgroup with its limits
/// and processes.
fn print_cgroups(node: &str) -> String {
    format!(
        r#"while true; do
  sleep 2
  for d in /sys/fs/cgroup/flotilla/{node}/*/; do
    [ -f "$d/memory.max" ] || continue
    echo "FLOTILLA-CGROUP $(basename $d) memory.max=$(cat $d/memory.max) cpu.max=$(cat $d/cpu.max | tr ' ' /) pids.max=$(cat $d/pids.max) swap.max=$(cat $d/memory.swap.max 2>/dev/null || echo absent) procs=$(wc -l < $d/cgroup.procs)"
  done
done"#
    )
}

fn workload(name: &str, limits: &str, policy: &str, script: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  \
         nodeSelector: {{board: qemu-virt}}\n  restartPolicy: {policy}\n  containers:\n  \
         - name: main\n    image: oci:/images/busybox:latest\n    command: [sh, -c, '{script}']\n    \
         resources:\n      limits: {limits}\n"
    )
}

#[test]
fn emulated_aarch64_machine_runs_a_limited_container_for_the_controller() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let agent_bin = machine::cross_agent().unwrap();
    let kit = Kit::fetch().unwrap();
    let prepared = started.elapsed();

    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("emu-arm64");
    let guest = Guest {
        node: node.clone(),
        broker_port: controller.mqtt_port,
        then: print_cgroups(&node),
    };
    let initrd = guest
        .initramfs(
            &kit,
            &agent_bin,
            &dir.path().join("controller/signing.pub"),
            dir.path(),
        )
        .unwrap();
    let console = dir.path().join("console.log");
    let mut qemu = machine::qemu(&kit, &initrd, &console);
    let boot = Instant::now();
    let vm = Proc::spawn(&mut qemu, dir.path().join("qemu.log"));
    let logs = [
        controller.proc.log.as_path(),
        vm.log.as_path(),
        console.as_path(),
    ];
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();

    let ready = wait_for("the emulated machine to boot", T, &logs, || {
        console_text()
            .lines()
            .find(|l| l.starts_with("FLOTILLA-VM-READY"))
            .map(str::to_owned)
    });
    let booted = boot.elapsed();
    assert!(ready.contains(" aarch64 "), "{ready}");
    for controller_name in ["cpu", "memory", "pids"] {
        assert!(
            ready.split_whitespace().any(|w| w == controller_name),
            "cgroup v2 controller {controller_name} missing: {ready}"
        );
    }
    assert!(
        !console_text().contains("insmod"),
        "a module failed to load"
    );

    wait_for("the emulated node to be Ready", T, &logs, || {
        let n = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
        (n["status"] == "Ready" && n["arch"] == "arm64").then_some(())
    });
    let registered = boot.elapsed();

    let out = controller.apply(
        dir.path(),
        &format!(
            "{}---\n{}",
            workload(
                "limited",
                "{cpu: 250m, memory: 32Mi, pids: 20}",
                "Always",
                DEVICE_PROBE
            ),
            workload(
                "hog",
                "{memory: 16Mi}",
                "Never",
                "x=aaaaaaaa; while true; do x=$x$x; done"
            ),
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = Instant::now();

    wait_for("the limited pod to be Running", T, &logs, || {
        let p = controller.pod(&format!("limited@{node}"))?;
        (p["phase"] == "Running" && p["containers"][0]["state"] == "Running").then_some(())
    });
    let running = applied.elapsed();
    // cgroup v2 has no devices controller: the agent's own BPF program
    // refuses the block device (without it: ENXIO, or the device opens).
    let log = wait_for("the limited container's device probe", T, &logs, || {
        let out = controller.cli(&["logs", &format!("limited@{node}")]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().any(|l| l == "up").then_some(text)
    });
    for want in [
        "mknod ok",
        "can't open '/dev/blk': Operation not permitted",
        "block rc=1",
        "null ok",
    ] {
        assert!(log.contains(want), "{want:?} missing: {log}");
    }
    // Inside the machine: the container's own cgroup, its limits, its process.
    // libcontainer leaves swap unlimited when it equals the memory limit;
    // the runtime closes it on cgroup v2. The machine prints the cgroup
    // every few seconds: wait for a line written after the limits were set.
    let wants = [
        "memory.max=33554432",
        "cpu.max=25000/100000",
        "pids.max=20",
        "swap.max=0",
        "procs=1",
    ];
    let last_line = || {
        console_text()
            .lines()
            .rev()
            .find(|l| l.starts_with("FLOTILLA-CGROUP limited."))
            .map(str::to_owned)
    };
    let limited = wait_for("the limited container's cgroup limits", T, &logs, || {
        let line = last_line()?;
        wants
            .iter()
            .all(|want| line.split_whitespace().any(|w| w == *want))
            .then_some(line)
    });
    let hog = wait_for("the hog to be OOM-killed", T, &logs, || {
        let p = controller.pod(&format!("hog@{node}"))?;
        (p["phase"] == "Failed").then_some(p)
    });
    assert_eq!(hog["containers"][0]["reason"], "OOMKilled", "{hog}");
    assert_eq!(hog["containers"][0]["exitCode"], 137, "{hog}");

    println!(
        "emulated aarch64: prepared in {prepared:.1?}, booted in {booted:.1?}, node Ready \
         {registered:.1?} after qemu started, pod Running {running:.1?} after apply; {limited}"
    );
}
