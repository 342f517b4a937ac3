//! `flotilla-swarm`: a simulated fleet. Runs N real agent state machines (the
//! agent's own code with the fake runtime, each with its own MQTT connection,
//! node name, labels and data directory) in one process against a real
//! `flotilla serve` — with its embedded broker or a Mosquitto — and measures
//! registration, convergence after an apply, memory per node, traffic per
//! node, API latency under load, and a broker restart.
//!
//! It exits non-zero when a node fails to converge or to come back: the
//! small-N end-to-end test relies on that, not on timings.

mod procs;
mod proxy;
mod watch;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_agent::config::{Config, NodeLabels, RuntimeKind};
use flotilla_agent::image::FakeImages;
use flotilla_agent::runtime::fake::FakeRuntime;
use flotilla_proto::Topics;
use procs::{BrokerKind, Cluster, rss_bytes};
use tokio_util::sync::CancellationToken;
use watch::Watch;

/// A simulated fleet against a real controller.
#[derive(Parser, Debug)]
#[command(name = "flotilla-swarm")]
struct Args {
    /// Number of agents.
    #[arg(long, default_value_t = 200)]
    nodes: usize,
    /// `embedded` (the controller's broker) or `mosquitto`.
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// The `flotilla` binary (default: next to this one).
    #[arg(long)]
    flotilla: Option<PathBuf>,
    /// Work directory (default: a new temp dir, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Agents started at once; the next batch starts when they have reported.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Agents that connect through a byte-counting proxy.
    #[arg(long, default_value_t = 100)]
    sample: usize,
    /// Length of the idle traffic window, seconds.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Deadline of each phase, seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Apply rounds (each changes every node's desired state).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Skip the broker restart phase.
    #[arg(long)]
    no_restart: bool,
    /// Also write the report (Markdown) to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::ERROR)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flotilla-swarm: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("flotilla-swarm: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// One line of the report, printed as it is measured.
struct Report {
    text: String,
    ok: bool,
}

impl Report {
    fn line(&mut self, s: String) {
        println!("{s}");
        self.text.push_str(&s);
        self.text.push('\n');
    }

    fn fail(&mut self, s: String) {
        self.ok = false;
        self.line(format!("- FAILED: {s}"));
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let kind = match args.broker.as_str() {
        "embedded" => BrokerKind::Embedded,
        "mosquitto" => BrokerKind::Mosquitto,
        other => bail!("--broker {other:?}: expected embedded or mosquitto"),
    };
    let flotilla = match args.flotilla.clone() {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("flotilla"),
    };
    let _tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            _tmp = TempDir::new()?;
            _tmp.0.clone()
        }
    };
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut report = Report {
        text: String::new(),
        ok: true,
    };
    report.line(format!(
        "## Swarm: {} agents, {} broker\n",
        args.nodes,
        if kind == BrokerKind::Embedded {
            "embedded (rmqtt)"
        } else {
            "Mosquitto"
        }
    ));

    let mut cluster = tokio::task::block_in_place(|| Cluster::start(&flotilla, kind, &dir))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_controller = rss_bytes(cluster.controller.pid())?;
    let idle_mosquitto = cluster
        .mosquitto
        .as_ref()
        .map(|m| rss_bytes(m.pid()))
        .transpose()?;
    let idle_self = rss_bytes(std::process::id())?;

    let shutdown = CancellationToken::new();
    let topics = Topics::default();
    let watch = Watch::start(cluster.mqtt_port, topics.clone(), shutdown.clone());
    let (proxy_port, counter) = proxy::start(cluster.mqtt_port, shutdown.clone()).await?;

