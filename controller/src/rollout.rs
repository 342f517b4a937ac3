//! Workload revisions: every change to what a workload's pods run (its
//! containers, volumes, restart policy or grace period — not where they go)
//! is a numbered revision, kept with when and why it was made, so that
//! `flotilla rollout history` can list them and `rollout undo` can bring
//! one back (as a new revision, as kubectl does).
//!
//! A staged rollout ([`Rollout`]) moves the nodes that run a workload from
//! one revision to the next in waves (`spec.strategy`): a wave's nodes
//! switch, at most `maxUnavailable` not yet healthy at a time; a node is
//! healthy once the new revision's pods have been Ready for
//! `healthySeconds`, and has failed when a container fails or it is not
//! healthy within `progressDeadlineSeconds`. The next wave starts when
//! every node of this one is healthy (or offline: it catches up when it
//! returns, and a failure then still counts). `failureThreshold` failed
//! nodes roll the whole rollout back. The state machine is pure
//! ([`Rollout::step`] takes what the nodes show and the time); the control
//! loop stores it after every change, so a restarted controller resumes it.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use flotilla_proto::{ContainerState, NodeStatus, PodPhase};

use crate::manifest::{Strategy, Workload};

/// Revisions kept per workload; older ones are dropped.
pub const HISTORY_LIMIT: usize = 10;

/// Errors of revision commands.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// No workload of that name.
    #[error("workload \"{0}\" not found")]
    NoWorkload(String),
    /// The revision asked for is not (or no longer) kept.
    #[error(
        "workload {workload} has no revision {number} (see `flotilla rollout history {workload}`)"
    )]
    NoRevision { workload: String, number: u64 },
    /// Pause or resume of a workload with no rollout under way.
    #[error("workload {0} has no rollout in progress")]
    NotRunning(String),
    /// Undo without a revision before the current one.
    #[error("workload {0} has no revision before the current one")]
    NoPrevious(String),
}

/// One revision of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    /// 1, 2, …, per workload.
    pub number: u64,
    /// When it was made (ms since the epoch).
    pub created_ms: u64,
    /// Why: `apply`, or `undo to revision N`.
    pub cause: String,
    /// The workload as it was then.
    pub workload: Workload,
}

/// Every workload's revisions, oldest first.
#[derive(Debug, Default)]
pub struct History {
    by_workload: BTreeMap<String, Vec<Revision>>,
}

impl History {
    /// Rebuilds the history from stored revisions, in any order.
    pub fn restore(revisions: impl IntoIterator<Item = Revision>) -> Self {
        let mut by_workload: BTreeMap<String, Vec<Revision>> = BTreeMap::new();
        for r in revisions {
            by_workload
                .entry(r.workload.name.clone())
                .or_default()
                .push(r);
        }
        for list in by_workload.values_mut() {
            list.sort_by_key(|r| r.number);
        }
        Self { by_workload }
    }

    /// A workload's revisions, oldest first.
    pub fn list(&self, workload: &str) -> &[Revision] {
        self.by_workload.get(workload).map_or(&[], Vec::as_slice)
    }

    /// The newest revision of a workload.
    pub fn current(&self, workload: &str) -> Option<&Revision> {
        self.list(workload).last()
    }

    /// The revision `w` makes, if it changes what the pods run compared
    /// with the newest revision (or there is none yet).
    pub fn next(&self, w: &Workload, cause: &str, now_ms: u64) -> Option<Revision> {
        let last = self.current(&w.name);
        if last.is_some_and(|r| r.workload.same_template(w)) {
            return None;
        }
        Some(Revision {
            number: last.map_or(1, |r| r.number + 1),
            created_ms: now_ms,
            cause: cause.to_owned(),
            workload: w.clone(),
        })
    }

