//! What the API shows of the cluster: nodes, workloads and pods as JSON
//! objects, computed from the control loop's state. Pods are named
//! `{workload}@{node}`.

use flotilla_proto::{
    ContainerState, ContainerStatus, NodeHealth, PodPhase, PodStatus, PrefetchState,
};
use serde_json::{Value, json};

use crate::control::Cluster;
use crate::fleet::{Node, Readiness};
use crate::manifest::Placement;
use crate::manifest::namespace;

/// Every node, sorted by name.
pub fn nodes(c: &Cluster) -> Vec<Value> {
    c.fleet
        .nodes()
        .iter()
        .map(|(name, node)| node_view(c, name, node))
        .collect()
}

/// The nodes `keep` accepts, sorted by name, as the API's `{"items":[…]}`
/// text. Each node's object is built and written out before the next, so
/// the listing of a 10,000-node fleet holds about a KiB of text per node
/// rather than a tree of values ten times that size.
pub fn nodes_text(c: &Cluster, keep: impl Fn(&Node) -> bool) -> String {
    let mut out = String::from("{\"items\":[");
    let mut first = true;
    for (name, node) in c.fleet.nodes() {
        if !keep(node) {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&node_view(c, name, node).to_string());
    }
    out.push_str("]}");
    out
}

/// One node, with its pods.
pub fn node(c: &Cluster, name: &str) -> Option<Value> {
    let node = c.fleet.get(name)?;
    let mut v = node_view(c, name, node);
    v["pods"] = Value::Array(pods(c).into_iter().filter(|p| p["node"] == name).collect());
    Some(v)
}

fn node_view(c: &Cluster, name: &str, node: &Node) -> Value {
    let status = node.status();
    let info = status.as_ref().map(|s| &s.info);
    // All zeros is an agent that has not sampled (or cannot): unknown.
    let health = status
        .as_ref()
        .map(|s| s.health)
        .filter(|h| *h != NodeHealth::default())
        .map(|h| {
            json!({
                "memoryAvailableBytes": h.memory_available_bytes,
                "diskFreeBytes": h.disk_free_bytes,
                "diskTotalBytes": h.disk_total_bytes,
                "load": f64::from(h.load_milli) / 1000.0,
                "uptimeSecs": h.uptime_secs,
            })
        });
    // What placed pods request, against what the node has.
    let (req_cpu, req_mem) = c.desired.get(name).map_or((0, 0), |d| {
        d.pods
            .iter()
            .filter_map(|p| c.workloads.get(p.workload()))
            .map(|w| w.total_requests())
            .fold((0u64, 0u64), |(a, b), (x, y)| (a + x, b.saturating_add(y)))
    });
    let allocatable = info.map(|i| {
        json!({
            "cpuMillis": (u64::from(i.cpus) * 1000).saturating_sub(req_cpu),
            "memoryBytes": i.memory_bytes.saturating_sub(req_mem),
        })
    });
    let reason = match node.readiness {
        Readiness::NotReady if node.expired() => Some("NoContact"),
        Readiness::NotReady => Some("Disconnected"),
        _ => None,
    };
    json!({
        "name": name,
        "status": node.readiness.as_str(),
        "statusReason": reason,
        "labels": node.labels(),
        "controllerLabels": node.controller_labels,
        "notReadySinceMs": node.not_ready_since_ms,
        "arch": info.map(|i| i.arch.as_str()),
        "os": info.map(|i| i.os.as_str()),
        "agentVersion": info.map(|i| i.agent_version.as_str()),
        "cpus": info.map(|i| i.cpus),
        "memoryBytes": info.map(|i| i.memory_bytes),
        "requested": {"cpuMillis": req_cpu, "memoryBytes": req_mem},
        "allocatable": allocatable,
        "bootId": info.map(|i| i.boot_id.as_str()).filter(|b| !b.is_empty()),
        "health": health,
        "lastSeenMs": node.last_seen_ms,
        "desiredGeneration": c.desired.get(name).map_or(0, |d| d.generation),
        "observedGeneration": node.observed_generation(),
        "desiredError": status.as_ref().and_then(|s| s.desired_error.as_deref()),
        "podCount": c.desired.get(name).map_or(0, |d| d.pods.len()),
    })
}

/// Every workload, with how many of its pods are desired and running.
pub fn workloads(c: &Cluster) -> Vec<Value> {
    c.workloads
        .keys()
        .filter_map(|name| workload(c, name))
        .collect()
}

/// One workload: its canonical manifest and its pods.
pub fn workload(c: &Cluster, name: &str) -> Option<Value> {
    let w = c.workloads.get(name)?;
    let pods: Vec<Value> = pods(c)
        .into_iter()
        .filter(|p| p["workload"] == name)
        .collect();
    let running = pods.iter().filter(|p| p["phase"] == "Running").count();
    let policy: Vec<String> = namespace::violations(&c.namespaces, w)
        .iter()
        .map(|v| format!("{}: {}", v.path, v.message))
        .collect();
    Some(json!({
        "name": name,
        "namespace": w.namespace,
        // Privileges its namespace no longer grants (it was tightened
        // after this was applied): the pods run, a change is refused.
        "policyViolations": policy,
        "manifest": w.to_json(),
        "images": w.spec.containers.iter().map(|c| c.image.as_str()).collect::<Vec<_>>(),
        "placement": match w.spec.scheduling.placement {
            Placement::EveryNode => "everyNode".to_owned(),
            Placement::Replicas(n) => format!("replicas: {n}"),
        },
        "unschedulable": c.unschedulable.get(name),
        "revision": c.history.current(name).map(|r| r.number),
        "desiredPods": pods.iter().filter(|p| p["desired"] == true).count(),
        "runningPods": running,
        "pods": pods,
    }))
}

