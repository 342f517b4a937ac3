//! A rollout's stored form: JSON in the store's `rollouts` table, read
//! back by a restarted controller (fields added later may be absent).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::{Phase, Rollout, Switch};

impl Rollout {
    /// The stored form.
    pub fn to_json(&self) -> Value {
        let switched: serde_json::Map<String, Value> = self
            .switched
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    json!({"atMs": s.at_ms, "generation": s.generation}),
                )
            })
            .collect();
        json!({
            "workload": self.workload,
            "from": self.from,
            "to": self.to,
            "startedMs": self.started_ms,
            "nodes": self.nodes,
            "wave": self.wave,
            "switched": switched,
            "healthy": self.healthy,
            "failed": self.failed,
            "phase": self.phase.as_str(),
            "readySince": self.ready_since,
            "prefetching": self.prefetching,
            "prefetchTimedOut": self.prefetch_timed_out,
        })
    }

    /// Reads the stored form back.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let text = |key: &str| {
            v[key]
                .as_str()
                .map(str::to_owned)
                .ok_or(format!("{key}: expected a string"))
        };
        let number = |key: &str| v[key].as_u64().ok_or(format!("{key}: expected a number"));
        let strings = |key: &str| -> Result<Vec<String>, String> {
            v[key]
                .as_array()
                .ok_or(format!("{key}: expected a list"))?
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_owned)
                        .ok_or(format!("{key}: expected strings"))
                })
                .collect()
        };
        let mut switched = BTreeMap::new();
        for (node, s) in v["switched"]
            .as_object()
            .ok_or("switched: expected a map")?
        {
            let at_ms = s["atMs"]
                .as_u64()
                .ok_or("switched: atMs: expected a number")?;
            let generation = s["generation"]
                .as_u64()
                .ok_or("switched: generation: expected a number")?;
            switched.insert(node.clone(), Switch { at_ms, generation });
        }
        let mut failed = BTreeMap::new();
        for (node, why) in v["failed"].as_object().ok_or("failed: expected a map")? {
            let why = why.as_str().ok_or("failed: expected strings")?;
            failed.insert(node.clone(), why.to_owned());
        }
        let mut ready_since = BTreeMap::new();
        // Absent from rollouts stored before it was kept.
        if let Some(map) = v.get("readySince") {
            for (node, ms) in map.as_object().ok_or("readySince: expected a map")? {
                let ms = ms.as_u64().ok_or("readySince: expected numbers")?;
                ready_since.insert(node.clone(), ms);
            }
        }
        // Absent from rollouts stored before prefetches were.
        let mut prefetching = BTreeMap::new();
        if let Some(map) = v.get("prefetching") {
            for (node, ms) in map.as_object().ok_or("prefetching: expected a map")? {
                let ms = ms.as_u64().ok_or("prefetching: expected numbers")?;
                prefetching.insert(node.clone(), ms);
            }
        }
        let prefetch_timed_out = match v.get("prefetchTimedOut") {
            Some(_) => strings("prefetchTimedOut")?.into_iter().collect(),
            None => BTreeSet::new(),
        };
        let phase = text("phase")?;
        Ok(Self {
            workload: text("workload")?,
            from: number("from")?,
            to: number("to")?,
            started_ms: number("startedMs")?,
            nodes: strings("nodes")?,
            wave: usize::try_from(number("wave")?).map_err(|e| e.to_string())?,
            switched,
            healthy: strings("healthy")?.into_iter().collect(),
            failed,
            phase: Phase::parse(&phase).ok_or(format!("phase: unknown {phase:?}"))?,
            ready_since,
            prefetching,
            prefetch_timed_out,
        })
    }
}