    // Registration: batches of agents, each waiting for the previous batch.
    let names: Vec<String> = (0..args.nodes).map(|i| format!("swarm-{i:05}")).collect();
    let started = Instant::now();
    for (b, chunk) in names.chunks(args.batch.max(1)).enumerate() {
        for (j, name) in chunk.iter().enumerate() {
            let i = b * args.batch.max(1) + j;
            let port = if i < args.sample {
                proxy_port
            } else {
                cluster.mqtt_port
            };
            start_agent(&dir, name, i, port, shutdown.child_token())?;
        }
        let want = (b * args.batch.max(1) + chunk.len()).min(args.nodes);
        if !wait(timeout, || watch.with(|n| n.len() >= want)).await {
            report.fail(format!(
                "only {} of {want} agents registered",
                watch.with(|n| n.len())
            ));
            return finish(report, &args, shutdown);
        }
    }
    let registered = started.elapsed();
    report.line(format!(
        "- connect and register: {} agents in {:.2} s",
        args.nodes,
        registered.as_secs_f64()
    ));
    wait_for_controller_nodes(&cluster.api, args.nodes, timeout).await?;

    let n = args.nodes as f64;
    let busy_controller = rss_bytes(cluster.controller.pid())?;
    report.line(format!(
        "- controller RSS: idle {:.1} MiB, with {} nodes {:.1} MiB: {:.1} KiB per node{}",
        mib(idle_controller),
        args.nodes,
        mib(busy_controller),
        busy_controller.saturating_sub(idle_controller) as f64 / n / 1024.0,
        if kind == BrokerKind::Embedded {
            " (controller and embedded broker)"
        } else {
            ""
        }
    ));
    if let (Some(idle), Some(m)) = (idle_mosquitto, &cluster.mosquitto) {
        let busy = rss_bytes(m.pid())?;
        report.line(format!(
            "- mosquitto RSS: idle {:.1} MiB, with {} nodes {:.1} MiB: {:.1} KiB per node",
            mib(idle),
            args.nodes,
            mib(busy),
            busy.saturating_sub(idle) as f64 / n / 1024.0
        ));
    }
    let busy_self = rss_bytes(std::process::id())?;
    report.line(format!(
        "- swarm process (agents' state machines, fake runtime): {:.1} KiB per agent",
        busy_self.saturating_sub(idle_self) as f64 / n / 1024.0
    ));

    // Idle traffic, measured on the sample behind the counting proxy.
    let sample = args.sample.min(args.nodes).max(1) as f64;
    let before = counter.get();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_bytes = counter.get() - before;
    report.line(format!(
        "- idle traffic: {} bytes from {} agents in {} s: {:.0} bytes per node per hour (MQTT, both ways)",
        idle_bytes,
        sample,
        args.idle_secs,
        idle_bytes as f64 / sample * 3600.0 / args.idle_secs as f64
    ));

    // Apply rounds: every node gets a changed desired state.
    for round in 1..=args.rounds {
        let before = counter.get();
        match converge(&cluster.api, &watch, round, args.nodes, timeout).await? {
            Ok(c) => {
                report.line(format!(
                    "- apply round {round}: all {} nodes report the new generation running; from the apply request: \
                     p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (the apply itself took {:.0} ms); \
                     `GET /v1/nodes` during it: max {:.0} ms",
                    args.nodes, c.p50, c.p99, c.max, c.apply_ms, c.api_max_ms
                ));
                report.line(format!(
                    "- traffic of round {round}: {:.0} bytes per node (sample behind the proxy)",
                    (counter.get() - before) as f64 / sample
                ));
            }
            Err(missing) => report.fail(format!(
                "round {round}: {missing} nodes did not converge within {timeout:?}"
            )),
        }
    }

    // After the rounds: what the applies and the fleet-wide status bursts
    // left behind (allocator high-water marks included).
    let after_rounds = rss_bytes(cluster.controller.pid())?;
    report.line(format!(
        "- controller RSS after the rounds: {:.1} MiB: {:.1} KiB per node",
        mib(after_rounds),
        after_rounds.saturating_sub(idle_controller) as f64 / n / 1024.0
    ));

    match targeted(&cluster.api, &watch, timeout).await? {
        Ok(line) => report.line(line),
        Err(why) => report.fail(why),
    }

