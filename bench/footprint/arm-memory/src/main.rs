//! The agent's idle memory on aarch64, measured where it runs: the emulated
//! machine of `flotilla_testkit::machine` boots with the cross-built static
//! aarch64 agent, which connects to a controller on this host; once the node
//! is Ready, and again once PODS pods (one busybox `sleep` each) are
//! Running, the host waits IDLE seconds and asks the machine for a snapshot
//! of the agent's `/proc/PID/smaps_rollup`, `smaps` and threads. The machine
//! has no Python: its PID 1 answers over TCP (busybox `nc` to the host's
//! loopback, 10.0.2.2) and bench/footprint/rss-breakdown splits the
//! snapshot here. Prints a Markdown section.
//!
//! `footprint-arm-memory [--flotilla BIN] [--agent BIN] [--pods N] [--idle SECS] [--keep DIR]`
//!
//! `--keep DIR` leaves the raw snapshots there, for a closer look.
//! BIN defaults: `target/debug/flotilla` (controller and CLI, this host's)
//! and the agent cross/build leaves for aarch64. Needs qemu-system-aarch64,
//! cpio and python3; fetches the machine's kernel and busybox once.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flotilla_testkit::machine::{self, Guest, Kit};
use serde_json::Value;

/// Boot, registration, the pods' start and each snapshot get this long.
const PATIENCE: Duration = Duration::from_secs(300);

struct Args {
    flotilla: PathBuf,
    agent: PathBuf,
    pods: usize,
    idle: Duration,
    /// Where the raw snapshots go (else into the temp dir, removed).
    keep: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let mut args = Args {
        flotilla: machine::repo().join("target/debug/flotilla"),
        agent: machine::agent_path(),
        pods: 10,
        idle: Duration::from_secs(10),
        keep: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a}: a value expected"));
        match a.as_str() {
            "--flotilla" => args.flotilla = value()?.into(),
            "--agent" => args.agent = value()?.into(),
            "--keep" => args.keep = Some(value()?.into()),
            "--pods" => args.pods = value()?.parse().context("--pods: a number expected")?,
            "--idle" => {
                let secs: u64 = value()?.parse().context("--idle: seconds expected")?;
                args.idle = Duration::from_secs(secs);
            }
            _ => bail!(
                "usage: footprint-arm-memory [--flotilla BIN] [--agent BIN] [--pods N] [--idle SECS] [--keep DIR]"
            ),
        }
    }
    Ok(args)
}

/// A child process killed when dropped.
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc(child))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `f` every 200 ms until it gives a value or `PATIENCE` is over.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The controller on this host, with its embedded broker.
struct Controller {
    _proc: Proc,
    bin: PathBuf,
    data: PathBuf,
    api: String,
    mqtt_port: u16,
}

impl Controller {
    fn start(bin: &Path, dir: &Path) -> Result<Controller> {
        let (api_port, mqtt_port) = (free_port()?, free_port()?);
        let data = dir.join("controller");
        let proc = Proc::spawn(
            Command::new(bin)
                .arg("serve")
                .arg("--data-dir")
                .arg(&data)
                .arg("--api-listen")
                .arg(format!("127.0.0.1:{api_port}"))
                .arg("--mqtt-listen")
                .arg(format!("127.0.0.1:{mqtt_port}"))
                // The machine's agent connects without credentials.
                .arg("--allow-anonymous"),
            &dir.join("controller.log"),
        )?;
        let c = Controller {
            _proc: proc,
            bin: bin.to_owned(),
            data,
            api: format!("https://127.0.0.1:{api_port}"),
            mqtt_port,
        };
        wait_for("the controller's API", || {
            c.json(&["get", "nodes", "-o", "json"])
        })?;
        Ok(c)
    }

    fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        let token = std::fs::read_to_string(self.data.join("admin.token")).unwrap_or_default();
        Ok(Command::new(&self.bin)
            .args(args)
            .env("FLOTILLA_SERVER", &self.api)
            .env("FLOTILLA_CA", self.data.join("ca.pem"))
            .env("FLOTILLA_TOKEN", token.trim())
            .stdin(Stdio::null())
            .output()?)
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let out = self.cli(args).ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }
}

/// PID 1's loop once the agent runs: wait on the host's port for an order,
/// and on `measure` send the agent's snapshot there.
fn measure_loop(port: u16) -> String {
    format!(
        r#"snapshot() {{
  echo "== exe"; readlink /proc/$agent/exe
  for t in /proc/$agent/task/*; do echo "== task ${{t##*/}}"; cat $t/syscall; done
  echo "== smaps_rollup"; cat /proc/$agent/smaps_rollup
  echo "== smaps"; cat /proc/$agent/smaps
  echo "== end"
}}
while true; do
  order=$(nc 10.0.2.2 {port} </dev/null 2>/dev/null)
  case $order in
    measure) snapshot | nc 10.0.2.2 {port} ;;
    *) sleep 1 ;;
  esac
done"#
    )
}

/// The host's end of the machine's measure loop.
struct Snapshots(TcpListener);

impl Snapshots {
    fn accept(&self) -> Result<TcpStream> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.0.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(PATIENCE))?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("the machine did not connect for a snapshot");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Orders a snapshot and returns it.
    fn take(&self) -> Result<String> {
        self.accept()?.write_all(b"measure\n")?;
        let mut stream = self.accept()?;
        let mut text = Vec::new();
        let mut chunk = [0u8; 16384];
        while !text.ends_with(b"== end\n") {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            text.extend_from_slice(&chunk[..n]);
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    }
}

/// One row of the table: RSS and PSS from the rollup, the rest from
/// rss-breakdown.
struct Row {
    rss: u64,
    pss: u64,
    threads: u64,
    binary: u64,
    heap: u64,
    stacks: u64,
    page_kib: u64,
}

fn row(snapshot: &str, file: &Path) -> Result<Row> {
    std::fs::write(file, snapshot)?;
    let field = |name: &str| -> Result<u64> {
        let rollup = snapshot
            .split("== smaps_rollup\n")
            .nth(1)
            .context("no smaps_rollup in the snapshot")?;
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in the snapshot's smaps_rollup"))
    };
    let out = Command::new("python3")
        .arg(machine::repo().join("bench/footprint/rss-breakdown"))
        .arg("--snapshot")
        .arg(file)
        .output()?;
    if !out.status.success() {
        bail!("rss-breakdown: {}", String::from_utf8_lossy(&out.stderr));
    }
    let parts: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [threads, binary, heap, stacks, _other] = parts[..] else {
        bail!("rss-breakdown printed {parts:?}");
    };
    let page_kib = snapshot
        .lines()
        .find_map(|l| l.strip_prefix("KernelPageSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok(Row {
        rss: field("Rss:")?,
        pss: field("Pss:")?,
        threads,
        binary,
        heap,
        stacks,
        page_kib,
    })
}

fn workloads(image: &str, pods: usize) -> String {
    (0..pods)
        .map(|i| {
            format!(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: idle-{i}}}\nspec:\n  \
                 nodeSelector: {{board: qemu-virt}}\n  containers:\n  - name: main\n    \
                 image: {image}\n    command: [sleep, '3600']\n    \
                 resources: {{limits: {{cpu: 100m, memory: 16Mi, pids: 16}}}}\n---\n"
            )
        })
        .collect()
}

fn mib(kib: u64) -> String {
    format!("{:.2} MiB", kib as f64 / 1024.0)
}

