//! The canonical manifest of a workload: every field spelled out, quantities
//! in one form, so that stored and printed workloads read back unchanged.

use std::collections::BTreeMap;

use flotilla_proto::{ContainerSpec, RestartPolicy};
use serde_json::{Map, Value, json};

use super::quantity::{format_cpu, format_memory};
use super::{API_VERSION, KIND, Workload};

impl Workload {
    /// The canonical manifest, used to store a workload and to print it with
    /// `get -o yaml|json`. Defaults are written out (`restartPolicy`, empty
    /// lists and maps); optional values that are unset (`workingDir`, each
    /// limit) are left out, as absence is what "unset" means in a manifest.
    pub fn to_json(&self) -> Value {
        json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": self.name,
                "labels": string_map(&self.labels),
            },
            "spec": {
                "nodeSelector": string_map(&self.spec.node_selector),
                "restartPolicy": restart_policy(self.spec.restart_policy),
                "containers": self.spec.containers.iter().map(container).collect::<Vec<_>>(),
            },
        })
    }
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

fn container(c: &ContainerSpec) -> Value {
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
    });
    if let (Some(dir), Value::Object(map)) = (&c.working_dir, &mut out) {
        map.insert("workingDir".into(), Value::String(dir.clone()));
    }
    out
}