    if !args.no_restart {
        let t0 = Instant::now();
        tokio::task::block_in_place(|| cluster.restart_broker())?;
        let back = wait(timeout, || {
            watch.with(|nodes| nodes.values().filter(|s| s.last_at > t0).count() == args.nodes)
        })
        .await;
        let returned = watch.with(|nodes| nodes.values().filter(|s| s.last_at > t0).count());
        if back {
            report.line(format!(
                "- broker restart: all {} agents reconnected and reported within {:.2} s; none gave up",
                args.nodes,
                t0.elapsed().as_secs_f64()
            ));
        } else {
            report.fail(format!(
                "broker restart: only {returned} of {} agents reported again within {timeout:?}",
                args.nodes
            ));
        }
    }
    finish(report, &args, shutdown)
}

fn finish(report: Report, args: &Args, shutdown: CancellationToken) -> anyhow::Result<bool> {
    shutdown.cancel();
    if let Some(path) = &args.report {
        let mut text = String::new();
        let _ = writeln!(text, "{}", report.text);
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.ok)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn start_agent(
    dir: &std::path::Path,
    name: &str,
    i: usize,
    port: u16,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut config = Config::new(
        &format!("mqtt://127.0.0.1:{port}"),
        name,
        dir.join("agents").join(name),
    )?;
    config.runtime = RuntimeKind::Fake;
    config.run_dir = dir.join("run").join(name);
    config.labels =
        NodeLabels::parse(&[format!("site=shop{}", i % 50), "fleet=swarm".to_string()])?;
    tokio::spawn(async move {
        let name = config.node.as_str().to_owned();
        let result = flotilla_agent::run_with(
            config,
            Arc::new(FakeRuntime::new()),
            Arc::new(FakeImages),
            token,
        )
        .await;
        if let Err(e) = result {
            eprintln!("agent {name}: {e:#}");
        }
    });
    Ok(())
}

/// Polls `f` every 20 ms until it holds or `timeout` passes.
async fn wait(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    let mut response = ureq::get(url)
        .header("authorization", procs::bearer())
        .call()
        .with_context(|| format!("GET {url}"))?;
    let text = response
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()?;
    Ok(serde_json::from_str(&text)?)
}

async fn wait_for_controller_nodes(api: &str, n: usize, timeout: Duration) -> anyhow::Result<()> {
    let url = format!("{api}/v1/nodes");
    let deadline = Instant::now() + timeout;
    loop {
        let u = url.clone();
        let nodes = tokio::task::spawn_blocking(move || get_json(&u)).await??;
        let count = nodes["items"].as_array().map_or(0, |a| a.len());
        if count >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the controller knows {count} of {n} nodes after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Convergence {
    apply_ms: f64,
    p50: f64,
    p99: f64,
    max: f64,
    api_max_ms: f64,
}

/// Applies a workload that changes every node's desired state and waits
/// until each node reports the new generation with all pods running.
/// `Err(n)`: n nodes did not make it in time.
async fn converge(
    api: &str,
    watch: &Watch,
    round: usize,
    nodes: usize,
    timeout: Duration,
) -> anyhow::Result<Result<Convergence, usize>> {
    let manifest = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: swarm-app}}\nspec:\n  \
         nodeSelector: {{fleet: swarm}}\n  containers:\n  - name: main\n    image: oci:/swarm/app:1\n    \
         command: [serve]\n    env: [{{name: ROUND, value: '{round}'}}]\n"
    );
    let url = format!("{api}/v1/apply");
    let t0 = Instant::now();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut r = ureq::post(&url)
            .header("authorization", procs::bearer())
            .send(manifest)
            .context("POST /v1/apply")?;
        let status = r.status();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        anyhow::ensure!(status.is_success(), "apply answered {status}: {body}");
        Ok(())
    })
    .await??;
    let applied = t0.elapsed();

    let nodes_url = format!("{api}/v1/nodes");
    let listing = tokio::task::spawn_blocking({
        let u = nodes_url.clone();
        move || get_json(&u)
    })
    .await??;
    let target: HashMap<String, u64> = listing["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            Some((
                n["name"].as_str()?.to_string(),
                n["desiredGeneration"].as_u64()?,
            ))
        })
        .collect();

    // Probe the API while the fleet converges.
    let stop = CancellationToken::new();
    let probe_stop = stop.clone();
    let probe = tokio::task::spawn_blocking(move || {
        let mut worst = Duration::ZERO;
        while !probe_stop.is_cancelled() {
            let t = Instant::now();
            let _ = get_json(&nodes_url);
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(250));
        }
        worst
    });

    let settled = |t: &HashMap<String, u64>| {
        watch.with(|seen| {
            t.iter()
                .filter_map(|(name, g)| {
                    let s = seen.get(name)?;
                    s.settled
                        .iter()
                        .filter(|(sg, _)| sg >= g)
                        .map(|(_, at)| *at)
                        .min()
                })
                .collect::<Vec<Instant>>()
        })
    };
    let all = wait(timeout, || {
        target.len() >= nodes && settled(&target).len() == target.len()
    })
    .await;
    stop.cancel();
    let api_worst = probe.await?;
    let times = settled(&target);
    if !all {
        return Ok(Err(target.len().max(nodes) - times.len()));
    }
    let mut ms: Vec<f64> = times
        .iter()
        .map(|at| at.saturating_duration_since(t0).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    Ok(Ok(Convergence {
        apply_ms: applied.as_secs_f64() * 1000.0,
        p50: pct(0.5),
        p99: pct(0.99),
        max: pct(1.0),
        api_max_ms: api_worst.as_secs_f64() * 1000.0,
    }))
}

