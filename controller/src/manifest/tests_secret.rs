//! Secrets in manifests: the `Secret` kind, `secret` volumes and
//! `imagePullSecrets`.

use flotilla_proto::{SealedSecret, SecretItem, VolumeSource};

use super::*;
use crate::secrets::SecretType;

const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: db}\n\
                      data: {password: aHVudGVyMg==}\nstringData: {user: app, password: over}\n";

const USES: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: web}\n\
spec:\n  imagePullSecrets: [{name: regcred}]\n  volumes:\n  \
- {name: creds, secret: {secretName: db, defaultMode: '0400', items: [{key: password, path: p/pw, mode: '0440'}]}}\n  \
- {name: all, secret: {secretName: db}}\n  \
containers: [{name: main, image: oci:/x, volumeMounts: [{name: creds, mountPath: /c}]}]\n";

fn errors(text: &str) -> Vec<String> {
    match parse_objects(text) {
        Ok(o) => panic!("accepted: {o:?}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn secrets_and_workloads_using_them_are_read_together() {
    let objects = parse_objects(&format!("{SECRET}---\n{USES}")).unwrap();
    assert_eq!(objects.secrets.len(), 1);
    let s = &objects.secrets[0];
    assert_eq!(s.name, "db");
    assert_eq!(s.kind, SecretType::Opaque);
    // stringData wins over data on the same key, as in Kubernetes.
    assert_eq!(s.data["password"], b"over");
    assert_eq!(s.data["user"], b"app");
    // Debug never shows a value.
    assert!(!format!("{s:?}").contains("over"));

    let w = &objects.workloads[0];
    assert_eq!(
        w.spec.image_pull_secrets,
        vec![SealedSecret::unsealed("regcred")]
    );
    assert_eq!(
        w.spec.volumes[0].source,
        VolumeSource::Secret {
            items: vec![SecretItem {
                key: "password".into(),
                path: "p/pw".into(),
                mode: Some(0o440),
            }],
            default_mode: 0o400,
            sealed: SealedSecret::unsealed("db"),
        }
    );
    // Secret volumes are mounted read-only whatever the mount says.
    assert!(w.spec.containers[0].volume_mounts[0].read_only);
    // The canonical form reads back the same (and holds no value).
    let text = w.to_json().to_string();
    assert_eq!(parse(&text).unwrap(), vec![w.clone()]);
    // `parse` (workloads only) leaves the Secret out.
    assert_eq!(parse(&format!("{SECRET}---\n{USES}")).unwrap().len(), 1);
}

#[test]
fn bad_secrets_are_named_without_their_values() {
    let got = errors(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: Bad, labels: {}}\ntype: x\n\
         data: {'a/b': eA==, ok: '!!not-base64', n: 5}\nstringData: {'..': y}\n",
    );
    assert_eq!(
        got,
        [
            "metadata.labels: unknown field",
            "metadata.name: \"Bad\" is not a valid name: character 'B' at position 0 is not allowed",
            "type: \"x\" is not supported (expected Opaque or kubernetes.io/dockerconfigjson)",
            "data[\"a/b\"]: key \"a/b\": character '/' at position 1 is not allowed (letters, digits, '-', '_', '.')",
            "data[\"ok\"]: not base64",
            "data[\"n\"]: expected a string (quote it)",
            "stringData[\"..\"]: key \"..\" is not allowed",
        ]
    );
    let big = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: big}}\nstringData: {{a: '{}'}}\n",
        "x".repeat(crate::secrets::MAX_SECRET_BYTES + 1)
    );
    assert_eq!(
        errors(&big),
        ["data: values are too large: 65537 bytes, at most 65536 in all"]
    );
    let docker = "apiVersion: v1\nkind: Secret\nmetadata: {name: reg}\n\
                  type: kubernetes.io/dockerconfigjson\nstringData: {.dockerconfigjson: '{\"auths\": 1}'}\n";
    assert_eq!(
        errors(docker),
        ["data[\".dockerconfigjson\"]: expected an object \"auths\" of registries"]
    );
    let twice = format!("{SECRET}---\n{SECRET}");
    assert_eq!(
        errors(&twice),
        ["document 2: metadata.name: duplicate secret name \"db\" (also in document 1)"]
    );
}

#[test]
fn bad_references_are_named() {
    let text = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: web}\nspec:\n  \
                imagePullSecrets: [{name: a}, {name: a}, {nam: b}]\n  volumes:\n  \
                - {name: s, secret: {secretName: X, items: [{key: 'a b', path: /abs}]}}\n  \
                containers: [{name: main, image: oci:/x}]\n";
    assert_eq!(
        errors(text),
        [
            "spec.volumes[0].secret.secretName: \"X\" is not a valid name: character 'X' at position 0 is not allowed",
            "spec.imagePullSecrets[1].name: \"a\" is listed twice",
            "spec.imagePullSecrets[2].nam: unknown field",
            "spec.imagePullSecrets[2].name: required",
        ]
    );
}
