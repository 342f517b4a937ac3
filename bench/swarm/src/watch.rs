//! Watches every node's status as the controller would — its own MQTT
//! connection, subscribed to `…/node/+/status` — and remembers when each node
//! first reported each generation with all its pods running. It also counts
//! the desired states the controller publishes to each node (live ones, not
//! the retained copies replayed when it subscribes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use flotilla_proto::{NodeStatus, PodPhase, TopicKind, Topics, decode};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// What is known of one node.
#[derive(Debug, Clone)]
pub struct NodeSeen {
    /// Agent process id of the newest status.
    pub instance: u64,
    /// Its sequence number.
    pub seq: u64,
    /// When the newest status arrived.
    pub last_at: Instant,
    /// Generation → when a status first showed it with every pod Running.
    pub settled: Vec<(u64, Instant)>,
    /// Pods in the newest status.
    pub pods: usize,
}

/// Shared view of the swarm's statuses.
#[derive(Clone, Default)]
pub struct Watch {
    nodes: Arc<Mutex<HashMap<String, NodeSeen>>>,
    published: Arc<Mutex<HashMap<String, u64>>>,
}

impl Watch {
    /// Runs `f` on the current view.
    pub fn with<T>(&self, f: impl FnOnce(&HashMap<String, NodeSeen>) -> T) -> T {
        f(&self.nodes.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Desired states published to each node since the watch started.
    pub fn published(&self) -> HashMap<String, u64> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Starts watching; the task ends with `shutdown`.
    pub fn start(port: u16, topics: Topics, shutdown: CancellationToken) -> Watch {
        let watch = Watch::default();
        let w = watch.clone();
        let mut options = MqttOptions::new(
            format!("swarm-watch-{}", std::process::id()),
            "127.0.0.1",
            port,
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        options.set_max_packet_size(2 << 20, 2 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    e = eventloop.poll() => e,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for kind in [TopicKind::Status, TopicKind::Desired] {
                            let _ = client
                                .subscribe(topics.all_nodes(kind), QoS::AtLeastOnce)
                                .await;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => match topics.parse(&p.topic) {
                        Some((node, TopicKind::Desired)) if !p.retain => {
                            let mut published =
                                w.published.lock().unwrap_or_else(PoisonError::into_inner);
                            *published.entry(node.to_owned()).or_default() += 1;
                        }
                        Some((_, TopicKind::Status)) => {
                            if let Ok(status) = decode::<NodeStatus>(&p.payload) {
                                w.record(status);
                            }
                        }
                        _ => {}
                    },
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        watch
    }

    fn record(&self, status: NodeStatus) {
        let now = Instant::now();
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = nodes
            .entry(status.node.clone())
            .or_insert_with(|| NodeSeen {
                instance: status.instance,
                seq: 0,
                last_at: now,
                settled: Vec::new(),
                pods: 0,
            });
        if seen.instance == status.instance && seen.seq >= status.seq && seen.seq != 0 {
            return;
        }
        seen.instance = status.instance;
        seen.seq = status.seq;
        seen.last_at = now;
        seen.pods = status.pods.len();
        let all_running = status.pods.iter().all(|p| p.phase == PodPhase::Running);
        let g = status.observed_generation;
        if all_running && !seen.settled.iter().any(|(sg, _)| *sg == g) {
            seen.settled.push((g, now));
        }
    }
}
