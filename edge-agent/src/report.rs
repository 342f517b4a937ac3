//! The node's status, coalesced: pods and the desired-state verdict report
//! changes here; a burst of changes becomes one [`NodeStatus`] after a short
//! debounce, and the status is offered again on a slow resync timer. Only the
//! newest status is kept (a `watch` channel), so nothing queues up while the
//! broker is unreachable. Health samples are kept and ride along with the
//! next status; only an urgent one (a warning level crossed) asks for one.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_proto::{NodeHealth, NodeInfo, NodeStatus, PodStatus, PrefetchState, PrefetchStatus};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest `message` or `desired_error` reported, in bytes; keeps a status
/// within its wire cap whatever a runtime or image error says.
pub const MAX_MESSAGE: usize = 512;

/// Why a report could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The reporter task has ended (the agent is shutting down).
    #[error("status reporter: stopped")]
    Stopped,
}

/// A change to report.
#[derive(Debug)]
enum Event {
    Pod(PodStatus),
    PodGone(String),
    Desired {
        observed_generation: Option<u64>,
        desired_error: Option<String>,
    },
    Health {
        health: NodeHealth,
        urgent: bool,
    },
    Prefetch(Vec<PrefetchStatus>),
}

/// Where components report changes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReportHandle {
    tx: mpsc::Sender<Event>,
}

impl ReportHandle {
    /// A pod's new status (replaces the previous one of that name).
    pub async fn pod(&self, status: PodStatus) -> Result<(), ReportError> {
        self.send(Event::Pod(status)).await
    }

    /// A pod is gone: stopped, deleted, no longer desired.
    pub async fn pod_gone(&self, name: String) -> Result<(), ReportError> {
        self.send(Event::PodGone(name)).await
    }

    /// The verdict on the newest desired message: the generation accepted
    /// (`None` leaves it as it was) and the refusal, if it was refused.
    pub async fn desired(
        &self,
        observed_generation: Option<u64>,
        desired_error: Option<String>,
    ) -> Result<(), ReportError> {
        self.send(Event::Desired {
            observed_generation,
            desired_error,
        })
        .await
    }

    /// A new health sample. It goes out with the next status; `urgent`
    /// sends a status for it now (a warning level was crossed).
    pub async fn health(&self, health: NodeHealth, urgent: bool) -> Result<(), ReportError> {
        self.send(Event::Health { health, urgent }).await
    }

    /// How far the images listed for prefetch are (replaces the list).
    pub async fn prefetch(&self, images: Vec<PrefetchStatus>) -> Result<(), ReportError> {
        self.send(Event::Prefetch(images)).await
    }

    async fn send(&self, event: Event) -> Result<(), ReportError> {
        self.tx.send(event).await.map_err(|_| ReportError::Stopped)
    }
}

/// Timing of the reporter.
#[derive(Debug, Clone, Copy)]
pub struct ReportTiming {
    /// Wait this long after the first change before offering a status, so a
    /// burst of changes gives one message.
    pub debounce: Duration,
    /// Offer the status again this often even when nothing changed.
    pub resync: Duration,
}

/// Starts the reporter. The returned receiver always holds the newest status
/// (its `seq` is left 0: the sender numbers what it actually sends); it is
/// marked changed after a debounced change and on every resync tick.
pub fn spawn(
    node: String,
    instance: u64,
    info: NodeInfo,
    observed_generation: u64,
    timing: ReportTiming,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> (ReportHandle, watch::Receiver<NodeStatus>) {
    let (tx, rx) = mpsc::channel(256);
    let mut reporter = Reporter {
        base: NodeStatus {
            node,
            instance,
            seq: 0,
            observed_generation,
            desired_error: None,
            info,
            health: Default::default(),
            pods: Vec::new(),
            prefetch: Vec::new(),
        },
        pods: BTreeMap::new(),
    };
    let (out_tx, out_rx) = watch::channel(reporter.build());
    tracker.spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = reporter.run(rx, out_tx, timing) => {}
        }
    });
    (ReportHandle { tx }, out_rx)
}

struct Reporter {
    /// Everything but the pods, which are kept sorted by name in `pods`.
    base: NodeStatus,
    pods: BTreeMap<String, PodStatus>,
}

