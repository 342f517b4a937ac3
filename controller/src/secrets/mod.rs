//! Secrets: `kind: Secret` values, kept sealed at rest under the
//! controller's key ([`vault`]) and sealed again for each node that needs
//! them ([`seal`]) when its desired state is encoded. The pod templates the
//! control loop shares between nodes hold only unsealed references
//! (`SealedSecret::unsealed`); values exist in the clear only in this
//! process's memory. The API shows names, keys and sizes, never values.

pub mod docker;
pub mod seal;
pub mod vault;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_proto::{ConfigFile, DesiredState, PodSpec, SealedSecret, SecretItem, VolumeSource};

use crate::control::{Applied, Cluster, NodeDesired};
use crate::identity::Identity;
use crate::store::Batch;
pub use vault::Vault;

/// Most keys in one Secret.
pub const MAX_KEYS: usize = 64;
/// Most bytes of all values of one Secret together: a pod's secrets travel
/// sealed in its node's desired state, itself capped at 1 MiB.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// Longest key (Kubernetes' rule).
pub const MAX_KEY_LEN: usize = 253;
/// The key of an image pull secret.
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// Why a secret could not be stored, loaded or sealed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A key file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The key file can be read by others than its owner.
    #[error("secrets key {path}: mode {mode:o} lets others read it, expected 0600")]
    Exposed { path: PathBuf, mode: u32 },
    /// The key file does not hold a key.
    #[error("secrets key {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    /// A stored Secret cannot be read back.
    #[error("stored secret {name:?}: {reason}")]
    Stored { name: String, reason: String },
    /// The system random source failed.
    #[error("no randomness for secrets")]
    Random,
}

/// What a Secret is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretType {
    /// Any keys and values (the default).
    Opaque,
    /// Registry credentials: one `.dockerconfigjson` key holding Docker's
    /// config JSON.
    DockerConfigJson,
}

impl SecretType {
    /// The manifest's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opaque => "Opaque",
            Self::DockerConfigJson => "kubernetes.io/dockerconfigjson",
        }
    }

    /// From the manifest's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Opaque" => Some(Self::Opaque),
            "kubernetes.io/dockerconfigjson" => Some(Self::DockerConfigJson),
            _ => None,
        }
    }
}

/// A validated Secret. Its `Debug` shows keys and sizes, never values, so
/// no log line can carry one.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// Unique name (a DNS label).
    pub name: String,
    /// Its type.
    pub kind: SecretType,
    /// Key → value.
    pub data: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: BTreeMap<&str, usize> = self
            .data
            .iter()
            .map(|(k, v)| (k.as_str(), v.len()))
            .collect();
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("sizes", &sizes)
            .finish()
    }
}

impl Secret {
    /// The bytes of all values together.
    pub fn size(&self) -> usize {
        self.data.values().map(Vec::len).sum()
    }
}

/// The Secrets a pod refers to, by name.
pub fn referenced(pod: &PodSpec) -> impl Iterator<Item = &str> {
    let volumes = pod.volumes.iter().filter_map(|v| match &v.source {
        VolumeSource::Secret { sealed, .. } => Some(sealed.name.as_str()),
        _ => None,
    });
    volumes.chain(pod.image_pull_secrets.iter().map(|s| s.name.as_str()))
}

/// Turns the sealed Secrets of stored desired states back into the
/// unsealed references the pod templates hold, so that a restarted
/// controller sees its nodes' pods as unchanged (and shares templates).
pub fn to_references(states: &mut BTreeMap<String, DesiredState>) {
    for state in states.values_mut() {
        for pod in &mut state.pods {
            for v in &mut pod.volumes {
                if let VolumeSource::Secret { sealed, .. } = &mut v.source {
                    *sealed = SealedSecret::unsealed(sealed.name.clone());
                }
            }
            for sealed in &mut pod.image_pull_secrets {
                *sealed = SealedSecret::unsealed(sealed.name.clone());
            }
        }
        for p in &mut state.prefetch_pull_secrets {
            for sealed in &mut p.pull_secrets {
                *sealed = SealedSecret::unsealed(sealed.name.clone());
            }
        }
    }
}

