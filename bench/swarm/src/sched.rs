//! `flotilla-sched-bench`: the controller's placement and fleet records at
//! fleet scale, in one process with no broker — full placement of N nodes ×
//! W workloads, one node event (a node joins, a node goes NotReady) on a
//! placed fleet, and the heap each node costs, counted by a global
//! allocator that tallies live bytes.
//!
//! `cargo run --release -p flotilla-swarm --bin flotilla-sched-bench -- --nodes 10000`

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_controller::control::{Cluster, templates_for};
use flotilla_controller::manifest::{self, Workload};
use flotilla_proto::{
    ContainerState, ContainerStatus, Label, NodeHealth, NodeInfo, NodeStatus, PodPhase, PodStatus,
    Presence, encode,
};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Placement and fleet memory at scale.
#[derive(Parser, Debug)]
#[command(name = "flotilla-sched-bench")]
struct Args {
    /// Nodes in the fleet.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Workloads: half `everyNode` with a site selector, half replicas spread by site.
    #[arg(long, default_value_t = 30)]
    workloads: usize,
    /// Sites the nodes are spread over (label `site`).
    #[arg(long, default_value_t = 50)]
    sites: usize,
    /// Times each measurement is repeated (the median is shown).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
}

/// A status as a swarm agent sends it: one pod with one running container.
fn status(i: usize, sites: usize, seq: u64) -> NodeStatus {
    NodeStatus {
        node: format!("node-{i:05}"),
        instance: 7,
        seq,
        observed_generation: 0,
        desired_error: None,
        info: NodeInfo {
            arch: "amd64".into(),
            os: "linux".into(),
            agent_version: "0.1.0".into(),
            labels: vec![
                Label {
                    key: "fleet".into(),
                    value: "swarm".into(),
                },
                Label {
                    key: "site".into(),
                    value: format!("shop{}", i % sites),
                },
            ],
            cpus: 4,
            memory_bytes: 4 << 30,
            boot_id: format!("5f0c2b8e-{i:04x}-4d7e-9a51-0c3f9e2d{i:04x}"),
        },
        health: NodeHealth {
            memory_available_bytes: 3 << 30,
            disk_free_bytes: 20 << 30,
            disk_total_bytes: 32 << 30,
            load_milli: 120,
            uptime_secs: 86_400,
        },
        pods: vec![PodStatus {
            name: "swarm-app".into(),
            workload: "swarm-app".into(),
            generation: 1,
            phase: PodPhase::Running,
            message: None,
            containers: vec![ContainerStatus {
                name: "main".into(),
                state: ContainerState::Running {
                    started_at_ms: 1_764_000_000_000,
                },
                restarts: 0,
                ready: true,
                pull: None,
                next: None,
            }],
        }],
        prefetch: Vec::new(),
    }
}

fn workloads(n: usize, sites: usize) -> BTreeMap<String, Workload> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let placement = if i % 2 == 0 {
            format!("nodeSelector: {{site: shop{}}}", i % sites)
        } else {
            format!("replicas: {}\n  spreadBy: site", 3 + i % 7)
        };
        let text = format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: app-{i}}}\nspec:\n  \
             {placement}\n  containers:\n  - name: main\n    image: registry.local/app-{i}:1\n    \
             resources: {{requests: {{cpu: 10m, memory: 8Mi}}}}\n"
        );
        match manifest::parse(&text) {
            Ok(mut w) => {
                let w = w.remove(0);
                out.insert(w.name.clone(), w);
            }
            Err(e) => panic!("bench workload {i}: {e}"),
        }
    }
    // One workload on every node, as the swarm runs.
    let every = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: swarm-app}\nspec:\n  \
                 nodeSelector: {fleet: swarm}\n  containers:\n  - name: main\n    image: oci:/swarm/app:1\n";
    if let Ok(mut w) = manifest::parse(every) {
        let w = w.remove(0);
        out.insert(w.name.clone(), w);
    }
    out
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn per_node(bytes: isize, n: usize) -> f64 {
    bytes as f64 / n as f64
}

