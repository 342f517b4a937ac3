//! Table-driven tests of the pod-level parts of a manifest: grace period,
//! volumes, volume mounts and probes — accepted values, refusals with the
//! exact lines a user sees, and the canonical form reading back.

use flotilla_proto::{
    ConfigFile, ContainerSpec, Probe, ProbeAction, Volume, VolumeMount, VolumeSource,
};

use super::*;

const HEAD: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: web\n";

/// A manifest whose `spec` holds `spec_fields` then one container `main`
/// with `container_fields`, each given unindented.
fn manifest(spec_fields: &str, container_fields: &str) -> String {
    let spec: String = spec_fields.lines().map(|l| format!("  {l}\n")).collect();
    let fields: String = container_fields
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    format!("{HEAD}spec:\n{spec}  containers:\n  - name: main\n    image: busybox\n{fields}")
}

fn main_container() -> ContainerSpec {
    ContainerSpec::new("main", "busybox")
}

fn parsed(text: &str) -> Workload {
    match parse(text) {
        Ok(mut w) if w.len() == 1 => w.remove(0),
        Ok(w) => panic!("expected one workload, got {w:?}"),
        Err(e) => panic!("refused:\n{e}\n---\n{text}"),
    }
}

fn probe(action: ProbeAction) -> Probe {
    Probe {
        action,
        initial_delay_secs: 0,
        period_secs: 10,
        timeout_secs: 1,
        success_threshold: 1,
        failure_threshold: 3,
    }
}

fn config(name: &str, files: &[(&str, &[u8], u32)]) -> Volume {
    Volume {
        name: name.into(),
        source: VolumeSource::Config {
            files: files
                .iter()
                .map(|(path, data, mode)| ConfigFile {
                    path: (*path).into(),
                    data: data.to_vec(),
                    mode: *mode,
                })
                .collect(),
        },
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only,
    }
}

const VOLUMES: &str = "\
terminationGracePeriodSeconds: 5
volumes:
- {name: data, hostPath: {path: /srv/data}}
- {name: cache, emptyDir: {}}
- name: tmp
  emptyDir:
