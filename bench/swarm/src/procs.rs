//! The processes a swarm run measures: `flotilla serve` (with its embedded
//! broker, or pointed at a Mosquitto this module starts), their memory, and
//! restarts.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A port free right now on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Resident memory of `pid` in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS line")?
        .parse()?;
    Ok(kb * 1024)
}

/// A child process, killed when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc { child })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which broker the controller uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// The controller's embedded rmqtt.
    Embedded,
    /// A Mosquitto started for the run.
    Mosquitto,
}

/// The controller (and Mosquitto, if used) of a run.
/// The controller's admin API token, once it is up (the same across
/// restarts: the store is kept).
static API_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `Bearer {admin token}`, for the API calls of the run.
pub fn bearer() -> String {
    format!("Bearer {}", API_TOKEN.get().map_or("", String::as_str))
}

pub struct Cluster {
    /// `flotilla serve`.
    pub controller: Proc,
    /// Mosquitto, when the run uses it.
    pub mosquitto: Option<Proc>,
    /// The API's base URL.
    pub api: String,
    /// The MQTT port agents connect to.
    pub mqtt_port: u16,
    kind: BrokerKind,
    api_port: u16,
    dir: PathBuf,
    flotilla: PathBuf,
    restarts: u32,
}

impl Cluster {
    /// Starts the broker (if Mosquitto) and the controller; returns when the API answers.
    pub fn start(flotilla: &Path, kind: BrokerKind, dir: &Path) -> anyhow::Result<Cluster> {
        let mqtt_port = free_port()?;
        let api_port = free_port()?;
        let mosquitto = match kind {
            BrokerKind::Embedded => None,
            BrokerKind::Mosquitto => Some(start_mosquitto(dir, mqtt_port)?),
        };
        let controller = start_controller(flotilla, kind, dir, mqtt_port, api_port, 0)?;
        let cluster = Cluster {
            controller,
            mosquitto,
            api: format!("http://127.0.0.1:{api_port}"),
            mqtt_port,
            kind,
            api_port,
            dir: dir.to_path_buf(),
            flotilla: flotilla.to_path_buf(),
            restarts: 0,
        };
        cluster.wait_api(Duration::from_secs(60))?;
        let token = std::fs::read_to_string(dir.join("controller/admin.token"))
            .context("reading the controller's admin.token")?;
        let _ = API_TOKEN.set(token.trim().to_owned());
        Ok(cluster)
    }

    /// Restarts the broker: Mosquitto, or the controller with its embedded
    /// broker (same ports, same store).
    pub fn restart_broker(&mut self) -> anyhow::Result<()> {
        self.restarts += 1;
        match self.kind {
            BrokerKind::Mosquitto => {
                if let Some(m) = &mut self.mosquitto {
                    m.kill();
                }
                self.mosquitto = Some(start_mosquitto(&self.dir, self.mqtt_port)?);
            }
            BrokerKind::Embedded => {
                self.controller.kill();
                self.controller = start_controller(
                    &self.flotilla,
                    self.kind,
                    &self.dir,
                    self.mqtt_port,
                    self.api_port,
                    self.restarts,
                )?;
                self.wait_api(Duration::from_secs(60))?;
            }
        }
        Ok(())
    }

    fn wait_api(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/healthz", self.api);
        while Instant::now() < deadline {
            if ureq::get(&url).call().is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the controller's API at {} did not answer within {timeout:?}",
            self.api
        )
    }
}

fn start_controller(
    flotilla: &Path,
    kind: BrokerKind,
    dir: &Path,
    mqtt_port: u16,
    api_port: u16,
    n: u32,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(flotilla);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.join("controller"))
        .arg("--api-listen")
        .arg(format!("127.0.0.1:{api_port}"))
        // The simulated agents connect without enrolling (the trust path
        // is measured elsewhere); signatures are still made and sent.
        .arg("--allow-anonymous")
        // The control plane is measured, not TLS: plain HTTP on loopback.
        .arg("--api-plain")
        .env("FLOTILLA_LOG", "warn");
    match kind {
        BrokerKind::Embedded => cmd
            .arg("--mqtt-listen")
            .arg(format!("127.0.0.1:{mqtt_port}")),
        BrokerKind::Mosquitto => cmd
            .arg("--broker")
            .arg(format!("mqtt://127.0.0.1:{mqtt_port}")),
    };
    Proc::spawn(&mut cmd, &dir.join(format!("controller-{n}.log")))
}

fn start_mosquitto(dir: &Path, port: u16) -> anyhow::Result<Proc> {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             set_tcp_nodelay true\nmax_packet_size 4194304\nmax_queued_messages 100000\n\
             max_connections -1\n"
        ),
    )?;
    let proc = Proc::spawn(
        Command::new("mosquitto").arg("-c").arg(&conf),
        &dir.join("mosquitto.log"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("mosquitto did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(proc)
}
