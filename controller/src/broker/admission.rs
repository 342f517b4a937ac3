//! Who may connect to the embedded broker and what each client may do: the
//! rmqtt `ClientAuthenticate`, `ClientSubscribeCheckAcl` and
//! `MessagePublishCheckAcl` hooks. Every client reaches the first one,
//! anonymous ones included, because the listener is set up with
//! `allow_anonymous = false` (with rmqtt's default, clients without a
//! username skip it altogether).
//!
//! With the fleet's identities ([`Policy::Fleet`]): the controller's own
//! session is a superuser; an enrolled device (username = node name, its
//! password from `join`) may subscribe only to its own `desired` and
//! `rpc/req` topics and publish only to its own `status`, `presence` and
//! `rpc/res`; its last will must be one of those too, checked at CONNECT
//! because rmqtt publishes wills without the publish ACL. The credential is
//! looked up again on every subscribe and publish, so revoking a node cuts
//! a live session's rights at once. Anonymous clients only with
//! `--allow-anonymous`, then with every right (as before identities).

use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::Arc;

use flotilla_proto::{TopicKind, Topics};
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::types::{AuthResult, ConnectInfo, LastWill, PublishAclResult, SubscribeAclResult};

use crate::identity::{Identity, Principal};

/// What the broker decides for a connecting client.
#[derive(Clone)]
pub(crate) enum Policy {
    /// Admit every client, without credentials, with every right.
    AllowAll,
    /// The fleet's identities and per-device ACLs.
    Fleet {
        identity: Arc<Identity>,
        topics: Topics,
    },
    /// Refuse every client; lets tests prove the hook is really consulted.
    #[cfg(test)]
    DenyAll,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AllowAll => f.write_str("AllowAll"),
            Self::Fleet { topics, .. } => write!(f, "Fleet({})", topics.prefix()),
            #[cfg(test)]
            Self::DenyAll => f.write_str("DenyAll"),
        }
    }
}

/// Topics a device may publish to.
const DEVICE_PUBLISHES: [TopicKind; 3] = [
    TopicKind::Status,
    TopicKind::Presence,
    TopicKind::RpcResponse,
];
/// Topics a device may subscribe to.
const DEVICE_SUBSCRIBES: [TopicKind; 2] = [TopicKind::Desired, TopicKind::RpcRequest];

/// The client ids a device may connect with: its node name, or the agent's
/// `flotilla-agent-{node}`. Binding the id to the node keeps a device from
/// taking over another's persistent session, whose subscriptions (checked
/// only when they were made) would otherwise deliver it the other's
/// desired state.
pub(super) fn device_client_ids(node: &str) -> [String; 2] {
    [node.to_owned(), format!("flotilla-agent-{node}")]
}

/// The handler of the three hooks.
pub(super) struct Admission {
    policy: Policy,
}

fn may(topics: &Topics, node: &str, kinds: &[TopicKind], topic: &str) -> bool {
    kinds.iter().any(|&k| topics.node(node, k) == topic)
}

fn will_topic<'a>(will: &LastWill<'a>) -> &'a str {
    match will {
        LastWill::V3(w) => &w.topic,
        LastWill::V5(w) => &w.topic,
    }
}

impl Admission {
    pub(super) fn new(policy: Policy) -> Self {
        Self { policy }
    }

    fn authenticate(&self, connect: &ConnectInfo) -> AuthResult {
        let (identity, topics) = match &self.policy {
            // Not a superuser: the ACL hooks still run (and allow).
            Policy::AllowAll => return AuthResult::Allow(false, None),
            #[cfg(test)]
            Policy::DenyAll => return AuthResult::NotAuthorized,
            Policy::Fleet { identity, topics } => (identity, topics),
        };
        let username = connect.username().map(|u| &**u);
        let password = connect.password().map(|p| &p[..]);
        match identity.authenticate(username, password) {
            Some(Principal::Controller) => AuthResult::Allow(true, None),
            Some(Principal::Anonymous) => AuthResult::Allow(false, None),
            Some(Principal::Device(node)) => {
                let client_id: &str = connect.client_id();
                if !device_client_ids(&node).iter().any(|id| id == client_id) {
                    tracing::warn!(%node, client = client_id, "refused a connect: client id of another");
                    return AuthResult::NotAuthorized;
                }
                if let Some(will) = connect.last_will() {
                    let topic = will_topic(&will);
                    if !may(topics, &node, &DEVICE_PUBLISHES, topic) {
                        tracing::warn!(%node, topic, "refused a connect: last will on another's topic");
                        return AuthResult::NotAuthorized;
                    }
                }
                AuthResult::Allow(false, None)
            }
            None => {
                tracing::warn!(
                    username = username.unwrap_or("<anonymous>"),
                    client = %connect.client_id(),
                    "refused a connect: bad or revoked credentials"
                );
                AuthResult::BadUsernameOrPassword
            }
        }
    }

    /// Whether the session of `username` may use `topic` as one of `kinds`.
    fn allowed(&self, username: Option<&str>, kinds: &[TopicKind], topic: &str) -> bool {
        let Policy::Fleet { identity, topics } = &self.policy else {
            return true;
        };
        match username {
            // Only admitted with --allow-anonymous.
            None => true,
            Some(node) => identity.is_active(node) && may(topics, node, kinds, topic),
        }
    }

    fn decide(&self, param: &Parameter<'_>, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(connect) => {
                let result = self.authenticate(connect);
                // This handler has the final word on admission.
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let username = session.id.username.as_deref();
                let topic = &*subscribe.topic_filter;
                let result = if self.allowed(username, &DEVICE_SUBSCRIBES, topic) {
                    SubscribeAclResult::new_success(subscribe.opts.qos(), None)
                } else {
                    tracing::warn!(username, topic, "refused a subscribe");
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let username = session.id.username.as_deref();
                let topic = &*publish.inner.topic;
                let result = if self.allowed(username, &DEVICE_PUBLISHES, topic) {
                    PublishAclResult::allow()
                } else {
                    tracing::warn!(username, topic, "refused a publish");
                    PublishAclResult::rejected(false, None)
                };
                (false, Some(HookResult::PublishAclResult(result)))
            }
            _ => (true, acc),
        }
    }
}

// Written out by hand rather than with `#[async_trait]`: the decision is
// synchronous, and this keeps the crate free of a proc-macro dependency.
impl Handler for Admission {
    fn hook<'life0, 'life1, 'async_trait>(
        &'life0 self,
        param: &'life1 Parameter<'_>,
        acc: Option<HookResult>,
    ) -> Pin<Box<dyn Future<Output = ReturnType> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let decided: Ready<ReturnType> = ready(self.decide(param, acc));
        Box::pin(decided)
    }
}