fn main() -> std::process::ExitCode {
    match bench() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("footprint-arm-memory: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    let args = args()?;
    let kit = Kit::fetch()?;
    let dir = tempfile::Builder::new()
        .prefix("flotilla-arm-memory.")
        .tempdir()?;
    let controller = Controller::start(&args.flotilla, dir.path())?;
    let snapshots = Snapshots(TcpListener::bind("127.0.0.1:0")?);
    snapshots.0.set_nonblocking(true)?;
    let node = format!("arm-memory-{}", std::process::id());
    let guest = Guest {
        node: node.clone(),
        broker_port: controller.mqtt_port,
        then: measure_loop(snapshots.0.local_addr()?.port()),
    };
    let key = controller.data.join("signing.pub");
    let initrd = guest.initramfs(&kit, &args.agent, &key, dir.path())?;
    let console = dir.path().join("console.log");
    let _vm = Proc::spawn(
        &mut machine::qemu(&kit, &initrd, &console),
        &dir.path().join("qemu.log"),
    )?;
    let keep = match &args.keep {
        Some(keep) => {
            std::fs::create_dir_all(keep)?;
            keep.clone()
        }
        None => dir.path().to_owned(),
    };
    let result = measure(&args, &controller, &snapshots, &node, dir.path(), &keep);
    if result.is_err() {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        for line in tail.iter().rev() {
            eprintln!("console: {line}");
        }
    }
    let (idle, busy) = result?;
    let agent_bytes = std::fs::metadata(&args.agent)?.len();
    let kernel = kit
        .kernel
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    println!("## Idle memory: aarch64, measured in the emulated machine");
    println!();
    println!(
        "The static aarch64 agent ({agent_bytes} bytes, `--runtime youki`) in the emulated machine of \
         `tests/src/machine.rs` (qemu-system-aarch64 TCG, `virt`, Cortex-A72, 2 cores, 1 GiB; Debian's \
         arm64 kernel {kernel}, {page} KiB pages, cgroup v2), connected to the embedded broker of a \
         controller on this host; measured inside the machine {idle_s} s after the node was Ready, then \
         {idle_s} s after {pods} pods (one busybox `sleep` each) were Running. Same columns as the \
         x86_64 table.",
        page = idle.page_kib,
        idle_s = args.idle.as_secs(),
        pods = args.pods,
    );
    println!();
    println!("| process | pods | RSS | PSS | threads | binary | heap | stacks |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (pods, r) in [(0, &idle), (args.pods, &busy)] {
        println!(
            "| flotilla-agent (aarch64) | {pods} | {} | {} | {} | {} | {} | {} |",
            mib(r.rss),
            mib(r.pss),
            r.threads,
            mib(r.binary),
            mib(r.heap),
            mib(r.stacks)
        );
    }
    Ok(())
}

/// Boot, the idle snapshot, the pods, the busy snapshot.
fn measure(
    args: &Args,
    controller: &Controller,
    snapshots: &Snapshots,
    node: &str,
    dir: &Path,
    keep: &Path,
) -> Result<(Row, Row)> {
    wait_for("the emulated node to be Ready", || {
        let n = controller.json(&["get", "nodes", node, "-o", "json"])?;
        (n["status"] == "Ready" && n["arch"] == "arm64").then_some(())
    })?;
    std::thread::sleep(args.idle);
    let idle = row(&snapshots.take()?, &keep.join("snapshot-0.txt"))?;

    let manifest = dir.join("pods.yaml");
    std::fs::write(
        &manifest,
        workloads("oci:/images/busybox:latest", args.pods),
    )?;
    let manifest = manifest.to_string_lossy();
    let out = controller.cli(&["apply", "-f", &manifest])?;
    if !out.status.success() {
        bail!("apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_for("the pods to be Running", || {
        let pods = controller.json(&["get", "pods", "-o", "json"])?;
        let running = pods["items"]
            .as_array()?
            .iter()
            .filter(|p| p["phase"] == "Running")
            .count();
        (running == args.pods).then_some(())
    })?;
    std::thread::sleep(args.idle);
    let busy = row(
        &snapshots.take()?,
        &keep.join(format!("snapshot-{}.txt", args.pods)),
    )?;
    Ok((idle, busy))
}
