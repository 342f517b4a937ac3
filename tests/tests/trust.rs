#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The trust path end to end: a device joins over the API with a one-use
//! token, gets a certificate for a key it made itself, and its agent runs a
//! real container over MQTT with mTLS. Then an MQTT client with every right
//! publishes straight to the device's desired topic: a forged, an unsigned
//! and a replayed older desired state are each refused, and the running
//! container is untouched. A used or expired token is refused at join.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use flotilla_proto::{DesiredState, Signature, SignedDesired, Topics, decode, encode};
use rumqttc::{Event, Packet, QoS};

const T: Duration = Duration::from_secs(90);

fn workload(name: &str, image: &str, node: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  \
         nodeSelector: {{trust: {node}}}\n  terminationGracePeriodSeconds: 1\n  containers:\n  \
         - name: main\n    image: {image}\n    command: [sh, -c, 'sleep 3600']\n"
    )
}

/// The pids in the node's container cgroups.
fn pids(node: &str) -> BTreeSet<i32> {
    container_cgroups(node)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A controller whose embedded broker also listens with mTLS on
/// `127.0.0.1:{tls}`, so devices that join get certificates; `ports` are
/// the plain MQTT, the TLS and the API ports.
fn tls_controller(dir: &Path, ports: [u16; 3], extra: &[&str]) -> Controller {
    let [mqtt, tls, api] = ports;
    Controller::start_full(dir, Broker::Embedded(mqtt), api, None, "127.0.0.1", |cmd| {
        cmd.arg("--mqtts-listen")
            .arg(format!("127.0.0.1:{tls}"))
            .arg("--broker-san")
            .arg("127.0.0.1")
            .args(extra);
    })
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The node's retained desired-state message, as the broker holds it.
fn capture_desired(port: u16, topic: &str) -> Vec<u8> {
    let (client, mut connection) = admin_client(port);
    client.subscribe(topic, QoS::AtLeastOnce).unwrap();
    let deadline = Instant::now() + T;
    for event in connection.iter() {
        assert!(Instant::now() < deadline, "no retained desired state");
        if let Ok(Event::Incoming(Packet::Publish(p))) = event {
            if p.topic == topic {
                return p.payload.to_vec();
            }
        }
    }
    panic!("the connection ended before the desired state came");
}

#[test]
fn a_tls_enrolled_device_refuses_forged_unsigned_and_replayed_desired_state() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let (mqtt, tls) = (free_port(), free_port());
    let controller = tls_controller(dir.path(), [mqtt, tls, free_port()], &[]);
    let node = unique_node("trust");
    let _cleanup = Cleanup(node.clone());

    // Join: a certificate, kept owner-only, and no password.
    let (token, out) = enroll(&controller, dir.path(), &node, "10m");
    assert!(
        out.status.success(),
        "join: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let identity = dir.path().join(format!("agent-{node}")).join("identity");
    assert_eq!(mode(&identity), 0o700);
    for file in [
        "device.key",
        "device.pem",
        "ca.pem",
        "broker",
        "controller.pub",
    ] {
        assert_eq!(mode(&identity.join(file)), 0o600, "{file}");
    }
    assert!(!identity.join("mqtt.password").exists());
    let broker = std::fs::read_to_string(identity.join("broker")).unwrap();
    assert_eq!(broker.trim(), format!("mqtts://127.0.0.1:{tls}"));

    // The token was for one join; an expired one is refused too.
    let again = join(&controller, dir.path(), &unique_node("trust"), &token);
    assert!(!again.status.success(), "a used token joined again");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let short = controller.cli(&["token", "create", "--ttl", "1s"]);
    assert!(short.status.success());
    let created = Instant::now();
    let short = String::from_utf8(short.stdout).unwrap().trim().to_owned();
    while created.elapsed() < Duration::from_millis(1500) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let late = join(&controller, dir.path(), &unique_node("trust"), &short);
    assert!(!late.status.success(), "an expired token joined");

    // The agent connects with its certificate (the stored broker, TLS).
    let agent = Agent::start_with(
        dir.path(),
        &node,
        &broker,
        &[&format!("trust={node}")],
        None,
        |_| {},
    );
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    wait_for("the node to be Ready over TLS", T, &logs, || {
        let n = controller.try_json(&["get", "nodes", &node, "-o", "json"])?;
        (n["status"] == "Ready").then_some(())
    });
    let agent_log = std::fs::read_to_string(&agent.proc.log).unwrap();
    assert!(agent_log.contains(&format!("port={tls}")), "{agent_log}");

    // A real container; then the retained desired state it came from.
    let out = controller.apply(dir.path(), &workload("keep", &image, &node));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (c, n) = (&controller, node.as_str());
    let running = |pods: &'static [&'static str]| {
        move || {
            pods.iter()
                .all(|p| {
                    c.pod(&format!("{p}@{n}"))
                        .is_some_and(|v| v["phase"] == "Running")
                })
                .then_some(())
        }
    };
    wait_for("keep to run", T, &logs, running(&["keep"]));
    let topic = Topics::default().desired(&node);
    let older = capture_desired(mqtt, &topic);
    let older_state: DesiredState =
        decode(&decode::<SignedDesired>(&older).unwrap().payload).unwrap();

    // A newer generation, accepted: a second pod.
    let out = controller.apply(dir.path(), &workload("later", &image, &node));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("both pods to run", T, &logs, running(&["keep", "later"]));
    let before = pids(&node);
    assert!(!before.is_empty());
    let error = |want: &'static str| {
        move || {
            let v = c.try_json(&["get", "nodes", n, "-o", "json"])?;
            let e = v["desiredError"].as_str()?.to_owned();
            e.contains(want).then_some(e)
        }
    };

    // Forged: a state for this node with no pods, under a bad signature.
    let empty = DesiredState {
        generation: older_state.generation + 100,
        pods: Vec::new(),
        ..older_state.clone()
    };
    let forged = SignedDesired {
        payload: encode(&empty).unwrap(),
        signature: Signature([7; flotilla_proto::SIGNATURE_LEN]),
    };
    publish(mqtt, &topic, encode(&forged).unwrap());
    let said = wait_for("the forged state refused", T, &logs, error("signature"));
    eprintln!("forged: {said}");

    // Unsigned: the bare desired-state frame.
    publish(mqtt, &topic, encode(&empty).unwrap());
    let said = wait_for("the unsigned state refused", T, &logs, || {
        let e = error("")()?;
        (!e.contains("signature") || e.contains("unsigned")).then_some(e)
    });
    eprintln!("unsigned: {said}");

    // Replayed: the older generation, validly signed.
    publish(mqtt, &topic, older);
    let said = wait_for(
        "the replay refused",
        T,
        &logs,
        error("older than the accepted generation"),
    );
    eprintln!("replayed: {said}");

    // Nothing ran or stopped: both pods still run, the same processes.
    wait_for(
        "both pods to still run",
        T,
        &logs,
        running(&["keep", "later"]),
    );
    assert_eq!(pids(&node), before, "the running containers were touched");

    controller.delete_and_wait_gone(&["keep", "later"], &node, &logs);
}

