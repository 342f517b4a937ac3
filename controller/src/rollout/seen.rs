//! What the controller reads of a node's status for a rollout: whether a
//! switched node runs the new revision healthily, and whether a node about
//! to switch has the new revision's images.

use flotilla_proto::{ContainerState, NodeStatus, PodPhase, PodSpec, PrefetchState};

use super::{Seen, Switch};

/// Waiting reasons that mean the new revision cannot run as it is (as
/// opposed to `Pulling`, which only takes time).
const FAILING_REASONS: &[&str] = &[
    "BackOff",
    "CreateFailed",
    "ImageNotFound",
    "ErrImagePull",
    "NoMatchingPlatform",
    "Unauthorized",
];

/// What a switched node shows of `workload`, from its newest status:
/// `connected` is its readiness; its pods must report the switch's
/// generation (or newer) to count.
pub fn seen(status: Option<&NodeStatus>, connected: bool, workload: &str, switch: &Switch) -> Seen {
    if !connected {
        return Seen::Offline;
    }
    let pod = status.and_then(|s| s.pods.iter().find(|p| p.workload == workload));
    let Some(pod) = pod.filter(|p| switch.generation > 0 && p.generation >= switch.generation)
    else {
        return Seen::NotYet;
    };
    if pod.phase == PodPhase::Failed {
        let why = pod.message.as_deref().unwrap_or("the pod failed");
        return Seen::Failing(why.to_owned());
    }
    for c in &pod.containers {
        // A container whose new version waits for its image still runs the
        // old one: judged by the new one's state.
        match c.next.as_ref().unwrap_or(&c.state) {
            ContainerState::Waiting { reason, .. }
                if FAILING_REASONS.contains(&reason.as_str()) =>
            {
                return Seen::Failing(format!("container {}: {reason}", c.name));
            }
            ContainerState::Terminated { exit_code, .. } if *exit_code != 0 => {
                return Seen::Failing(format!("container {} exited with {exit_code}", c.name));
            }
            _ => {}
        }
    }
    let ready =
        !pod.containers.is_empty() && pod.containers.iter().all(|c| c.ready && c.next.is_none());
    if pod.phase == PodPhase::Running && ready {
        Seen::Ready
    } else {
        Seen::NotYet
    }
}

/// The images of `new`'s containers that `old`'s do not run, each once, in
/// container order: what a node downloads before it switches.
pub fn prefetch_images(new: &PodSpec, old: &PodSpec) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in &new.containers {
        let known = old.containers.iter().any(|o| o.image == c.image);
        if !known && !out.contains(&c.image) {
            out.push(c.image.clone());
        }
    }
    out
}

/// Whether `status` reports every one of `images` present on the node.
pub fn prefetched(status: Option<&NodeStatus>, images: &[String]) -> bool {
    images.iter().all(|image| {
        status.is_some_and(|s| {
            s.prefetch
                .iter()
                .any(|p| p.image == *image && p.state == PrefetchState::Ready)
        })
    })
}