/// Adds to `changed` every node not in it whose pods use one of the
/// Secrets `names`, with its pods as they are and the next generation, so
/// that the new contents are sealed for it and reach its containers.
pub fn bump(cluster: &Cluster, names: &BTreeSet<String>, changed: &mut Vec<(String, NodeDesired)>) {
    if names.is_empty() {
        return;
    }
    let already: BTreeSet<String> = changed.iter().map(|(n, _)| n.clone()).collect();
    for (node, desired) in &cluster.desired {
        let uses = desired
            .pods
            .iter()
            .any(|p| referenced(&p.template).any(|n| names.contains(n)))
            || desired
                .prefetch_pull_secrets
                .iter()
                .flat_map(|p| &p.pull_secrets)
                .any(|s| names.contains(&s.name));
        if !uses || already.contains(node) {
            continue;
        }
        let observed = cluster
            .fleet
            .get(node)
            .map_or(0, |n| n.observed_generation());
        let next = NodeDesired {
            generation: desired.generation.max(observed) + 1,
            ..desired.clone()
        };
        changed.push((node.clone(), next));
    }
}

/// What sealing for nodes needs: the controller's key and every node's
/// sealing key.
pub struct Sealer {
    vault: Vault,
    identity: Arc<Identity>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// Loads (or makes) `{dir}/secrets.key`. Blocking.
    pub fn open(dir: &Path, identity: Arc<Identity>) -> Result<Self, SecretError> {
        Ok(Self {
            vault: Vault::load_or_create(dir)?,
            identity,
        })
    }

