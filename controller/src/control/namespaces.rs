//! Namespaces in the control loop: a manifest's namespaces stored in the
//! same transaction as its workloads and Secrets, the policy check every
//! workload a user applies (or undoes to) passes against the namespaces it
//! would run under, and deletion, refused while workloads are in the
//! namespace.
//!
//! Tightening a namespace is allowed and kills nothing: the workloads it no
//! longer covers keep their pods, are named in the apply's warnings, and
//! show the violation in `describe` until they are changed (and then
//! checked again) or the namespace allows them again.

use std::collections::BTreeMap;

use tokio::sync::oneshot;

use crate::manifest::namespace::{self, Namespace, Violation};
use crate::manifest::{Objects, Workload};
use crate::store::Batch;

use super::{Applied, Command, ControlError, ControlHandle, ControlLoop};

/// Why a namespace change or a workload was refused; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// Workloads ask for privileges their namespace does not grant (or
    /// name a namespace that does not exist).
    #[error("{}", lines(.0))]
    Refused(Vec<Violation>),
    /// The namespace still holds workloads.
    #[error(
        "namespace {name:?} still holds workloads {}: delete them or move them to another namespace first",
        .workloads.join(", ")
    )]
    InUse {
        /// The namespace.
        name: String,
        /// The workloads in it.
        workloads: Vec<String>,
    },
    /// `default` always exists.
    #[error("namespace \"default\" always exists and cannot be deleted")]
    Default,
}

fn lines(v: &[Violation]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// What applying a manifest did, kind by kind, and what it left uncovered.
#[derive(Debug, Default)]
pub struct AppliedObjects {
    /// The namespaces.
    pub namespaces: Vec<(String, Applied)>,
    /// The Secrets.
    pub secrets: Vec<(String, Applied)>,
    /// The workloads.
    pub workloads: Vec<(String, Applied)>,
    /// Workloads already stored (not in this manifest) that ask for
    /// privileges a namespace changed here no longer grants: they keep
    /// running, and their next change is refused until it is fixed.
    pub warnings: Vec<Violation>,
}

/// Commands of this module, carried by the loop's `Command::Namespaces`.
pub(super) enum NamespaceCommand {
    Apply {
        objects: Objects,
        reply: oneshot::Sender<Result<AppliedObjects, ControlError>>,
    },
    Delete {
        name: String,
        reply: oneshot::Sender<Result<bool, ControlError>>,
    },
}

/// Namespace changes the next `commit` writes with the rest.
pub(super) struct StagedNamespaces {
    changed: Vec<Namespace>,
    next: BTreeMap<String, Namespace>,
}

impl ControlHandle {
    /// Applies a manifest's namespaces, Secrets and workloads, all or none:
    /// every workload must be granted what it asks by its namespace, as it
    /// stands after this manifest.
    pub async fn apply_objects(&self, objects: Objects) -> Result<AppliedObjects, ControlError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Namespaces(NamespaceCommand::Apply { objects, reply });
        self.tx.send(cmd).await.map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Deletes a namespace; `false` if there was none of that name.
    pub async fn delete_namespace(&self, name: String) -> Result<bool, ControlError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Namespaces(NamespaceCommand::Delete { name, reply });
        self.tx.send(cmd).await.map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }
}

/// Refuses `workloads` unless each is granted what it asks by its
/// namespace among `namespaces`.
pub(super) fn admit(
    namespaces: &BTreeMap<String, Namespace>,
    workloads: &[Workload],
) -> Result<(), NamespaceError> {
    let refused: Vec<Violation> = workloads
        .iter()
        .flat_map(|w| namespace::violations(namespaces, w))
        .collect();
    match refused.is_empty() {
        true => Ok(()),
        false => Err(NamespaceError::Refused(refused)),
    }
}

impl ControlLoop {
    pub(super) async fn namespace_command(&mut self, cmd: NamespaceCommand) {
        match cmd {
            NamespaceCommand::Apply { objects, reply } => {
                let _ = reply.send(self.apply_objects(objects).await);
            }
            NamespaceCommand::Delete { name, reply } => {
                let _ = reply.send(self.delete_namespace(name).await);
            }
        }
    }

