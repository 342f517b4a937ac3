//! Requests to agents and their answers: each request gets a fresh id and a
//! slot in the pending table; the MQTT session delivers responses into the
//! slot of their id; a caller that waited too long (the device is offline, or
//! slow) gets a timeout and its slot is freed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::{EncodeError, RpcCall, RpcRequest, RpcResponse, RpcResult, decode, encode};
use tokio::sync::oneshot;

/// Most requests waiting for an answer at once; a fleet-wide `logs -f` by
/// many users stays bounded.
pub const MAX_PENDING: usize = 1024;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The agent did not answer in time.
    #[error("node {node} did not answer within {} s", timeout.as_secs())]
    Timeout { node: String, timeout: Duration },
    /// Too many requests are waiting already.
    #[error("too many requests to nodes in flight (at most {max}); try again")]
    Busy { max: usize },
    /// The request could not be encoded.
    #[error("encoding the request to node {node}: {source}")]
    Encode { node: String, source: EncodeError },
    /// The MQTT session refused the request.
    #[error("sending the request to node {node}: {reason}")]
    Send { node: String, reason: String },
}

/// The pending requests. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Rpc {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
}

#[derive(Debug)]
struct Pending {
    node: String,
    reply: oneshot::Sender<RpcResult>,
}

/// Frees a request's slot however its caller stops waiting.
struct Slot<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(&self.inner.pending).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Rpc {
    /// An empty table. Ids start at a random number, so an answer meant for
    /// an earlier controller process is not taken for one of ours.
    pub fn new() -> Self {
        let rpc = Self::default();
        rpc.inner
            .next_id
            .store(rand::random::<u64>() >> 1, Ordering::Relaxed);
        rpc
    }

    /// Sends `call` to `node` through `send` (which publishes the encoded
    /// request) and waits at most `timeout` for the answer.
    pub async fn call<F, E>(
        &self,
        node: &str,
        call: RpcCall,
        timeout: Duration,
        send: F,
    ) -> Result<RpcResult, RpcError>
    where
        F: AsyncFnOnce(Vec<u8>) -> Result<(), E>,
        E: std::fmt::Display,
    {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&RpcRequest { id, call }).map_err(|source| RpcError::Encode {
            node: node.to_owned(),
            source,
        })?;
        let (reply, answer) = oneshot::channel();
        {
            let mut pending = lock(&self.inner.pending);
            if pending.len() >= MAX_PENDING {
                return Err(RpcError::Busy { max: MAX_PENDING });
            }
            pending.insert(
                id,
                Pending {
                    node: node.to_owned(),
                    reply,
                },
            );
        }
        let _slot = Slot {
            inner: &self.inner,
            id,
        };
        send(frame).await.map_err(|e| RpcError::Send {
            node: node.to_owned(),
            reason: e.to_string(),
        })?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => Ok(result),
            // The sender is only dropped with the slot, which we hold.
            Ok(Err(_)) | Err(_) => Err(RpcError::Timeout {
                node: node.to_owned(),
                timeout,
            }),
        }
    }

    /// Hands a response frame that `node` published to whoever waits for
    /// it. Unknown ids (late answers) and answers from another node than
    /// the one asked are dropped.
    pub fn deliver(&self, node: &str, frame: &[u8]) {
        let response = match decode::<RpcResponse>(frame) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%node, "refusing an rpc response: {e}");
                return;
            }
        };
        let mut pending = lock(&self.inner.pending);
        match pending.get(&response.id) {
            Some(p) if p.node == node => {
                if let Some(p) = pending.remove(&response.id) {
                    let _ = p.reply.send(response.result);
                }
            }
            Some(p) => {
                tracing::warn!(%node, asked = %p.node, id = response.id, "dropping an rpc response from another node than the one asked");
            }
            None => tracing::debug!(%node, id = response.id, "dropping a late rpc response"),
        }
    }

    /// Requests waiting for an answer.
    pub fn pending(&self) -> usize {
        lock(&self.inner.pending).len()
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::{LogCursor, LogsRequest};

    use super::*;

    fn logs_call() -> RpcCall {
        RpcCall::Logs(LogsRequest {
            pod: "web".into(),
            container: "main".into(),
            tail_lines: None,
            from: None,
            max_bytes: 10,
        })
    }

    fn answer(id: u64) -> Vec<u8> {
        encode(&RpcResponse {
            id,
            result: RpcResult::Logs {
                data: b"hi".to_vec(),
                next: LogCursor {
                    file_id: 1,
                    offset: 2,
                },
            },
        })
        .unwrap()
    }

    #[tokio::test]
    async fn answers_reach_their_caller_only_from_the_node_asked() {
        let rpc = Rpc::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let caller = {
            let rpc = rpc.clone();
            tokio::spawn(async move {
                rpc.call("n1", logs_call(), Duration::from_secs(10), async |frame| {
                    let _ = tx.send(frame);
                    Ok::<(), String>(())
                })
                .await
            })
        };
        let frame = rx.await.unwrap();
        let id = decode::<RpcRequest>(&frame).unwrap().id;
        rpc.deliver("n2", &answer(id));
        rpc.deliver("n1", &answer(id.wrapping_add(1)));
        rpc.deliver("n1", b"\x01garbage");
        assert_eq!(rpc.pending(), 1);
        rpc.deliver("n1", &answer(id));
        let result = caller.await.unwrap().unwrap();
        assert!(matches!(result, RpcResult::Logs { data, .. } if data == b"hi"));
        assert_eq!(rpc.pending(), 0);
    }

    #[tokio::test]
    async fn silence_times_out_and_frees_the_slot() {
        let rpc = Rpc::new();
        let t0 = std::time::Instant::now();
        let e = rpc
            .call("n1", logs_call(), Duration::from_secs(1), async |_| {
                Ok::<(), String>(())
            })
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "node n1 did not answer within 1 s");
        assert!(t0.elapsed() >= Duration::from_secs(1));
        assert_eq!(rpc.pending(), 0);
        let e = rpc
            .call("n1", logs_call(), Duration::from_secs(10), async |_| {
                Err("queue closed")
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "sending the request to node n1: queue closed"
        );
        assert_eq!(rpc.pending(), 0);
    }
}
