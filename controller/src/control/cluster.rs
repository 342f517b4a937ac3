//! The cluster state the control loop owns — workloads, the fleet, each
//! node's desired pods (sharing their workload's template), revisions and
//! rollouts — and placement over it: which nodes' desired state changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use flotilla_proto::{DesiredState, PodSpec, PrefetchPullSecrets};

use crate::fleet::Fleet;
use crate::manifest::{Placement, Workload};
use crate::rollout::{self, History, Rollout};
use crate::scheduler::{self, Condition, NodeFacts, Placements};
use crate::store::Snapshot;

/// The pods a node should run, sharing their workload's pod template
/// rather than holding copies: a fleet of thousands of nodes running the
/// same workloads holds each template once. A [`DesiredState`] is built
/// from it only to be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDesired {
    /// The generation last published.
    pub generation: u64,
    /// The pods, by workload then pod name.
    pub pods: Vec<PlacedPod>,
    /// Images to download ahead of a rollout's switch (each once).
    pub prefetch: Vec<String>,
    /// The pull secrets of the revisions those images come from, as
    /// unsealed references (sealed per node as the state is encoded).
    pub prefetch_pull_secrets: Vec<PrefetchPullSecrets>,
}

/// One pod on a node: its name there and its workload's template.
#[derive(Debug, Clone, Eq)]
pub struct PlacedPod {
    /// The pod's name on the node (`web`, or `web-2` for a replica).
    pub name: String,
    /// The pod as its workload describes it (its own `name` is the workload's).
    pub template: Arc<PodSpec>,
}

impl PartialEq for PlacedPod {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && (Arc::ptr_eq(&self.template, &other.template) || self.template == other.template)
    }
}

impl PlacedPod {
    /// The workload the pod belongs to.
    pub fn workload(&self) -> &str {
        &self.template.workload
    }
}

impl NodeDesired {
    /// The wire form, for `node`.
    pub fn to_state(&self, node: &str) -> DesiredState {
        DesiredState {
            node: node.to_owned(),
            generation: self.generation,
            pods: self
                .pods
                .iter()
                .map(|p| PodSpec {
                    name: p.name.clone(),
                    ..(*p.template).clone()
                })
                .collect(),
            prefetch: self.prefetch.clone(),
            prefetch_pull_secrets: self.prefetch_pull_secrets.clone(),
        }
    }
}

/// The state the control loop owns. Read-only access is given to API
/// handlers through [`ControlHandle::read`].
#[derive(Debug, Default)]
pub struct Cluster {
    /// Workloads by name.
    pub workloads: BTreeMap<String, Workload>,
    /// Nodes and what they reported.
    pub fleet: Fleet,
    /// The desired state last published to each node.
    pub desired: BTreeMap<String, NodeDesired>,
    /// Each workload's pod template, shared by the nodes that run it.
    pub(super) templates: BTreeMap<String, Arc<PodSpec>>,
    /// Workloads whose pods could not all be placed, with why.
    pub unschedulable: BTreeMap<String, String>,
    /// Every workload's revisions.
    pub history: History,
    /// Each workload's rollout, running or the last one.
    pub rollouts: BTreeMap<String, RolloutState>,
    /// Secrets by name, opened (set by `control::start`: the store holds
    /// them sealed).
    pub secrets: BTreeMap<String, crate::secrets::Secret>,
    /// Namespaces applied by name (`default`, implicit, is not among them).
    pub namespaces: BTreeMap<String, crate::manifest::namespace::Namespace>,
}

/// A rollout and the pod template of the revision it moves away from,
/// which the nodes not switched yet keep running.
#[derive(Debug, Clone)]
pub struct RolloutState {
    /// The state machine.
    pub rollout: Rollout,
    /// Revision `rollout.from`'s pod template.
    pub stable: Arc<PodSpec>,
}

/// A workload's pod template, kept from `old` when it did not change so
/// that nodes keep sharing one copy.
pub fn templates_for(
    workloads: &BTreeMap<String, Workload>,
    old: &BTreeMap<String, Arc<PodSpec>>,
) -> BTreeMap<String, Arc<PodSpec>> {
    workloads
        .iter()
        .map(|(name, w)| {
            let fresh = w.pod_spec(name);
            let t = match old.get(name) {
                Some(t) if **t == fresh => Arc::clone(t),
                _ => Arc::new(fresh),
            };
            (name.clone(), t)
        })
        .collect()
}

