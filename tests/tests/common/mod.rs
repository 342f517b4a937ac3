//! A cluster of real processes for end-to-end tests: `flotilla serve` with its
//! embedded broker (or an external Mosquitto), `flotilla-agent`s running real
//! containers, and the `flotilla` CLI. Each piece runs in its own temp dir on
//! free ports; its output goes to a log file that is printed when a wait fails.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where cargo put the binaries: the test executable is `target/debug/deps/x`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node name unique to this test process and call.
pub fn unique_node(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`
/// and the logs of `logs`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    logs: &[&Path],
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            for log in logs {
                eprintln!(
                    "==== {} ====\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `{dir}/{name}-N.log` for the first N not yet used (a restarted process gets a new log).
fn next_log(dir: &Path, name: &str) -> PathBuf {
    (0..)
        .map(|i| dir.join(format!("{name}-{i}.log")))
        .find(|p| !p.exists())
        .unwrap()
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    /// SIGKILL, as a crash or power cut would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How the controller reaches its broker.
pub enum Broker {
    /// `flotilla serve`'s embedded broker on this port.
    Embedded(u16),
    /// An external broker on 127.0.0.1 at this port.
    External(u16),
}

/// A running `flotilla serve`.
pub struct Controller {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub api: String,
    pub mqtt_port: u16,
    api_port: u16,
    external: bool,
    /// The network namespace it runs in, if not the host's.
    pub netns: Option<String>,
    ip: String,
}

/// A command for `program`, run in network namespace `netns` when given.
pub fn command_in(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        // nsenter switches only the network namespace; `ip netns exec`
        // would also remount /sys and hide the cgroup hierarchies.
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

impl Controller {
    pub fn start(dir: &Path, broker: Broker) -> Controller {
        Self::start_on(dir, broker, free_port())
    }

    /// Starts (or restarts, with the same `dir` and ports) a controller.
    pub fn start_on(dir: &Path, broker: Broker, api_port: u16) -> Controller {
        Self::start_at(dir, broker, api_port, None, "127.0.0.1")
    }

    /// Starts a controller in network namespace `netns` (when given), its
    /// embedded broker listening on `ip`; the API stays on the loopback.
    pub fn start_at(
        dir: &Path,
        broker: Broker,
        api_port: u16,
        netns: Option<&str>,
        ip: &str,
    ) -> Controller {
        Self::start_full(dir, broker, api_port, netns, ip, |_| {})
    }

    /// [`Controller::start_at`], `extra` adding arguments to `serve`.
    pub fn start_full(
        dir: &Path,
        broker: Broker,
        api_port: u16,
        netns: Option<&str>,
        ip: &str,
        extra: impl FnOnce(&mut Command),
    ) -> Controller {
        let data_dir = dir.join("controller");
        let mut cmd = command_in(netns, &bin("flotilla"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{api_port}"));
        let (mqtt_port, external) = match broker {
            Broker::Embedded(port) => {
                cmd.arg("--mqtt-listen").arg(format!("{ip}:{port}"));
                (port, false)
            }
            Broker::External(port) => {
                cmd.arg("--broker").arg(format!("mqtt://127.0.0.1:{port}"));
                (port, true)
            }
        };
        // Agents of the shared harness connect without credentials; the
        // trust tests enroll theirs and start controllers without this.
        cmd.arg("--allow-anonymous");
        extra(&mut cmd);
        cmd.env("FLOTILLA_LOG", "debug,rmqtt=warn,rmqtt_net=warn,redb=warn");
        let proc = Proc::spawn(&mut cmd, next_log(dir, "controller"));
        let api = format!("https://127.0.0.1:{api_port}");
        let c = Controller {
            proc,
            data_dir,
            api,
            mqtt_port,
            api_port,
            external,
            netns: netns.map(str::to_owned),
            ip: ip.to_owned(),
        };
        let logs = [c.proc.log.as_path()];
        wait_for(
            "the controller's API",
            Duration::from_secs(60),
            &logs,
            || {
                let out = c.cli(&["get", "nodes", "-o", "json"]);
                out.status.success().then_some(())
            },
        );
        c
    }

    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    pub fn broker_url(&self) -> String {
        format!("mqtt://{}:{}", self.ip, self.mqtt_port)
    }

    /// The CLI, set up for this controller (server, admin token, CA).
    pub fn cli_command(&self) -> Command {
        let mut cmd = command_in(self.netns.as_deref(), &bin("flotilla"));
        api_env(&mut cmd, &self.api, &self.data_dir);
        cmd
    }

    /// Runs the CLI against this controller.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command().args(args).output().unwrap()
    }

    /// Runs the CLI and parses its JSON output; panics with stderr on failure.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "flotilla {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Like [`Controller::json`], but `None` when the command fails (e.g. a
    /// node not registered yet).
    pub fn try_json(&self, args: &[&str]) -> Option<Value> {
        let out = self.cli(args);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `flotilla apply -f FILE` of `manifest`.
    pub fn apply(&self, dir: &Path, manifest: &str) -> Output {
        let file = dir.join(format!("manifest-{}.yaml", unique_node("m")));
        std::fs::write(&file, manifest).unwrap();
        self.cli(&["apply", "-f", file.to_str().unwrap()])
    }

    /// The pod `name` as `get pods -o json` shows it, if listed.
    pub fn pod(&self, name: &str) -> Option<Value> {
        let pods = self.json(&["get", "pods", "-o", "json"]);
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
    }
}

/// Points a `flotilla` CLI command at the API `api` (`https://…`) of the
/// controller whose data dir is `data_dir`: its admin token (written on its
/// first start, read afresh each time) and its CA. The one place tests
/// learn how the CLI authenticates.
pub fn api_env(cmd: &mut Command, api: &str, data_dir: &Path) {
    cmd.env("FLOTILLA_SERVER", api)
        .env("FLOTILLA_CA", data_dir.join("ca.pem"));
    match std::fs::read_to_string(data_dir.join("admin.token")) {
        Ok(token) => cmd.env("FLOTILLA_TOKEN", token.trim()),
        // Not written yet: no token, rather than the one of a controller
        // in the default data dir.
        Err(_) => cmd.env("FLOTILLA_TOKEN", ""),
    };
}

/// How an agent started in `dir` checks desired state: it pins the key of
/// the controller that `Controller::start` runs in the same `dir` (the
/// controller writes `signing.pub` before its API answers).
pub fn trust_args(dir: &Path) -> Vec<std::ffi::OsString> {
    let key = dir.join("controller").join("signing.pub");
    vec!["--controller-key".into(), key.into_os_string()]
}

/// Enrolls `node` as a device does: a one-use join token from `flotilla
/// token create --ttl TTL`, then `flotilla-agent join` into the data dir
/// [`Agent::start_in`] uses. Returns the token and join's output.
pub fn enroll(c: &Controller, dir: &Path, node: &str, ttl: &str) -> (String, Output) {
    let out = c.cli(&["token", "create", "--ttl", ttl]);
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let joined = join(c, dir, node, &token);
    (token, joined)
}

/// `flotilla-agent join` with `token` into `node`'s data dir.
pub fn join(c: &Controller, dir: &Path, node: &str, token: &str) -> Output {
    Command::new(bin("flotilla-agent"))
        .arg("join")
        .arg("--server")
        .arg(&c.api)
        .arg("--token")
        .arg(token)
        .arg("--node")
        .arg(node)
        .arg("--data-dir")
        .arg(dir.join(format!("agent-{node}")))
        .output()
        .unwrap()
}

/// A running `flotilla-agent` with the real (youki) runtime.
pub struct Agent {
    pub proc: Proc,
    pub node: String,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, node: &str, broker_url: &str, labels: &[&str]) -> Agent {
        Self::start_in(dir, node, broker_url, labels, None)
    }

    /// Starts an agent in network namespace `netns` (when given).
    pub fn start_in(
        dir: &Path,
        node: &str,
        broker_url: &str,
        labels: &[&str],
        netns: Option<&str>,
    ) -> Agent {
        Self::start_with(dir, node, broker_url, labels, netns, |_| {})
    }

    /// [`Agent::start_in`], `extra` adding arguments or environment.
    pub fn start_with(
        dir: &Path,
        node: &str,
        broker_url: &str,
        labels: &[&str],
        netns: Option<&str>,
        extra: impl FnOnce(&mut Command),
    ) -> Agent {
        let data_dir = dir.join(format!("agent-{node}"));
        let run_dir = dir.join(format!("run-{node}"));
        let mut cmd = command_in(netns, &bin("flotilla-agent"));
        cmd.arg("--broker")
            .arg(broker_url)
            .arg("--node")
            .arg(node)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--run-dir")
            .arg(&run_dir)
            .args(trust_args(dir))
            .env("FLOTILLA_LOG", "debug");
        for l in labels {
            cmd.arg("--label").arg(l);
        }
        extra(&mut cmd);
        let proc = Proc::spawn(&mut cmd, next_log(dir, &format!("agent-{node}")));
        Agent {
            proc,
            node: node.to_string(),
            data_dir,
            run_dir,
        }
    }

    /// The container's log file on the device.
    pub fn container_log(&self, pod: &str, container: &str) -> String {
        std::fs::read_to_string(
            self.data_dir
                .join("logs")
                .join(pod)
                .join(format!("{container}.log")),
        )
        .unwrap_or_default()
    }
}

