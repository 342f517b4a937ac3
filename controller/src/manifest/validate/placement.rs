//! The scheduling fields of a workload's `spec` (`everyNode`, `replicas`,
//! `architectures`, `spreadBy`, `tolerationSeconds`), its rollout
//! `strategy`, and a container's `resources.requests`.

use std::collections::BTreeSet;

use flotilla_proto::check_label_key;
use serde_norway::{Mapping, Value};

use super::super::quantity::{parse_cpu, parse_memory};
use super::super::{
    ARCHITECTURES, Amount, DEFAULT_HEALTHY_SECS, DEFAULT_PREFETCH_TIMEOUT_SECS,
    DEFAULT_PROGRESS_DEADLINE_SECS, DEFAULT_TOLERATION_SECS, MAX_REPLICAS, Placement, Requests,
    Scheduling, Strategy,
};
use super::{Check, field, optional, shown};

/// Most waves a strategy may list.
const MAX_WAVES: usize = 32;

/// Longest pod name (a DNS label, as `flotilla_proto::check_name` wants).
const MAX_NAME: usize = 63;

impl Check<'_> {
    pub(super) fn scheduling(&mut self, spec: &Mapping) -> Scheduling {
        let every_node = match optional(spec, "everyNode") {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                self.expected("spec.everyNode", "true or false", v);
                None
            }
        };
        let replicas = optional(spec, "replicas").and_then(|v| {
            let n = self.whole("spec.replicas", v, 0)?;
            if n > MAX_REPLICAS {
                self.err(
                    "spec.replicas",
                    format!("{n} is not valid: must be at most {MAX_REPLICAS}"),
                );
                return None;
            }
            Some(n)
        });
        let given_replicas = optional(spec, "replicas").is_some();
        let placement = match (every_node, replicas) {
            (Some(true), _) if given_replicas => {
                self.err(
                    "spec.replicas",
                    "cannot be given with everyNode: true (choose one)",
                );
                Placement::EveryNode
            }
            (Some(false), None) if !given_replicas => {
                self.err(
                    "spec.everyNode",
                    "false needs spec.replicas (how many pods, and where the scheduler puts them)",
                );
                Placement::EveryNode
            }
            (_, Some(n)) => Placement::Replicas(n),
            _ => Placement::EveryNode,
        };
        let architectures = self.architectures(optional(spec, "architectures"));
        let spread_by = optional(spec, "spreadBy").and_then(|v| {
            let key = self.str("spec.spreadBy", v)?;
            match check_label_key(key) {
                Ok(()) => Some(key.to_owned()),
                Err(e) => {
                    let msg = format!("{} is not a valid label key: {e}", shown(key));
                    self.err("spec.spreadBy", msg);
                    None
                }
            }
        });
        let toleration = "spec.tolerationSeconds";
        let toleration_secs = optional(spec, "tolerationSeconds")
            .and_then(|v| self.whole(toleration, v, 0))
            .unwrap_or(DEFAULT_TOLERATION_SECS);
        // Both only mean something when the scheduler chooses nodes: a pod of
        // an everyNode workload belongs to its node and never moves.
        if !given_replicas {
            for key in ["spreadBy", "tolerationSeconds"] {
                if optional(spec, key).is_some() {
                    self.err(
                        &field("spec", key),
                        "applies only to workloads with spec.replicas",
                    );
                }
            }
        }
        Scheduling {
            placement,
            architectures,
            spread_by,
            toleration_secs,
        }
    }

    fn architectures(&mut self, v: Option<&Value>) -> Vec<String> {
        let path = "spec.architectures";
        let Some(v) = v else { return Vec::new() };
        let Value::Sequence(items) = v else {
            self.expected(path, "a list of architectures", v);
            return Vec::new();
        };
        if items.is_empty() {
            self.err(
                path,
                "must name at least one architecture (leave it out for any)",
            );
        }
        let mut out = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let Some(arch) = self.str(&at, item) else {
                continue;
            };
            if !ARCHITECTURES.contains(&arch) {
                let msg = format!(
                    "{} is not a known architecture (expected one of {})",
                    shown(arch),
                    ARCHITECTURES.join(", ")
                );
                self.err(&at, msg);
            } else if !out.insert(arch.to_owned()) {
                self.err(&at, format!("duplicate architecture {}", shown(arch)));
            }
        }
        out.into_iter().collect()
    }

    /// A replica's pod is named `{workload}-{index}`, itself a DNS label:
    /// the workload's name must leave room for the largest index.
    pub(super) fn replica_room(&mut self, name: &str, placement: Placement) {
        let Placement::Replicas(n) = placement else {
            return;
        };
        let longest = name.len() + 1 + n.saturating_sub(1).to_string().len();
        if longest > MAX_NAME {
            let msg = format!(
                "{} is too long for {n} replicas: pod names {name}-N must be at most {MAX_NAME} characters",
                shown(name)
            );
            self.err("metadata.name", msg);
        }
    }

    pub(super) fn strategy(&mut self, v: &Value) -> Option<Strategy> {
        let path = "spec.strategy";
        let fields = [
            "waves",
            "maxUnavailable",
            "healthySeconds",
            "failureThreshold",
            "progressDeadlineSeconds",
            "prefetch",
            "prefetchTimeoutSeconds",
        ];
        let m = self.map(path, v, &fields)?;
        let mut waves = Vec::new();
        match optional(m, "waves") {
            None => {}
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let at = format!("{path}.waves[{i}]");
                    if let Some(a) = self.amount(&at, item) {
                        waves.push(a);
                    }
                }
                if items.len() > MAX_WAVES {
                    let msg = format!("at most {MAX_WAVES} waves, found {}", items.len());
                    self.err(&field(path, "waves"), msg);
                }
            }
            Some(other) => self.expected(
                &field(path, "waves"),
                "a list of node counts or percentages",
                other,
            ),
        }
        let amount = |c: &mut Self, key: &str, default: Amount| {
            optional(m, key)
                .and_then(|v| c.amount(&field(path, key), v))
                .unwrap_or(default)
        };
        let max_unavailable = amount(self, "maxUnavailable", Amount::Count(1));
        let failure_threshold = amount(self, "failureThreshold", Amount::Count(1));
        let secs = |c: &mut Self, key: &str, default: u32| {
            optional(m, key)
                .and_then(|v| c.whole(&field(path, key), v, 0))
                .unwrap_or(default)
        };
        let prefetch = match optional(m, "prefetch") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.expected(&field(path, "prefetch"), "true or false", other);
                false
            }
        };
        Some(Strategy {
            waves,
            max_unavailable,
            healthy_secs: secs(self, "healthySeconds", DEFAULT_HEALTHY_SECS),
            failure_threshold,
            progress_deadline_secs: secs(
                self,
                "progressDeadlineSeconds",
                DEFAULT_PROGRESS_DEADLINE_SECS,
            ),
            prefetch,
            prefetch_timeout_secs: secs(
                self,
                "prefetchTimeoutSeconds",
                DEFAULT_PREFETCH_TIMEOUT_SECS,
            ),
        })
    }

    /// A node count (`3`, at least 1) or a percentage (`"10%"`, 1–100).
    fn amount(&mut self, path: &str, v: &Value) -> Option<Amount> {
        match v {
            Value::Number(_) => self.whole(path, v, 1).map(Amount::Count),
            Value::String(s) => {
                let parsed = s
                    .strip_suffix('%')
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|p| (1..=100).contains(p));
                if parsed.is_none() {
                    let msg = format!(
                        "{} is not valid: expected a node count or a percentage from 1% to 100%",
                        shown(s)
                    );
                    self.err(path, msg);
                }
                parsed.map(Amount::Percent)
            }
            other => {
                self.expected(path, "a node count or a percentage like \"10%\"", other);
                None
            }
        }
    }

    pub(super) fn requests(&mut self, path: &str, v: &Value) -> Option<Requests> {
        let m = self.map(path, v, &["cpu", "memory"])?;
        let mut r = Requests::default();
        if let Some(v) = optional(m, "cpu") {
            r.cpu_millis = self.quantity(&field(path, "cpu"), v, parse_cpu);
        }
        if let Some(v) = optional(m, "memory") {
            r.memory_bytes = self.quantity(&field(path, "memory"), v, parse_memory);
        }
        Some(r)
    }
}
