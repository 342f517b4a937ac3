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
//! nodes roll the whole rollout back. With `prefetch`, a wave's nodes
//! first download the new revision's images (pods unchanged) and each
//! switches once it has them, or at `prefetchTimeoutSeconds`. The state machine is pure
//! ([`Rollout::step`] takes what the nodes show and the time); the control
//! loop stores it after every change, so a restarted controller resumes it.

use std::collections::{BTreeMap, BTreeSet};

use crate::manifest::Strategy;

mod history;
mod seen;
mod stored;

pub use history::{HISTORY_LIMIT, History, Revision};
pub use seen::{prefetch_images, prefetched, seen};

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
    /// Not heard from since the controller started: like `Offline` for
    /// the waves, but its health-gate clock is kept (a restarted
    /// controller continues it once the node's presence is replayed).
    Unknown,
}

/// What the controller sees of a node given the new revision's images to
/// download before it switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// It reports every image present (or there is none to download).
    Ready,
    /// Still downloading, or it has not seen the list yet.
    NotYet,
    /// The node is not connected: it switches at once and catches up when
    /// it returns, as without a prefetch.
    Offline,
    /// Not heard from since the controller started: it waits (a restarted
    /// controller does not switch every prefetching node at once).
    Unknown,
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
    /// Nodes were given images to download: store it and publish their
    /// new desired state.
    Prefetching,
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
    /// Since when each switched node not yet healthy has been seen Ready;
    /// stored with the rest, so a restarted controller continues the gate.
    ready_since: BTreeMap<String, u64>,
    /// Nodes not switched yet that were given the new revision's images to
    /// download (`strategy.prefetch`), with since when (ms since the epoch).
    pub prefetching: BTreeMap<String, u64>,
    /// Switched nodes that switched at the prefetch timeout, before they
    /// reported their images present.
    pub prefetch_timed_out: BTreeSet<String>,
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
            prefetching: BTreeMap::new(),
            prefetch_timed_out: BTreeSet::new(),
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

    /// [`Rollout::step_with`] for nodes that have every image at once.
    pub fn step(
        &mut self,
        strategy: &Strategy,
        now_ms: u64,
        seen: impl FnMut(&str, &Switch) -> Seen,
    ) -> Step {
        self.step_with(strategy, now_ms, seen, |_| Fetched::Ready)
    }

    /// Looks at the switched nodes, then switches more or moves to the
    /// next wave as the strategy allows. With `strategy.prefetch`, a
    /// wave's nodes are first given the images to download (and, once
    /// they have all switched, the next wave's are too, while the health
    /// gate runs); each switches when `fetched` says it has them, is
    /// offline, or has waited `prefetchTimeoutSeconds`.
    pub fn step_with(
        &mut self,
        strategy: &Strategy,
        now_ms: u64,
        mut seen: impl FnMut(&str, &Switch) -> Seen,
        mut fetched: impl FnMut(&str) -> Fetched,
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
                Seen::Ready if self.healthy.contains(node) => {}
                Seen::Ready => {
                    let since = *self.ready_since.entry(node.clone()).or_insert(now_ms);
                    let healthy_ms = u64::from(strategy.healthy_secs) * 1000;
                    if now_ms.saturating_sub(since) >= healthy_ms {
                        self.healthy.insert(node.clone());
                        self.ready_since.remove(node);
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
                Seen::Unknown => {
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
        let prefetch_ms = strategy
            .prefetch
            .then(|| u64::from(strategy.prefetch_timeout_secs) * 1000);
        let mut switched_any = false;
        let mut started = false;
        loop {
            let Some(&target) = targets.get(self.wave) else {
                self.phase = Phase::Complete;
                self.prefetching.clear();
                return Step::Complete;
            };
            let settled = |r: &Self, n: &String| {
                r.healthy.contains(n) || r.failed.contains_key(n) || offline.contains(n)
            };
            let mut unavailable = self.switched.keys().filter(|n| !settled(self, n)).count();
            if let Some(timeout_ms) = prefetch_ms {
                // The next wave downloads while this one's health gate runs.
                let horizon = match self.switched.len() >= target {
                    true => targets.get(self.wave + 1).copied().unwrap_or(target),
                    false => target,
                };
                started |= self.start_prefetch(horizon, now_ms);
                let wave: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| !self.switched.contains_key(*n))
                    .take(target.saturating_sub(self.switched.len()))
                    .cloned()
                    .collect();
                for node in wave {
                    if unavailable >= max_unavailable {
                        break;
                    }
                    let since = self.prefetching.get(&node).copied().unwrap_or(now_ms);
                    let waited = now_ms.saturating_sub(since) >= timeout_ms;
                    match fetched(&node) {
                        Fetched::Ready | Fetched::Offline => {}
                        Fetched::NotYet | Fetched::Unknown if waited => {
                            self.prefetch_timed_out.insert(node.clone());
                        }
                        Fetched::NotYet | Fetched::Unknown => continue,
                    }
                    self.prefetching.remove(&node);
                    let switch = Switch {
                        at_ms: now_ms,
                        generation: 0,
                    };
                    self.switched.insert(node, switch);
                    unavailable += 1;
                    switched_any = true;
                }
            }
            while prefetch_ms.is_none()
                && self.switched.len() < target
                && unavailable < max_unavailable
            {
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
        match (switched_any, started, changed) {
            (true, _, _) => Step::Switched,
            (false, true, _) => Step::Prefetching,
            (false, false, true) => Step::Changed,
            (false, false, false) => Step::Idle,
        }
    }

    /// Gives the nodes up to the `horizon`-th not switched yet the images
    /// to download; true when any was new.
    fn start_prefetch(&mut self, horizon: usize, now_ms: u64) -> bool {
        let mut started = false;
        let wanted = horizon.saturating_sub(self.switched.len());
        for node in self
            .nodes
            .iter()
            .filter(|n| !self.switched.contains_key(*n))
            .take(wanted)
        {
            if !self.prefetching.contains_key(node) {
                self.prefetching.insert(node.clone(), now_ms);
                started = true;
            }
        }
        started
    }

    /// Drops nodes that no longer run the workload (moved or removed) and
    /// adds new ones at the end, so the rollout follows the placement.
    pub fn follow(&mut self, nodes: &BTreeSet<String>) {
        self.nodes
            .retain(|n| nodes.contains(n) || self.switched.contains_key(n));
        let kept = &self.nodes;
        self.prefetching.retain(|n, _| kept.contains(n));
        for n in nodes {
            if !self.nodes.contains(n) {
                self.nodes.push(n.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::manifest::Amount;

    fn strategy(waves: &[Amount]) -> Strategy {
        Strategy {
            waves: waves.to_vec(),
            max_unavailable: Amount::Count(2),
            healthy_secs: 5,
            failure_threshold: Amount::Count(1),
            progress_deadline_secs: 60,
            prefetch: false,
            prefetch_timeout_secs: 60,
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
    fn the_health_gate_clock_survives_a_restart() {
        let s = strategy(&[Amount::Count(1)]);
        let mut r = Rollout::new("web", 1, 2, nodes(2), 0);
        assert_eq!(r.step(&s, 0, |_, _| Seen::NotYet), Step::Switched);
        assert_eq!(r.step(&s, 1000, |_, _| Seen::Ready), Step::Idle);
        // Stored, then read back by a restarted controller, which has not
        // heard from the node yet: the clock is kept, not restarted.
        let mut back = Rollout::from_json(&r.to_json()).unwrap();
        assert_eq!(back, r);
        // An unknown node does not hold the waves back (n1 switches), and
        // keeps its clock.
        assert_eq!(back.step(&s, 3000, |_, _| Seen::Unknown), Step::Switched);
        assert!(back.healthy.is_empty());
        // Ready since 1000: healthy at 6000, not 5 s after the restart.
        back.step(&s, 5999, |_, _| Seen::Ready);
        assert!(back.healthy.is_empty());
        back.step(&s, 6000, |_, _| Seen::Ready);
        assert_eq!(back.healthy.iter().collect::<Vec<_>>(), ["n0"]);
        // Stored forms from before the clock was kept still read.
        let mut old = r.to_json();
        old.as_object_mut().unwrap().remove("readySince");
        assert!(Rollout::from_json(&old).is_ok());
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

    #[test]
    fn a_wave_downloads_first_and_switches_when_ready_or_too_late() {
        let mut s = strategy(&[Amount::Count(1), Amount::Count(2)]);
        s.prefetch = true;
        let mut r = Rollout::new("web", 1, 2, nodes(4), 0);
        let ready = |_: &str, _: &Switch| Seen::Ready;
        let not_yet = |_: &str| Fetched::NotYet;
        // The first wave's node is given the images; nothing switches.
        assert_eq!(r.step_with(&s, 0, ready, not_yet), Step::Prefetching);
        assert_eq!(r.prefetching.keys().collect::<Vec<_>>(), ["n0"]);
        assert!(r.switched.is_empty());
        assert_eq!(r.step_with(&s, 1000, ready, not_yet), Step::Idle);
        // It has them: it switches.
        let only_n0 = |n: &str| match n {
            "n0" => Fetched::Ready,
            _ => Fetched::NotYet,
        };
        assert_eq!(r.step_with(&s, 2000, ready, only_n0), Step::Switched);
        assert_eq!(switched(&r), ["n0"]);
        assert!(r.prefetching.is_empty());
        // While its health gate runs, the next wave downloads.
        assert_eq!(r.step_with(&s, 3000, ready, not_yet), Step::Prefetching);
        assert_eq!(r.prefetching, BTreeMap::from([("n1".to_string(), 3000)]));
        // The stored form keeps who downloads since when.
        assert_eq!(Rollout::from_json(&r.to_json()).unwrap(), r);
        // n0 healthy: wave 2, but n1 does not have its images yet, and a
        // node not heard from since a restart waits too.
        assert_eq!(r.step_with(&s, 8000, ready, not_yet), Step::Changed);
        assert_eq!((r.wave, switched(&r)), (1, vec!["n0"]));
        let unknown = |_: &str| Fetched::Unknown;
        assert_eq!(r.step_with(&s, 62_999, ready, unknown), Step::Idle);
        // At the timeout it switches anyway, marked so.
        assert_eq!(r.step_with(&s, 63_000, ready, not_yet), Step::Switched);
        assert_eq!(switched(&r), ["n0", "n1"]);
        assert_eq!(r.prefetch_timed_out.iter().collect::<Vec<_>>(), ["n1"]);
        assert_eq!(r.step_with(&s, 63_500, ready, not_yet), Step::Prefetching);
        assert_eq!(r.prefetching.len(), 2, "the last wave downloads");
        // An offline node switches at once and catches up when back, as
        // without a prefetch; the last wave's two switch together
        // (maxUnavailable 2).
        let n2_offline = |n: &str| match n {
            "n2" => Fetched::Offline,
            _ => Fetched::Ready,
        };
        assert_eq!(r.step_with(&s, 68_500, ready, n2_offline), Step::Switched);
        assert_eq!(switched(&r).len(), 4);
        assert!(r.prefetching.is_empty());
        assert_eq!(r.prefetch_timed_out.len(), 1);
        r.step_with(&s, 69_000, ready, not_yet);
        assert_eq!(r.step_with(&s, 74_000, ready, not_yet), Step::Complete);

        // Without the option nothing is downloaded ahead.
        s.prefetch = false;
        let mut r = Rollout::new("web", 1, 2, nodes(2), 0);
        assert_eq!(r.step_with(&s, 0, ready, not_yet), Step::Switched);
        assert!(r.prefetching.is_empty());
    }

    #[test]
    fn only_new_images_are_fetched_and_a_node_has_them_when_it_says_so() {
        let spec = |images: &[&str]| {
            let containers: Vec<String> = images
                .iter()
                .enumerate()
                .map(|(i, image)| format!("{{name: c{i}, image: {image}}}"))
                .collect();
            let text = format!(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: web}}\n\
                 spec:\n  containers: [{}]\n",
                containers.join(", ")
            );
            crate::manifest::parse(&text)
                .unwrap()
                .remove(0)
                .pod_spec("web")
        };
        let old = spec(&["app:1", "side:1"]);
        let new = spec(&["app:2", "side:1", "app:2", "log:3"]);
        assert_eq!(prefetch_images(&new, &old), ["app:2", "log:3"]);
        assert!(prefetch_images(&old, &old).is_empty());

        let mut status = flotilla_proto::NodeStatus {
            node: "n1".into(),
            instance: 1,
            seq: 1,
            observed_generation: 1,
            desired_error: None,
            info: Default::default(),
            health: Default::default(),
            pods: vec![],
            prefetch: vec![],
        };
        let images = prefetch_images(&new, &old);
        assert!(!prefetched(Some(&status), &images));
        assert!(!prefetched(None, &images));
        assert!(prefetched(None, &[]));
        use flotilla_proto::{PrefetchState, PrefetchStatus, PullProgress};
        status.prefetch = vec![
            PrefetchStatus {
                image: "app:2".into(),
                state: PrefetchState::Ready,
            },
            PrefetchStatus {
                image: "log:3".into(),
                state: PrefetchState::Pulling {
                    progress: PullProgress {
                        done_bytes: 1,
                        total_bytes: 2,
                    },
                },
            },
        ];
        assert!(!prefetched(Some(&status), &images));
        status.prefetch[1].state = PrefetchState::Ready;
        assert!(prefetched(Some(&status), &images));
    }
}