/// Every namespace, `default` first (it is implicit and allows nothing).
pub fn namespaces(c: &Cluster) -> Vec<Value> {
    std::iter::once(namespace::DEFAULT_NAMESPACE)
        .chain(c.namespaces.keys().map(String::as_str))
        .filter_map(|name| namespace(c, name))
        .collect()
}

/// One namespace: what it allows and which workloads are in it.
pub fn namespace(c: &Cluster, name: &str) -> Option<Value> {
    let ns = namespace::lookup(&c.namespaces, name)?;
    let workloads: Vec<&str> = c
        .workloads
        .values()
        .filter(|w| w.namespace == name)
        .map(|w| w.name.as_str())
        .collect();
    Some(json!({
        "name": name,
        "implicit": !c.namespaces.contains_key(name),
        "manifest": ns.to_json(),
        "allowPrivileged": ns.allow_privileged,
        "allowedCapabilities": ns.allowed_capabilities,
        "allowUnconfinedSeccomp": ns.allow_unconfined_seccomp,
        "workloads": workloads,
    }))
}

/// Every Secret: names, types, keys and sizes (never values).
pub fn secrets(c: &Cluster) -> Vec<Value> {
    c.secrets
        .keys()
        .filter_map(|name| secret(c, name))
        .collect()
}

/// One Secret as the API shows it: no value, and which workloads use it.
pub fn secret(c: &Cluster, name: &str) -> Option<Value> {
    let s = c.secrets.get(name)?;
    let keys: serde_json::Map<String, Value> = s
        .data
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.len())))
        .collect();
    let used_by: Vec<&str> = c
        .workloads
        .iter()
        .filter(|(n, w)| crate::secrets::referenced(&w.pod_spec(n)).any(|r| r == name))
        .map(|(n, _)| n.as_str())
        .collect();
    Some(json!({
        "name": name,
        "type": s.kind.as_str(),
        "keys": keys,
        "bytes": s.size(),
        "usedBy": used_by,
    }))
}

