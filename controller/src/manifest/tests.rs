//! Table-driven tests of manifest parsing: accepted manifests with the values
//! they give, refused ones with the exact lines a user sees, and the
//! canonical form reading back to the same workload.

use std::collections::BTreeMap;

use flotilla_proto::{ContainerSpec, EnvVar, PodSpec, Resources, RestartPolicy};

use super::*;

const HEAD: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: web\n";

/// A manifest named `web` whose `spec` is the given YAML, indented by two.
fn with_spec(spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!("{HEAD}spec:\n{spec}")
}

/// A manifest named `web` with one container whose extra fields are given.
fn with_container(fields: &str) -> String {
    let fields: String = fields.lines().map(|l| format!("    {l}\n")).collect();
    format!("{HEAD}spec:\n  containers:\n  - name: main\n    image: busybox\n{fields}")
}

fn container(name: &str, image: &str) -> ContainerSpec {
    ContainerSpec::new(name, image)
}

fn workload(name: &str, containers: Vec<ContainerSpec>) -> Workload {
    Workload {
        name: name.into(),
        namespace: "default".into(),
        labels: BTreeMap::new(),
        spec: WorkloadSpec {
            node_selector: BTreeMap::new(),
            restart_policy: RestartPolicy::Always,
            termination_grace_secs: 30,
            volumes: vec![],
            containers,
            requests: BTreeMap::new(),
            scheduling: Scheduling::default(),
            strategy: None,
            image_pull_secrets: Vec::new(),
        },
    }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn full() -> Workload {
    Workload {
        name: "web".into(),
        namespace: "default".into(),
        labels: map(&[("app", "web"), ("flotilla.dev/tier", "front")]),
        spec: WorkloadSpec {
            node_selector: map(&[("site", "shop12")]),
            restart_policy: RestartPolicy::OnFailure,
            termination_grace_secs: 30,
            volumes: vec![],
            containers: vec![
                ContainerSpec {
                    name: "main".into(),
                    image: "oci:/srv/images/busybox:latest".into(),
                    command: vec!["sh".into(), "-c".into()],
                    args: vec!["echo hi; sleep 3600".into()],
                    env: vec![
                        EnvVar {
                            name: "MODE".into(),
                            value: "prod".into(),
                        },
                        EnvVar {
                            name: "_EMPTY".into(),
                            value: String::new(),
                        },
                    ],
                    working_dir: Some("/app".into()),
                    resources: Resources {
                        cpu_millis: Some(500),
                        memory_bytes: Some(64 << 20),
                        pids: Some(100),
                    },
                    ..container("main", "oci:/srv/images/busybox:latest")
                },
                ContainerSpec {
                    resources: Resources {
                        cpu_millis: Some(2000),
                        memory_bytes: Some(134_217_728),
                        pids: None,
                    },
                    ..container("side", "oci:/srv/images/side:1")
                },
            ],
            requests: BTreeMap::new(),
            scheduling: Scheduling::default(),
            strategy: None,
            image_pull_secrets: Vec::new(),
        },
    }
}

const FULL: &str = "\
# a comment before the document
apiVersion: flotilla.dev/v1
kind: Workload
metadata:
  name: web
  labels: {app: web, flotilla.dev/tier: front}
spec:
  nodeSelector: {site: shop12}
  restartPolicy: OnFailure
  containers:
  - name: main
    image: oci:/srv/images/busybox:latest
    command: [sh, -c]
    args: [\"echo hi; sleep 3600\"]
    env:
    - {name: MODE, value: prod}
    - name: _EMPTY
    workingDir: /app
    resources:
      limits: {cpu: 500m, memory: 64Mi, pids: 100}
  - name: side
    image: oci:/srv/images/side:1
    command:
    resources:
      limits:
        cpu: 2
        memory: 134217728
";

#[test]
fn accepts_valid_manifests() {
    let minimal = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: a}\n\
                   spec: {containers: [{name: c, image: i}]}\n";
    let json = r#"{"apiVersion": "flotilla.dev/v1", "kind": "Workload",
        "metadata": {"name": "j", "labels": {}},
        "spec": {"restartPolicy": "Never", "containers": [
            {"name": "c", "image": "i", "args": ["a", "b"],
             "resources": {"limits": {"cpu": "0.25", "memory": "1.5Gi"}}}]}}"#;
    let several = format!(
        "---\n{minimal}---\n# empty\n---\n{HEAD}spec:\n  containers: [{{name: x, image: y}}]\n...\n"
    );
    let merged = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: m}\n\
                  spec:\n  containers:\n  - &base {name: a, image: i, args: [x]}\n  - <<: *base\n    name: b\n";
    let cases: Vec<(&str, String, Vec<Workload>)> = vec![
        (
            "minimal",
            minimal.into(),
            vec![workload("a", vec![container("c", "i")])],
        ),
        ("full", FULL.into(), vec![full()]),
        (
            "json",
            json.into(),
            vec![Workload {
                spec: WorkloadSpec {
                    restart_policy: RestartPolicy::Never,
                    ..workload(
                        "j",
                        vec![ContainerSpec {
                            args: vec!["a".into(), "b".into()],
                            resources: Resources {
                                cpu_millis: Some(250),
                                memory_bytes: Some(3 << 29),
                                pids: None,
                            },
                            ..container("c", "i")
                        }],
                    )
                    .spec
                },
                ..workload("j", vec![])
            }],
        ),
        (
            "several documents, empty ones skipped",
            several,
            vec![
                workload("a", vec![container("c", "i")]),
                workload("web", vec![container("x", "y")]),
            ],
        ),
        (
            "merge keys",
            merged.into(),
            vec![workload(
                "m",
                vec![
                    ContainerSpec {
                        args: vec!["x".into()],
                        ..container("a", "i")
                    },
                    ContainerSpec {
                        args: vec!["x".into()],
                        ..container("b", "i")
                    },
                ],
            )],
        ),
        (
            "null optional fields",
            with_container("command:\nargs: ~\nenv:\nworkingDir:\nresources:\n  limits:"),
            vec![workload("web", vec![container("main", "busybox")])],
        ),
        (
            "unquoted numeric cpu",
            with_container("resources: {limits: {cpu: 0.5, memory: 1e9}}"),
            vec![workload(
                "web",
                vec![ContainerSpec {
                    resources: Resources {
                        cpu_millis: Some(500),
                        memory_bytes: Some(1_000_000_000),
                        pids: None,
                    },
                    ..container("main", "busybox")
                }],
            )],
        ),
    ];
    for (name, text, expected) in cases {
        match parse(&text) {
            Ok(got) => assert_eq!(got, expected, "{name}"),
            Err(e) => panic!("{name}: refused:\n{e}"),
        }
    }
}