impl Cluster {
    pub(super) fn from_snapshot(snap: Snapshot) -> Self {
        let mut fleet = Fleet::default();
        for (name, frame) in snap.status {
            let seen = snap.last_seen.get(&name).copied().unwrap_or(0);
            // A status is only a cache of what the node will report again:
            // drop one that no longer decodes rather than refuse to start.
            if let Err(e) = fleet.restore(frame, seen) {
                tracing::warn!(node = %name, "dropping stored status: {e}");
            }
        }
        for (name, since) in snap.not_ready_since {
            fleet.restore_not_ready_since(&name, since);
        }
        for (name, labels) in snap.node_labels {
            fleet.set_controller_labels(&name, labels);
        }
        let templates = templates_for(&snap.workloads, &BTreeMap::new());
        let desired = snap
            .desired
            .into_iter()
            .map(|(node, state)| {
                let pods = state
                    .pods
                    .into_iter()
                    .map(|pod| {
                        let as_template = PodSpec {
                            name: pod.workload.clone(),
                            ..pod.clone()
                        };
                        let template = match templates.get(&pod.workload) {
                            Some(t) if **t == as_template => Arc::clone(t),
                            _ => Arc::new(as_template),
                        };
                        PlacedPod {
                            name: pod.name,
                            template,
                        }
                    })
                    .collect();
                let generation = state.generation;
                let prefetch = state.prefetch;
                let prefetch_pull_secrets = state.prefetch_pull_secrets;
                (
                    node,
                    NodeDesired {
                        generation,
                        pods,
                        prefetch,
                        prefetch_pull_secrets,
                    },
                )
            })
            .collect();
        let mut cluster = Self {
            workloads: snap.workloads,
            fleet,
            desired,
            templates,
            unschedulable: BTreeMap::new(),
            history: History::restore(snap.revisions),
            rollouts: BTreeMap::new(),
            secrets: BTreeMap::new(),
            namespaces: snap.namespaces,
        };
        for rollout in snap.rollouts {
            let name = rollout.workload.clone();
            let old = cluster.history.list(&name).iter();
            let Some(from) = old.clone().find(|r| r.number == rollout.from) else {
                tracing::warn!(workload = %name, revision = rollout.from, "dropping a rollout whose old revision is gone");
                continue;
            };
            let fresh = from.workload.pod_spec(&name);
            // Share the template with the nodes that run it, as at start.
            let stable = cluster
                .desired
                .values()
                .flat_map(|d| &d.pods)
                .find(|p| *p.template == fresh)
                .map_or_else(|| Arc::new(fresh), |p| Arc::clone(&p.template));
            cluster
                .rollouts
                .insert(name, RolloutState { rollout, stable });
        }
        cluster
    }

    /// The nodes the scheduler may use: those that reported at least once.
    pub fn facts(&self) -> Vec<NodeFacts> {
        self.fleet
            .nodes()
            .iter()
            .filter_map(|(name, node)| {
                let info = node.reported()?;
                Some(NodeFacts {
                    name: name.clone(),
                    labels: node.shared_labels(),
                    arch: Arc::clone(&info.arch),
                    cpu_millis: u64::from(info.cpus) * 1000,
                    memory_bytes: info.memory_bytes,
                    condition: node.condition(),
                })
            })
            .collect()
    }

    /// Where pods are now, as the scheduler reads it.
    pub fn current(&self) -> Placements {
        let mut out = Placements::new();
        for (node, d) in &self.desired {
            for pod in &d.pods {
                out.entry(pod.workload().to_owned())
                    .or_default()
                    .insert(node.clone(), pod.name.clone());
            }
        }
        out
    }

