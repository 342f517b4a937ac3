//! The canonical manifest of a workload: every field spelled out, quantities
//! in one form, so that stored and printed workloads read back unchanged.

use std::collections::BTreeMap;

use base64::Engine as _;
use flotilla_proto::{ContainerSpec, Probe, ProbeAction, RestartPolicy, Volume, VolumeSource};
use serde_json::{Map, Value, json};

use super::quantity::{format_cpu, format_memory};
use super::{API_VERSION, Amount, KIND, Placement, Requests, Strategy, Workload};

impl Workload {
    /// The canonical manifest, used to store a workload and to print it with
    /// `get -o yaml|json`. Defaults are written out (`restartPolicy`, the
    /// grace period, a probe's timings, empty lists and maps); optional
    /// values that are unset (`workingDir`, each limit, each probe) are left
    /// out, as absence is what "unset" means in a manifest. A config file is
    /// written as `content` when it is UTF-8, else as `contentBase64`.
    pub fn to_json(&self) -> Value {
        let containers: Vec<Value> = self
            .spec
            .containers
            .iter()
            .map(|c| container(c, self.spec.requests.get(&c.name)))
            .collect();
        let mut out = json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": string_map(&self.labels),
            },
            "spec": {
                "nodeSelector": string_map(&self.spec.node_selector),
                "restartPolicy": restart_policy(self.spec.restart_policy),
                "terminationGracePeriodSeconds": self.spec.termination_grace_secs,
                "volumes": self.spec.volumes.iter().map(volume).collect::<Vec<_>>(),
                "containers": containers,
            },
        });
        let s = &self.spec.scheduling;
        if !s.architectures.is_empty() {
            out["spec"]["architectures"] = json!(s.architectures);
        }
        match s.placement {
            Placement::EveryNode => out["spec"]["everyNode"] = Value::Bool(true),
            Placement::Replicas(n) => {
                out["spec"]["replicas"] = n.into();
                out["spec"]["tolerationSeconds"] = s.toleration_secs.into();
                if let Some(key) = &s.spread_by {
                    out["spec"]["spreadBy"] = Value::String(key.clone());
                }
            }
        }
        if let Some(strategy) = &self.spec.strategy {
            out["spec"]["strategy"] = strategy_json(strategy);
        }
        if !self.spec.image_pull_secrets.is_empty() {
            let names = self.spec.image_pull_secrets.iter();
            out["spec"]["imagePullSecrets"] = names.map(|s| json!({"name": s.name})).collect();
        }
        out
    }
}

fn amount(a: Amount) -> Value {
    match a {
        Amount::Count(n) => n.into(),
        Amount::Percent(p) => Value::String(format!("{p}%")),
    }
}

fn strategy_json(s: &Strategy) -> Value {
    json!({
        "waves": s.waves.iter().map(|a| amount(*a)).collect::<Vec<_>>(),
        "maxUnavailable": amount(s.max_unavailable),
        "healthySeconds": s.healthy_secs,
        "failureThreshold": amount(s.failure_threshold),
        "progressDeadlineSeconds": s.progress_deadline_secs,
        "prefetch": s.prefetch,
        "prefetchTimeoutSeconds": s.prefetch_timeout_secs,
    })
}

fn string_map(m: &BTreeMap<String, String>) -> Value {
    Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

fn restart_policy(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::Always => "Always",
        RestartPolicy::OnFailure => "OnFailure",
        RestartPolicy::Never => "Never",
    }
}

fn container(c: &ContainerSpec, requests: Option<&Requests>) -> Value {
    let mut limits = Map::new();
    if let Some(cpu) = c.resources.cpu_millis {
        limits.insert("cpu".into(), Value::String(format_cpu(cpu)));
    }
    if let Some(memory) = c.resources.memory_bytes {
        limits.insert("memory".into(), format_memory(memory));
    }
    if let Some(pids) = c.resources.pids {
        limits.insert("pids".into(), Value::from(pids));
    }
    let mut out = json!({
        "name": c.name,
        "image": c.image,
        "command": c.command,
        "args": c.args,
        "env": c.env.iter().map(|e| json!({"name": e.name, "value": e.value})).collect::<Vec<_>>(),
        "resources": {"limits": limits},
        "volumeMounts": c.volume_mounts.iter().map(|m| json!({
            "name": m.name,
            "mountPath": m.mount_path,
            "readOnly": m.read_only,
        })).collect::<Vec<_>>(),
    });
    if let Some(r) = requests {
        let mut asked = Map::new();
        if let Some(cpu) = r.cpu_millis {
            asked.insert("cpu".into(), Value::String(format_cpu(cpu)));
        }
        if let Some(memory) = r.memory_bytes {
            asked.insert("memory".into(), format_memory(memory));
        }
        out["resources"]["requests"] = Value::Object(asked);
    }
    if let Value::Object(map) = &mut out {
        if let Some(dir) = &c.working_dir {
            map.insert("workingDir".into(), Value::String(dir.clone()));
        }
        for (key, p) in [
            ("livenessProbe", &c.liveness_probe),
            ("readinessProbe", &c.readiness_probe),
            ("startupProbe", &c.startup_probe),
        ] {
            if let Some(p) = p {
                map.insert(key.into(), probe(p));
            }
        }
        if let Some(s) = &c.security_context {
            map.insert("securityContext".into(), super::security::to_json(s));
        }
    }
    out
}

fn volume(v: &Volume) -> Value {
    match &v.source {
        VolumeSource::HostPath { path } => json!({"name": v.name, "hostPath": {"path": path}}),
        VolumeSource::Scratch => json!({"name": v.name, "emptyDir": {}}),
        VolumeSource::Config { files } => {
            let files: Vec<Value> = files
                .iter()
                .map(|f| {
                    let mut out = json!({"path": f.path, "mode": format!("{:04o}", f.mode)});
                    let (key, content) = match std::str::from_utf8(&f.data) {
                        Ok(text) => ("content", text.to_owned()),
                        Err(_) => (
                            "contentBase64",
                            base64::engine::general_purpose::STANDARD.encode(&f.data),
                        ),
                    };
                    out[key] = Value::String(content);
                    out
                })
                .collect();
            json!({"name": v.name, "config": {"files": files}})
        }
        VolumeSource::Secret {
            items,
            default_mode,
            sealed,
        } => {
            let items: Vec<Value> = items
                .iter()
                .map(|i| {
                    let mut out = json!({"key": i.key, "path": i.path});
                    if let Some(mode) = i.mode {
                        out["mode"] = Value::String(format!("{mode:04o}"));
                    }
                    out
                })
                .collect();
            let mut secret = json!({
                "secretName": sealed.name,
                "defaultMode": format!("{default_mode:04o}"),
            });
            if !items.is_empty() {
                secret["items"] = Value::Array(items);
            }
            json!({"name": v.name, "secret": secret})
        }
    }
}

fn probe(p: &Probe) -> Value {
    let mut out = json!({
        "initialDelaySeconds": p.initial_delay_secs,
        "periodSeconds": p.period_secs,
        "timeoutSeconds": p.timeout_secs,
        "successThreshold": p.success_threshold,
        "failureThreshold": p.failure_threshold,
    });
    let (key, action) = match &p.action {
        ProbeAction::Exec { command } => ("exec", json!({"command": command})),
        ProbeAction::Tcp { port } => ("tcpSocket", json!({"port": port})),
        ProbeAction::Http { port, path } => ("httpGet", json!({"port": port, "path": path})),
    };
    out[key] = action;
    out
}
