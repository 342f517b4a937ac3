//! Placement: which nodes run which pods. A pure function of the fleet (as
//! [`NodeFacts`]), the workloads and where their pods are now, so it is
//! tested with tables and gives the same answer for the same input.
//!
//! Rules:
//! - `everyNode` workloads (the default) run one pod, named after the
//!   workload, on every node whose labels match `nodeSelector` and whose
//!   architecture is in `architectures` (when given), whatever its
//!   readiness: a node that is away gets its pods when it returns.
//! - `replicas: N` workloads run pods `{workload}-{index}`, index `0..N`, at
//!   most one per node (pods use the host's network, so two would fight
//!   over ports). A new replica goes to a Ready node that matches, has room
//!   for its requests and does not run one already; among those, the one
//!   whose `spreadBy` value holds the fewest replicas (nodes without that
//!   label are not used), then the one with the fewest pods, then by name.
//! - Stability: a pod stays where it is while its node still matches, and
//!   for a replica while its node is not NotReady for longer than
//!   `tolerationSeconds`. Pods kept count against their node's resources
//!   before any new pod is placed, and a new node never moves anything.
//! - Requests are checked only when a pod is placed: capacity is the node's
//!   CPUs and memory as its agent reports them, minus the requests of the
//!   pods placed there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::fleet::Labels;
use crate::manifest::{Placement, Workload};

/// Whether a node is connected, with when it stopped being so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Connected.
    Ready,
    /// Not connected since this time (ms since the epoch).
    NotReady { since_ms: u64 },
    /// Not heard from since the controller started.
    Unknown,
}

/// What the scheduler needs to know of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node's name.
    pub name: String,
    /// Its labels: the agent's, with the controller's over them (shared
    /// with the fleet's record, not copied per placement).
    pub labels: Labels,
    /// Its architecture (OCI name).
    pub arch: Arc<str>,
    /// CPU capacity in thousandths of a CPU.
    pub cpu_millis: u64,
    /// Memory capacity in bytes.
    pub memory_bytes: u64,
    /// Connected or not.
    pub condition: Condition,
}

/// Where each workload's pods are: workload → node → pod name.
pub type Placements = BTreeMap<String, BTreeMap<String, String>>;

/// The scheduler's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Workload → node → pod name.
    pub placements: Placements,
    /// Workloads not wholly placed, with why.
    pub unschedulable: BTreeMap<String, String>,
}

/// The name of replica `index` of `workload` on its node.
pub fn replica_name(workload: &str, index: u32) -> String {
    format!("{workload}-{index}")
}

/// The index of a replica pod of `workload`, from its name.
fn replica_index(workload: &str, pod: &str) -> Option<u32> {
    let digits = pod.strip_prefix(workload)?.strip_prefix('-')?;
    // `web-01` is not a name this scheduler gives; taking it for 1 could
    // keep two pods for one index.
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

/// Why a node cannot take a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refusal {
    Selector,
    Architecture,
    NotReady,
    NoSpreadLabel,
    HasReplica,
    Cpu,
    Memory,
}

impl Refusal {
    fn text(self, w: &Workload) -> String {
        match self {
            Self::Selector => "do not match the node selector".into(),
            Self::Architecture => format!(
                "have an architecture not in [{}]",
                w.spec.scheduling.architectures.join(", ")
            ),
            Self::NotReady => "are not Ready".into(),
            Self::NoSpreadLabel => format!(
                "have no {} label to spread by",
                w.spec.scheduling.spread_by.as_deref().unwrap_or_default()
            ),
            Self::HasReplica => "already run a replica".into(),
            Self::Cpu => "have too little cpu left".into(),
            Self::Memory => "have too little memory left".into(),
        }
    }
}

/// Whether `node` may run a pod of `w` at all (selector and architecture).
fn selects(w: &Workload, node: &NodeFacts) -> Result<(), Refusal> {
    if !w.matches(&node.labels) {
        return Err(Refusal::Selector);
    }
    let archs = &w.spec.scheduling.architectures;
    if !archs.is_empty() && !archs.iter().any(|a| *a == *node.arch) {
        return Err(Refusal::Architecture);
    }
    Ok(())
}

/// Requests placed on each node so far.
#[derive(Default)]
struct Usage {
    by_node: BTreeMap<String, (u64, u64, usize)>,
}

impl Usage {
    fn add(&mut self, node: &str, (cpu, mem): (u64, u64)) {
        let u = self.by_node.entry(node.to_owned()).or_default();
        u.0 += cpu;
        u.1 = u.1.saturating_add(mem);
        u.2 += 1;
    }