- name: conf
  config:
    files:
    - {path: app.conf, content: \"port = 80\\n\"}
    - {path: keys/blob.bin, contentBase64: \"AP8Q\\n gA==\", mode: \"0600\"}
    - {path: run.sh, content: \"#!/bin/sh\", mode: 0755}";

const MOUNTS: &str = "\
volumeMounts:
- {name: data, mountPath: /data}
- {name: cache, mountPath: /cache, readOnly: true}
- {name: conf, mountPath: /etc/app, readOnly: false}";

#[test]
fn reads_grace_period_volumes_and_mounts() {
    let w = parsed(&manifest(VOLUMES, MOUNTS));
    assert_eq!(w.spec.termination_grace_secs, 5);
    assert_eq!(
        w.spec.volumes,
        vec![
            Volume {
                name: "data".into(),
                source: VolumeSource::HostPath {
                    path: "/srv/data".into()
                },
            },
            Volume {
                name: "cache".into(),
                source: VolumeSource::Scratch,
            },
            Volume {
                name: "tmp".into(),
                source: VolumeSource::Scratch,
            },
            config(
                "conf",
                &[
                    ("app.conf", b"port = 80\n", 0o644),
                    ("keys/blob.bin", &[0x00, 0xff, 0x10, 0x80], 0o600),
                    ("run.sh", b"#!/bin/sh", 0o755),
                ]
            ),
        ]
    );
    assert_eq!(
        w.spec.containers[0].volume_mounts,
        vec![
            mount("data", "/data", false),
            mount("cache", "/cache", true),
            // A config volume is mounted read-only whatever readOnly says.
            mount("conf", "/etc/app", true),
        ]
    );
    let pod = w.pod_spec("web");
    assert_eq!(pod.termination_grace_secs, 5);
    assert_eq!(pod.volumes, w.spec.volumes);

    let zero = parsed(&manifest("terminationGracePeriodSeconds: 0", ""));
    assert_eq!(zero.spec.termination_grace_secs, 0);
    let default = parsed(&manifest("", ""));
    assert_eq!(default.spec.termination_grace_secs, 30);
}

#[test]
fn reads_probes_with_kubernetes_defaults() {
    let text = manifest(
        "",
        "livenessProbe:\n  exec: {command: [cat, /tmp/healthy]}\n\
         readinessProbe:\n  httpGet: {port: 8080, path: /ready?full=1}\n  initialDelaySeconds: 2\n  \
         periodSeconds: 1\n  timeoutSeconds: 3\n  successThreshold: 2\n  failureThreshold: 1\n\
         startupProbe:\n  tcpSocket: {port: 5432}\n  failureThreshold: 30",
    );
    let c = parsed(&text).spec.containers.remove(0);
    assert_eq!(
        c.liveness_probe,
        Some(probe(ProbeAction::Exec {
            command: vec!["cat".into(), "/tmp/healthy".into()]
        }))
    );
    assert_eq!(
        c.readiness_probe,
        Some(Probe {
            initial_delay_secs: 2,
            period_secs: 1,
            timeout_secs: 3,
            success_threshold: 2,
            failure_threshold: 1,
            ..probe(ProbeAction::Http {
                port: 8080,
                path: "/ready?full=1".into()
            })
        })
    );
    assert_eq!(
        c.startup_probe,
        Some(Probe {
            failure_threshold: 30,
            ..probe(ProbeAction::Tcp { port: 5432 })
        })
    );
    let http = parsed(&manifest("", "readinessProbe: {httpGet: {port: 80}}"));
    assert_eq!(
        http.spec.containers[0].readiness_probe,
        Some(probe(ProbeAction::Http {
            port: 80,
            path: "/".into()
        }))
    );
}

#[test]
fn refuses_bad_volumes_mounts_and_probes_naming_each_problem() {
    let c = "spec.containers[0]";
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "duplicate volume names and bad sources",
            manifest(
                "volumes:\n- {name: a, emptyDir: {}}\n- {name: a, hostPath: {path: /x}}\n\
                 - {name: B_, emptyDir: {}}\n- {name: c}\n- {name: d, emptyDir: {}, hostPath: {path: /x}}\n\
                 - {name: e, emptyDir: {medium: Memory}}\n- {name: f, nfs: {}}",
                "",
            ),
            vec![
                "spec.volumes[1].name: duplicate volume name \"a\"".into(),
                "spec.volumes[2].name: \"B_\" is not a valid name: \
                 character 'B' at position 0 is not allowed"
                    .into(),
                "spec.volumes[3]: expected one of hostPath, emptyDir, config, secret".into(),
                "spec.volumes[4]: only one of hostPath, emptyDir, config, secret may be given, \
                 found hostPath and emptyDir"
                    .into(),
                "spec.volumes[5].emptyDir.medium: unknown field".into(),
                "spec.volumes[6].nfs: unknown field".into(),
                "spec.volumes[6]: expected one of hostPath, emptyDir, config, secret".into(),
            ],
        ),
        (
            "host paths",
            manifest(
                "volumes:\n- {name: a, hostPath: {path: srv/data}}\n- {name: b, hostPath: {path: /srv/../etc}}\n\
                 - {name: c, hostPath: {}}\n- {name: d, hostPath: {path: \"/a\\tb\"}}",
                "",
            ),
            vec![
                "spec.volumes[0].hostPath.path: \"srv/data\" is not an absolute path".into(),
                "spec.volumes[1].hostPath.path: \"/srv/../etc\" must not contain \"..\"".into(),
                "spec.volumes[2].hostPath.path: required".into(),
                "spec.volumes[3].hostPath.path: character '\\t' at position 2 is not allowed"
                    .into(),
            ],
        ),
        (
            "config files",
            manifest(
                "volumes:\n- name: conf\n  config:\n    files:\n    - {path: ../etc/passwd, content: x}\n    \
                 - {path: /etc/passwd, content: x}\n    - {path: a//b, content: x}\n    \
                 - {path: ok, content: x, contentBase64: eA==}\n    - {path: ok2}\n    \
                 - {path: bin, contentBase64: \"not base64!\"}\n    - {path: m1, content: x, mode: 644}\n    \
                 - {path: m2, content: x, mode: 04755}\n    - {path: m3, content: x, mode: \"rw\"}\n    \
                 - {path: dup, content: x}\n    - {path: dup, content: y}\n    - {path: dup/x, content: z}",
                "",
            ),
            vec![
                "spec.volumes[0].config.files[0].path: \"../etc/passwd\" must not contain \"..\""
                    .into(),
                "spec.volumes[0].config.files[1].path: \"/etc/passwd\" must be relative to the \
                 volume, not absolute"
                    .into(),
                "spec.volumes[0].config.files[2].path: \"a//b\" has an empty or \".\" component"
                    .into(),
                "spec.volumes[0].config.files[3]: only one of content, contentBase64 may be given"
                    .into(),
                "spec.volumes[0].config.files[4]: expected content or contentBase64".into(),
                "spec.volumes[0].config.files[5].contentBase64: not valid base64: character '!' \
                 at position 9 (spaces and line breaks not counted)"
                    .into(),
                "spec.volumes[0].config.files[6].mode: expected octal digits with a leading 0, \
                 like 0644, found the number 644"
                    .into(),
                "spec.volumes[0].config.files[7].mode: \"04755\" is not allowed: only permission \
                 bits up to \"0777\" (no setuid, setgid or sticky)"
                    .into(),
                "spec.volumes[0].config.files[8].mode: \"rw\" is not a file mode: expected octal \
                 digits like \"0644\""
                    .into(),
                "spec.volumes[0].config.files[10].path: duplicate file \"dup\"".into(),
                "spec.volumes[0].config.files[11].path: \"dup\" and \"dup/x\" cannot both be files"
                    .into(),
            ],
        ),
        (
            "config volumes over the size cap",
            manifest(
                &format!(
                    "volumes:\n- name: a\n  config:\n    files:\n    - {{path: big, content: {}}}\n\
                     - name: b\n  config:\n    files:\n    - {{path: more, content: {}}}",
                    "x".repeat(MAX_CONFIG_BYTES / 2),
                    "y".repeat(MAX_CONFIG_BYTES / 2 + 1),
                ),
                "",
            ),
            vec![
                "spec.volumes[1].config.files[0]: config files are too large: over 262144 bytes \
                 in all (they travel in the desired state)"
                    .into(),
            ],
        ),
        (
            "mounts",
            manifest(
                "volumes:\n- {name: data, emptyDir: {}}\n- {name: Bad, emptyDir: {}}",
                "volumeMounts:\n- {name: nope, mountPath: /x}\n- {name: data, mountPath: data}\n\
                 - {name: data, mountPath: /}\n- {name: data, mountPath: /a/../b}\n\
                 - {name: data, mountPath: /d, readOnly: \"yes\"}\n- {name: data, mountPath: /e}\n\
                 - {name: data, mountPath: /e/}\n- {mountPath: /f}",
            ),
            vec![
                "spec.volumes[1].name: \"Bad\" is not a valid name: \
                 character 'B' at position 0 is not allowed"
                    .into(),
                format!(
                    "{c}.volumeMounts[0].name: unknown volume \"nope\": spec.volumes declares data"
                ),
                format!("{c}.volumeMounts[1].mountPath: \"data\" is not an absolute path"),
                format!(
                    "{c}.volumeMounts[2].mountPath: cannot mount over the container's root \"/\""
                ),
                format!("{c}.volumeMounts[3].mountPath: \"/a/../b\" must not contain \"..\""),
                format!("{c}.volumeMounts[4].readOnly: expected true or false, found a string"),
                format!("{c}.volumeMounts[6].mountPath: \"/e/\" is mounted more than once"),
                format!("{c}.volumeMounts[7].name: required"),
            ],
        ),
        (
            "mount without any volume",
            manifest("", "volumeMounts: [{name: x, mountPath: /x}]"),
            vec![format!(
                "{c}.volumeMounts[0].name: unknown volume \"x\": spec.volumes declares none"
            )],
        ),
        (
            "probe handlers",
            manifest(
                "",
                "livenessProbe: {}\nreadinessProbe: {exec: {command: [a]}, tcpSocket: {port: 1}}\n\
                 startupProbe: {grpc: {port: 1}}",
            ),
            vec![
                format!("{c}.livenessProbe: expected one of exec, tcpSocket, httpGet"),
                format!(
                    "{c}.readinessProbe: only one of exec, tcpSocket, httpGet may be given, \
                     found exec and tcpSocket"
                ),
                format!("{c}.startupProbe.grpc: unknown field"),
                format!("{c}.startupProbe: expected one of exec, tcpSocket, httpGet"),
            ],
        ),
        (
            "probe actions",
            manifest(
                "",
                "livenessProbe: {exec: {command: []}}\n\
                 readinessProbe: {httpGet: {port: http, path: health, host: x}}\n\
                 startupProbe: {tcpSocket: {port: 70000}}",
            ),
            vec![
                format!("{c}.livenessProbe.exec.command: must not be empty"),
                format!("{c}.readinessProbe.httpGet.host: unknown field"),
                format!(
                    "{c}.readinessProbe.httpGet.port: expected a port number from 1 to 65535, \
                     found the string \"http\" (named ports are not supported)"
                ),
                format!("{c}.readinessProbe.httpGet.path: \"health\" must start with \"/\""),
                format!(
                    "{c}.startupProbe.tcpSocket.port: 70000 is not a port: expected 1 to 65535"
                ),
            ],
        ),
        (
            "more probe actions",
            manifest(
                "",
                "livenessProbe: {exec: {command: [sh, 1]}}\n\
                 readinessProbe: {httpGet: {port: 0, path: \"/a b\"}}\n\
                 startupProbe: {tcpSocket: {}}",
            ),
            vec![
                format!(
                    "{c}.livenessProbe.exec.command[1]: expected a string, found a number \
                     (put it in quotes to use it as text)"
                ),
                format!("{c}.readinessProbe.httpGet.port: 0 is not a port: expected 1 to 65535"),
                format!(
                    "{c}.readinessProbe.httpGet.path: character ' ' at position 2 is not allowed \
                     (percent-encode it)"
                ),
                format!("{c}.startupProbe.tcpSocket.port: required"),
            ],
        ),
        (
            "probe timings",
            manifest(
                "terminationGracePeriodSeconds: -1",
                "livenessProbe:\n  tcpSocket: {port: 80}\n  periodSeconds: 0\n  timeoutSeconds: 1.5\n  \
                 successThreshold: 2\n  failureThreshold: 0\n  initialDelaySeconds: \"5\"\n\
                 startupProbe: {tcpSocket: {port: 80}, successThreshold: 3}\n\
                 readinessProbe: {tcpSocket: {port: 80}, successThreshold: 3, periodSeconds: 5000000000}",
            ),
            vec![
                "spec.terminationGracePeriodSeconds: -1 is not valid: must be at least 0".into(),
                format!(
                    "{c}.livenessProbe.initialDelaySeconds: expected a whole number, found a string"
                ),
                format!("{c}.livenessProbe.periodSeconds: 0 is not valid: must be at least 1"),
                format!(
                    "{c}.livenessProbe.timeoutSeconds: 1.5 is not valid: must be a whole number"
                ),
                format!("{c}.livenessProbe.failureThreshold: 0 is not valid: must be at least 1"),
                format!("{c}.livenessProbe.successThreshold: must be 1 for a liveness probe"),
                format!(
                    "{c}.readinessProbe.periodSeconds: 5000000000 is not valid: \
                     must be at most 4294967295"
                ),
                format!("{c}.startupProbe.successThreshold: must be 1 for a startup probe"),
            ],
        ),
    ];
    let failed: Vec<String> = cases
        .into_iter()
        .filter_map(|(name, text, expected)| {
            let got: Vec<String> = match parse(&text) {
                Ok(w) => vec![format!("accepted: {w:?}")],
                Err(e) => e.to_string().lines().map(str::to_owned).collect(),
            };
            (got != expected)
                .then(|| format!("{name}:\n  got      {got:#?}\n  expected {expected:#?}"))
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn canonical_json_keeps_volumes_mounts_and_probes() {
    let mut w = parsed(&manifest(VOLUMES, MOUNTS));
    let c = &mut w.spec.containers[0];
    c.liveness_probe = Some(probe(ProbeAction::Exec {
        command: vec!["sh".into(), "-c".into(), "test -f /tmp/ok".into()],
    }));
    c.readiness_probe = Some(Probe {
        success_threshold: 2,
        initial_delay_secs: 7,
        ..probe(ProbeAction::Http {
            port: 8080,
            path: "/ready".into(),
        })
    });
    c.startup_probe = Some(probe(ProbeAction::Tcp { port: 1 }));
    w.spec.containers.push(main_container());
    w.spec.containers[1].name = "side".into();

    let json = w.to_json();
    assert_eq!(json["spec"]["terminationGracePeriodSeconds"], 5);
    let files = &json["spec"]["volumes"][3]["config"]["files"];
    assert_eq!(
        files[1],
        serde_json::json!({"path": "keys/blob.bin", "contentBase64": "AP8QgA==", "mode": "0600"})
    );
    assert_eq!(
        files[0],
        serde_json::json!({"path": "app.conf", "content": "port = 80\n", "mode": "0644"})
    );
    assert_eq!(
        json["spec"]["containers"][0]["readinessProbe"],
        serde_json::json!({
            "httpGet": {"port": 8080, "path": "/ready"},
            "initialDelaySeconds": 7,
            "periodSeconds": 10,
            "timeoutSeconds": 1,
            "successThreshold": 2,
            "failureThreshold": 3,
        })
    );
    assert!(json["spec"]["containers"][1].get("livenessProbe").is_none());
    for text in [
        serde_json::to_string(&json).unwrap_or_default(),
        serde_norway::to_string(&json).unwrap_or_default(),
    ] {
        assert_eq!(parse(&text), Ok(vec![w.clone()]), "{text}");
    }
}