#[test]
fn certificates_are_renewed_before_they_expire_and_used_at_the_next_connect() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, tls, api) = (free_port(), free_port(), free_port());
    let start = || tls_controller(dir.path(), [mqtt, tls, api], &["--cert-lifetime", "10s"]);
    let mut controller = start();
    let node = unique_node("renew");
    let (_, out) = enroll(&controller, dir.path(), &node, "10m");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let joined = Instant::now();
    let identity = dir.path().join(format!("agent-{node}")).join("identity");
    let cert = || std::fs::read_to_string(identity.join("device.pem")).unwrap();
    let first = cert();
    let agent = Agent::start_with(
        dir.path(),
        &node,
        &format!("mqtts://127.0.0.1:{tls}"),
        &[],
        None,
        |cmd| {
            cmd.arg("--runtime").arg("fake");
        },
    );
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    let agent_log = || std::fs::read_to_string(&agent.proc.log).unwrap_or_default();
    wait_for("the agent to connect", T, &logs, || {
        agent_log().contains("connected to broker").then_some(())
    });

    // Renewed with a third of its 10 s left, twice, each time a new
    // certificate stored owner-only, no token needed.
    let mut seen = vec![first];
    wait_for("two renewals", T, &logs, || {
        let now = cert();
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        (seen.len() >= 3).then_some(())
    });
    assert_eq!(mode(&identity.join("device.pem")), 0o600);
    assert_eq!(mode(&identity.join("device.key")), 0o600);

    // Once the first certificate has expired, the broker restarts: the
    // agent reconnects, which only a renewed certificate can do.
    while joined.elapsed() < Duration::from_secs(11) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let connects = agent_log().matches("connected to broker").count();
    controller.proc.stop();
    controller = start();
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    wait_for("the agent to reconnect", T, &logs, || {
        (agent_log().matches("connected to broker").count() > connects).then_some(())
    });
    assert!(
        agent_log().contains("connecting with the renewed certificate"),
        "{}",
        agent_log()
    );
}