    /// Places `workloads` and returns the new desired states of the nodes
    /// whose pods changed (or whose agent holds a newer generation than the
    /// store remembers), with the generation bumped, and why some pods
    /// could not be placed.
    /// During a rollout, nodes not switched yet keep the old template.
    pub fn plan(
        &self,
        workloads: &BTreeMap<String, Workload>,
        templates: &BTreeMap<String, Arc<PodSpec>>,
        rollouts: &BTreeMap<String, RolloutState>,
        now_ms: u64,
    ) -> (Vec<(String, NodeDesired)>, BTreeMap<String, String>) {
        let schedule = scheduler::schedule(&self.facts(), workloads, &self.current(), now_ms);
        let mut by_node: BTreeMap<&str, Vec<PlacedPod>> = BTreeMap::new();
        let mut prefetch: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut prefetch_secrets: BTreeMap<&str, Vec<PrefetchPullSecrets>> = BTreeMap::new();
        for (workload, pods) in &schedule.placements {
            let Some(template) = templates.get(workload) else {
                continue;
            };
            let rollout = rollouts.get(workload).filter(|r| r.rollout.phase.active());
            let images = rollout
                .filter(|r| !r.rollout.prefetching.is_empty())
                .map(|r| rollout::prefetch_images(template, &r.stable))
                .unwrap_or_default();
            // The new revision's registry logins go with its images, as
            // its pods' pulls will use them.
            let secrets =
                (!images.is_empty() && !template.image_pull_secrets.is_empty()).then(|| {
                    PrefetchPullSecrets {
                        images: images.clone(),
                        pull_secrets: template.image_pull_secrets.clone(),
                    }
                });
            for (node, pod) in pods {
                if rollout.is_some_and(|r| r.rollout.prefetching.contains_key(node)) {
                    let list = prefetch.entry(node).or_default();
                    for image in &images {
                        if !list.contains(image) {
                            list.push(image.clone());
                        }
                    }
                    if let Some(secrets) = &secrets {
                        prefetch_secrets
                            .entry(node)
                            .or_default()
                            .push(secrets.clone());
                    }
                }
                let template = match rollout {
                    Some(r) if !r.rollout.switched.contains_key(node) => &r.stable,
                    _ => template,
                };
                by_node.entry(node).or_default().push(PlacedPod {
                    name: pod.clone(),
                    template: Arc::clone(template),
                });
            }
        }
        let names: BTreeSet<&str> = self
            .fleet
            .nodes()
            .keys()
            .map(String::as_str)
            .chain(self.desired.keys().map(String::as_str))
            .collect();
        let mut out = Vec::new();
        for node in names {
            let pods = by_node.remove(node).unwrap_or_default();
            let prefetch = prefetch.remove(node).unwrap_or_default();
            let prefetch_pull_secrets = prefetch_secrets.remove(node).unwrap_or_default();
            let last = self.desired.get(node);
            let published = last.map_or(0, |d| d.generation);
            let observed = self.fleet.get(node).map_or(0, |n| n.observed_generation());
            let same = last.is_some_and(|d| {
                d.pods == pods
                    && d.prefetch == prefetch
                    && d.prefetch_pull_secrets == prefetch_pull_secrets
            });
            if same && observed <= published {
                continue;
            }
            if last.is_none() && pods.is_empty() && observed == 0 {
                continue;
            }
            let generation = published.max(observed) + 1;
            let desired = NodeDesired {
                generation,
                pods,
                prefetch,
                prefetch_pull_secrets,
            };
            out.push((node.to_owned(), desired));
        }
        (out, schedule.unschedulable)
    }