impl Reporter {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Event>,
        out: watch::Sender<NodeStatus>,
        timing: ReportTiming,
    ) {
        let mut due: Option<Instant> = None;
        let resync_every = timing.resync.max(Duration::from_secs(1));
        let mut resync = tokio::time::interval_at(Instant::now() + resync_every, resync_every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { return };
                    if self.apply(event) && due.is_none() {
                        due = Some(Instant::now() + timing.debounce);
                    }
                }
                () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    due = None;
                    out.send_replace(self.build());
                }
                _ = resync.tick() => {
                    due = None;
                    out.send_replace(self.build());
                }
            }
        }
    }

    /// Applies a change; true when the status differs from before.
    fn apply(&mut self, event: Event) -> bool {
        match event {
            Event::Pod(mut status) => {
                status.message = status.message.map(cap_message);
                for c in &mut status.containers {
                    cap_state_message(&mut c.state);
                }
                if self.pods.get(&status.name) == Some(&status) {
                    return false;
                }
                self.pods.insert(status.name.clone(), status);
                true
            }
            Event::PodGone(name) => self.pods.remove(&name).is_some(),
            Event::Prefetch(mut images) => {
                for p in &mut images {
                    if let PrefetchState::Failed { message, .. } = &mut p.state {
                        *message = cap_message(std::mem::take(message));
                    }
                }
                let changed = self.base.prefetch != images;
                self.base.prefetch = images;
                changed
            }
            Event::Health { health, urgent } => {
                let changed = self.base.health != health;
                self.base.health = health;
                urgent && changed
            }
            Event::Desired {
                observed_generation,
                desired_error,
            } => {
                let before = (
                    self.base.observed_generation,
                    self.base.desired_error.clone(),
                );
                if let Some(g) = observed_generation {
                    self.base.observed_generation = g;
                }
                self.base.desired_error = desired_error.map(cap_message);
                before
                    != (
                        self.base.observed_generation,
                        self.base.desired_error.clone(),
                    )
            }
        }
    }

    fn build(&self) -> NodeStatus {
        let mut status = self.base.clone();
        status.pods = self.pods.values().cloned().collect();
        status
    }
}

fn cap_state_message(state: &mut flotilla_proto::ContainerState) {
    use flotilla_proto::ContainerState::{Running, Terminated, Waiting};
    match state {
        Waiting { message, .. } | Terminated { message, .. } => {
            *message = message.take().map(cap_message);
        }
        Running { .. } => {}
    }
}

/// Cuts `s` to at most [`MAX_MESSAGE`] bytes, on a character boundary.
pub fn cap_message(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use flotilla_proto::{PodPhase, PodStatus};

    use super::*;

    fn pod(name: &str, phase: PodPhase) -> PodStatus {
        PodStatus {
            name: name.into(),
            workload: "w".into(),
            generation: 1,
            phase,
            message: None,
            containers: vec![],
        }
    }

    fn start() -> (
        ReportHandle,
        watch::Receiver<NodeStatus>,
        TaskTracker,
        CancellationToken,
    ) {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let timing = ReportTiming {
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(1800),
        };
        let (h, rx) = spawn(
            "n1".into(),
            7,
            NodeInfo::default(),
            3,
            timing,
            &tracker,
            shutdown.clone(),
        );
        (h, rx, tracker, shutdown)
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_gives_one_status() {
        let (h, mut rx, tracker, shutdown) = start();
        assert_eq!(rx.borrow_and_update().observed_generation, 3);
        let t0 = Instant::now();
        h.pod(pod("b", PodPhase::Pending)).await.unwrap();
        h.pod(pod("a", PodPhase::Pending)).await.unwrap();
        h.pod(pod("b", PodPhase::Running)).await.unwrap();
        h.desired(Some(4), None).await.unwrap();
        rx.changed().await.unwrap();
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(100) && waited < Duration::from_millis(200));
        let s = rx.borrow_and_update().clone();
        let names: Vec<_> = s.pods.iter().map(|p| (p.name.as_str(), p.phase)).collect();
        assert_eq!(names, [("a", PodPhase::Pending), ("b", PodPhase::Running)]);
        assert_eq!((s.instance, s.observed_generation), (7, 4));

        // Nothing new: nothing is offered until the resync tick.
        h.pod(pod("a", PodPhase::Pending)).await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_secs(60), rx.changed()).await;
        assert!(quiet.is_err(), "an unchanged pod must not produce a status");

        h.pod_gone("a".into()).await.unwrap();
        h.desired(None, Some("x".repeat(2000))).await.unwrap();
        rx.changed().await.unwrap();
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.pods.len(), 1);
        assert_eq!(s.observed_generation, 4);
        assert!(s.desired_error.as_ref().unwrap().len() <= MAX_MESSAGE);

        // The resync tick offers the same status again.
        let t1 = Instant::now();
        rx.changed().await.unwrap();
        assert!(t1.elapsed() >= Duration::from_secs(1700));
        assert_eq!(*rx.borrow_and_update(), s);

        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn health_rides_along_unless_urgent() {
        let (h, mut rx, tracker, shutdown) = start();
        rx.borrow_and_update();
        let sample = |mem| NodeHealth {
            memory_available_bytes: mem,
            ..NodeHealth::default()
        };
        h.health(sample(1), false).await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_secs(60), rx.changed()).await;
        assert!(quiet.is_err(), "a routine sample must not send a status");
        // The next status, for whatever reason, carries the newest sample.
        h.pod(pod("a", PodPhase::Running)).await.unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().health, sample(1));
        h.health(sample(2), true).await.unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().health, sample(2));
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn caps_on_char_boundary() {
        let s = cap_message("é".repeat(600));
        assert!(s.len() <= MAX_MESSAGE && s.ends_with('…'));
        assert_eq!(cap_message("short".into()), "short");
    }
}
