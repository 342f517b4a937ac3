//! Table-driven tests of `securityContext`, `metadata.namespace` and the
//! `Namespace` kind: accepted values and what goes on the wire, refusals
//! with the exact lines a user sees, the canonical form reading back, and
//! a namespace's policy over a workload.

use flotilla_proto::SecurityContext;

use super::namespace::{Namespace, Violation};
use super::*;

/// A workload `web` with one container `main` whose extra fields are
/// given unindented, and `meta` added to its metadata.
fn workload_with(meta: &str, container_fields: &str) -> String {
    let fields: String = container_fields
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: web{meta}}}\n\
         spec:\n  containers:\n  - name: main\n    image: busybox\n{fields}"
    )
}

fn parsed(text: &str) -> Workload {
    match parse(text) {
        Ok(mut w) if w.len() == 1 => w.remove(0),
        Ok(w) => panic!("expected one workload, got {w:?}"),
        Err(e) => panic!("refused:\n{e}\n---\n{text}"),
    }
}

fn errors(text: &str) -> Vec<String> {
    match parse_objects(text) {
        Ok(o) => panic!("accepted: {o:?}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

fn caps(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
fn security_contexts_map_to_the_wire() {
    let cases: Vec<(&str, &str, Option<SecurityContext>)> = vec![
        ("absent", "", None),
        // Asking for nothing beyond the default is no context at all, so
        // the container's spec (and its id on the device) is unchanged.
        ("empty", "securityContext: {}", None),
        (
            "defaults spelled out",
            "securityContext:\n  privileged: false\n  capabilities: {add: [], drop: []}\n  \
             seccompProfile: {type: RuntimeDefault}\n  readOnlyRootFilesystem: false",
            None,
        ),
        (
            "privileged",
            "securityContext: {privileged: true}",
            Some(SecurityContext {
                privileged: true,
                ..SecurityContext::default()
            }),
        ),
        (
            "capabilities in every spelling",
            "securityContext:\n  capabilities:\n    add: [NET_ADMIN, CAP_SYS_TIME, net_raw]\n    drop: [ALL]",
            Some(SecurityContext {
                add_capabilities: caps(&["NET_ADMIN", "SYS_TIME", "NET_RAW"]),
                drop_capabilities: caps(&["ALL"]),
                ..SecurityContext::default()
            }),
        ),
        (
            "unconfined and read-only",
            "securityContext: {seccompProfile: {type: Unconfined}, readOnlyRootFilesystem: true}",
            Some(SecurityContext {
                seccomp_unconfined: true,
                read_only_root_filesystem: true,
                ..SecurityContext::default()
            }),
        ),
    ];
    for (name, fields, expected) in cases {
        let w = parsed(&workload_with("", fields));
        assert_eq!(w.spec.containers[0].security_context, expected, "{name}");
        let json = w.to_json();
        let back = parsed(&serde_norway::to_string(&json).unwrap());
        assert_eq!(back, w, "{name}: canonical yaml reads back");
        let canonical = &json["spec"]["containers"][0]["securityContext"];
        assert_eq!(canonical.is_null(), expected.is_none(), "{name}: {json}");
    }
}

#[test]
fn canonical_security_context_spells_out_every_field() {
    let w = parsed(&workload_with(
        ", namespace: net",
        "securityContext: {capabilities: {add: [cap_net_admin]}}",
    ));
    assert_eq!(w.namespace, "net");
    let json = w.to_json();
    assert_eq!(json["metadata"]["namespace"], "net");
    assert_eq!(
        json["spec"]["containers"][0]["securityContext"],
        serde_json::json!({
            "privileged": false,
            "capabilities": {"add": ["NET_ADMIN"], "drop": []},
            "seccompProfile": {"type": "RuntimeDefault"},
            "readOnlyRootFilesystem": false,
        })
    );
    // A workload that names no namespace is in `default`, written out.
    let plain = parsed(&workload_with("", ""));
    assert_eq!(plain.namespace, "default");
    assert_eq!(plain.to_json()["metadata"]["namespace"], "default");
}

#[test]
fn bad_security_contexts_are_named() {
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        (
            "types",
            "securityContext: {privileged: 'yes', readOnlyRootFilesystem: 1}",
            vec![
                "spec.containers[0].securityContext.privileged: expected true or false, found a string",
                "spec.containers[0].securityContext.readOnlyRootFilesystem: expected true or false, found a number",
            ],
        ),
        (
            "unknown capability, duplicates, not a list",
            "securityContext:\n  capabilities: {add: [NET_ADMIN, CAP_NET_ADMIN, NET_ADMINS, 7], drop: ALL}",
            vec![
                "spec.containers[0].securityContext.capabilities.add[1]: NET_ADMIN is listed twice",
                "spec.containers[0].securityContext.capabilities.add[2]: \"NET_ADMINS\" is not a capability: \
                 expected a name such as NET_ADMIN or CAP_SYS_TIME (capabilities(7)), or ALL",
                "spec.containers[0].securityContext.capabilities.add[3]: expected a string, found a number \
                 (put it in quotes to use it as text)",
                "spec.containers[0].securityContext.capabilities.drop: expected a list of capability names, found a string",
            ],
        ),
        (
            "seccomp profiles we do not have",
            "securityContext: {seccompProfile: {type: Localhost, localhostProfile: x.json}}",
            vec![
                "spec.containers[0].securityContext.seccompProfile.localhostProfile: unknown field",
                "spec.containers[0].securityContext.seccompProfile.type: \"Localhost\" is not supported \
                 (expected RuntimeDefault or Unconfined)",
            ],
        ),
        (
            "fields we do not have",
            "securityContext: {runAsUser: 1000, capabilities: {keep: [CHOWN]}, seccompProfile: {}}",
            vec![
                "spec.containers[0].securityContext.runAsUser: unknown field",
                "spec.containers[0].securityContext.capabilities.keep: unknown field",
                "spec.containers[0].securityContext.seccompProfile.type: required",
            ],
        ),
    ];
    for (name, fields, expected) in cases {
        assert_eq!(errors(&workload_with("", fields)), expected, "{name}");
    }
    assert_eq!(
        errors(&workload_with(", namespace: Net_1", "")),
        [
            "metadata.namespace: \"Net_1\" is not a valid name: character 'N' at position 0 is not allowed"
        ]
    );
    let many = format!(
        "securityContext: {{capabilities: {{drop: [{}]}}}}",
        vec!["CHOWN"; 65].join(", ")
    );
    assert_eq!(
        errors(&workload_with("", &many)),
        ["spec.containers[0].securityContext.capabilities.drop: 65 names, at most 64"]
    );
}

const NET: &str = "apiVersion: flotilla.dev/v1\nkind: Namespace\nmetadata: {name: net}\n\
                   spec: {allowedCapabilities: [CAP_NET_ADMIN, net_raw], allowUnconfinedSeccomp: true}\n";

#[test]
fn namespaces_are_read_with_workloads() {
    let text = format!("{}---\n{NET}", workload_with(", namespace: net", ""));
    let objects = parse_objects(&text).unwrap();
    assert_eq!(objects.workloads.len(), 1);
    assert_eq!(
        objects.namespaces,
        [Namespace {
            name: "net".into(),
            allow_privileged: false,
            allowed_capabilities: caps(&["NET_ADMIN", "NET_RAW"]),
            allow_unconfined_seccomp: true,
        }]
    );
    // The canonical form reads back the same.
    let canonical = objects.namespaces[0].to_json().to_string();
    assert_eq!(
        parse_objects(&canonical).unwrap().namespaces,
        objects.namespaces
    );
    // Kubernetes' own Namespace object is one that allows nothing.
    let k8s = "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain, labels: {team: a}}\n";
    assert_eq!(
        parse_objects(k8s).unwrap().namespaces,
        [Namespace::empty("plain")]
    );
    // `parse` (workloads only) leaves namespaces out.
    assert_eq!(parse(&text).unwrap().len(), 1);
}

#[test]
fn bad_namespaces_are_named() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "default is not written",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\nspec: {allowPrivileged: true}\n".into(),
            vec![
                "metadata.name: \"default\" always exists and allows nothing; \
                 give privileged workloads a namespace of their own",
            ],
        ),
        (
            "fields",
            "apiVersion: apps/v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n\
             spec: {allowPrivileged: 1, allowedCapabilities: [FLY], allowHostNetwork: true}\n"
                .into(),
            vec![
                "apiVersion: \"apps/v1\" is not supported (expected flotilla.dev/v1)",
                "metadata.namespace: unknown field",
                "spec.allowHostNetwork: unknown field",
                "spec.allowPrivileged: expected true or false, found a number",
                "spec.allowedCapabilities[0]: \"FLY\" is not a capability: \
                 expected a name such as NET_ADMIN or CAP_SYS_TIME (capabilities(7)), or ALL",
            ],
        ),
        (
            "twice in a file",
            format!("{NET}---\n{NET}"),
            vec!["document 2: metadata.name: duplicate namespace name \"net\" (also in document 1)"],
        ),
    ];
    for (name, text, expected) in cases {
        assert_eq!(errors(&text), expected, "{name}");
    }
}