    /// Whether a replica sits on a node NotReady for longer than its
    /// workload tolerates, so placement must run again.
    pub(super) fn tolerance_passed(&self, now_ms: u64) -> bool {
        self.desired.iter().any(|(node, d)| {
            let Some(Condition::NotReady { since_ms }) =
                self.fleet.get(node).map(|n| n.condition())
            else {
                return false;
            };
            d.pods.iter().any(|p| {
                self.workloads.get(p.workload()).is_some_and(|w| {
                    matches!(w.spec.scheduling.placement, Placement::Replicas(_))
                        && now_ms.saturating_sub(since_ms)
                            > u64::from(w.spec.scheduling.toleration_secs) * 1000
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Label, NodeInfo, NodeStatus};

    fn workload(text: &str) -> Workload {
        crate::manifest::parse(text).unwrap().remove(0)
    }

    fn status(node: &str, site: &str, observed: u64) -> NodeStatus {
        NodeStatus {
            node: node.into(),
            instance: 1,
            seq: observed + 1,
            observed_generation: observed,
            desired_error: None,
            health: Default::default(),
            info: NodeInfo {
                labels: vec![Label {
                    key: "site".into(),
                    value: site.into(),
                }],
                ..NodeInfo::default()
            },
            pods: vec![],
            prefetch: Vec::new(),
        }
    }

    const WEB: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: web}\n\
                       spec:\n  nodeSelector: {site: a}\n  containers: [{name: main, image: oci:/x}]\n";

    #[test]
    fn placement_follows_selectors_and_generations_only_grow() {
        let mut cluster = Cluster::default();
        cluster.fleet.ingest_status(status("n1", "a", 0), 1);
        cluster.fleet.ingest_status(status("n2", "b", 0), 1);
        cluster.fleet.ingest_status(status("n3", "a", 0), 1);
        let mut workloads = BTreeMap::new();
        workloads.insert("web".to_string(), workload(WEB));
        let templates = templates_for(&workloads, &BTreeMap::new());
        let none = BTreeMap::new();
        let plan = |c: &Cluster, w: &BTreeMap<String, Workload>| c.plan(w, &templates, &none, 1).0;

        let changed = plan(&cluster, &workloads);
        let nodes: Vec<&str> = changed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(nodes, ["n1", "n3"], "n2 does not match and had nothing");
        let (_, d1) = &changed[0];
        assert_eq!(d1.generation, 1);
        assert_eq!(d1.to_state("n1").pods[0].name, "web");
        // One template, shared by both nodes.
        assert!(Arc::ptr_eq(
            &d1.pods[0].template,
            &changed[1].1.pods[0].template
        ));
        for (node, d) in changed {
            cluster.desired.insert(node, d);
        }

        // Same inputs: nothing to publish.
        assert!(plan(&cluster, &workloads).is_empty());

        // The agent holds a newer generation than the store (store lost):
        // the next generation goes above it.
        cluster.fleet.ingest_status(status("n1", "a", 40), 2);
        let changed = plan(&cluster, &workloads);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].1.generation, 41);

        // Removing the workload empties the nodes' pods with a new generation.
        let changed = plan(&cluster, &BTreeMap::new());
        assert_eq!(changed[0].1.generation, 41);
        assert!(changed[0].1.pods.is_empty());
        assert_eq!(changed.len(), 2);
    }

    #[test]
    fn a_stored_desired_state_shares_the_workloads_template() {
        let web = workload(WEB);
        let state = DesiredState {
            node: "n1".into(),
            generation: 3,
            pods: vec![
                web.pod_spec("web"),
                PodSpec {
                    termination_grace_secs: 1,
                    ..web.pod_spec("web")
                },
            ],
            prefetch: Vec::new(),
            prefetch_pull_secrets: Vec::new(),
        };
        let mut snap = Snapshot::default();
        snap.workloads.insert("web".into(), web);
        snap.desired.insert("n1".into(), state.clone());
        let cluster = Cluster::from_snapshot(snap);
        let d = &cluster.desired["n1"];
        assert!(Arc::ptr_eq(&d.pods[0].template, &cluster.templates["web"]));
        assert!(!Arc::ptr_eq(&d.pods[1].template, &cluster.templates["web"]));
        assert_eq!(d.to_state("n1"), state);
    }

    #[test]
    fn a_prefetching_node_keeps_its_pods_and_gets_the_new_images() {
        let mut cluster = Cluster::default();
        cluster.fleet.ingest_status(status("n1", "a", 0), 1);
        cluster.fleet.ingest_status(status("n3", "a", 0), 1);
        let old = workload(WEB);
        let new = workload(&WEB.replace("oci:/x", "oci:/y"));
        let workloads = BTreeMap::from([("web".to_string(), new)]);
        let templates = templates_for(&workloads, &BTreeMap::new());
        let stable = Arc::new(old.pod_spec("web"));
        let mut rollout = Rollout::new("web", 1, 2, vec!["n1".into(), "n3".into()], 0);
        rollout.prefetching.insert("n1".into(), 0);
        let rollouts = BTreeMap::from([(
            "web".to_string(),
            RolloutState {
                rollout,
                stable: Arc::clone(&stable),
            },
        )]);
        let (changed, _) = cluster.plan(&workloads, &templates, &rollouts, 1);
        let by_node: BTreeMap<_, _> = changed.into_iter().collect();
        let n1 = &by_node["n1"];
        assert!(Arc::ptr_eq(&n1.pods[0].template, &stable), "pods unchanged");
        assert_eq!(n1.prefetch, ["oci:/y"]);
        assert_eq!(n1.to_state("n1").prefetch, ["oci:/y"]);
        assert!(by_node["n3"].prefetch.is_empty());

        // Switched, it runs the new template and downloads nothing ahead.
        let mut rollouts = rollouts;
        let r = &mut rollouts.get_mut("web").unwrap().rollout;
        r.prefetching.clear();
        r.switched.insert(
            "n1".into(),
            crate::rollout::Switch {
                at_ms: 1,
                generation: 0,
            },
        );
        let (changed, _) = cluster.plan(&workloads, &templates, &rollouts, 1);
        let n1 = &changed.iter().find(|(n, _)| n == "n1").unwrap().1;
        assert!(Arc::ptr_eq(&n1.pods[0].template, &templates["web"]));
        assert!(n1.prefetch.is_empty());
    }

    #[test]
    fn a_prefetching_node_gets_the_new_revisions_pull_secrets_sealed_for_it() {
        use crate::secrets::{Sealer, Secret, SecretType, bump, to_references};
        use flotilla_proto::{ConfigFile, SealedSecret, SecretFiles, encode};

        let mut cluster = Cluster::default();
        cluster.fleet.ingest_status(status("n1", "a", 0), 1);
        cluster.fleet.ingest_status(status("n3", "a", 0), 1);
        let old = workload(WEB);
        let private = WEB.replace("oci:/x", "reg.local:5000/app:2")
            + "  imagePullSecrets: [{name: regcred}]\n";
        let workloads = BTreeMap::from([("web".to_string(), workload(&private))]);
        let templates = templates_for(&workloads, &BTreeMap::new());
        let mut rollout = Rollout::new("web", 1, 2, vec!["n1".into(), "n3".into()], 0);
        rollout.prefetching.insert("n1".into(), 0);
        let stable = Arc::new(old.pod_spec("web"));
        let rollouts = BTreeMap::from([("web".to_string(), RolloutState { rollout, stable })]);
        let (changed, _) = cluster.plan(&workloads, &templates, &rollouts, 1);
        let by_node: BTreeMap<_, _> = changed.into_iter().collect();

        // The wave's node: the new images with the new revision's pull
        // secrets, as references; its pods (the old revision) name none.
        let n1 = &by_node["n1"];
        assert_eq!(n1.prefetch, ["reg.local:5000/app:2"]);
        assert_eq!(
            n1.prefetch_pull_secrets,
            [PrefetchPullSecrets {
                images: vec!["reg.local:5000/app:2".into()],
                pull_secrets: vec![SealedSecret::unsealed("regcred")],
            }]
        );
        assert!(n1.pods[0].template.image_pull_secrets.is_empty());
        assert!(by_node["n3"].prefetch_pull_secrets.is_empty());

        // Encoded for n1, they are sealed for n1's key as a pod's are; a
        // node without a key gets the reason instead.
        let dir = tempfile::tempdir().unwrap();
        let identity = crate::identity::Identity::open(dir.path(), false).unwrap();
        identity.set_sealing_key("n1", [9; 32]).unwrap();
        let sealer = Sealer::open(dir.path(), identity).unwrap();
        let json = br#"{"auths":{"reg.local:5000":{"auth":"cm9ib3Q6czNjcmV0"}}}"#.to_vec();
        let secrets = BTreeMap::from([(
            "regcred".to_string(),
            Secret {
                name: "regcred".into(),
                kind: SecretType::DockerConfigJson,
                data: BTreeMap::from([(".dockerconfigjson".to_string(), json.clone())]),
            },
        )]);
        let mut state = n1.to_state("n1");
        sealer.seal_state(&mut state, &secrets);
        let sealed = &state.prefetch_pull_secrets[0].pull_secrets[0];
        let frame = encode(&SecretFiles {
            files: vec![ConfigFile {
                path: ".dockerconfigjson".into(),
                data: json,
                mode: 0o400,
            }],
        })
        .unwrap();
        assert_eq!(sealed.name, "regcred");
        assert_eq!(sealed.problem, None);
        assert_eq!(sealed.digest, sealer.vault().digest("regcred", &frame));
        assert_eq!(sealed.ciphertext.len(), frame.len() + 16);
        assert!(!sealed.ciphertext.windows(8).any(|w| w == b"cm9ib3Q6"));
        let mut keyless = n1.to_state("n2");
        sealer.seal_state(&mut keyless, &secrets);
        assert_eq!(
            keyless.prefetch_pull_secrets[0].pull_secrets[0]
                .problem
                .as_deref(),
            Some("node n2 has no sealing key: re-enrol it")
        );

        // Stored sealed, read back as references: a restarted controller
        // sees n1 unchanged.
        let mut stored = BTreeMap::from([("n1".to_string(), state)]);
        to_references(&mut stored);
        let snap = Snapshot {
            workloads: workloads.clone(),
            desired: stored,
            ..Snapshot::default()
        };
        let restarted = Cluster::from_snapshot(snap);
        assert_eq!(restarted.desired["n1"], *n1);

        // A changed regcred reaches n1 (whose pods do not use it), not n3.
        cluster.desired = by_node.clone();
        let mut bumped = Vec::new();
        bump(
            &cluster,
            &BTreeSet::from(["regcred".to_string()]),
            &mut bumped,
        );
        let nodes: Vec<&str> = bumped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(nodes, ["n1"]);
        assert_eq!(bumped[0].1.generation, n1.generation + 1);
    }
}