    fn fits(&self, node: &NodeFacts, (cpu, mem): (u64, u64)) -> Result<(), Refusal> {
        let (used_cpu, used_mem, _) = self.by_node.get(&node.name).copied().unwrap_or_default();
        if cpu > 0 && used_cpu + cpu > node.cpu_millis {
            return Err(Refusal::Cpu);
        }
        if mem > 0 && used_mem.saturating_add(mem) > node.memory_bytes {
            return Err(Refusal::Memory);
        }
        Ok(())
    }

    fn pods(&self, node: &str) -> usize {
        self.by_node.get(node).map_or(0, |u| u.2)
    }
}

/// Places every workload's pods. `fleet` lists the nodes that have reported
/// at least once; `current` is where pods are now; `now_ms` decides which
/// NotReady nodes are past a workload's toleration.
pub fn schedule(
    fleet: &[NodeFacts],
    workloads: &BTreeMap<String, Workload>,
    current: &Placements,
    now_ms: u64,
) -> Schedule {
    let by_name: BTreeMap<&str, &NodeFacts> = fleet.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut usage = Usage::default();
    let mut out = Schedule::default();

    // Pods that stay, first, so that they hold their room.
    for (name, w) in workloads {
        let placed = out.placements.entry(name.clone()).or_default();
        let Some(now) = current.get(name) else {
            continue;
        };
        let mut indices = BTreeSet::new();
        for (node_name, pod) in now {
            let Some(node) = by_name.get(node_name.as_str()) else {
                continue;
            };
            if selects(w, node).is_err() {
                continue;
            }
            let keep = match w.spec.scheduling.placement {
                Placement::EveryNode => pod == name,
                Placement::Replicas(n) => {
                    let tolerated = match node.condition {
                        Condition::NotReady { since_ms } => {
                            now_ms.saturating_sub(since_ms)
                                <= u64::from(w.spec.scheduling.toleration_secs) * 1000
                        }
                        Condition::Ready | Condition::Unknown => true,
                    };
                    tolerated
                        && replica_index(name, pod).is_some_and(|i| i < n && indices.insert(i))
                }
            };
            if keep {
                usage.add(node_name, w.total_requests());
                placed.insert(node_name.clone(), pod.clone());
            }
        }
    }

    // Then new pods, workload by workload in name order.
    for (name, w) in workloads {
        let asked = w.total_requests();
        let mut placed = out.placements.remove(name).unwrap_or_default();
        let reason = match w.spec.scheduling.placement {
            Placement::EveryNode => {
                let mut refused: BTreeMap<Refusal, usize> = BTreeMap::new();
                for node in fleet {
                    if placed.contains_key(&node.name) || selects(w, node).is_err() {
                        continue;
                    }
                    match usage.fits(node, asked) {
                        Ok(()) => {
                            usage.add(&node.name, asked);
                            placed.insert(node.name.clone(), name.clone());
                        }
                        Err(r) => *refused.entry(r).or_default() += 1,
                    }
                }
                let missing: usize = refused.values().sum();
                (missing > 0).then(|| {
                    format!(
                        "not placed on {missing} of {} matching nodes: {}",
                        placed.len() + missing,
                        refusals(w, &refused)
                    )
                })
            }
            Placement::Replicas(n) => {
                place_replicas(w, n, fleet, &mut usage, &mut placed).map(|refused| {
                    format!(
                        "{} of {n} replicas placed; of {} nodes, {}",
                        placed.len(),
                        fleet.len(),
                        refusals(w, &refused)
                    )
                })
            }
        };
        if let Some(reason) = reason {
            out.unschedulable.insert(name.clone(), reason);
        }
        out.placements.insert(name.clone(), placed);
    }
    out
}

/// Adds the missing replicas of `w` to `placed`; when some cannot be
/// placed, returns why each node was refused for the first of them.
fn place_replicas(
    w: &Workload,
    n: u32,
    fleet: &[NodeFacts],
    usage: &mut Usage,
    placed: &mut BTreeMap<String, String>,
) -> Option<BTreeMap<Refusal, usize>> {
    let spread_by = w.spec.scheduling.spread_by.as_deref();
    let taken: BTreeSet<u32> = placed
        .values()
        .filter_map(|p| replica_index(&w.name, p))
        .collect();
    let mut per_domain: BTreeMap<String, usize> = BTreeMap::new();
    if let Some(key) = spread_by {
        for node in fleet.iter().filter(|n| placed.contains_key(&n.name)) {
            if let Some(v) = node.labels.get(key) {
                *per_domain.entry(v.clone()).or_default() += 1;
            }
        }
    }
    let asked = w.total_requests();
    for index in (0..n).filter(|i| !taken.contains(i)) {
        let mut refused: BTreeMap<Refusal, usize> = BTreeMap::new();
        let mut best: Option<(usize, usize, &NodeFacts)> = None;
        for node in fleet {
            let check = || {
                selects(w, node)?;
                if node.condition != Condition::Ready {
                    return Err(Refusal::NotReady);
                }
                if placed.contains_key(&node.name) {
                    return Err(Refusal::HasReplica);
                }
                let domain = match spread_by {
                    Some(key) => match node.labels.get(key) {
                        Some(v) => per_domain.get(v).copied().unwrap_or(0),
                        None => return Err(Refusal::NoSpreadLabel),
                    },
                    None => 0,
                };
                usage.fits(node, asked)?;
                Ok(domain)
            };
            match check() {
                Ok(domain) => {
                    let score = (domain, usage.pods(&node.name));
                    if best.is_none_or(|(d, p, _)| score < (d, p)) {
                        best = Some((score.0, score.1, node));
                    }
                }
                Err(r) => *refused.entry(r).or_default() += 1,
            }
        }
        let Some((_, _, node)) = best else {
            return Some(refused);
        };
        usage.add(&node.name, asked);
        placed.insert(node.name.clone(), replica_name(&w.name, index));
        if let Some(v) = spread_by.and_then(|key| node.labels.get(key)) {
            *per_domain.entry(v.clone()).or_default() += 1;
        }
    }
    None
}