    /// Adds a revision; returns the numbers dropped past [`HISTORY_LIMIT`].
    pub fn push(&mut self, revision: Revision) -> Vec<u64> {
        let list = self
            .by_workload
            .entry(revision.workload.name.clone())
            .or_default();
        list.push(revision);
        let excess = list.len().saturating_sub(HISTORY_LIMIT);
        list.drain(..excess).map(|r| r.number).collect()
    }

    /// The numbers that [`History::push`] of one more revision would drop.
    pub fn would_drop(&self, workload: &str) -> Vec<u64> {
        let list = self.list(workload);
        let excess = (list.len() + 1).saturating_sub(HISTORY_LIMIT);
        list[..excess].iter().map(|r| r.number).collect()
    }

    /// Forgets a deleted workload; returns the numbers it had.
    pub fn remove(&mut self, workload: &str) -> Vec<u64> {
        self.by_workload
            .remove(workload)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.number)
            .collect()
    }

    /// The workload `current` with the pods of revision `to` (default: the
    /// one before the newest), keeping where the pods go as it is now.
    pub fn undo(&self, current: &Workload, to: Option<u64>) -> Result<Workload, RolloutError> {
        let list = self.list(&current.name);
        let target = match to {
            Some(number) => list.iter().find(|r| r.number == number).ok_or_else(|| {
                RolloutError::NoRevision {
                    workload: current.name.clone(),
                    number,
                }
            })?,
            None => list
                .iter()
                .rev()
                .nth(1)
                .ok_or_else(|| RolloutError::NoPrevious(current.name.clone()))?,
        };
        let mut out = current.clone();
        let (spec, old) = (&mut out.spec, &target.workload.spec);
        spec.restart_policy = old.restart_policy;
        spec.termination_grace_secs = old.termination_grace_secs;
        spec.volumes.clone_from(&old.volumes);
        spec.containers.clone_from(&old.containers);
        Ok(out)
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Switching nodes wave by wave.
    Progressing,
    /// Held by `flotilla rollout pause`: no new node switches.
    Paused,
    /// Every node runs the new revision.
    Complete,
    /// Stopped by failures; the switched nodes went back.
    RolledBack,
}

impl Phase {
    /// The name shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Progressing => "Progressing",
            Self::Paused => "Paused",
            Self::Complete => "Complete",
            Self::RolledBack => "RolledBack",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Progressing" => Self::Progressing,
            "Paused" => Self::Paused,
            "Complete" => Self::Complete,
            "RolledBack" => Self::RolledBack,
            _ => return None,
        })
    }

    /// Whether the rollout still decides which nodes run which revision.
    pub fn active(self) -> bool {
        matches!(self, Self::Progressing | Self::Paused)
    }
}

/// What the controller sees of a switched node, for the health gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The new revision's pods run and are Ready.
    Ready,
    /// Not there yet (pulling, starting, not Ready).
    NotYet,
    /// A container of the new revision failed; why.
    Failing(String),
    /// The node is not connected.
    Offline,
}

/// One node moved to the new revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The node's desired generation that carries the new revision (0 until
    /// published): its pods report at least this once they run it.
    pub generation: u64,
}

/// What [`Rollout::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing changed.
    Idle,
    /// The state changed (a node healthy, a wave passed): store it.
    Changed,
    /// Nodes switched: store it and publish their new desired state.
    Switched,
    /// Every node runs the new revision.
    Complete,
    /// Too many failures: roll back to the old revision, for this reason.
    RollBack(String),
}

/// A staged rollout of one workload from revision `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// The workload.
    pub workload: String,
    /// The revision the nodes ran.
    pub from: u64,
    /// The revision they move to.
    pub to: u64,
    /// When it started (ms since the epoch).
    pub started_ms: u64,
    /// The nodes, in the order they switch.
    pub nodes: Vec<String>,
    /// The wave under way (index into [`Rollout::targets`]).
    pub wave: usize,
    /// Nodes moved to the new revision.
    pub switched: BTreeMap<String, Switch>,
    /// Switched nodes that passed the health gate.
    pub healthy: BTreeSet<String>,
    /// Switched nodes that failed, with why.
    pub failed: BTreeMap<String, String>,
    /// Where it is.
    pub phase: Phase,
    /// Since when each switched node has been seen Ready (not stored: a
    /// restarted controller watches the gate again from the start).
    ready_since: BTreeMap<String, u64>,
}

