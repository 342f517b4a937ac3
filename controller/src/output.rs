//! How the CLI prints API objects: aligned tables for `get`, key/value
//! sections for `describe`.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// `-o` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// Aligned columns, more of them.
    Wide,
    /// The API's JSON, pretty.
    Json,
    /// The API's JSON as YAML.
    Yaml,
}

impl Format {
    /// Parses `wide`, `json`, `yaml`; no flag is `Table`.
    pub fn parse(s: Option<&str>) -> anyhow::Result<Format> {
        Ok(match s {
            None => Format::Table,
            Some("wide") => Format::Wide,
            Some("json") => Format::Json,
            Some("yaml") => Format::Yaml,
            Some(other) => {
                anyhow::bail!("unknown output format {other:?} (expected wide, json or yaml)")
            }
        })
    }
}

/// Lays out rows under a header, columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                let _ = write!(s, "{cell:<w$}   ");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "<none>".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `5s`, `3m`, `2h`, `4d` since `ms` (ms since the epoch); `<never>` for 0.
pub fn age(ms: u64) -> String {
    if ms == 0 {
        return "<never>".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    duration(now.saturating_sub(ms) / 1000)
}

/// `45s`, `12m`, `5h`, `3d`.
fn duration(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// Labels as `k=v,k2=v2`, `<none>` when there are none.
pub fn labels(v: &Value) -> String {
    let pairs: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    if pairs.is_empty() {
        "<none>".into()
    } else {
        pairs.join(",")
    }
}

fn bytes(v: &Value) -> String {
    match v.as_u64() {
        Some(b) if b >= 1 << 30 => format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{}Mi", b >> 20),
        None => "<unknown>".into(),
    }
}

fn load(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "<unknown>".into(), |l| format!("{l:.2}"))
}

/// The first block of a boot id: enough to tell reboots apart in a table.
fn short_id(v: &Value) -> String {
    match v.as_str() {
        Some(id) => id.split('-').next().unwrap_or(id).to_owned(),
        None => "<unknown>".into(),
    }
}

/// `get nodes`.
pub fn nodes_table(items: &[Value], wide: bool) -> String {
    let mut header = vec![
        "NAME",
        "STATUS",
        "ARCH",
        "VERSION",
        "PODS",
        "SYNCED",
        "LAST-SEEN",
    ];
    if wide {
        header.extend([
            "CPUS",
            "MEMORY",
            "MEM-AVAIL",
            "DISK-FREE",
            "LOAD",
            "BOOT-ID",
            "LABELS",
        ]);
    }
    let rows = items
        .iter()
        .map(|n| {
            let synced = if n["desiredGeneration"] == n["observedGeneration"] {
                "yes"
            } else {
                "no"
            };
            let mut row = vec![
                s(&n["name"]),
                s(&n["status"]),
                s(&n["arch"]),
                s(&n["agentVersion"]),
                s(&n["podCount"]),
                format!(
                    "{} ({}/{})",
                    synced, n["observedGeneration"], n["desiredGeneration"]
                ),
                age(n["lastSeenMs"].as_u64().unwrap_or(0)),
            ];
            if wide {
                let health = &n["health"];
                row.extend([
                    s(&n["cpus"]),
                    bytes(&n["memoryBytes"]),
                    bytes(&health["memoryAvailableBytes"]),
                    bytes(&health["diskFreeBytes"]),
                    load(&health["load"]),
                    short_id(&n["bootId"]),
                    labels(&n["labels"]),
                ]);
            }
            row
        })
        .collect();
    table(&header, rows)
}

/// `get workloads`.
pub fn workloads_table(items: &[Value], wide: bool) -> String {
    let mut header = vec!["NAME", "RUNNING", "IMAGES"];
    if wide {
        header.push("SELECTOR");
    }
    let rows = items
        .iter()
        .map(|w| {
            let images: Vec<String> = w["images"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            let mut row = vec![
                s(&w["name"]),
                format!("{}/{}", w["runningPods"], w["desiredPods"]),
                images.join(","),
            ];
            if wide {
                row.push(labels(&w["manifest"]["spec"]["nodeSelector"]));
            }
            row
        })
        .collect();
    table(&header, rows)
}

/// `get secrets`: keys with their sizes, never values.
pub fn secrets_table(items: &[Value]) -> String {
    let rows = items
        .iter()
        .map(|x| {
            let keys: Vec<String> = x["keys"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, n)| format!("{k}({n})"))
                .collect();
            let used: Vec<String> = x["usedBy"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            vec![
                s(&x["name"]),
                s(&x["type"]),
                keys.join(","),
                x["bytes"].to_string(),
                used.join(","),
            ]
        })
        .collect();
    table(&["NAME", "TYPE", "KEYS", "BYTES", "USED BY"], rows)
}

/// What a namespace allows, in a few words: `privileged`, the capabilities,
/// `unconfined`; `nothing` for none.
fn allowed(n: &Value) -> String {
    let mut out = Vec::new();
    if n["allowPrivileged"] == true {
        out.push("privileged".to_owned());
    }
    let caps: Vec<String> = n["allowedCapabilities"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    if !caps.is_empty() {
        out.push(format!("capabilities {}", caps.join(",")));
    }
    if n["allowUnconfinedSeccomp"] == true {
        out.push("unconfined seccomp".to_owned());
    }
    if out.is_empty() {
        return "nothing".to_owned();
    }
    out.join("; ")
}

/// `get namespaces`: what each allows and how many workloads it holds.
pub fn namespaces_table(items: &[Value]) -> String {
    let rows = items
        .iter()
        .map(|n| {
            let count = n["workloads"].as_array().map_or(0, Vec::len);
            vec![s(&n["name"]), count.to_string(), allowed(n)]
        })
        .collect();
    table(&["NAME", "WORKLOADS", "ALLOWS"], rows)
}

/// `describe namespace`.
pub fn describe_namespace(n: &Value) -> String {
    let mut out = String::new();
    let implicit = if n["implicit"] == true {
        " (implicit)"
    } else {
        ""
    };
    let _ = writeln!(out, "Name:       {}{implicit}", s(&n["name"]));
    let _ = writeln!(out, "Allows:     {}", allowed(n));
    let names: Vec<String> = n["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    let list = if names.is_empty() {
        "<none>".to_owned()
    } else {
        names.join(", ")
    };
    let _ = writeln!(out, "Workloads:  {list}");
    out
}

/// `rollout history`: one row per revision, the current one marked.
pub fn revisions_table(items: &[Value]) -> String {
    let rows = items
        .iter()
        .map(|r| {
            let images: Vec<String> = r["images"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            let mark = if r["current"] == true { " *" } else { "" };
            vec![
                format!("{}{mark}", r["revision"]),
                age(r["createdMs"].as_u64().unwrap_or(0)),
                s(&r["cause"]),
                images.join(","),
            ]
        })
        .collect();
    table(&["REVISION", "AGE", "CAUSE", "IMAGES"], rows)
}

/// `rollout status`: the phase, then a bar of the nodes switched (`#`
/// healthy, `+` switched, `x` failed, `-` not yet), then failures.
pub fn rollout_status(r: &Value) -> String {
    const WIDTH: usize = 30;
    let count = |key: &str| r[key].as_array().map_or(0, Vec::len);
    let failed = r["failed"].as_object().map_or(0, serde_json::Map::len);
    let total = r["nodes"].as_u64().unwrap_or(0) as usize;
    let (switched, healthy) = (count("switched"), count("healthy"));
    let cells = |n: usize| (n * WIDTH).checked_div(total).unwrap_or(0);
    let (h, f) = (cells(healthy), cells(failed));
    let sw = cells(switched).max(h + f);
    let bar = format!(
        "{}{}{}{}",
        "#".repeat(h),
        "x".repeat(f),
        "+".repeat(sw - h - f),
        "-".repeat(WIDTH.saturating_sub(sw))
    );
    let mut out = format!(
        "rollout of {}: revision {} -> {}, {}, wave {}/{}\n[{bar}] {switched}/{total} nodes switched, {healthy} healthy, {failed} failed\n",
        s(&r["workload"]),
        r["from"],
        r["to"],
        s(&r["phase"]),
        r["wave"],
        count("waves").max(1),
    );
    for (node, why) in r["failed"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "  {node}: {}", s(why));
    }
    // Per wave: nodes downloading the new images, and those that have them.
    let mut waves: std::collections::BTreeMap<u64, (usize, usize)> = Default::default();
    let prefetching = r["prefetching"].as_array().map_or(&[][..], Vec::as_slice);
    for p in prefetching {
        let counts = waves.entry(p["wave"].as_u64().unwrap_or(0)).or_default();
        counts.0 += 1;
        counts.1 += usize::from(p["ready"] == true);
    }
    for (wave, (n, ready)) in waves {
        let _ = writeln!(
            out,
            "wave {wave}: {n} node{} prefetching, {ready} ready to switch",
            if n == 1 { "" } else { "s" }
        );
    }
    for p in prefetching {
        if let Some(why) = p["error"].as_str() {
            let _ = writeln!(out, "  {}: prefetch failing: {why}", s(&p["node"]));
        }
    }
    for node in r["prefetchTimedOut"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {}: switched at the prefetch timeout, pulling as usual",
            s(node)
        );
    }
    out
}

/// `get pods`.
pub fn pods_table(items: &[Value], wide: bool) -> String {
    let mut header = vec!["NAME", "NODE", "PHASE", "READY", "RESTARTS"];
    if wide {
        header.extend(["GENERATION", "MESSAGE"]);
    }
    let rows = items
        .iter()
        .map(|p| {
            let mut row = vec![
                s(&p["name"]),
                s(&p["node"]),
                s(&p["phase"]),
                s(&p["ready"]),
                s(&p["restarts"]),
            ];
            if wide {
                row.push(format!(
                    "{}/{}",
                    s(&p["podGeneration"]),
                    p["desiredGeneration"]
                ));
                row.push(pod_message(p));
            }
            row
        })
        .collect();
    table(&header, rows)
}

/// The first thing worth telling about a pod that is not plainly running.
fn pod_message(p: &Value) -> String {
    if let Some(m) = p["message"].as_str() {
        return m.to_string();
    }
    for c in p["containers"].as_array().into_iter().flatten() {
        let next = &c["next"];
        if c["state"] == "Running" && !next.is_null() {
            let reason = s(&next["reason"]);
            return match next["message"].as_str() {
                Some(m) => format!(
                    "{}: running the previous version; next: {reason}: {m}",
                    s(&c["name"])
                ),
                None => format!(
                    "{}: running the previous version; next: {reason}",
                    s(&c["name"])
                ),
            };
        }
        if c["state"] != "Running" {
            let reason = s(&c["reason"]);
            return match c["message"].as_str() {
                Some(m) => format!("{}: {reason}: {m}", s(&c["name"])),
                None => format!("{}: {reason}", s(&c["name"])),
            };
        }
    }
    String::new()
}

fn container_lines(out: &mut String, containers: &Value) {
    for c in containers.as_array().into_iter().flatten() {
        let _ = writeln!(out, "  {}:", s(&c["name"]));
        let _ = writeln!(out, "    State:     {}", s(&c["state"]));
        for (key, label) in [
            ("reason", "Reason"),
            ("message", "Message"),
            ("exitCode", "Exit Code"),
        ] {
            if !c[key].is_null() {
                let _ = writeln!(out, "    {:<10} {}", format!("{label}:"), s(&c[key]));
            }
        }
        if let Some(ms) = c["startedAtMs"].as_u64() {
            let _ = writeln!(out, "    Started:   {} ago", age(ms));
        }
        if let Some(ms) = c["finishedAtMs"].as_u64() {
            let _ = writeln!(out, "    Finished:  {} ago", age(ms));
        }
        let _ = writeln!(out, "    Restarts:  {}", s(&c["restarts"]));
        let next = &c["next"];
        if !next.is_null() {
            let _ = writeln!(
                out,
                "    Next:      {} (the running version serves until it starts)",
                s(&next["state"])
            );
            for (key, label) in [("reason", "Reason"), ("message", "Message")] {
                if !next[key].is_null() {
                    let _ = writeln!(out, "      {:<8} {}", format!("{label}:"), s(&next[key]));
                }
            }
        }
    }
}

/// `describe pod`.
pub fn describe_pod(p: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Name:        {}", s(&p["name"]));
    let _ = writeln!(out, "Workload:    {}", s(&p["workload"]));
    let _ = writeln!(
        out,
        "Node:        {} ({})",
        s(&p["node"]),
        s(&p["nodeStatus"])
    );
    let _ = writeln!(out, "Phase:       {}", s(&p["phase"]));
    if !p["message"].is_null() {
        let _ = writeln!(out, "Message:     {}", s(&p["message"]));
    }
    let _ = writeln!(
        out,
        "Generation:  runs {} (node at {}, desired {})",
        s(&p["podGeneration"]),
        p["observedGeneration"],
        p["desiredGeneration"]
    );
    let _ = writeln!(out, "Containers:");
    container_lines(&mut out, &p["containers"]);
    out
}

/// `describe node`.
pub fn describe_node(n: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Name:          {}", s(&n["name"]));
    match n["statusReason"].as_str() {
        Some(reason) => {
            let _ = writeln!(out, "Status:        {} ({reason})", s(&n["status"]));
        }
        None => {
            let _ = writeln!(out, "Status:        {}", s(&n["status"]));
        }
    }
    let _ = writeln!(out, "Labels:        {}", labels(&n["labels"]));
    let _ = writeln!(out, "Architecture:  {}/{}", s(&n["os"]), s(&n["arch"]));
    let _ = writeln!(out, "Agent:         {}", s(&n["agentVersion"]));
    let _ = writeln!(
        out,
        "Capacity:      {} cpus, {} memory",
        s(&n["cpus"]),
        bytes(&n["memoryBytes"])
    );
    let alloc = &n["allocatable"];
    if !alloc.is_null() {
        let cpu = alloc["cpuMillis"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "Allocatable:   {} cpus, {} memory",
            crate::manifest::format_cpu(u32::try_from(cpu).unwrap_or(u32::MAX)),
            bytes(&alloc["memoryBytes"])
        );
    }
    let health = &n["health"];
    if health.is_null() {
        let _ = writeln!(out, "Health:        <not reported>");
    } else {
        let _ = writeln!(
            out,
            "Health:        {} memory available, {} of {} disk free, load {}, up {}",
            bytes(&health["memoryAvailableBytes"]),
            bytes(&health["diskFreeBytes"]),
            bytes(&health["diskTotalBytes"]),
            load(&health["load"]),
            duration(health["uptimeSecs"].as_u64().unwrap_or(0)),
        );
    }
    let _ = writeln!(out, "Boot id:       {}", s(&n["bootId"]));
    let _ = writeln!(
        out,
        "Last seen:     {} ago",
        age(n["lastSeenMs"].as_u64().unwrap_or(0))
    );
    let _ = writeln!(
        out,
        "Generation:    observed {} of desired {}",
        n["observedGeneration"], n["desiredGeneration"]
    );
    if !n["desiredError"].is_null() {
        let _ = writeln!(out, "Desired error: {}", s(&n["desiredError"]));
    }
    let _ = writeln!(out, "Pods:");
    let pods = n["pods"].as_array().cloned().unwrap_or_default();
    if pods.is_empty() {
        let _ = writeln!(out, "  <none>");
    } else {
        for line in pods_table(&pods, false).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// `describe workload`.
pub fn describe_workload(w: &Value) -> anyhow::Result<String> {
    let mut out = String::new();
    let _ = writeln!(out, "Name:     {}", s(&w["name"]));
    if let Some(ns) = w["namespace"].as_str() {
        let _ = writeln!(out, "Namespace: {ns}");
    }
    let violations = w["policyViolations"].as_array().into_iter().flatten();
    for (i, v) in violations.enumerate() {
        if i == 0 {
            let _ = writeln!(
                out,
                "Policy:   not allowed by its namespace any more (pods keep running; a change is refused):"
            );
        }
        let _ = writeln!(out, "  {}", s(v));
    }
    let _ = writeln!(out, "Running:  {}/{}", w["runningPods"], w["desiredPods"]);
    let _ = writeln!(out, "Placement: {}", s(&w["placement"]));
    if !w["revision"].is_null() {
        let _ = writeln!(out, "Revision: {}", w["revision"]);
    }
    if let Some(reason) = w["unschedulable"].as_str() {
        let _ = writeln!(out, "Unschedulable: {reason}");
    }
    let _ = writeln!(out, "Manifest:");
    for line in serde_norway::to_string(&w["manifest"])?.lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(out, "Pods:");
    let pods = w["pods"].as_array().cloned().unwrap_or_default();
    if pods.is_empty() {
        let _ = writeln!(out, "  <none> (no node matches the selector)");
    } else {
        for line in pods_table(&pods, true).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align() {
        let pods = vec![
            json!({"name": "web@pi-1", "node": "pi-1", "phase": "Running", "ready": "1/1", "restarts": 0}),
            json!({"name": "db@shop-server", "node": "shop-server", "phase": "Pending", "ready": "0/1", "restarts": 12}),
        ];
        assert_eq!(
            pods_table(&pods, false),
            "NAME             NODE          PHASE     READY   RESTARTS\n\
             web@pi-1         pi-1          Running   1/1     0\n\
             db@shop-server   shop-server   Pending   0/1     12\n"
        );
    }

    #[test]
    fn nodes_wide_and_described_show_health() {
        let n = json!({"name": "pi-1", "status": "Ready", "arch": "arm64", "agentVersion": "0.1.0",
            "podCount": 1, "observedGeneration": 2, "desiredGeneration": 2, "lastSeenMs": 0,
            "cpus": 4, "memoryBytes": 4u64 << 30, "bootId": "0c6a2b1e-5f1d-4c1e-9d5e-0123456789ab",
            "labels": {"site": "a"},
            "health": {"memoryAvailableBytes": 3u64 << 30, "diskFreeBytes": 512u64 << 20,
                       "diskTotalBytes": 8u64 << 30, "load": 0.52, "uptimeSecs": 90000}});
        let table = nodes_table(std::slice::from_ref(&n), true);
        let row = table.lines().nth(1).unwrap();
        for cell in ["4.0Gi", "3.0Gi", "512Mi", "0.52", "0c6a2b1e", "site=a"] {
            assert!(row.contains(cell), "{cell} missing in {row}");
        }
        let text = describe_node(&n);
        assert!(
            text.contains(
                "Health:        3.0Gi memory available, 512Mi of 8.0Gi disk free, load 0.52, up 25h"
            ),
            "{text}"
        );
        assert!(text.contains("Boot id:       0c6a2b1e-5f1d-4c1e-9d5e-0123456789ab"));
        let mut gone = n.clone();
        gone["status"] = "NotReady".into();
        gone["statusReason"] = "NoContact".into();
        gone["health"] = Value::Null;
        let text = describe_node(&gone);
        assert!(
            text.contains("Status:        NotReady (NoContact)"),
            "{text}"
        );
        assert!(text.contains("Health:        <not reported>"), "{text}");
    }

    #[test]
    fn pod_message_names_the_waiting_container() {
        let p = json!({"message": null, "containers": [
            {"name": "a", "state": "Running"},
            {"name": "b", "state": "Waiting", "reason": "ImageNotFound", "message": "no such layout"}]});
        assert_eq!(pod_message(&p), "b: ImageNotFound: no such layout");
    }

    #[test]
    fn rollout_status_draws_the_nodes() {
        let r = json!({
            "workload": "web", "from": 1, "to": 2, "phase": "Progressing",
            "wave": 2, "waves": [1, 3, 6], "nodes": 6,
            "switched": ["a", "b", "c"], "healthy": ["a"],
            "failed": {"b": "container main exited with 1"},
        });
        assert_eq!(
            rollout_status(&r),
            "rollout of web: revision 1 -> 2, Progressing, wave 2/3\n\
             [#####xxxxx+++++---------------] 3/6 nodes switched, 1 healthy, 1 failed\n  \
             b: container main exited with 1\n"
        );
        let r = json!({
            "workload": "web", "from": 1, "to": 2, "phase": "Progressing",
            "wave": 1, "waves": [1, 3], "nodes": 3,
            "switched": ["a"], "healthy": [], "failed": {},
            "prefetching": [
                {"node": "b", "wave": 2, "ready": true, "error": null},
                {"node": "c", "wave": 2, "ready": false, "error": "ErrImagePull: image \"x\": down"},
            ],
            "prefetchTimedOut": ["a"],
        });
        assert_eq!(
            rollout_status(&r),
            "rollout of web: revision 1 -> 2, Progressing, wave 1/2\n\
             [++++++++++--------------------] 1/3 nodes switched, 0 healthy, 0 failed\n\
             wave 2: 2 nodes prefetching, 1 ready to switch\n  \
             c: prefetch failing: ErrImagePull: image \"x\": down\n  \
             a: switched at the prefetch timeout, pulling as usual\n"
        );
    }
}
