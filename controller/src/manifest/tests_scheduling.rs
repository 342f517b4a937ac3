//! Tests of the scheduling fields: `everyNode`, `replicas`,
//! `architectures`, `spreadBy`, `tolerationSeconds`, `resources.requests`.

use super::*;

fn manifest(name: &str, spec_fields: &str, container_fields: &str) -> String {
    let spec: String = spec_fields.lines().map(|l| format!("  {l}\n")).collect();
    let fields: String = container_fields
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n{spec}  \
         containers:\n  - name: main\n    image: busybox\n{fields}"
    )
}

fn parsed(text: &str) -> Workload {
    match parse(text) {
        Ok(mut w) if w.len() == 1 => w.remove(0),
        Ok(w) => panic!("expected one workload, got {w:?}"),
        Err(e) => panic!("refused:\n{e}\n---\n{text}"),
    }
}

fn refused(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(w) => panic!("accepted: {w:?}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn every_node_is_the_default_and_replicas_read_in_full() {
    let w = parsed(&manifest("web", "", ""));
    assert_eq!(w.spec.scheduling, Scheduling::default());
    assert_eq!(w.spec.scheduling.placement, Placement::EveryNode);
    assert_eq!(
        parsed(&manifest("web", "everyNode: true", ""))
            .spec
            .scheduling,
        Scheduling::default()
    );

    let w = parsed(&manifest(
        "web",
        "replicas: 3\narchitectures: [arm64, amd64]\nspreadBy: site\ntolerationSeconds: 60",
        "resources:\n  requests: {cpu: 250m, memory: 64Mi}\n  limits: {cpu: 1}",
    ));
    assert_eq!(
        w.spec.scheduling,
        Scheduling {
            placement: Placement::Replicas(3),
            architectures: vec!["amd64".into(), "arm64".into()],
            spread_by: Some("site".into()),
            toleration_secs: 60,
        }
    );
    assert_eq!(
        w.spec.requests["main"],
        Requests {
            cpu_millis: Some(250),
            memory_bytes: Some(64 << 20),
        }
    );
    assert_eq!(w.total_requests(), (250, 64 << 20));
    assert_eq!(w.spec.containers[0].resources.cpu_millis, Some(1000));
    // Requests stay off the wire: the pod is the same without them.
    let plain = parsed(&manifest(
        "web",
        "replicas: 3",
        "resources: {limits: {cpu: 1}}",
    ));
    assert!(w.same_template(&plain));
    assert_eq!(w.pod_spec("web-0"), plain.pod_spec("web-0"));

    // `everyNode: false` with replicas is the same as replicas alone.
    let w2 = parsed(&manifest("web", "everyNode: false\nreplicas: 0", ""));
    assert_eq!(w2.spec.scheduling.placement, Placement::Replicas(0));
    assert_eq!(w2.spec.scheduling.toleration_secs, DEFAULT_TOLERATION_SECS);
}

#[test]
fn canonical_json_keeps_the_scheduling_fields() {
    for text in [
        manifest("web", "", ""),
        manifest(
            "web",
            "replicas: 2\narchitectures: [arm]\nspreadBy: flotilla.dev/site\ntolerationSeconds: 0",
            "resources: {requests: {memory: 1Gi}}",
        ),
        manifest("web", "replicas: 1", "resources: {requests: {}}"),
    ] {
        let w = parsed(&text);
        let json = w.to_json().to_string();
        assert_eq!(parsed(&json), w, "{json}");
    }
    let w = parsed(&manifest("web", "replicas: 2", ""));
    let json = w.to_json();
    assert_eq!(json["spec"]["replicas"], 2);
    assert_eq!(json["spec"]["tolerationSeconds"], 300);
    assert!(json["spec"].get("everyNode").is_none());
    assert_eq!(
        parsed(&manifest("a", "", "")).to_json()["spec"]["everyNode"],
        true
    );
}

#[test]
fn bad_scheduling_fields_are_named_by_path() {
    let cases: [(&str, &str, &str, &[&str]); 9] = [
        (
            "web",
            "everyNode: true\nreplicas: 2",
            "",
            &["spec.replicas: cannot be given with everyNode: true (choose one)"],
        ),
        (
            "web",
            "everyNode: false",
            "",
            &[
                "spec.everyNode: false needs spec.replicas (how many pods, and where the scheduler puts them)",
            ],
        ),
        (
            "web",
            "everyNode: yes please",
            "",
            &["spec.everyNode: expected true or false, found a string"],
        ),
        (
            "web",
            "replicas: -1",
            "",
            &["spec.replicas: -1 is not valid: must be at least 0"],
        ),
        (
            "web",
            "replicas: 100001",
            "",
            &["spec.replicas: 100001 is not valid: must be at most 100000"],
        ),
        (
            "web",
            "replicas: 1\narchitectures: [arm64, x86, arm64]",
            "",
            &[
                "spec.architectures[1]: \"x86\" is not a known architecture (expected one of amd64, arm64, arm, 386, riscv64, ppc64le, s390x, mips64le, loong64)",
                "spec.architectures[2]: duplicate architecture \"arm64\"",
            ],
        ),
        (
            "web",
            "architectures: []\nspreadBy: site\ntolerationSeconds: 5",
            "",
            &[
                "spec.architectures: must name at least one architecture (leave it out for any)",
                "spec.spreadBy: applies only to workloads with spec.replicas",
                "spec.tolerationSeconds: applies only to workloads with spec.replicas",
            ],
        ),
        (
            "web",
            "replicas: 1\nspreadBy: 'bad key!'",
            "resources: {requests: {cpu: lots, gpu: 1}}",
            &[
                "spec.spreadBy: \"bad key!\" is not a valid label key: character ' ' at position 3 is not allowed",
                "spec.containers[0].resources.requests.gpu: unknown field",
                "spec.containers[0].resources.requests.cpu: \"lots\" is not a valid quantity: expected a number of CPUs like 0.5 or 2, or millicpus like 500m",
            ],
        ),
        (
            "a-workload-name-that-is-fifty-nine-characters-long-xxxxxxxx",
            "replicas: 1001",
            "",
            &[
                "metadata.name: \"a-workload-name-that-is-fifty-nine-characters-long-xxxxxxxx\" is too long for 1001 replicas: \
                 pod names a-workload-name-that-is-fifty-nine-characters-long-xxxxxxxx-N must be at most 63 characters",
            ],
        ),
    ];
    for (name, spec, container, expected) in cases {
        assert_eq!(
            refused(&manifest(name, spec, container)),
            expected,
            "{spec}"
        );
    }
    // The longest name that leaves room passes.
    parsed(&manifest(
        "a-workload-name-that-is-fifty-nine-characters-long-xxxxxxxx",
        "replicas: 1000",
        "",
    ));
}

#[test]
fn a_strategy_reads_counts_and_percentages() {
    let w = parsed(&manifest(
        "web",
        "strategy:\n  waves: [1, 10%, '50%']\n  maxUnavailable: 25%\n  healthySeconds: 5\n  \
         failureThreshold: 2\n  progressDeadlineSeconds: 60\n  prefetch: true\n  \
         prefetchTimeoutSeconds: 600",
        "",
    ));
    assert_eq!(
        w.spec.strategy,
        Some(Strategy {
            waves: vec![Amount::Count(1), Amount::Percent(10), Amount::Percent(50)],
            max_unavailable: Amount::Percent(25),
            healthy_secs: 5,
            failure_threshold: Amount::Count(2),
            progress_deadline_secs: 60,
            prefetch: true,
            prefetch_timeout_secs: 600,
        })
    );
    let json = w.to_json().to_string();
    assert_eq!(parsed(&json), w, "{json}");
    // Where the pods go and how they roll out is not part of the pods.
    assert!(w.same_template(&parsed(&manifest("web", "", ""))));
    let defaults = parsed(&manifest("web", "strategy: {}", "")).spec.strategy;
    assert_eq!(
        defaults,
        Some(Strategy {
            waves: vec![],
            max_unavailable: Amount::Count(1),
            healthy_secs: DEFAULT_HEALTHY_SECS,
            failure_threshold: Amount::Count(1),
            progress_deadline_secs: DEFAULT_PROGRESS_DEADLINE_SECS,
            prefetch: false,
            prefetch_timeout_secs: DEFAULT_PREFETCH_TIMEOUT_SECS,
        })
    );
    assert_eq!(Amount::Percent(10).of(25), 3);
    assert_eq!(Amount::Percent(100).of(7), 7);
    assert_eq!(Amount::Count(5).of(2), 2);

    assert_eq!(
        refused(&manifest(
            "web",
            "strategy:\n  waves: [0, 101%, x, true]\n  surge: 1\n  prefetch: 1",
            ""
        )),
        [
            "spec.strategy.surge: unknown field",
            "spec.strategy.waves[0]: 0 is not valid: must be at least 1",
            "spec.strategy.waves[1]: \"101%\" is not valid: expected a node count or a percentage from 1% to 100%",
            "spec.strategy.waves[2]: \"x\" is not valid: expected a node count or a percentage from 1% to 100%",
            "spec.strategy.waves[3]: expected a node count or a percentage like \"10%\", found a boolean",
            "spec.strategy.prefetch: expected true or false, found a number",
        ]
    );
}