impl Rollout {
    /// A rollout over `nodes` (switched in this order).
    pub fn new(workload: &str, from: u64, to: u64, nodes: Vec<String>, now_ms: u64) -> Self {
        Self {
            workload: workload.to_owned(),
            from,
            to,
            started_ms: now_ms,
            nodes,
            wave: 0,
            switched: BTreeMap::new(),
            healthy: BTreeSet::new(),
            failed: BTreeMap::new(),
            phase: Phase::Progressing,
            ready_since: BTreeMap::new(),
        }
    }

    /// How many nodes run the new revision at the end of each wave: the
    /// strategy's waves, rounded up, growing, ending with every node.
    pub fn targets(&self, strategy: &Strategy) -> Vec<usize> {
        let total = self.nodes.len();
        let mut out: Vec<usize> = Vec::new();
        for a in &strategy.waves {
            let n = a.of(total);
            if n > out.last().copied().unwrap_or(0) {
                out.push(n);
            }
        }
        if total > out.last().copied().unwrap_or(0) {
            out.push(total);
        }
        out
    }

    /// Holds the rollout: no node switches until [`Rollout::resume`].
    pub fn pause(&mut self) -> bool {
        let was = self.phase;
        if was == Phase::Progressing {
            self.phase = Phase::Paused;
        }
        was == Phase::Progressing
    }

    /// Lets a paused rollout go on.
    pub fn resume(&mut self) -> bool {
        let was = self.phase;
        if was == Phase::Paused {
            self.phase = Phase::Progressing;
        }
        was == Phase::Paused
    }

    /// Looks at the switched nodes, then switches more or moves to the
    /// next wave as the strategy allows.
    pub fn step(
        &mut self,
        strategy: &Strategy,
        now_ms: u64,
        mut seen: impl FnMut(&str, &Switch) -> Seen,
    ) -> Step {
        if !self.phase.active() {
            return Step::Idle;
        }
        let mut changed = false;
        let mut offline = BTreeSet::new();
        for (node, switch) in &self.switched {
            if self.failed.contains_key(node) {
                continue;
            }
            // A healthy node that fails later still counts: a bad release
            // can take a while to show.
            match seen(node, switch) {
                Seen::Ready => {
                    let since = *self.ready_since.entry(node.clone()).or_insert(now_ms);
                    let healthy_ms = u64::from(strategy.healthy_secs) * 1000;
                    if now_ms.saturating_sub(since) >= healthy_ms
                        && self.healthy.insert(node.clone())
                    {
                        changed = true;
                    }
                }
                Seen::Failing(why) => {
                    self.failed.insert(node.clone(), why);
                    self.ready_since.remove(node);
                    changed = true;
                }
                Seen::NotYet => {
                    self.ready_since.remove(node);
                    let deadline_ms = u64::from(strategy.progress_deadline_secs) * 1000;
                    if !self.healthy.contains(node)
                        && now_ms.saturating_sub(switch.at_ms) > deadline_ms
                    {
                        let why =
                            format!("not healthy within {}s", strategy.progress_deadline_secs);
                        self.failed.insert(node.clone(), why);
                        changed = true;
                    }
                }
                Seen::Offline => {
                    self.ready_since.remove(node);
                    offline.insert(node.clone());
                }
            }
        }
        let threshold = strategy.failure_threshold.of(self.nodes.len()).max(1);
        if self.failed.len() >= threshold {
            self.phase = Phase::RolledBack;
            let (node, why) = self
                .failed
                .iter()
                .next()
                .map_or(("?", "?"), |(n, w)| (n, w));
            let more = match self.failed.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            return Step::RollBack(format!(
                "revision {} failed on node {node}: {why}{more}",
                self.to
            ));
        }
        if self.phase == Phase::Paused {
            return if changed { Step::Changed } else { Step::Idle };
        }
        let targets = self.targets(strategy);
        let max_unavailable = strategy.max_unavailable.of(self.nodes.len()).max(1);
        let mut switched_any = false;
        loop {
            let Some(&target) = targets.get(self.wave) else {
                self.phase = Phase::Complete;
                return Step::Complete;
            };
            let settled = |r: &Self, n: &String| {
                r.healthy.contains(n) || r.failed.contains_key(n) || offline.contains(n)
            };
            let mut unavailable = self.switched.keys().filter(|n| !settled(self, n)).count();
            while self.switched.len() < target && unavailable < max_unavailable {
                let Some(next) = self
                    .nodes
                    .iter()
                    .find(|n| !self.switched.contains_key(*n))
                    .cloned()
                else {
                    break;
                };
                self.switched.insert(
                    next,
                    Switch {
                        at_ms: now_ms,
                        generation: 0,
                    },
                );
                unavailable += 1;
                switched_any = true;
            }
            let done =
                self.switched.len() >= target && self.switched.keys().all(|n| settled(self, n));
            if !done {
                break;
            }
            self.wave += 1;
            changed = true;
        }
        match (switched_any, changed) {
            (true, _) => Step::Switched,
            (false, true) => Step::Changed,
            (false, false) => Step::Idle,
        }
    }