/// Applies a workload for one site (`site=shop0`) and counts the desired
/// states published: each of that site's nodes must get exactly one, once
/// their statuses are back (ingesting them republishes nothing), and no
/// other node any. `Err`: what went wrong.
async fn targeted(
    api: &str,
    watch: &Watch,
    timeout: Duration,
) -> anyhow::Result<Result<String, String>> {
    let manifest = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: swarm-site0}\nspec:\n  \
                    nodeSelector: {site: shop0}\n  containers:\n  - name: main\n    image: oci:/swarm/site:1\n    \
                    command: [serve]\n";
    let before = watch.published();
    let url = format!("{api}/v1/apply");
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut r = ureq::post(&url)
            .header("authorization", procs::bearer())
            .send(manifest)
            .context("POST /v1/apply")?;
        let status = r.status();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        anyhow::ensure!(status.is_success(), "apply answered {status}: {body}");
        Ok(())
    })
    .await??;
    let site_url = format!("{api}/v1/nodes?labelSelector=site=shop0");
    // The site's nodes, once the controller has seen each run its new generation.
    let deadline = Instant::now() + timeout;
    let site: Vec<String> = loop {
        let u = site_url.clone();
        let listing = tokio::task::spawn_blocking(move || get_json(&u)).await??;
        let items = listing["items"].as_array().cloned().unwrap_or_default();
        let done = !items.is_empty()
            && items
                .iter()
                .all(|n| n["observedGeneration"].as_u64() >= n["desiredGeneration"].as_u64());
        if done {
            break items
                .iter()
                .filter_map(|n| n["name"].as_str().map(str::to_owned))
                .collect();
        }
        if Instant::now() > deadline {
            return Ok(Err(format!(
                "targeted apply: the nodes of site shop0 did not report it within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let diff = || {
        let after = watch.published();
        let mut out: HashMap<String, u64> = HashMap::new();
        for (node, n) in after {
            let d = n - before.get(&node).copied().unwrap_or(0);
            if d > 0 {
                out.insert(node, d);
            }
        }
        out
    };
    // The watcher gets the publishes on its own connection: wait for them.
    wait(timeout, || site.iter().all(|n| diff().contains_key(n))).await;
    let published = diff();
    let total: u64 = published.values().sum();
    let others = published.keys().filter(|n| !site.contains(n)).count();
    let twice = published.values().filter(|n| **n > 1).count();
    if total as usize != site.len() || others > 0 || twice > 0 {
        return Ok(Err(format!(
            "targeted apply: {total} desired states published for {} nodes of site shop0 \
             ({others} to other nodes, {twice} nodes more than once)",
            site.len()
        )));
    }
    Ok(Ok(format!(
        "- targeted apply (a workload for site shop0): {total} desired states published, one to each of its {} nodes, none to the others",
        site.len()
    )))
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("flotilla-swarm-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
