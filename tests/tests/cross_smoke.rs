#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The quick check of the device builds, run by CI: `cross/build` makes the
//! static aarch64 agent, which qemu-user runs here — `--version`, then, with
//! the fake runtime (qemu-user cannot create containers), a real session with
//! a controller on this host: the node registers as arm64 and a workload's
//! pod is reported Running. Also: dist/install.sh puts a binary, its systemd
//! unit and its settings in place, and the units pass `systemd-analyze verify`.
//! The real containers on ARM are proven in an emulated machine (tests/tests/arm.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// What an ELF file's header says: machine, and whether it asks for a
/// dynamic loader or has a dynamic section.
fn elf_facts(bytes: &[u8]) -> (u16, bool) {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[4], 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let machine = u16_at(18);
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    let dynamic = (0..phnum as usize)
        .map(|i| u32_at(phoff + i * phentsize))
        .any(|t| t == PT_INTERP || t == PT_DYNAMIC);
    (machine, dynamic)
}

#[test]
fn aarch64_agent_runs_under_qemu_user_and_reports_to_a_controller() {
    let dir = tempfile::tempdir().unwrap();
    let agent_bin = flotilla_testkit::machine::cross_agent().unwrap();

    let bytes = std::fs::read(&agent_bin).unwrap();
    let (machine, dynamic) = elf_facts(&bytes);
    const EM_AARCH64: u16 = 183;
    assert_eq!(
        machine,
        EM_AARCH64,
        "{} is not an aarch64 binary",
        agent_bin.display()
    );
    assert!(!dynamic, "{} is dynamically linked", agent_bin.display());
    // The 4 MiB budget is reported by cross/build and bench/footprint, not
    // enforced here.
    eprintln!(
        "aarch64 agent: {} bytes ({:.2} MiB of a 4 MiB budget)",
        bytes.len(),
        bytes.len() as f64 / f64::from(1 << 20)
    );

    let version = Command::new("qemu-aarch64-static")
        .arg(&agent_bin)
        .arg("--version")
        .output()
        .expect("qemu-aarch64-static (Debian's qemu-user-static) is missing");
    assert!(version.status.success(), "{version:?}");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("flotilla-agent {}", env!("CARGO_PKG_VERSION"))
    );

    let controller = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("qemu-arm64");
    let mut cmd = Command::new("qemu-aarch64-static");
    cmd.arg(&agent_bin)
        .arg("--broker")
        .arg(controller.broker_url())
        .arg("--node")
        .arg(&node)
        .arg("--label")
        .arg("board=emulated")
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--runtime")
        .arg("fake")
        .args(trust_args(dir.path()))
        .env("FLOTILLA_LOG", "debug");
    let agent = Proc::spawn(&mut cmd, dir.path().join("agent.log"));
    let logs = [controller.proc.log.as_path(), agent.log.as_path()];

    wait_for("the arm64 node to be Ready", T, &logs, || {
        let n = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
        (n["status"] == "Ready" && n["arch"] == "arm64" && n["labels"]["board"] == "emulated")
            .then_some(())
    });
    let out = controller.apply(
        dir.path(),
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: on-arm\nspec:\n  \
         nodeSelector: {board: emulated}\n  containers:\n  - name: main\n    \
         image: oci:/var/lib/flotilla/images/busybox:latest\n    command: [sleep, '3600']\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod = format!("on-arm@{node}");
    wait_for("the pod to be Running on the arm64 agent", T, &logs, || {
        let p = controller.pod(&pod)?;
        (p["phase"] == "Running").then_some(())
    });
    let out = controller.cli(&["delete", "workload", "on-arm"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("the pod to be gone", T, &logs, || {
        controller.pod(&pod).is_none().then_some(())
    });
}

fn install(root: &Path, args: &[&str], prefix: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(repo().join("dist/install.sh"));
    cmd.args(args).env("DESTDIR", root);
    if let Some(p) = prefix {
        cmd.env("PREFIX", p);
    }
    cmd.output().unwrap()
}

#[test]
fn install_script_puts_binary_unit_and_settings_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let agent = bin("flotilla-agent");
    let agent = agent.to_str().unwrap();

    // Without settings there is nothing to tell the agent where its broker is.
    let out = install(&root, &["agent", "--bin", agent], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give --join (and --token) or --broker"),
        "{out:?}"
    );
    // A device enrolled with a certificate learns its broker at join.
    let joining = dir.path().join("joining");
    let out = install(
        &joining,
        &[
            "agent",
            "--bin",
            agent,
            "--join",
            "https://controller.local:7470",
            "--token",
            "flt_x",
        ],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let env = std::fs::read_to_string(joining.join("etc/flotilla/agent.env")).unwrap();
    assert!(!env.contains("FLOTILLA_BROKER"), "{env}");
    assert!(
        env.lines().any(|l| l.starts_with("FLOTILLA_NODE=")),
        "{env}"
    );

    let out = install(
        &root,
        &[
            "agent",
            "--bin",
            agent,
            "--broker",
            "mqtt://controller.local:1883",
            "--node",
            "shop12-pi",
            "--label",
            "site=shop12",
            "--label",
            "board=pi4",
        ],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let installed = root.join("usr/local/bin/flotilla-agent");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(agent).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/flotilla-agent.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/local/bin/flotilla-agent\n"),
        "{unit}"
    );
    assert!(
        unit.contains("\nEnvironmentFile=/etc/flotilla/agent.env\n"),
        "{unit}"
    );
    let env = std::fs::read_to_string(root.join("etc/flotilla/agent.env")).unwrap();
    for line in [
        "FLOTILLA_BROKER=mqtt://controller.local:1883",
        "FLOTILLA_NODE=shop12-pi",
        "FLOTILLA_LABELS=site=shop12,board=pi4",
        "FLOTILLA_DATA_DIR=/var/lib/flotilla-agent",
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line} missing from:\n{env}"
        );
    }
    // A second install with no settings keeps the settings.
    let out = install(&root, &["agent", "--bin", agent], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/flotilla/agent.env")).unwrap(),
        env
    );

    // The controller, under another prefix: the unit follows.
    let flotilla = bin("flotilla");
    let out = install(
        &root,
        &[
            "controller",
            "--bin",
            flotilla.to_str().unwrap(),
            "--mqtt-listen",
            "0.0.0.0:1883",
        ],
        Some("/opt/flotilla"),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(root.join("opt/flotilla/bin/flotilla").is_file());
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/flotilla.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/opt/flotilla/bin/flotilla serve\n"),
        "{unit}"
    );
    let env = std::fs::read_to_string(root.join("etc/flotilla/controller.env")).unwrap();
    // Devices reach MQTT over TLS and the API (join, renewal) by default; the
    // plain listener only where asked.
    for line in [
        "FLOTILLA_MQTT_LISTEN=0.0.0.0:1883",
        "FLOTILLA_MQTTS_LISTEN=0.0.0.0:8883",
        "FLOTILLA_API_LISTEN=0.0.0.0:7470",
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line} missing from:\n{env}"
        );
    }

    // systemd accepts both units, pointed at binaries that exist here.
    for (unit, bin) in [
        ("flotilla-agent.service", agent.to_owned()),
        ("flotilla.service", flotilla.to_str().unwrap().to_owned()),
    ] {
        let text = std::fs::read_to_string(repo().join("dist").join(unit)).unwrap();
        let text = text
            .replace("/usr/local/bin/flotilla-agent", &bin)
            .replace("/usr/local/bin/flotilla", &bin);
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian's systemd) is missing");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify {unit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn install_script_sets_up_the_hourly_mosquitto_config() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let flotilla = bin("flotilla");
    let flotilla = flotilla.to_str().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "fla_test\n").unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

    // Every setting is needed the first time.
    let out = install(
        &root,
        &[
            "mosquitto-config",
            "--bin",
            flotilla,
            "--server",
            "https://ctl:7470",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("give --server, --token-file, --out and --san"),
        "{out:?}"
    );

    let args = [
        "mosquitto-config",
        "--bin",
        flotilla,
        "--server",
        "https://controller.local:7470",
        "--token-file",
        token.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
        "--out",
        "/etc/mosquitto/flotilla",
        "--san",
        "broker.local",
        "--san",
        "10.0.0.5",
        "--listen",
        "0.0.0.0:8884",
    ];
    let out = install(&root, &args, None);
    assert!(out.status.success(), "{out:?}");
    let etc = root.join("etc/flotilla");
    let env_path = etc.join("mosquitto-config.env");
    let env = std::fs::read_to_string(&env_path).unwrap();
    for line in [
        "FLOTILLA_SERVER=https://controller.local:7470",
        "FLOTILLA_TOKEN_FILE=/etc/flotilla/mosquitto-config.token",
        "FLOTILLA_CA=/etc/flotilla/controller-ca.pem",
        "FLOTILLA_MOSQUITTO_DIR=/etc/mosquitto/flotilla",
        "FLOTILLA_MOSQUITTO_SANS=broker.local,10.0.0.5",
        "FLOTILLA_MOSQUITTO_LISTEN=0.0.0.0:8884",
        "FLOTILLA_MOSQUITTO_KEY_OWNER=mosquitto",
        "FLOTILLA_MOSQUITTO_RELOAD=\"systemctl try-reload-or-restart mosquitto\"",
        "FLOTILLA_MOSQUITTO_RESTART=\"systemctl try-restart mosquitto\"",
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line} missing from:\n{env}"
        );
    }
    assert_eq!(mode(&env_path), 0o600, "the env file names a token file");
    let secret = etc.join("mosquitto-config.token");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "fla_test\n");
    assert_eq!(mode(&secret), 0o600);
    assert_eq!(mode(&etc.join("controller-ca.pem")), 0o644);
    assert!(root.join("usr/local/bin/flotilla").is_file());

    let units = root.join("etc/systemd/system");
    let service = std::fs::read_to_string(units.join("flotilla-mosquitto-config.service")).unwrap();
    for line in [
        "Type=oneshot",
        "EnvironmentFile=/etc/flotilla/mosquitto-config.env",
        "ExecStart=/usr/local/bin/flotilla broker-config mosquitto",
    ] {
        assert!(service.lines().any(|l| l == line), "{line} in:\n{service}");
    }
    let timer = std::fs::read_to_string(units.join("flotilla-mosquitto-config.timer")).unwrap();
    for line in [
        "OnCalendar=hourly",
        "Persistent=true",
        "WantedBy=timers.target",
    ] {
        assert!(timer.lines().any(|l| l == line), "{line} in:\n{timer}");
    }
    assert!(
        timer.lines().any(|l| l.starts_with("RandomizedDelaySec=")),
        "{timer}"
    );
    for unit in [
        "flotilla-mosquitto-config.service",
        "flotilla-mosquitto-config.timer",
    ] {
        assert_eq!(mode(&units.join(unit)), 0o644);
    }

    // A second install with no settings keeps them, and the token.
    let out = install(&root, &["mosquitto-config", "--bin", flotilla], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&env_path).unwrap(), env);
    assert_eq!(mode(&env_path), 0o600);

    // The env file is what the CLI reads: sourced as systemd would, it
    // names every setting `broker-config mosquitto` needs (the run stops at
    // the CA file, which is not a certificate, before any network).
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -a; . {env}; FLOTILLA_TOKEN_FILE={secret}; FLOTILLA_CA={ca}; \
             FLOTILLA_MOSQUITTO_DIR={out}; {flotilla} broker-config mosquitto",
            env = env_path.display(),
            secret = secret.display(),
            ca = etc.join("controller-ca.pem").display(),
            out = dir.path().join("mosquitto").display(),
        ))
        .env_remove("FLOTILLA_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no pem certificate"), "{err}");

    // systemd accepts both units, pointed at a binary that exists here.
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed here");
        return;
    };
    assert!(probe.status.success());
    let checked = dir.path().join("units");
    std::fs::create_dir(&checked).unwrap();
    for unit in [
        "flotilla-mosquitto-config.service",
        "flotilla-mosquitto-config.timer",
    ] {
        let text = std::fs::read_to_string(units.join(unit))
            .unwrap()
            .replace("/usr/local/bin/flotilla", flotilla);
        std::fs::write(checked.join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(checked.join("flotilla-mosquitto-config.service"))
        .arg(checked.join("flotilla-mosquitto-config.timer"))
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