fn refusals(w: &Workload, refused: &BTreeMap<Refusal, usize>) -> String {
    if refused.is_empty() {
        return "none has reported yet".into();
    }
    refused
        .iter()
        .map(|(r, count)| format!("{count} {}", r.text(w)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000_000;

    /// One node per line: `name arch cpus memory condition [key=value…]`,
    /// the condition `Ready`, `Unknown` or `NotReady:SECONDS` (ago).
    fn fleet(text: &str) -> Vec<NodeFacts> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let condition = match f[4] {
                    "Ready" => Condition::Ready,
                    "Unknown" => Condition::Unknown,
                    other => {
                        let secs: u64 = other.strip_prefix("NotReady:").unwrap().parse().unwrap();
                        Condition::NotReady {
                            since_ms: NOW - secs * 1000,
                        }
                    }
                };
                NodeFacts {
                    name: f[0].into(),
                    arch: f[1].into(),
                    cpu_millis: f[2].parse::<u64>().unwrap() * 1000,
                    memory_bytes: crate::manifest::parse_memory(f[3]).unwrap(),
                    condition,
                    labels: Arc::new(
                        f[5..]
                            .iter()
                            .map(|kv| {
                                let (k, v) = kv.split_once('=').unwrap();
                                (k.into(), v.into())
                            })
                            .collect(),
                    ),
                }
            })
            .collect()
    }

    /// Workloads from one-line specs: `name: {spec fields}`; a container is added.
    fn workloads(text: &str) -> BTreeMap<String, Workload> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|line| {
                let (name, rest) = line.split_once(": ").unwrap();
                let (fields, requests) = rest.split_once(" requests=").unwrap_or((rest, "{}"));
                let doc = format!(
                    "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\n\
                     spec:\n  containers: [{{name: c, image: oci:/i, resources: {{requests: {requests}}}}}]\n  \
                     {}\n",
                    fields
                        .strip_prefix('{')
                        .and_then(|f| f.strip_suffix('}'))
                        .unwrap()
                        .replace(", ", "\n  ")
                );
                let w = crate::manifest::parse(&doc)
                    .unwrap_or_else(|e| panic!("{doc}\n{e}"))
                    .remove(0);
                (w.name.clone(), w)
            })
            .collect()
    }

    /// `workload: node=pod …` per line.
    fn placements(text: &str) -> Placements {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|line| {
                let (w, rest) = line.split_once(':').unwrap();
                let pods = rest
                    .split_whitespace()
                    .map(|np| {
                        let (n, p) = np.split_once('=').unwrap();
                        (n.to_string(), p.to_string())
                    })
                    .collect();
                (w.to_string(), pods)
            })
            .collect()
    }

    fn render(s: &Schedule) -> String {
        let mut out = String::new();
        for (w, pods) in &s.placements {
            out.push_str(w);
            out.push(':');
            for (n, p) in pods {
                out.push_str(&format!(" {n}={p}"));
            }
            out.push('\n');
        }
        for (w, why) in &s.unschedulable {
            out.push_str(&format!("{w} unschedulable: {why}\n"));
        }
        out
    }

    struct Case {
        name: &'static str,
        fleet: &'static str,
        workloads: &'static str,
        current: &'static str,
        expect: &'static str,
    }

    const FLEET: &str = "
        a1 arm64 4 2Gi Ready site=a
        a2 arm64 4 2Gi Ready site=a
        b1 amd64 2 1Gi Ready site=b
        b2 arm64 1 512Mi Ready site=b
        c1 arm64 4 2Gi Ready site=c
    ";

    #[test]
    fn placements_follow_the_rules() {
        let cases = [
            Case {
                name: "everyNode is the default and follows the selector",
                fleet: FLEET,
                workloads: "
                    all: {}
                    shop-b: {nodeSelector: {site: b}}
                ",
                current: "",
                expect: "all: a1=all a2=all b1=all b2=all c1=all\nshop-b: b1=shop-b b2=shop-b\n",
            },
            Case {
                name: "architecture filters everyNode and replicas alike",
                fleet: FLEET,
                workloads: "
                    x86: {architectures: [amd64]}
                    arm: {replicas: 4, architectures: [arm64]}
                ",
                current: "",
                expect: "arm: a1=arm-0 a2=arm-1 b2=arm-2 c1=arm-3\nx86: b1=x86\n",
            },
            Case {
                name: "spread across sites, then the least loaded node",
                fleet: FLEET,
                workloads: "web: {replicas: 3, spreadBy: site}",
                current: "",
                expect: "web: a1=web-0 b1=web-1 c1=web-2\n",
            },
            Case {
                name: "resource fit counts what is placed, kept pods first",
                fleet: FLEET,
                workloads: "
                    agent: {} requests={cpu: 1, memory: 256Mi}
                    big: {replicas: 3} requests={cpu: 3}
                    huge: {replicas: 1} requests={memory: 4Gi}
                ",
                current: "",
                expect: "agent: a1=agent a2=agent b1=agent b2=agent c1=agent\n\
                         big: a1=big-0 a2=big-1 c1=big-2\nhuge:\n\
                         huge unschedulable: 0 of 1 replicas placed; of 5 nodes, 5 have too little memory left\n",
            },
            Case {
                name: "an everyNode pod that does not fit is reported",
                fleet: FLEET,
                workloads: "agent: {} requests={cpu: 1500m}",
                current: "",
                expect: "agent: a1=agent a2=agent b1=agent c1=agent\n\
                         agent unschedulable: not placed on 1 of 5 matching nodes: 1 have too little cpu left\n",
            },
            Case {
                name: "unschedulable: a clear reason for every node",
                fleet: "
                    a1 arm64 4 2Gi Ready site=a
                    a2 arm64 4 2Gi NotReady:10 site=a
                    b1 amd64 4 2Gi Ready site=a
                    c1 arm64 4 2Gi Ready site=c
                    d1 arm64 4 2Gi Ready
                ",
                workloads: "db: {replicas: 2, nodeSelector: {site: a}, architectures: [arm64]}",
                current: "",
                expect: "db: a1=db-0\n\
                         db unschedulable: 1 of 2 replicas placed; of 5 nodes, 2 do not match the node selector, \
                         1 have an architecture not in [arm64], 1 are not Ready, 1 already run a replica\n",
            },
            Case {
                name: "stable: nothing moves for a new or emptier node, scale down drops the top",
                fleet: FLEET,
                workloads: "web: {replicas: 2, spreadBy: site}",
                current: "web: a1=web-0 a2=web-1 b1=web-2",
                expect: "web: a1=web-0 a2=web-1\n",
            },
            Case {
                name: "a NotReady node keeps its replica within the toleration",
                fleet: "
                    n1 arm64 4 2Gi NotReady:299 site=a
                    n2 arm64 4 2Gi Ready site=a
                ",
                workloads: "web: {replicas: 1}",
                current: "web: n1=web-0",
                expect: "web: n1=web-0\n",
            },
            Case {
                name: "past the toleration the replica moves; everyNode pods stay",
                fleet: "
                    n1 arm64 4 2Gi NotReady:301 site=a
                    n2 arm64 4 2Gi Ready site=a
                ",
                workloads: "
                    web: {replicas: 1}
                    fast: {replicas: 1, tolerationSeconds: 0}
                    all: {}
                ",
                current: "web: n1=web-0\nall: n1=all",
                expect: "all: n1=all n2=all\nfast: n2=fast-0\nweb: n2=web-0\n",
            },
            Case {
                name: "a relabelled node loses its pod; a foreign name is not kept",
                fleet: FLEET,
                workloads: "web: {replicas: 1, nodeSelector: {site: c}}",
                current: "web: a1=web-0 c1=web-07",
                expect: "web: c1=web-0\n",
            },
        ];
        for case in cases {
            let got = schedule(
                &fleet(case.fleet),
                &workloads(case.workloads),
                &placements(case.current),
                NOW,
            );
            assert_eq!(render(&got), case.expect, "case: {}", case.name);
            // Same input, same answer: the result fed back changes nothing.
            let again = schedule(
                &fleet(case.fleet),
                &workloads(case.workloads),
                &got.placements,
                NOW,
            );
            assert_eq!(again.placements, got.placements, "stable: {}", case.name);
        }
    }
}