    /// Drops nodes that no longer run the workload (moved or removed) and
    /// adds new ones at the end, so the rollout follows the placement.
    pub fn follow(&mut self, nodes: &BTreeSet<String>) {
        self.nodes
            .retain(|n| nodes.contains(n) || self.switched.contains_key(n));
        for n in nodes {
            if !self.nodes.contains(n) {
                self.nodes.push(n.clone());
            }
        }
    }

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
            ready_since: BTreeMap::new(),
        })
    }
}

/// Waiting reasons that mean the new revision cannot run as it is (as
/// opposed to `Pulling`, which only takes time).
const FAILING_REASONS: &[&str] = &[
    "BackOff",
    "CreateFailed",
    "ImageNotFound",
    "ErrImagePull",
    "NoMatchingPlatform",
    "Unauthorized",
];

/// What a switched node shows of `workload`, from its newest status:
/// `connected` is its readiness; its pods must report the switch's
/// generation (or newer) to count.
pub fn seen(status: Option<&NodeStatus>, connected: bool, workload: &str, switch: &Switch) -> Seen {
    if !connected {
        return Seen::Offline;
    }
    let pod = status.and_then(|s| s.pods.iter().find(|p| p.workload == workload));
    let Some(pod) = pod.filter(|p| switch.generation > 0 && p.generation >= switch.generation)
    else {
        return Seen::NotYet;
    };
    if pod.phase == PodPhase::Failed {
        let why = pod.message.as_deref().unwrap_or("the pod failed");
        return Seen::Failing(why.to_owned());
    }
    for c in &pod.containers {
        match &c.state {
            ContainerState::Waiting { reason, .. }
                if FAILING_REASONS.contains(&reason.as_str()) =>
            {
                return Seen::Failing(format!("container {}: {reason}", c.name));
            }
            ContainerState::Terminated { exit_code, .. } if *exit_code != 0 => {
                return Seen::Failing(format!("container {} exited with {exit_code}", c.name));
            }
            _ => {}
        }
    }
    let ready = !pod.containers.is_empty() && pod.containers.iter().all(|c| c.ready);
    if pod.phase == PodPhase::Running && ready {
        Seen::Ready
    } else {
        Seen::NotYet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(image: &str, replicas: u32) -> Workload {
        let text = format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: web}}\n\
             spec:\n  replicas: {replicas}\n  containers: [{{name: main, image: {image}}}]\n"
        );
        crate::manifest::parse(&text).unwrap().remove(0)
    }

    #[test]
    fn a_revision_per_change_of_the_pods_and_undo_brings_one_back() {
        let mut h = History::default();
        let v1 = workload("app:1", 2);
        let r1 = h.next(&v1, "apply", 10).unwrap();
        assert_eq!((r1.number, r1.cause.as_str()), (1, "apply"));
        assert!(h.push(r1).is_empty());
        // Where the pods go is not a revision.
        assert!(h.next(&workload("app:1", 5), "apply", 11).is_none());
        let v2 = workload("app:2", 5);
        let r2 = h.next(&v2, "apply", 12).unwrap();
        assert_eq!(r2.number, 2);
        h.push(r2);

        // Undo: revision 1's pods, today's replicas.
        let back = h.undo(&v2, None).unwrap();
        assert_eq!(back.spec.containers[0].image, "app:1");
        assert_eq!(back, workload("app:1", 5));
        assert_eq!(h.undo(&v2, Some(2)).unwrap(), v2);
        assert_eq!(
            h.undo(&v2, Some(7)).unwrap_err().to_string(),
            "workload web has no revision 7 (see `flotilla rollout history web`)"
        );
        let lone = History::restore([h.list("web")[0].clone()]);
        assert_eq!(
            lone.undo(&v1, None).unwrap_err().to_string(),
            "workload web has no revision before the current one"
        );

        // The history is capped, oldest dropped first.
        for i in 3..=12 {
            let w = workload(&format!("app:{i}"), 5);
            let r = h.next(&w, "apply", 20 + i).unwrap();
            assert_eq!(r.number, i);
            let expect = h.would_drop("web");
            assert_eq!(h.push(r), expect);
        }
        let numbers: Vec<u64> = h.list("web").iter().map(|r| r.number).collect();
        assert_eq!(numbers, (3..=12).collect::<Vec<_>>());
        let restored = History::restore(h.list("web").iter().rev().cloned());
        assert_eq!(restored.list("web"), h.list("web"));
        assert_eq!(h.remove("web").len(), HISTORY_LIMIT);
        assert!(h.current("web").is_none());
    }

    use crate::manifest::Amount;

    fn strategy(waves: &[Amount]) -> Strategy {
        Strategy {
            waves: waves.to_vec(),
            max_unavailable: Amount::Count(2),
            healthy_secs: 5,
            failure_threshold: Amount::Count(1),
            progress_deadline_secs: 60,
        }
    }

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    fn switched(r: &Rollout) -> Vec<&str> {
        r.switched.keys().map(String::as_str).collect()
    }

    #[test]
    fn waves_pass_the_health_gate_one_after_the_other() {
        let s = strategy(&[Amount::Count(1), Amount::Percent(50)]);
        let mut r = Rollout::new("web", 1, 2, nodes(6), 0);
        assert_eq!(r.targets(&s), [1, 3, 6]);
        assert_eq!(r.step(&s, 0, |_, _| Seen::NotYet), Step::Switched);
        assert_eq!(switched(&r), ["n0"]);
        assert_eq!(r.step(&s, 1000, |_, _| Seen::NotYet), Step::Idle);
        assert_eq!(r.step(&s, 2000, |_, _| Seen::Ready), Step::Idle);
        assert_eq!(
            r.step(&s, 6999, |_, _| Seen::Ready),
            Step::Idle,
            "not 5 s yet"
        );
        // Healthy: the next wave switches two (maxUnavailable) at once.
        assert_eq!(r.step(&s, 7000, |_, _| Seen::Ready), Step::Switched);
        assert_eq!((r.wave, switched(&r)), (1, vec!["n0", "n1", "n2"]));
        // Being Ready, then not, starts the 5 s again.
        r.step(&s, 8000, |_, _| Seen::Ready);
        r.step(
            &s,
            9000,
            |n, _| if n == "n1" { Seen::NotYet } else { Seen::Ready },
        );
        assert_eq!(
            r.step(&s, 13000, |_, _| Seen::Ready),
            Step::Changed,
            "n2 healthy"
        );
        assert_eq!(switched(&r).len(), 3, "wave 2 waits for n1");
        // An offline node does not hold the wave back.
        assert_eq!(
            r.step(&s, 13500, |n, _| if n == "n1" {
                Seen::Offline
            } else {
                Seen::Ready
            }),
            Step::Switched
        );
        assert_eq!(r.wave, 2);
        assert_eq!(switched(&r), ["n0", "n1", "n2", "n3", "n4"]);
        // Pause: nothing more switches, health is still watched.
        assert!(r.pause());
        assert_eq!(r.step(&s, 20000, |_, _| Seen::Ready), Step::Idle);
        assert_eq!(r.step(&s, 25000, |_, _| Seen::Ready), Step::Changed);
        assert_eq!(switched(&r).len(), 5);
        assert!(r.resume());
        assert_eq!(r.step(&s, 25000, |_, _| Seen::Ready), Step::Switched);
        assert_eq!(r.step(&s, 26000, |_, _| Seen::Ready), Step::Idle);
        assert_eq!(r.step(&s, 31000, |_, _| Seen::Ready), Step::Complete);
        assert_eq!(r.phase, Phase::Complete);
        assert_eq!(r.step(&s, 32000, |_, _| Seen::Ready), Step::Idle);
    }

    #[test]
    fn failures_past_the_threshold_roll_back() {
        let s = strategy(&[Amount::Count(1)]);
        let mut r = Rollout::new("web", 1, 2, nodes(4), 0);
        r.step(&s, 0, |_, _| Seen::NotYet);
        let step = r.step(&s, 1000, |_, _| {
            Seen::Failing("container main: exit 1".into())
        });
        assert_eq!(
            step,
            Step::RollBack("revision 2 failed on node n0: container main: exit 1".into())
        );
        assert_eq!(r.phase, Phase::RolledBack);
        assert_eq!(switched(&r), ["n0"], "the other nodes were never touched");

        // Not healthy in time is a failure too; a threshold of 2 lets one pass.
        let mut s = strategy(&[Amount::Count(2)]);
        s.failure_threshold = Amount::Percent(50);
        let mut r = Rollout::new("web", 1, 2, nodes(4), 0);
        r.step(&s, 0, |_, _| Seen::NotYet);
        assert_eq!(switched(&r), ["n0", "n1"]);
        assert_eq!(
            r.step(&s, 60_001, |n, _| if n == "n0" {
                Seen::NotYet
            } else {
                Seen::Ready
            }),
            Step::Changed
        );
        assert_eq!(r.failed["n0"], "not healthy within 60s");
        assert_eq!(r.step(&s, 65_001, |_, _| Seen::Ready), Step::Switched);
        let step = r.step(&s, 65_002, |n, _| {
            if n == "n2" {
                Seen::Failing("BackOff".into())
            } else {
                Seen::NotYet
            }
        });
        assert!(
            matches!(step, Step::RollBack(ref why) if why.ends_with("(and 1 more)")),
            "{step:?}"
        );
    }

    #[test]
    fn the_stored_form_reads_back_and_the_plan_follows_placement() {
        let s = strategy(&[Amount::Count(1)]);
        let mut r = Rollout::new("web", 3, 4, nodes(3), 7);
        r.step(&s, 7, |_, _| Seen::NotYet);
        r.switched.get_mut("n0").unwrap().generation = 12;
        r.failed.insert("n9".into(), "x".into());
        r.pause();
        let back = Rollout::from_json(&r.to_json()).unwrap();
        assert_eq!(back, r);
        assert!(Rollout::from_json(&json!({"workload": "w"})).is_err());

        r.follow(&["n1".to_string(), "n5".to_string()].into());
        assert_eq!(
            r.nodes,
            ["n0", "n1", "n5"],
            "switched n0 stays, n2 left, n5 joined"
        );
    }
}
