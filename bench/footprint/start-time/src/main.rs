//! Times one container's whole life — create, start, run `/bin/true`, exit,
//! delete — through the agent's runtime (libcontainer, creating through its
//! single-threaded helper process, as the agent runs it) and through `runc
//! run` and `crun run` of a bundle with the same root filesystem, process and
//! limits; and, apart, what the helper's process alone costs (spawn, exec,
//! exit with no work). Runs are interleaved so that a noisy moment hits all
//! alike. Prints a Markdown table.
//!
//! `footprint-start-time WORK_DIR RUNS [HELPER]`: HELPER is the binary the
//! runtime re-executes as its helper (the agent's static binary, as on a
//! device); without it, this binary. Needs root, /bin/busybox (static), runc
//! and crun.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flotilla_agent::runtime::youki::YoukiRuntime;
use flotilla_agent::runtime::{ContainerConfig, Runtime};
use flotilla_proto::Resources;
use serde_json::json;

const MEMORY: u64 = 64 << 20;
const CPU_MILLIS: u32 = 500;
const PIDS: u32 = 64;

fn main() -> std::process::ExitCode {
    // The agent's runtime re-executes this binary as its single-threaded
    // create/exec helper.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == flotilla_agent::runtime::youki::helper::ARG)
    {
        return flotilla_agent::runtime::youki::helper::main(std::env::args_os().skip(2).collect());
    }
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("footprint-start-time: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (work, runs, helper) = match args.as_slice() {
        [work, runs] => (work, runs, None),
        [work, runs, helper] => (work, runs, Some(std::path::absolute(helper)?)),
        _ => bail!("usage: footprint-start-time WORK_DIR RUNS [HELPER]"),
    };
    let work = std::path::absolute(work)?;
    let runs: usize = runs.parse().context("RUNS: expected a number")?;
    let helper = match helper {
        Some(h) => h,
        None => std::env::current_exe()?,
    };
    let rootfs = busybox_rootfs(&work.join("rootfs"))?;
    let bundle = oci_bundle(&work.join("bundle"), &rootfs)?;

    let node = format!("bench-{}", std::process::id());
    let youki = YoukiRuntime::new(
        work.join("state"),
        work.join("containers"),
        format!("flotilla-bench/{node}"),
    )?
    .with_helper(helper.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut times: [Vec<Duration>; 4] = Default::default();
    // Two warm-up rounds fill the page cache and the cgroup parents.
    for i in 0..runs + 2 {
        let t = [
            agent_runtime(&youki, &rt, &rootfs, &work, i)?,
            oci_cli("runc", &bundle, i, false)?,
            oci_cli("crun", &bundle, i, true)?,
            helper_alone(&helper)?,
        ];
        if i >= 2 {
            for (all, t) in times.iter_mut().zip(t) {
                all.push(t);
            }
        }
    }
    println!("| runtime | median | p90 | min | runs |");
    println!("|---|---:|---:|---:|---:|");
    let size = std::fs::metadata(&helper).map(|m| m.len()).unwrap_or(0);
    let alone = format!(
        "of which the helper process alone (spawn, exec of the {:.2} MiB binary, exit)",
        size as f64 / f64::from(1 << 20)
    );
    let names = [
        "flotilla-agent runtime (libcontainer, through its helper process)",
        "`runc run` (runc 1.1.5)",
        "`crun run` (crun 1.8.1)",
        alone.as_str(),
    ];
    for (name, mut t) in names.into_iter().zip(times) {
        t.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
            ms(t[t.len() / 2]),
            ms(t[t.len() * 9 / 10]),
            ms(t[0]),
            t.len()
        );
    }
    let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/unified/flotilla-bench/{node}"));
    Ok(())
}

/// A root filesystem of the host's static busybox and its `true` and `sh`.
fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("/bin/busybox (Debian's busybox-static)")?;
    for applet in ["true", "sh"] {
        let link = dir.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    Ok(dir.to_path_buf())
}

/// runc's default spec, made to match what the agent's runtime runs: the
/// same process, no terminal, a read-only root, the same limits.
fn oci_bundle(dir: &Path, rootfs: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(dir.join("config.json"));
    let out = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(dir)
        .output()
        .context("runc")?;
    if !out.status.success() {
        bail!("runc spec: {}", String::from_utf8_lossy(&out.stderr));
    }
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["/bin/true"]);
    spec["process"]["env"] = json!(["PATH=/bin"]);
    spec["root"] = json!({ "path": rootfs, "readonly": true });
    spec["hostname"] = json!("bench");
    spec["linux"]["cgroupsPath"] = json!(format!("/flotilla-bench/oci-{}", std::process::id()));
    spec["linux"]["resources"] = json!({
        "memory": { "limit": MEMORY },
        "cpu": { "quota": i64::from(CPU_MILLIS) * 100, "period": 100_000 },
        "pids": { "limit": PIDS },
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(dir.to_path_buf())
}

fn agent_runtime(
    youki: &YoukiRuntime,
    rt: &tokio::runtime::Runtime,
    rootfs: &Path,
    work: &Path,
    i: usize,
) -> Result<Duration> {
    let id = format!("bench.main.{i:08}");
    let config = ContainerConfig {
        id: id.clone(),
        image_rootfs: rootfs.to_path_buf(),
        args: vec!["/bin/true".into()],
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        uid: 0,
        gid: 0,
        hostname: "bench".into(),
        resources: Resources {
            cpu_millis: Some(CPU_MILLIS),
            memory_bytes: Some(MEMORY),
            pids: Some(PIDS),
        },
        log_path: work.join("agent-runtime.log"),
        mounts: Vec::new(),
        security: Default::default(),
    };
    let start = Instant::now();
    youki.start(&config)?;
    let exit = rt.block_on(youki.wait(&id))?;
    youki.delete(&id)?;
    let took = start.elapsed();
    if exit.code != 0 {
        bail!("agent runtime: /bin/true exited {}", exit.code);
    }
    Ok(took)
}

/// The helper's own cost: it is spawned and exec'd like for a create, and
/// exits at once on its missing arguments.
fn helper_alone(helper: &Path) -> Result<Duration> {
    let start = Instant::now();
    let out = Command::new(helper)
        .arg(flotilla_agent::runtime::youki::helper::ARG)
        .stdin(Stdio::null())
        .output()
        .with_context(|| helper.display().to_string())?;
    let took = start.elapsed();
    if out.status.success() || out.stderr.is_empty() {
        bail!("the helper with no request: expected an error, got {out:?}");
    }
    Ok(took)
}

/// `runc run` / `crun run`: create, start, wait, delete in one command.
/// crun refuses this host's hybrid cgroup layout unless the empty cgroup2
/// mount at /sys/fs/cgroup/unified is gone: it runs in a mount namespace of
/// its own without it (the unmount costs microseconds, inside the timing).
fn oci_cli(cli: &str, bundle: &Path, i: usize, private_unified: bool) -> Result<Duration> {
    let mut cmd = Command::new(cli);
    cmd.args(["run", "--bundle"])
        .arg(bundle)
        .arg(format!("bench-{cli}-{}-{i}", std::process::id()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if private_unified {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                use nix::mount::{MntFlags, MsFlags, mount, umount2};
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )?;
                let _ = umount2("/sys/fs/cgroup/unified", MntFlags::MNT_DETACH);
                Ok(())
            });
        }
    }
    let start = Instant::now();
    let out = cmd.output().with_context(|| cli.to_owned())?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("{cli} run: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}
