#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Secrets end to end: a device enrolled with `join` (so it has a sealing
//! key), a Secret and a workload mounting it applied with `flotilla apply`;
//! the container reads the value from a tmpfs; the value is in the clear
//! nowhere else — not in the desired state published on the broker
//! (captured by a separate MQTT client), not in the controller's store,
//! not in the agent's data directory; a changed Secret reaches the
//! container; the tmpfs goes with the pod.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(90);

/// Every payload published on `topic`, as a subscriber sees it.
fn capture(port: u16, topic: &str) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut opts = rumqttc::MqttOptions::new(unique_node("capture"), "127.0.0.1", port);
    opts.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut connection) = rumqttc::Client::new(opts, 16);
    client.subscribe(topic, rumqttc::QoS::AtLeastOnce).unwrap();
    let out = Arc::clone(&seen);
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    out.lock().unwrap().push(p.payload.to_vec());
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    seen
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Whether any file under `dir` holds `needle`.
fn found_under(dir: &Path, needle: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if meta.is_dir() {
            if let Some(p) = found_under(&path, needle) {
                return Some(p);
            }
        } else if meta.is_file() && std::fs::read(&path).is_ok_and(|b| contains(&b, needle)) {
            return Some(path);
        }
    }
    None
}

fn secret(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: db}}\nstringData: {{password: {value}, user: app}}\n"
    )
}

fn mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == path.to_str())
}

#[test]
fn a_secret_reaches_its_container_on_a_tmpfs_and_nowhere_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let node = unique_node("sec");
    let _cleanup = Cleanup(node.clone());

    // Enrol: the device makes its sealing key and sends the public half.
    let out = c.cli(&["token", "create"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let data = dir.path().join(format!("agent-{node}"));
    let out = std::process::Command::new(bin("flotilla-agent"))
        .args([
            "join", "--server", &c.api, "--token", &token, "--node", &node,
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = data.join("identity/sealing.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let agent = Agent::start(
        dir.path(),
        &node,
        &c.broker_url(),
        &[&format!("node={node}")],
    );
    let logs = [c.proc.log.as_path(), agent.proc.log.as_path()];
    let published = capture(c.mqtt_port, &format!("flotilla/v1/node/{node}/desired"));

    let image = busybox_image(dir.path());
    let first = format!("v1-{}", unique_node("pw"));
    let workload = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: sec}}\nspec:\n  \
         nodeSelector: {{node: {node}}}\n  terminationGracePeriodSeconds: 1\n  volumes:\n  \
         - {{name: creds, secret: {{secretName: db, items: [{{key: password, path: pw}}]}}}}\n  \
         containers:\n  - name: main\n    image: {image}\n    \
         command: [sh, -c, 'echo \"value=$(cat /etc/creds/pw)\"; grep \" /etc/creds \" /proc/mounts; sleep 3600']\n    \
         volumeMounts: [{{name: creds, mountPath: /etc/creds}}]\n"
    );
    let out = c.apply(dir.path(), &format!("{}---\n{workload}", secret(&first)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("secret/db created"), "{said}");

    // The container reads it, from a tmpfs mounted read-only.
    let log = wait_for("the container to print the secret", T, &logs, || {
        let log = agent.container_log("sec", "main");
        log.contains(&format!("value={first}")).then_some(log)
    });
    let line = log
        .lines()
        .find(|l| l.contains(" /etc/creds "))
        .unwrap_or_else(|| panic!("no mount line in {log}"));
    assert!(line.contains(" tmpfs "), "{line}");
    assert!(line.contains(" ro,") || line.contains(" ro "), "{line}");
    let tmpfs = agent.run_dir.join("secrets").join("sec");
    assert!(mounted(&tmpfs), "{} is not a mount point", tmpfs.display());

    // Not on the wire, not in any store: only ciphertext.
    let frames = published.lock().unwrap().clone();
    assert!(!frames.is_empty(), "no desired state captured");
    for f in &frames {
        assert!(
            !contains(f, &first),
            "the secret is in a published desired state"
        );
    }
    let store = std::fs::read(c.data_dir.join("store.redb")).unwrap();
    assert!(
        !contains(&store, &first),
        "the secret is in the controller's store"
    );
    assert_eq!(found_under(&c.data_dir, &first), None);
    // The container's log holds what the test made it print; the rest of
    // the agent's disk must not hold the value.
    for entry in std::fs::read_dir(&agent.data_dir).unwrap().flatten() {
        if entry.file_name() != "logs" {
            assert_eq!(found_under(&entry.path(), &first), None);
        }
    }

    // The API names keys and sizes, never values.
    let listed = c.json(&["get", "secrets", "-o", "json"]);
    let text = listed.to_string();
    assert!(!text.contains(&first), "{text}");
    assert_eq!(listed["items"][0]["keys"]["password"], first.len());
    assert_eq!(listed["items"][0]["usedBy"][0], "sec");

    // A changed Secret reaches the container.
    let second = format!("v2-{}", unique_node("pw"));
    let out = c.apply(dir.path(), &secret(&second));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("secret/db configured"));
    wait_for("the container to see the new value", T, &logs, || {
        agent
            .container_log("sec", "main")
            .contains(&format!("value={second}"))
            .then_some(())
    });
    for f in published.lock().unwrap().iter() {
        assert!(!contains(f, &second));
    }
    let store = std::fs::read(c.data_dir.join("store.redb")).unwrap();
    assert!(!contains(&store, &second));

    // The pod goes: its tmpfs too.
    let out = c.cli(&["delete", "workload", "sec"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the tmpfs to be unmounted", T, &logs, || {
        (!mounted(&tmpfs) && !tmpfs.exists()).then_some(())
    });
    let out = c.cli(&["delete", "secret", "db"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = c.json(&["get", "secrets", "-o", "json"]);
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(0));
}

#[test]
fn a_node_without_a_sealing_key_gets_a_pod_error_not_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(dir.path(), Broker::Embedded(free_port()));
    // Never enrolled: an anonymous agent with no sealing key.
    let node = unique_node("nokey");
    let _cleanup = Cleanup(node.clone());
    let agent = Agent::start(
        dir.path(),
        &node,
        &c.broker_url(),
        &[&format!("node={node}")],
    );
    let logs = [c.proc.log.as_path(), agent.proc.log.as_path()];
    let published = capture(c.mqtt_port, &format!("flotilla/v1/node/{node}/desired"));
    let image = busybox_image(dir.path());
    let value = format!("v-{}", unique_node("pw"));
    let workload = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: nokey}}\nspec:\n  \
         nodeSelector: {{node: {node}}}\n  volumes: [{{name: creds, secret: {{secretName: db}}}}]\n  \
         containers:\n  - {{name: main, image: '{image}', command: [sleep, '3600'], \
         volumeMounts: [{{name: creds, mountPath: /etc/creds}}]}}\n"
    );
    let out = c.apply(dir.path(), &format!("{}---\n{workload}", secret(&value)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let message = wait_for("the pod to report the missing key", T, &logs, || {
        let pod = c.pod(&format!("nokey@{node}"))?;
        let text = pod.to_string();
        text.contains("has no sealing key").then_some(text)
    });
    assert!(
        message.contains(&format!("node {node} has no sealing key: re-enrol it")),
        "{message}"
    );
    for f in published.lock().unwrap().iter() {
        assert!(!contains(f, &value));
    }
}