fn main() {
    let args = Args::parse();
    let n = args.nodes;
    println!(
        "## Placement and fleet records: {n} nodes, {} workloads (+1 on every node)\n",
        args.workloads
    );

    // What a node's last status costs, kept three ways.
    let statuses: Vec<NodeStatus> = (0..n).map(|i| status(i, args.sites, 1)).collect();
    let before = live();
    let decoded: Vec<NodeStatus> = statuses.clone();
    let as_structs = live() - before;
    let before = live();
    let frames: Vec<Box<[u8]>> = statuses
        .iter()
        .map(|s| encode(s).unwrap_or_default().into_boxed_slice())
        .collect();
    let as_frames = live() - before;
    drop((decoded, frames));
    println!(
        "- a node's last status held decoded (`NodeStatus`, the old record): {:.0} bytes per node; \
         as its postcard frame: {:.0} bytes per node",
        per_node(as_structs, n),
        per_node(as_frames, n)
    );

    // The fleet record as the controller keeps it now.
    let before = live();
    let mut cluster = Cluster::default();
    for s in &statuses {
        cluster.fleet.ingest_status(s.clone(), 1);
    }
    for s in &statuses {
        cluster.fleet.ingest_presence(&s.node, &presence(), 1);
    }
    let fleet_bytes = live() - before;
    println!(
        "- fleet record (compact: hot fields decoded, the status as its frame, interned labels): \
         {:.0} bytes per node",
        per_node(fleet_bytes, n)
    );
    drop(statuses);

    let workloads = workloads(args.workloads, args.sites);
    let templates = templates_for(&workloads, &BTreeMap::new());
    let rollouts = BTreeMap::new();

    // Full placement from nothing.
    let mut times = Vec::new();
    let mut changed = Vec::new();
    for _ in 0..args.repeat {
        let t = Instant::now();
        let (c, _) = cluster.plan(&workloads, &templates, &rollouts, 2);
        times.push(t.elapsed());
        changed = c;
    }
    drop(changed);
    // Once more, counting what the desired states hold once installed.
    let before = live();
    let (changed, _) = cluster.plan(&workloads, &templates, &rollouts, 2);
    let placed = changed.len();
    for (node, d) in changed {
        cluster.desired.insert(node, d);
    }
    let desired_bytes = live() - before;
    cluster.workloads = workloads.clone();
    println!(
        "- full placement, nothing placed yet: {:.1} ms (median of {}); {placed} nodes get a desired state",
        median(times),
        args.repeat
    );
    println!(
        "- desired pods per node (sharing their workload's template): {:.0} bytes per node",
        per_node(desired_bytes, n)
    );

    // Placement again with everything in place: what every event costs.
    let mut times = Vec::new();
    for _ in 0..args.repeat {
        let t = Instant::now();
        let (c, _) = cluster.plan(&workloads, &templates, &rollouts, 3);
        times.push(t.elapsed());
        assert!(c.is_empty(), "a placed fleet placed again changes nothing");
    }
    println!(
        "- placement of a placed fleet (no change): {:.1} ms",
        median(times)
    );

    // One node joins.
    let mut times = Vec::new();
    let mut changed_nodes = 0;
    for r in 0..args.repeat {
        cluster.fleet.ingest_status(status(n + r, args.sites, 1), 4);
        let t = Instant::now();
        let (c, _) = cluster.plan(&workloads, &templates, &rollouts, 4);
        times.push(t.elapsed());
        changed_nodes = c.len();
        for (node, d) in c {
            cluster.desired.insert(node, d);
        }
    }
    println!(
        "- one node joins: {:.1} ms; {changed_nodes} node(s) republished",
        median(times)
    );

    // One node goes NotReady, then past the toleration: its replicas move.
    let mut times = Vec::new();
    let mut moved = 0;
    for r in 0..args.repeat {
        let victim = cluster
            .desired
            .iter()
            .filter(|(_, d)| d.pods.iter().any(|p| p.name != p.workload()))
            .nth(r)
            .map(|(name, _)| name.clone());
        let Some(victim) = victim else { break };
        cluster
            .fleet
            .ingest_presence(&victim, &Presence::Offline, 5);
        let t = Instant::now();
        let (c, _) = cluster.plan(&workloads, &templates, &rollouts, 10_000_000);
        times.push(t.elapsed());
        moved = c.len();
        for (node, d) in c {
            cluster.desired.insert(node, d);
        }
    }
    println!(
        "- one node NotReady past its replicas' toleration: {:.1} ms; {moved} node(s) republished",
        median(times)
    );
}

fn presence() -> Presence {
    Presence::Online {
        instance: 7,
        agent_version: "0.1.0".into(),
    }
}