    async fn apply_objects(&mut self, objects: Objects) -> Result<AppliedObjects, ControlError> {
        let mut next = self.cluster.namespaces.clone();
        let mut out = AppliedObjects::default();
        let mut changed = Vec::new();
        for ns in objects.namespaces {
            let applied = match next.get(&ns.name) {
                None => Applied::Created,
                Some(old) if *old == ns => Applied::Unchanged,
                Some(_) => Applied::Configured,
            };
            out.namespaces.push((ns.name.clone(), applied));
            if applied != Applied::Unchanged {
                changed.push(ns.clone());
                next.insert(ns.name.clone(), ns);
            }
        }
        admit(&next, &objects.workloads)?;
        out.warnings = self
            .cluster
            .workloads
            .values()
            .filter(|w| changed.iter().any(|ns| ns.name == w.namespace))
            .filter(|w| !objects.workloads.iter().any(|o| o.name == w.name))
            .flat_map(|w| namespace::violations(&next, w))
            .collect();
        for v in &out.warnings {
            tracing::warn!(%v, "a namespace no longer allows what a running workload asks for");
        }
        self.staged_namespaces =
            (!changed.is_empty()).then_some(StagedNamespaces { changed, next });
        let result = self.apply_all(objects.workloads, objects.secrets).await;
        // Still staged: no commit ran, as nothing else changed; a failed
        // apply drops them with the rest.
        let staged = self.staged_namespaces.take();
        let (workloads, secrets) = result?;
        if let Some(staged) = staged {
            let batch = Batch {
                put_namespaces: staged.changed,
                ..Batch::default()
            };
            self.write(batch).await?;
            self.cluster.namespaces = staged.next;
        }
        out.workloads = workloads;
        out.secrets = secrets;
        Ok(out)
    }

    /// Adds the staged namespace changes to `batch`; the namespaces to make
    /// current once it is written.
    pub(super) fn take_staged_namespaces(
        &mut self,
        batch: &mut Batch,
    ) -> Option<BTreeMap<String, Namespace>> {
        let staged = self.staged_namespaces.take()?;
        batch.put_namespaces = staged.changed;
        Some(staged.next)
    }

    async fn delete_namespace(&mut self, name: String) -> Result<bool, ControlError> {
        if name == namespace::DEFAULT_NAMESPACE {
            return Err(NamespaceError::Default.into());
        }
        if !self.cluster.namespaces.contains_key(&name) {
            return Ok(false);
        }
        let workloads: Vec<String> = self
            .cluster
            .workloads
            .values()
            .filter(|w| w.namespace == name)
            .map(|w| w.name.clone())
            .collect();
        if !workloads.is_empty() {
            return Err(NamespaceError::InUse { name, workloads }.into());
        }
        self.write(Batch {
            delete_namespaces: vec![name.clone()],
            ..Batch::default()
        })
        .await?;
        tracing::info!(namespace = %name, "namespace deleted");
        self.cluster.namespaces.remove(&name);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_objects;

    fn objects(text: &str) -> Objects {
        match parse_objects(text) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        }
    }

    fn workload(name: &str, meta: &str, security: &str) -> String {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}{meta}}}\n\
             spec: {{containers: [{{name: main, image: busybox, securityContext: {security}}}]}}\n---\n"
        )
    }

    #[test]
    fn apply_admits_only_what_the_namespace_grants() {
        let net = "apiVersion: flotilla.dev/v1\nkind: Namespace\nmetadata: {name: net}\n\
                   spec: {allowedCapabilities: [NET_ADMIN]}\n---\n";
        let stored: BTreeMap<String, Namespace> = objects(net)
            .namespaces
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        // Each case: what is refused, one line per violation; none: admitted.
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            ("nothing asked, default", workload("a", "", "{}"), vec![]),
            (
                "granted",
                workload(
                    "a",
                    ", namespace: net",
                    "{capabilities: {add: [NET_ADMIN], drop: [ALL]}}",
                ),
                vec![],
            ),
            (
                "asked in default",
                workload("a", "", "{capabilities: {add: [NET_ADMIN]}}"),
                vec![
                    "workload \"a\": spec.containers[0].securityContext.capabilities.add[0]: \
                     namespace \"default\" does not allow adding capability NET_ADMIN",
                ],
            ),
            (
                "beyond the grant, and a missing namespace",
                format!(
                    "{}{}",
                    workload("a", ", namespace: net", "{privileged: true}"),
                    workload("b", ", namespace: lab", "{}")
                ),
                vec![
                    "workload \"a\": spec.containers[0].securityContext.privileged: \
                     namespace \"net\" does not allow privileged containers",
                    "workload \"b\": metadata.namespace: namespace \"lab\" not found: \
                     apply a kind: Namespace of that name first",
                ],
            ),
        ];
        for (name, text, expected) in cases {
            let got: Vec<String> = match admit(&stored, &objects(&text).workloads) {
                Ok(()) => vec![],
                Err(NamespaceError::Refused(v)) => v.iter().map(ToString::to_string).collect(),
                Err(other) => vec![other.to_string()],
            };
            assert_eq!(got, expected, "{name}");
        }
    }
}