/// The lines a user sees for a refused manifest.
fn error_lines(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(w) => panic!("accepted: {w:?}"),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

#[test]
fn refuses_bad_manifests_naming_each_problem() {
    let limits = "spec.containers[0].resources.limits";
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "missing image",
            with_spec("containers:\n- name: main"),
            vec!["spec.containers[0].image: required".into()],
        ),
        (
            "bad container name",
            with_spec("containers:\n- {name: main, image: a}\n- {name: Main, image: b}"),
            vec![
                "spec.containers[1].name: \"Main\" is not a valid name: \
                 character 'M' at position 0 is not allowed"
                    .into(),
            ],
        ),
        (
            "bad memory suffix",
            with_container("resources: {limits: {memory: 12Q}}"),
            vec![format!(
                "{limits}.memory: \"12Q\" is not a valid quantity: \
                 expected bytes or a number with suffix Ki, Mi, Gi, Ti, k, M, G, T"
            )],
        ),
        (
            "bad restart policy",
            with_spec("restartPolicy: Sometimes\ncontainers: [{name: a, image: b}]"),
            vec!["spec.restartPolicy: \"Sometimes\" is not one of Always, OnFailure, Never".into()],
        ),
        (
            "restart policy of the wrong type",
            with_spec("restartPolicy: [Always]\ncontainers: [{name: a, image: b}]"),
            vec!["spec.restartPolicy: expected a string, found a list".into()],
        ),
        (
            "unsupported kind hides the foreign schema",
            "apiVersion: flotilla.dev/v1\nkind: Deployment\nmetadata: {name: a}\n\
             spec: {replicas: 3, template: {}}"
                .into(),
            vec!["kind: \"Deployment\" is not supported (expected Workload)".into()],
        ),
        (
            "unsupported and missing apiVersion",
            "---\napiVersion: apps/v1\nkind: Workload\nmetadata: {name: a}\n\
             spec: {containers: [{name: a, image: b}]}\n---\n\
             kind: Workload\nmetadata: {name: b}\nspec: {containers: [{name: a}]}"
                .into(),
            vec![
                "document 1: apiVersion: \"apps/v1\" is not supported (expected flotilla.dev/v1)"
                    .into(),
                "document 2: apiVersion: required".into(),
                "document 2: spec.containers[0].image: required".into(),
            ],
        ),
        (
            "unknown fields",
            format!(
                "{}status: {{}}\n",
                with_spec(
                    "containers:\n- name: main\n  imagee: busybox\n  resources: {claims: {cpu: 1}}"
                )
            ),
            vec![
                "status: unknown field".into(),
                "spec.containers[0].imagee: unknown field".into(),
                "spec.containers[0].image: required".into(),
                "spec.containers[0].resources.claims: unknown field".into(),
            ],
        ),
        (
            "list of strings given as a map",
            with_container("command: {sh: -c}"),
            vec!["spec.containers[0].command: expected a list of strings, found a map".into()],
        ),
        (
            "list of strings holding other things",
            with_container("args: [ok, 8080, true, [x], \"a\\0b\"]"),
            vec![
                "spec.containers[0].args[1]: expected a string, found a number \
                 (put it in quotes to use it as text)"
                    .into(),
                "spec.containers[0].args[2]: expected a string, found a boolean \
                 (put it in quotes to use it as text)"
                    .into(),
                "spec.containers[0].args[3]: expected a string, found a list".into(),
                "spec.containers[0].args[4]: character '\\0' at position 1 is not allowed".into(),
            ],
        ),
        (
            "duplicate container names",
            with_spec("containers:\n- {name: main, image: a}\n- {name: main, image: b}"),
            vec!["spec.containers[1].name: duplicate container name \"main\"".into()],
        ),
        (
            "zero limits",
            with_container("resources: {limits: {cpu: 0, memory: \"0Mi\", pids: 0}}"),
            vec![
                format!("{limits}.cpu: 0 is not a valid quantity: must be greater than zero"),
                format!(
                    "{limits}.memory: \"0Mi\" is not a valid quantity: must be greater than zero"
                ),
                format!("{limits}.pids: 0 is not a valid limit: must be greater than zero"),
            ],
        ),
        (
            "negative limits",
            with_container("resources: {limits: {cpu: \"-500m\", memory: -64Mi, pids: -1}}"),
            vec![
                format!(
                    "{limits}.cpu: \"-500m\" is not a valid quantity: must be greater than zero"
                ),
                format!(
                    "{limits}.memory: \"-64Mi\" is not a valid quantity: must be greater than zero"
                ),
                format!("{limits}.pids: -1 is not a valid limit: must be greater than zero"),
            ],
        ),
        (
            "overflowing limits",
            with_container(
                "resources: {limits: {cpu: 5000000, memory: 99999999Ti, pids: 5000000000}}",
            ),
            vec![
                format!(
                    "{limits}.cpu: 5000000 is not a valid quantity: must be at most 4294967295m"
                ),
                format!(
                    "{limits}.memory: \"99999999Ti\" is not a valid quantity: \
                     must be at most 18446744073709551615 bytes"
                ),
                format!(
                    "{limits}.pids: 5000000000 is not a valid limit: must be at most 4294967295"
                ),
            ],
        ),
        (
            "limits of the wrong kind",
            with_container("resources: {limits: {cpu: 0.0005, memory: [1], pids: \"100\"}}"),
            vec![
                format!(
                    "{limits}.cpu: 0.0005 is not a valid quantity: \
                     must be a whole number of millicpus (at most 3 decimals)"
                ),
                format!(
                    "{limits}.memory: expected a quantity like \"500m\", \"64Mi\" or 2, found a list"
                ),
                format!("{limits}.pids: expected a positive integer, found a string"),
            ],
        ),
        (
            "yaml syntax error",
            format!("{HEAD}spec:\n  containers: [{{name: a, image: b}}\n  restartPolicy: Never\n"),
            vec![
                "invalid YAML at line 7, column 3: did not find expected ',' or ']', \
                 while parsing a flow sequence at line 6 column 15"
                    .into(),
            ],
        ),
        (
            "duplicate key",
            with_container("image: other"),
            vec![
                "invalid YAML at line 7, column 5: spec.containers[0]: \
                 duplicate entry with key \"image\""
                    .into(),
            ],
        ),
        (
            "duplicate workload names",
            format!(
                "{}---\n{}---\n{}",
                with_spec("containers: [{name: a, image: b}]"),
                with_spec("containers: [{name: a, image: c}]"),
                with_spec("containers: [{name: a, image: \"\"}]"),
            ),
            vec![
                "document 2: metadata.name: duplicate workload name \"web\" (also in document 1)"
                    .into(),
                "document 3: spec.containers[0].image: must not be empty".into(),
                "document 3: metadata.name: duplicate workload name \"web\" (also in document 1)"
                    .into(),
            ],
        ),
        (
            "missing sections",
            "apiVersion: flotilla.dev/v1\nkind: Workload\n".into(),
            vec!["metadata: required".into(), "spec: required".into()],
        ),
        (
            "missing and empty containers",
            format!(
                "{}---\n{}",
                with_spec("restartPolicy: Never"),
                with_spec("containers: []").replace("web", "web2")
            ),
            vec![
                "document 1: spec.containers: required".into(),
                "document 2: spec.containers: must have at least one container".into(),
            ],
        ),
        (
            "containers of the wrong type",
            with_spec("containers: {name: a, image: b}"),
            vec!["spec.containers: expected a list of containers, found a map".into()],
        ),
        (
            "bad workload name",
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: web_1}\n\
             spec: {containers: [{name: a, image: b}]}"
                .into(),
            vec![
                "metadata.name: \"web_1\" is not a valid name: \
                 character '_' at position 3 is not allowed"
                    .into(),
            ],
        ),
        (
            "bad labels and node selector",
            "apiVersion: flotilla.dev/v1\nkind: Workload\n\
             metadata: {name: a, labels: {\"Site=\": x, app: \"a b\", version: 2, 7: x}}\n\
             spec: {nodeSelector: {flotilla.dev/site: -x}, containers: [{name: a, image: b}]}"
                .into(),
            vec![
                "metadata.labels: \"Site=\" is not a valid label key: \
                 character '=' at position 4 is not allowed"
                    .into(),
                "metadata.labels.app: \"a b\" is not a valid label value: \
                 character ' ' at position 1 is not allowed"
                    .into(),
                "metadata.labels.version: expected a string, found a number \
                 (put it in quotes to use it as text)"
                    .into(),
                "metadata.labels: keys must be strings, found a number 7".into(),
                "spec.nodeSelector[\"flotilla.dev/site\"]: \"-x\" is not a valid label value: \
                 must start and end with a letter or digit"
                    .into(),
            ],
        ),
        (
            "bad env",
            with_container(
                "env:\n- {name: MODE, value: a}\n- {name: MODE, value: b}\n\
                 - {name: 1X, value: c}\n- {name: PORT, value: 8080}\n- {value: d}\n- plain",
            ),
            vec![
                "spec.containers[0].env[1].name: duplicate variable \"MODE\"".into(),
                "spec.containers[0].env[2].name: \"1X\" is not a valid variable name: \
                 expected letters, digits and '_', not starting with a digit"
                    .into(),
                "spec.containers[0].env[3].value: expected a string, found a number \
                 (put it in quotes to use it as text)"
                    .into(),
                "spec.containers[0].env[4].name: required".into(),
                "spec.containers[0].env[5]: expected a map, found a string".into(),
            ],
        ),
        (
            "env given as a map",
            with_container("env: {MODE: prod}"),
            vec![
                "spec.containers[0].env: expected a list of {name, value} maps, found a map".into(),
            ],
        ),
        (
            "bad image references",
            format!(
                "{HEAD}spec:\n  containers:\n  - {{name: a, image: \"busy box\"}}\n  \
                 - {{name: b, image: {}}}\n  - {{name: c, image: !foo x}}\n  - {{name: d, image: 5}}\n",
                "x".repeat(1025)
            ),
            vec![
                "spec.containers[0].image: \"busy box\" is not a valid image reference: \
                 character ' ' at position 4 is not allowed"
                    .into(),
                "spec.containers[1].image: must be at most 1024 bytes, found 1025".into(),
                "spec.containers[2].image: expected a string, found a value tagged !foo".into(),
                "spec.containers[3].image: expected a string, found a number \
                 (put it in quotes to use it as text)"
                    .into(),
            ],
        ),
        (
            "relative working directory",
            with_container("workingDir: app"),
            vec!["spec.containers[0].workingDir: \"app\" is not an absolute path".into()],
        ),
        (
            "document that is not a map",
            format!(
                "- a\n- b\n---\n{}",
                with_spec("containers: [{name: a, image: b}]")
            ),
            vec!["document 1: expected a map, found a list".into()],
        ),
        (
            "no document",
            "# nothing here\n---\n\n---\n# still nothing\n".into(),
            vec!["no workload found: the input has no YAML document".into()],
        ),
        (
            "empty input",
            String::new(),
            vec!["no workload found: the input has no YAML document".into()],
        ),
        (
            "long values are cut in messages",
            with_spec(&format!(
                "restartPolicy: {}\ncontainers: [{{name: a, image: b}}]",
                "A".repeat(100)
            )),
            vec![format!(
                "spec.restartPolicy: \"{}\"… is not one of Always, OnFailure, Never",
                "A".repeat(64)
            )],
        ),
    ];
    assert!(cases.len() >= 20);
    // Every case is run before failing, so one run shows all mismatches.
    let failed: Vec<String> = cases
        .into_iter()
        .filter_map(|(name, text, expected)| {
            let got = error_lines(&text);
            (got != expected)
                .then(|| format!("{name}:\n  got      {got:?}\n  expected {expected:?}"))
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn reports_every_problem_of_every_document_at_once() {
    let text = format!(
        "{HEAD}spec:\n  restartPolicy: Sometimes\n  containers:\n  - name: Main\n    \
         resources: {{limits: {{memory: 12Q}}}}\n---\nkind: Workload\nmetadata: {{name: web}}\n\
         spec:\n  containers: [{{name: a, image: b, extra: 1}}]\n---\napiVersion: v2\nkind: Pod\n"
    );
    let errors = match parse(&text) {
        Ok(w) => panic!("accepted: {w:?}"),
        Err(e) => e,
    };
    let got: Vec<_> = errors
        .0
        .iter()
        .map(|e| (e.document, e.path.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "spec.restartPolicy"),
            (1, "spec.containers[0].name"),
            (1, "spec.containers[0].image"),
            (1, "spec.containers[0].resources.limits.memory"),
            (2, "apiVersion"),
            (2, "spec.containers[0].extra"),
            (2, "metadata.name"),
            (3, "apiVersion"),
            (3, "kind"),
        ]
    );
    assert!(errors.0.iter().all(|e| e.multi_document));
    assert_eq!(
        errors.0[6].to_string(),
        "document 2: metadata.name: duplicate workload name \"web\" (also in document 1)"
    );
    assert_eq!(errors.to_string().lines().count(), 9);
}

#[test]
fn a_yaml_error_does_not_hide_other_documents() {
    // An unknown alias leaves libyaml mid-document; reading on from there in
    // the same stream would misparse (serde_norway even panics), so this also
    // checks that the next document is parsed on its own.
    let text = format!(
        "{HEAD}spec: *nope\n---\n{}---\n{}",
        with_spec("containers: [{name: a, image: b}]").replace("web", "two"),
        with_spec("containers: [{name: a}]").replace("web", "three"),
    );
    assert_eq!(
        error_lines(&text),
        vec![
            "document 1: invalid YAML at line 5, column 7: unknown anchor",
            "document 3: spec.containers[0].image: required",
        ]
    );
}

#[test]
fn hostile_yaml_is_refused_not_expanded() {
    let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .windows(2)
        .map(|w| (w[0], w[1]))
    {
        laughs.push_str(&format!(
            "{name}: &{name} [{}]\n",
            vec![format!("*{prev}"); 10].join(", ")
        ));
    }
    assert_eq!(
        error_lines(&laughs),
        vec!["invalid YAML in the document starting at line 1: repetition limit exceeded"]
    );

    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(
        error_lines(&deep),
        vec!["invalid YAML at line 1, column 129: recursion limit exceeded"]
    );

    let huge = format!(
        "{}\n{}",
        with_spec("containers: [{name: a, image: b}]"),
        "#".repeat(MAX_MANIFEST_BYTES)
    );
    let errors = match parse(&huge) {
        Ok(w) => panic!("accepted: {w:?}"),
        Err(e) => e,
    };
    assert_eq!(
        errors.to_string(),
        format!(
            "manifest is too large: {} bytes, at most 1048576",
            huge.len()
        )
    );
}

#[test]
fn canonical_json_reads_back_to_the_same_workload() {
    let mut big = full();
    big.spec.containers[0].resources = Resources {
        cpu_millis: Some(u32::MAX),
        memory_bytes: Some(u64::MAX),
        pids: Some(u32::MAX),
    };
    big.spec.containers[1].resources.memory_bytes = Some(1536);
    big.spec.containers[1].env.push(EnvVar {
        name: "MULTI".into(),
        value: "line one\nline \"two\": 1.10\n".into(),
    });
    let never = Workload {
        spec: WorkloadSpec {
            restart_policy: RestartPolicy::Never,
            ..workload("n", vec![container("c", "i")]).spec
        },
        ..workload("n", vec![])
    };
    for w in [
        workload("a", vec![container("c", "oci:/srv/images/busybox:latest")]),
        full(),
        big,
        never,
    ] {
        let json = w.to_json();
        let text = match serde_json::to_string(&json) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(parse(&text), Ok(vec![w.clone()]), "json: {text}");
        let yaml = match serde_norway::to_string(&json) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(parse(&yaml), Ok(vec![w]), "yaml:\n{yaml}");
    }
}

#[test]
fn canonical_json_spells_out_every_field() {
    let got = full().to_json();
    let expected = serde_json::json!({
        "apiVersion": "flotilla.dev/v1",
        "kind": "Workload",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web", "flotilla.dev/tier": "front"}},
        "spec": {
            "nodeSelector": {"site": "shop12"},
            "everyNode": true,
            "restartPolicy": "OnFailure",
            "terminationGracePeriodSeconds": 30,
            "volumes": [],
            "containers": [
                {
                    "name": "main",
                    "image": "oci:/srv/images/busybox:latest",
                    "command": ["sh", "-c"],
                    "args": ["echo hi; sleep 3600"],
                    "env": [{"name": "MODE", "value": "prod"}, {"name": "_EMPTY", "value": ""}],
                    "workingDir": "/app",
                    "resources": {"limits": {"cpu": "500m", "memory": "64Mi", "pids": 100}},
                    "volumeMounts": [],
                },
                {
                    "name": "side",
                    "image": "oci:/srv/images/side:1",
                    "command": [],
                    "args": [],
                    "env": [],
                    "resources": {"limits": {"cpu": "2", "memory": "128Mi"}},
                    "volumeMounts": [],
                },
            ],
        },
    });
    assert_eq!(got, expected);
}

#[test]
fn node_selector_matches_nodes_with_all_its_labels() {
    let node = map(&[("site", "shop12"), ("arch", "arm64")]);
    let w = full();
    assert!(w.matches(&node));
    assert!(!w.matches(&map(&[("site", "shop13"), ("arch", "arm64")])));
    assert!(!w.matches(&map(&[("arch", "arm64")])));
    assert!(!w.matches(&BTreeMap::new()));
    let mut two = full();
    two.spec.node_selector.insert("arch".into(), "amd64".into());
    assert!(!two.matches(&node));
    let everywhere = workload("a", vec![container("c", "i")]);
    assert!(everywhere.matches(&BTreeMap::new()));
    assert!(everywhere.matches(&node));
}

#[test]
fn pod_spec_copies_the_containers() {
    let w = full();
    assert_eq!(
        w.pod_spec("web-7f3a"),
        PodSpec {
            name: "web-7f3a".into(),
            workload: "web".into(),
            restart_policy: RestartPolicy::OnFailure,
            termination_grace_secs: 30,
            volumes: vec![],
            containers: w.spec.containers.clone(),
            image_pull_secrets: Vec::new(),
        }
    );
}

#[test]
fn single_document_errors_are_not_numbered() {
    let errors = match parse(&with_spec("containers: [{name: a}]")) {
        Ok(w) => panic!("accepted: {w:?}"),
        Err(e) => e,
    };
    assert_eq!(
        errors.0,
        vec![FieldError {
            document: 1,
            path: "spec.containers[0].image".into(),
            message: "required".into(),
            multi_document: false,
        }]
    );
    assert_eq!(errors.to_string(), "spec.containers[0].image: required");
}

#[test]
fn problems_past_the_cap_are_counted_not_listed() {
    let args = vec!["1"; MAX_REPORTED_ERRORS + 500].join(", ");
    let text = format!(
        "{}---\n{}",
        with_container(&format!("args: [{args}]")),
        with_spec("containers: [{name: a}]")
    );
    let errors = match parse(&text) {
        Ok(w) => panic!("accepted: {w:?}"),
        Err(e) => e,
    };
    assert_eq!(errors.0.len(), MAX_REPORTED_ERRORS + 1);
    assert_eq!(
        errors.0[MAX_REPORTED_ERRORS - 1].to_string(),
        "document 1: spec.containers[0].args[999]: expected a string, found a number \
         (put it in quotes to use it as text)"
    );
    // 500 more args, then document 2's missing image and its duplicate name.
    assert_eq!(
        errors.0.last().map(ToString::to_string).as_deref(),
        Some("502 more problems not shown")
    );
}