    /// The vault, for storing Secrets.
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// Reads stored Secrets back; one that cannot be opened is logged and
    /// left out (its pods then report it missing), not a reason to stop.
    pub fn open_stored(&self, stored: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Secret> {
        stored
            .into_iter()
            .filter_map(
                |(name, bytes)| match self.vault.open_at_rest(&name, &bytes) {
                    Ok(s) => Some((name, s)),
                    Err(e) => {
                        tracing::error!("{e}");
                        None
                    }
                },
            )
            .collect()
    }

    /// Replaces every unsealed reference in `state` (secret volumes, image
    /// pull secrets, prefetches' pull secrets) with the Secret sealed for
    /// `state.node`, or with the reason it could not be.
    pub fn seal_state(&self, state: &mut DesiredState, secrets: &BTreeMap<String, Secret>) {
        let node_key = self.identity.sealing_key(&state.node);
        for pod in &mut state.pods {
            for v in &mut pod.volumes {
                if let VolumeSource::Secret {
                    items,
                    default_mode,
                    sealed,
                } = &mut v.source
                {
                    let files = secrets
                        .get(&sealed.name)
                        .ok_or_else(|| not_found(&sealed.name))
                        .and_then(|s| volume_files(s, items, *default_mode));
                    *sealed = self.seal_files(&state.node, node_key, &sealed.name, files);
                }
            }
            for sealed in &mut pod.image_pull_secrets {
                self.seal_pull(&state.node, node_key, sealed, secrets);
            }
        }
        for p in &mut state.prefetch_pull_secrets {
            for sealed in &mut p.pull_secrets {
                self.seal_pull(&state.node, node_key, sealed, secrets);
            }
        }
    }

    /// Seals the image pull secret `sealed` refers to, in place.
    fn seal_pull(
        &self,
        node: &str,
        node_key: Option<[u8; 32]>,
        sealed: &mut SealedSecret,
        secrets: &BTreeMap<String, Secret>,
    ) {
        let files = secrets
            .get(&sealed.name)
            .ok_or_else(|| not_found(&sealed.name))
            .and_then(pull_files);
        *sealed = self.seal_files(node, node_key, &sealed.name, files);
    }

    fn seal_files(
        &self,
        node: &str,
        node_key: Option<[u8; 32]>,
        name: &str,
        files: Result<Vec<ConfigFile>, String>,
    ) -> SealedSecret {
        let problem = |p: String| SealedSecret {
            problem: Some(p),
            ..SealedSecret::unsealed(name)
        };
        let files = match files {
            Ok(f) => f,
            Err(p) => return problem(p),
        };
        let Some(node_key) = node_key else {
            return problem(format!("node {node} has no sealing key: re-enrol it"));
        };
        match seal::seal(&self.vault, node, &node_key, name, files) {
            Ok(sealed) => sealed,
            Err(e) => problem(e),
        }
    }
}

fn not_found(name: &str) -> String {
    format!("secret {name:?} not found")
}

/// The files a secret volume shows: the items asked for, or every key.
fn volume_files(
    secret: &Secret,
    items: &[SecretItem],
    default_mode: u32,
) -> Result<Vec<ConfigFile>, String> {
    if items.is_empty() {
        return Ok(secret
            .data
            .iter()
            .map(|(k, v)| ConfigFile {
                path: k.clone(),
                data: v.clone(),
                mode: default_mode,
            })
            .collect());
    }
    items
        .iter()
        .map(|item| {
            let data = secret
                .data
                .get(&item.key)
                .ok_or_else(|| format!("secret {:?} has no key {:?}", secret.name, item.key))?;
            Ok(ConfigFile {
                path: item.path.clone(),
                data: data.clone(),
                mode: item.mode.unwrap_or(default_mode),
            })
        })
        .collect()
}

/// An image pull secret's one file.
fn pull_files(secret: &Secret) -> Result<Vec<ConfigFile>, String> {
    let wrong = || {
        format!(
            "secret {:?} is not of type {}",
            secret.name,
            SecretType::DockerConfigJson.as_str()
        )
    };
    if secret.kind != SecretType::DockerConfigJson {
        return Err(wrong());
    }
    let data = secret.data.get(DOCKER_CONFIG_KEY).ok_or_else(wrong)?;
    Ok(vec![ConfigFile {
        path: DOCKER_CONFIG_KEY.to_owned(),
        data: data.clone(),
        mode: 0o400,
    }])
}

/// Secrets to store and delete with the next change of the control loop,
/// and the names whose contents changed (their nodes get a new generation).
#[derive(Debug, Default)]
pub struct Staged {
    /// Secrets created or changed, with their stored (sealed) form.
    pub put: Vec<(Secret, Vec<u8>)>,
    /// Secrets deleted.
    pub delete: Vec<String>,
}

impl Staged {
    /// Stages the Secrets of a manifest that differ from `current`, sealed
    /// for the store; says for each whether it is new, changed or the same.
    pub fn new(
        current: &BTreeMap<String, Secret>,
        secrets: Vec<Secret>,
        vault: &Vault,
    ) -> Result<(Self, Vec<(String, Applied)>), SecretError> {
        let mut staged = Self::default();
        let mut outcome = Vec::with_capacity(secrets.len());
        for s in secrets {
            let applied = match current.get(&s.name) {
                None => Applied::Created,
                Some(old) if *old == s => Applied::Unchanged,
                Some(_) => Applied::Configured,
            };
            outcome.push((s.name.clone(), applied));
            if applied != Applied::Unchanged {
                let stored = vault.seal_at_rest(&s)?;
                staged.put.push((s, stored));
            }
        }
        Ok((staged, outcome))
    }

    /// Stages the deletion of Secret `name`.
    pub fn delete(name: String) -> Self {
        Self {
            put: Vec::new(),
            delete: vec![name],
        }
    }

    /// Whether this changes nothing.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.delete.is_empty()
    }

    /// Adds the store's side of this to `batch`.
    pub fn into_batch(self, batch: &mut Batch) {
        batch.put_secrets = self.put.into_iter().map(|(s, b)| (s.name, b)).collect();
        batch.delete_secrets = self.delete;
    }

    /// The names this changes.
    pub fn names(&self) -> BTreeSet<String> {
        self.put
            .iter()
            .map(|(s, _)| s.name.clone())
            .chain(self.delete.iter().cloned())
            .collect()
    }

    /// `current` with this applied.
    pub fn applied_to(&self, current: &BTreeMap<String, Secret>) -> BTreeMap<String, Secret> {
        let mut next = current.clone();
        for name in &self.delete {
            next.remove(name);
        }
        for (s, _) in &self.put {
            next.insert(s.name.clone(), s.clone());
        }
        next
    }
}