#[test]
fn a_namespace_grants_only_what_it_lists() {
    let asks = parsed(&workload_with(
        "",
        "securityContext:\n  privileged: true\n  capabilities: {add: [NET_ADMIN, SYS_TIME], drop: [ALL]}\n  \
         seccompProfile: {type: Unconfined}\n  readOnlyRootFilesystem: true",
    ));
    let at = |path: &str, message: &str| Violation {
        workload: "web".into(),
        path: format!("spec.containers[0].securityContext.{path}"),
        message: message.into(),
    };
    let net = parse_objects(NET).unwrap().namespaces.remove(0);
    let cases: Vec<(&str, Namespace, Vec<Violation>)> = vec![
        (
            "default",
            Namespace::default_namespace(),
            vec![
                at(
                    "privileged",
                    "namespace \"default\" does not allow privileged containers",
                ),
                at(
                    "capabilities.add[0]",
                    "namespace \"default\" does not allow adding capability NET_ADMIN",
                ),
                at(
                    "capabilities.add[1]",
                    "namespace \"default\" does not allow adding capability SYS_TIME",
                ),
                at(
                    "seccompProfile.type",
                    "namespace \"default\" does not allow Unconfined seccomp",
                ),
            ],
        ),
        (
            "some capabilities and unconfined",
            net.clone(),
            vec![
                at(
                    "privileged",
                    "namespace \"net\" does not allow privileged containers",
                ),
                at(
                    "capabilities.add[1]",
                    "namespace \"net\" does not allow adding capability SYS_TIME",
                ),
            ],
        ),
        (
            "privileged allows everything",
            Namespace {
                allow_privileged: true,
                ..Namespace::empty("root")
            },
            vec![],
        ),
    ];
    for (name, ns, expected) in cases {
        assert_eq!(ns.violations(&asks), expected, "{name}");
    }
    // Taking privileges away needs nothing, and `ALL` allows every capability.
    let drops = parsed(&workload_with(
        "",
        "securityContext: {capabilities: {drop: [ALL]}, readOnlyRootFilesystem: true}",
    ));
    assert_eq!(Namespace::default_namespace().violations(&drops), []);
    let all = parsed(&workload_with(
        "",
        "securityContext: {capabilities: {add: [ALL]}}",
    ));
    assert_eq!(
        net.violations(&all),
        [at(
            "capabilities.add[0]",
            "namespace \"net\" does not allow adding every capability (ALL)"
        )]
    );
    let any = Namespace {
        allowed_capabilities: caps(&["ALL"]),
        ..Namespace::empty("any")
    };
    assert_eq!(any.violations(&all), []);
    assert_eq!(any.violations(&asks).len(), 2, "privileged and unconfined");
}
