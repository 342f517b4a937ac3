//! The agent end to end against a real `mosquitto`, with a rumqttc client in
//! the controller's role: retained desired state in, status and presence
//! out, refusals, generations, a broker restart, a clean exit and a crash.

// Helpers outside #[test] fns panic on setup failures too: that fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::config::{Config, RuntimeKind};
use flotilla_agent::image::FakeImages;
use flotilla_agent::reconciler::container_id;
use flotilla_agent::runtime::fake::FakeRuntime;
use flotilla_proto::{
    ContainerSpec, DesiredState, NodeStatus, PodPhase, PodSpec, Presence, RestartPolicy, Topics,
    decode, encode,
};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(15);

struct Mosquitto {
    child: Child,
    port: u16,
    conf: std::path::PathBuf,
}

impl Mosquitto {
    fn start(dir: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = Self::spawn(&conf, port);
        Self { child, port, conf }
    }

    fn spawn(conf: &Path, port: u16) -> Child {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed");
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < DEADLINE,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(&self.conf, self.port);
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The controller's side: publishes desired states, collects status and
/// presence, resubscribes after every reconnect.
struct Controller {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    topics: Topics,
    node: String,
}

impl Controller {
    fn connect(port: u16, node: &str) -> Self {
        let topics = Topics::default();
        let mut options = MqttOptions::new(format!("test-controller-{node}"), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (tx, rx) = mpsc::unbounded_channel();
        let subscriber = client.clone();
        let filters = [topics.status(node), topics.presence(node)];
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for f in &filters {
                            subscriber
                                .try_subscribe(f.as_str(), QoS::AtLeastOnce)
                                .unwrap();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Self {
            client,
            rx,
            topics,
            node: node.into(),
        }
    }

    async fn publish_desired(&self, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(
                self.topics.desired(&self.node),
                QoS::AtLeastOnce,
                retain,
                payload,
            )
            .await
            .unwrap();
    }

    async fn desired(&self, d: &DesiredState) {
        self.publish_desired(envelope(d), true).await;
    }

    /// Reads messages until one on `topic` decodes into a value satisfying `pred`.
    async fn expect<M: flotilla_proto::Message + std::fmt::Debug>(
        &mut self,
        topic: &str,
        what: &str,
        pred: impl Fn(&M) -> bool,
    ) -> M {
        let mut last = None;
        let found = tokio::time::timeout(DEADLINE, async {
            while let Some((t, payload)) = self.rx.recv().await {
                if t != topic {
                    continue;
                }
                let m: M = decode(&payload).unwrap();
                if pred(&m) {
                    return Some(m);
                }
                last = Some(m);
            }
            None
        })
        .await;
        match found {
            Ok(Some(m)) => m,
            _ => panic!("no {what} on {topic}; last one: {last:#?}"),
        }
    }

    async fn status(&mut self, what: &str, pred: impl Fn(&NodeStatus) -> bool) -> NodeStatus {
        let topic = self.topics.status(&self.node);
        self.expect(&topic, what, pred).await
    }

    async fn presence(&mut self, what: &str, pred: impl Fn(&Presence) -> bool) -> Presence {
        let topic = self.topics.presence(&self.node);
        self.expect(&topic, what, pred).await
    }
}

/// The agent on a runtime of its own, so that it can be killed abruptly.
struct Agent {
    rt: tokio::runtime::Runtime,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    fn start(port: u16, node: &str, data_dir: &Path, runtime: FakeRuntime) -> Self {
        let mut config = Config::new(
            &format!("mqtt://127.0.0.1:{port}"),
            node,
            data_dir.to_path_buf(),
        )
        .unwrap();
        config.runtime = RuntimeKind::Fake;
        config.run_dir = data_dir.join("run");
        config.keepalive = Duration::from_secs(5);
        config.stop_grace = Duration::from_secs(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let done = rt.spawn(flotilla_agent::run_with(
            config,
            Arc::new(runtime),
            Arc::new(FakeImages),
            shutdown.clone(),
        ));
        Self { rt, shutdown, done }
    }

    /// As a SIGKILL would: every task dropped, sockets closed, no goodbye.
    fn kill(self) {
        self.rt.shutdown_background();
    }
}

fn app(version: &str) -> ContainerSpec {
    ContainerSpec {
        command: vec!["serve".into(), version.into()],
        ..ContainerSpec::new("app", "oci:/images/app:latest")
    }
}

fn desired(node: &str, generation: u64, version: &str) -> DesiredState {
    DesiredState {
        node: node.into(),
        generation,
        pods: vec![PodSpec {
            name: "web".into(),
            workload: "web".into(),
            restart_policy: RestartPolicy::Always,
            termination_grace_secs: 30,
            volumes: vec![],
            containers: vec![app(version)],
            image_pull_secrets: Vec::new(),
        }],
        prefetch: Vec::new(),
        prefetch_pull_secrets: Vec::new(),
    }
}

fn web_running(s: &NodeStatus) -> bool {
    s.pods.len() == 1 && s.pods[0].name == "web" && s.pods[0].phase == PodPhase::Running
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_talks_to_a_real_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    let node = "edge-session-1";
    let mut controller = Controller::connect(broker.port, node);
    controller.desired(&desired(node, 1, "v1")).await;

    let runtime = FakeRuntime::new();
    let agent = Agent::start(broker.port, node, &dir.path().join("data"), runtime.clone());

    let online = controller
        .presence("online", |p| matches!(p, Presence::Online { .. }))
        .await;
    let Presence::Online {
        instance,
        agent_version,
    } = online
    else {
        unreachable!()
    };
    assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
    let s = controller
        .status("generation 1 running", |s| {
            s.observed_generation == 1 && web_running(s)
        })
        .await;
    assert_eq!((s.node.as_str(), s.instance), (node, instance));
    assert_eq!(s.desired_error, None);
    assert_eq!(s.info.os, "linux");
    let v1 = container_id("web", &app("v1"));
    assert_eq!(runtime.running_ids(), std::slice::from_ref(&v1));

    // A bad payload is refused, named, and changes nothing.
    controller
        .publish_desired(b"\x01garbage".to_vec(), false)
        .await;
    let s = controller
        .status("a refusal", |s| s.desired_error.is_some())
        .await;
    assert!(
        s.desired_error
            .as_deref()
            .unwrap()
            .starts_with("desired state: "),
        "{s:?}"
    );
    assert_eq!(s.observed_generation, 1);
    assert!(web_running(&s));
    let mut other_node = desired("someone-else", 9, "v9");
    other_node.node = "someone-else".into();
    controller
        .publish_desired(envelope(&other_node), false)
        .await;
    let s = controller
        .status("wrong node refused", |s| {
            s.desired_error
                .as_deref()
                .is_some_and(|e| e.contains("someone-else"))
        })
        .await;
    assert_eq!(s.observed_generation, 1);

    // The same generation again: nothing restarts, the refusal is cleared.
    controller.desired(&desired(node, 1, "v1")).await;
    controller
        .status("refusal cleared", |s| s.desired_error.is_none())
        .await;
    assert_eq!(runtime.start_count(&v1), 1);

    // A newer generation replaces the container; an older one is ignored.
    controller.desired(&desired(node, 3, "v3")).await;
    let v3 = container_id("web", &app("v3"));
    controller
        .status("generation 3 running", |s| {
            s.observed_generation == 3 && web_running(s) && s.pods[0].generation == 3
        })
        .await;
    controller.desired(&desired(node, 2, "v2")).await;
    controller.publish_desired(b"".to_vec(), false).await;
    let s = controller
        .status("refusal after the stale one", |s| s.desired_error.is_some())
        .await;
    assert_eq!(s.observed_generation, 3);
    assert_eq!(runtime.all_ids(), std::slice::from_ref(&v3));
    assert_eq!(runtime.start_count(&container_id("web", &app("v2"))), 0);
    let seq_before = s.seq;

    // The broker restarts and forgets everything: the agent reconnects,
    // announces itself, subscribes again and reports again.
    broker.restart();
    controller
        .presence("online again", |p| {
            *p == Presence::Online {
                instance,
                agent_version: env!("CARGO_PKG_VERSION").into(),
            }
        })
        .await;
    controller
        .status("status again", |s| {
            s.seq > seq_before && s.observed_generation == 3
        })
        .await;
    controller.desired(&desired(node, 4, "v4")).await;
    controller
        .status("generation 4 after the restart", |s| {
            s.observed_generation == 4 && web_running(s)
        })
        .await;

    // Killed without a goodbye: the broker sends the last will.
    agent.kill();
    controller
        .presence("offline from the will", |p| *p == Presence::Offline)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_exit_says_offline_and_leaves_containers_running() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let node = "edge-session-2";
    let mut controller = Controller::connect(broker.port, node);
    controller.desired(&desired(node, 5, "v1")).await;
    let runtime = FakeRuntime::new();
    let agent = Agent::start(broker.port, node, &dir.path().join("data"), runtime.clone());
    controller
        .status("running", |s| s.observed_generation == 5 && web_running(s))
        .await;

    agent.shutdown.cancel();
    let result = tokio::time::timeout(DEADLINE, agent.done)
        .await
        .expect("run returns after shutdown")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    controller
        .presence("offline", |p| *p == Presence::Offline)
        .await;
    assert_eq!(runtime.running_ids(), [container_id("web", &app("v1"))]);
    agent.rt.shutdown_background();
    drop(broker);
}

/// The envelope of the desired topic, unsigned: these agents are configured
/// with `Trust::Unverified` (signatures are tested in state.rs and trust.rs).
fn envelope(d: &DesiredState) -> Vec<u8> {
    encode(&flotilla_proto::SignedDesired {
        payload: encode(d).unwrap(),
        signature: flotilla_proto::Signature([0; 64]),
    })
    .unwrap()
}
