//! The control loop's API: the commands it takes and [`ControlHandle`],
//! the cloneable handle the API server calls, each call a command with a
//! oneshot reply.

use std::collections::BTreeMap;

use tokio::sync::{mpsc, oneshot};

use super::namespaces;
use super::{Applied, Cluster, ControlError};

/// What applying a manifest did to its workloads and its Secrets.
pub(super) type AppliedAll = (Vec<(String, Applied)>, Vec<(String, Applied)>);

pub(super) enum Command {
    DeleteSecret {
        name: String,
        reply: oneshot::Sender<Result<bool, ControlError>>,
    },
    Delete {
        name: String,
        reply: oneshot::Sender<Result<bool, ControlError>>,
    },
    Undo {
        workload: String,
        to: Option<u64>,
        reply: oneshot::Sender<Result<(Applied, u64), ControlError>>,
    },
    Hold {
        workload: String,
        pause: bool,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    Label {
        node: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
        reply: oneshot::Sender<Result<BTreeMap<String, String>, ControlError>>,
    },
    Read(Box<dyn FnOnce(&Cluster) + Send>),
    Namespaces(namespaces::NamespaceCommand),
}

/// A cloneable handle to the control loop.
#[derive(Clone)]
pub struct ControlHandle {
    pub(super) tx: mpsc::Sender<Command>,
}

impl ControlHandle {
    /// Deletes a Secret; `false` if there was none of that name. Pods that
    /// use it fail to start again until it is back.
    pub async fn delete_secret(&self, name: String) -> Result<bool, ControlError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::DeleteSecret { name, reply };
        self.tx.send(cmd).await.map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Deletes a workload; `false` if there was none of that name.
    pub async fn delete(&self, name: String) -> Result<bool, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Delete { name, reply })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Brings back the pods of revision `to` (default: the one before the
    /// newest) as a new revision; returns whether anything changed and the
    /// workload's revision after.
    pub async fn undo(
        &self,
        workload: String,
        to: Option<u64>,
    ) -> Result<(Applied, u64), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Undo {
                workload,
                to,
                reply,
            })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Pauses (`pause`) or resumes a workload's rollout.
    pub async fn hold(&self, workload: String, pause: bool) -> Result<(), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Hold {
                workload,
                pause,
                reply,
            })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Sets and removes labels of a node at the controller; returns the
    /// node's controller labels after the change. Keys and values must
    /// have been checked (`flotilla_proto::check_label_key`, `…_value`).
    pub async fn label(
        &self,
        node: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<BTreeMap<String, String>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Label {
                node,
                set,
                remove,
                reply,
            })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Runs `f` on the cluster state inside the control loop and returns its result.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Cluster) -> T + Send + 'static,
    ) -> Result<T, ControlError> {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(move |c: &Cluster| {
            let _ = reply.send(f(c));
        });
        self.tx
            .send(Command::Read(job))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)
    }
}