/// The cgroup directories (in every v1 hierarchy, or the v2 tree) that hold
/// containers of `node`, by container id.
pub fn container_cgroups(node: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let roots = ["memory", "pids", "cpu", "cpu,cpuacct", "unified", ""];
    for root in roots {
        let dir = Path::new("/sys/fs/cgroup")
            .join(root)
            .join("flotilla")
            .join(node);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    out.push(e.path());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Kills whatever a test left running in `node`'s cgroups (best effort).
pub fn kill_node_containers(node: &str) {
    for dir in container_cgroups(node) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A Mosquitto broker on a free port, killed when dropped.
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n\
                 max_packet_size 4194304\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(&conf);
        let proc = Proc::spawn(&mut cmd, dir.join("mosquitto.log"));
        let logs = [proc.log.as_path()];
        wait_for(
            "mosquitto to listen",
            Duration::from_secs(10),
            &logs,
            || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        );
        Mosquitto { proc, port }
    }
}

/// Writes the busybox test image as an OCI layout under `dir` and returns
/// its reference.
pub fn busybox_image(dir: &Path) -> String {
    let layout = dir.join("busybox-layout");
    flotilla_testkit::oci::busybox()
        .write_layout(&layout, "latest")
        .unwrap();
    format!("oci:{}:latest", layout.display())
}

/// Kills a node's leftover containers when dropped, even when an assertion
/// failed half-way.
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        kill_node_containers(&self.0);
    }
}

