#![allow(clippy::unwrap_used, clippy::expect_used)]

//! `flotilla-agent join` over the API's HTTPS: a fresh device with nothing
//! but the join token (which carries the fleet CA's fingerprint) checks the
//! controller's certificate and enrolls; a token pinned to another CA is
//! refused before the token is sent.

mod common;

use std::process::Command;

use common::*;

fn join(c: &Controller, token: &str, node: &str, data: &std::path::Path) -> std::process::Output {
    Command::new(bin("flotilla-agent"))
        .args(["join", "--server", &c.api, "--token", token, "--node", node])
        .arg("--data-dir")
        .arg(data)
        .env_remove("FLOTILLA_CA")
        .output()
        .unwrap()
}

#[test]
fn a_device_joins_over_https_with_the_pinned_ca() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(dir.path(), Broker::Embedded(free_port()));
    let logs = [c.proc.log.as_path()];
    assert!(c.api.starts_with("https://"), "{}", c.api);

    let out = c.cli(&["token", "create", "--uses", "2", "--labels", "site=shop12"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (secret, _pin) = token
        .split_once('.')
        .expect("a CA fingerprint in the token");

    // The fingerprint of another CA: refused, and nothing written.
    let other = format!("{secret}.{}", "A".repeat(43));
    let node = unique_node("pinned");
    let data = dir.path().join("device-a");
    let out = join(&c, &other, &node, &data);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fingerprint"), "{err}");
    assert!(!data.join("identity").exists());

    // The real one: enrolled.
    let out = join(&c, &token, &node, &data);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(logs[0]).unwrap_or_default()
    );
    assert!(data.join("identity").is_dir());
    // The token's labels are the node's, under any `--label` of its own.
    assert_eq!(
        std::fs::read_to_string(data.join("identity/labels")).unwrap(),
        "site=shop12\n"
    );

    // With the CA file instead, and the bare secret, as well.
    let data_b = dir.path().join("device-b");
    let out = Command::new(bin("flotilla-agent"))
        .args(["join", "--server", &c.api, "--token", secret])
        .args(["--node", &unique_node("cafile")])
        .arg("--data-dir")
        .arg(&data_b)
        .arg("--ca")
        .arg(c.data_dir.join("ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