/// A workload's revisions, oldest first, with what each ran.
pub fn revisions(c: &Cluster, name: &str) -> Option<Value> {
    c.workloads.get(name)?;
    let list = c.history.list(name);
    let current = list.last().map(|r| r.number);
    let items: Vec<Value> = list
        .iter()
        .map(|r| {
            json!({
                "revision": r.number,
                "createdMs": r.created_ms,
                "cause": r.cause,
                "current": Some(r.number) == current,
                "images": r.workload.spec.containers.iter().map(|c| c.image.as_str()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Some(json!({ "workload": name, "items": items }))
}

/// A workload's rollout, if it has had one.
pub fn rollout(c: &Cluster, name: &str) -> Option<Value> {
    let state = c.rollouts.get(name)?;
    let r = &state.rollout;
    let waves = c
        .workloads
        .get(name)
        .and_then(|w| w.spec.strategy.as_ref())
        .map(|s| r.targets(s))
        .unwrap_or_default();
    Some(json!({
        "workload": name,
        "from": r.from,
        "to": r.to,
        "phase": r.phase.as_str(),
        "startedMs": r.started_ms,
        "wave": (r.wave + 1).min(waves.len().max(1)),
        "waves": waves,
        "nodes": r.nodes.len(),
        "switched": r.switched.keys().collect::<Vec<_>>(),
        "healthy": r.healthy,
        "failed": r.failed,
        "prefetching": prefetching(c, name, &waves),
        "prefetchTimedOut": r.prefetch_timed_out,
    }))
}

/// The nodes of a rollout downloading the new revision's images before
/// they switch: each with its wave (1-based), whether it has them (ready
/// to switch), and why its last attempt failed.
fn prefetching(c: &Cluster, name: &str, waves: &[usize]) -> Vec<Value> {
    let Some(state) = c.rollouts.get(name) else {
        return Vec::new();
    };
    let r = &state.rollout;
    let images = c
        .workloads
        .get(name)
        .map(|w| crate::rollout::prefetch_images(&w.pod_spec(name), &state.stable))
        .unwrap_or_default();
    r.prefetching
        .keys()
        .map(|node| {
            let pos = r.nodes.iter().position(|n| n == node).unwrap_or(0);
            let wave = waves
                .iter()
                .position(|&t| t > pos)
                .map_or(waves.len(), |i| i + 1);
            let status = c.fleet.get(node).and_then(|n| n.status());
            let error = status.as_ref().and_then(|s| {
                s.prefetch.iter().find_map(|p| match &p.state {
                    PrefetchState::Failed {
                        reason, message, ..
                    } if images.contains(&p.image) => Some(format!("{reason}: {message}")),
                    _ => None,
                })
            });
            json!({
                "node": node,
                "wave": wave,
                "ready": crate::rollout::prefetched(status.as_ref(), &images),
                "error": error,
            })
        })
        .collect()
}

/// Every pod: desired ones, and ones a node still reports while removing them.
pub fn pods(c: &Cluster) -> Vec<Value> {
    let mut out = Vec::new();
    for (node_name, node) in c.fleet.nodes() {
        let desired = c.desired.get(node_name);
        let status = node.status();
        let reported = status
            .as_ref()
            .map(|s| s.pods.as_slice())
            .unwrap_or_default();
        let observed = node.observed_generation();
        let generation = desired.map_or(0, |d| d.generation);
        for spec in desired.map(|d| d.pods.as_slice()).unwrap_or_default() {
            let status = reported.iter().find(|p| p.name == spec.name);
            let mut v = pod_view(
                node_name,
                spec.workload(),
                &spec.name,
                status,
                node.readiness,
                generation,
                observed,
            );
            v["desired"] = Value::Bool(true);
            if status.is_none() {
                v["containers"] = spec
                    .template
                    .containers
                    .iter()
                    .map(|c| json!({"name": c.name, "state": "Waiting", "reason": "NotReported", "restarts": 0}))
                    .collect();
            }
            out.push(v);
        }
        for status in reported {
            let still_desired =
                desired.is_some_and(|d| d.pods.iter().any(|p| p.name == status.name));
            if !still_desired {
                let mut v = pod_view(
                    node_name,
                    &status.workload,
                    &status.name,
                    Some(status),
                    node.readiness,
                    generation,
                    observed,
                );
                v["desired"] = Value::Bool(false);
                out.push(v);
            }
        }
    }
    out
}

/// One pod by its `{workload}@{node}` name.
pub fn pod(c: &Cluster, name: &str) -> Option<Value> {
    pods(c).into_iter().find(|p| p["name"] == name)
}

fn pod_view(
    node: &str,
    workload: &str,
    pod_name: &str,
    status: Option<&PodStatus>,
    readiness: Readiness,
    generation: u64,
    observed: u64,
) -> Value {
    let (phase, message) = match status {
        Some(s) => (phase_str(s.phase), s.message.clone()),
        None if readiness == Readiness::NotReady => {
            ("Pending", Some(format!("node {node} is offline")))
        }
        None => (
            "Pending",
            Some(format!("waiting for node {node} to report")),
        ),
    };
    let containers: Vec<Value> = status
        .map(|s| s.containers.iter().map(container_view).collect())
        .unwrap_or_default();
    let restarts: u32 = status.map_or(0, |s| s.containers.iter().map(|c| c.restarts).sum());
    json!({
        "name": format!("{workload}@{node}"),
        "podName": pod_name,
        "workload": workload,
        "node": node,
        "phase": phase,
        "message": message,
        "ready": format!(
            "{}/{}",
            containers.iter().filter(|c| c["ready"] == true).count(),
            containers.len()
        ),
        "restarts": restarts,
        "desiredGeneration": generation,
        "observedGeneration": observed,
        "podGeneration": status.map(|s| s.generation),
        "nodeStatus": readiness.as_str(),
        "containers": containers,
    })
}

fn container_view(c: &ContainerStatus) -> Value {
    let mut v = json!({ "name": c.name, "restarts": c.restarts, "ready": c.ready });
    if let Some(pull) = c.pull {
        v["pull"] = json!({ "doneBytes": pull.done_bytes, "totalBytes": pull.total_bytes });
    }
    state_view(&mut v, &c.state);
    // The new version, waiting for its image while the old one runs.
    if let Some(next) = &c.next {
        let mut n = json!({});
        state_view(&mut n, next);
        v["next"] = n;
    }
    v
}

fn state_view(v: &mut Value, state: &ContainerState) {
    match state {
        ContainerState::Waiting {
            reason,
            message,
            retry_at_ms,
        } => {
            v["state"] = "Waiting".into();
            v["reason"] = reason.as_str().into();
            v["message"] = message.as_deref().into();
            v["retryAtMs"] = (*retry_at_ms).into();
        }
        ContainerState::Running { started_at_ms } => {
            v["state"] = "Running".into();
            v["startedAtMs"] = (*started_at_ms).into();
        }
        ContainerState::Terminated {
            exit_code,
            reason,
            message,
            finished_at_ms,
        } => {
            v["state"] = "Terminated".into();
            v["exitCode"] = (*exit_code).into();
            v["reason"] = reason.as_str().into();
            v["message"] = message.as_deref().into();
            v["finishedAtMs"] = (*finished_at_ms).into();
        }
    }
}

fn phase_str(p: PodPhase) -> &'static str {
    match p {
        PodPhase::Pending => "Pending",
        PodPhase::Running => "Running",
        PodPhase::Succeeded => "Succeeded",
        PodPhase::Failed => "Failed",
        PodPhase::Terminating => "Terminating",
    }
}