impl Controller {
    /// Deletes `workloads` and waits until `node` holds no container cgroup.
    pub fn delete_and_wait_gone(&self, workloads: &[&str], node: &str, logs: &[&Path]) {
        for w in workloads {
            let out = self.cli(&["delete", "workload", w]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        wait_for(
            "the containers and their cgroups to be removed",
            Duration::from_secs(60),
            logs,
            || container_cgroups(node).is_empty().then_some(()),
        );
    }
}

/// An MQTT client of a controller's plain listener (the harness runs
/// controllers with `--allow-anonymous`, which gives it every right): for
/// tests where the broker is not what stops a forged message, the
/// signature is.
pub fn admin_client(port: u16) -> (rumqttc::Client, rumqttc::Connection) {
    let mut o = rumqttc::MqttOptions::new(unique_node("admin"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(4 << 20, 4 << 20);
    rumqttc::Client::new(o, 16)
}

/// Publishes `payload` on `topic` (QoS 1, not retained) through an
/// [`admin_client`] and waits for the ack.
pub fn publish(port: u16, topic: &str, payload: Vec<u8>) {
    let (client, mut connection) = admin_client(port);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    for event in connection.iter() {
        assert!(Instant::now() < deadline, "publish not acknowledged");
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = event {
            return;
        }
    }
    panic!("the connection ended before the publish was acknowledged");
}