/// A device switched off past its certificate's expiry (a shop closed for a
/// season): within the controller's `--renew-grace` it renews with its own
/// key when it comes back and reconnects, no new token needed; with
/// `--renew-grace 0s` it is told to join again and does not connect, until
/// the grace is raised.
#[test]
fn a_device_back_after_its_certificate_expired_renews_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, tls, api) = (free_port(), free_port(), free_port());
    let start = |grace: &str| {
        tls_controller(
            dir.path(),
            [mqtt, tls, api],
            &["--cert-lifetime", "3s", "--renew-grace", grace],
        )
    };
    let mut controller = start("1h");
    let node = unique_node("expired");
    let (_, out) = enroll(&controller, dir.path(), &node, "10m");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let identity = dir.path().join(format!("agent-{node}")).join("identity");
    let cert = || std::fs::read_to_string(identity.join("device.pem")).unwrap();
    // Until the stored certificate's expiry (device.times: received and
    // expiry, ms since the epoch) has passed, plus a second: X.509 times are
    // whole seconds and the last second is still valid.
    let until_expired = || {
        let times = std::fs::read_to_string(identity.join("device.times")).unwrap();
        let expires: u64 = times.split_whitespace().nth(1).unwrap().parse().unwrap();
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        while now() <= expires + 1_200 {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let start_agent = || {
        Agent::start_with(
            dir.path(),
            &node,
            &format!("mqtts://127.0.0.1:{tls}"),
            &[],
            None,
            |cmd| {
                cmd.arg("--runtime").arg("fake");
            },
        )
    };

    until_expired();
    let expired = cert();
    let mut agent = start_agent();
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    let agent_log = |agent: &Agent| std::fs::read_to_string(&agent.proc.log).unwrap_or_default();
    wait_for("the agent to renew and connect", T, &logs, || {
        agent_log(&agent)
            .contains("connected to broker")
            .then_some(())
    });
    assert_ne!(cert(), expired, "connected without a new certificate");
    assert!(
        agent_log(&agent).contains("certificate renewed"),
        "{}",
        agent_log(&agent)
    );
    agent.proc.stop();

    // A controller without grace: the device must join again.
    controller.proc.stop();
    controller = start("0s");
    until_expired();
    let agent = start_agent();
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    wait_for("the renewal to be refused", T, &logs, || {
        agent_log(&agent)
            .contains("join again with a new token")
            .then_some(())
    });
    assert!(
        !agent_log(&agent).contains("connected to broker"),
        "connected with an expired certificate: {}",
        agent_log(&agent)
    );

    // The operator grants a grace again: the same agent, still retrying,
    // renews and connects without a restart or a token.
    controller.proc.stop();
    controller = start("1h");
    let logs = [controller.proc.log.as_path(), agent.proc.log.as_path()];
    wait_for("the agent to renew and connect", T, &logs, || {
        agent_log(&agent)
            .contains("connected to broker")
            .then_some(())
    });
}
