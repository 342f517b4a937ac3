//! Who may connect to the embedded broker: the rmqtt `ClientAuthenticate`
//! hook. Every client reaches it, anonymous ones included, because the
//! listener is set up with `allow_anonymous = false` (with rmqtt's default,
//! clients without a username skip this hook altogether). Device credentials,
//! the will-topic check at CONNECT and the per-device publish/subscribe ACLs
//! belong here, next to this hook.

use std::future::{Future, Ready, ready};
use std::pin::Pin;

use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::types::AuthResult;

/// What the broker decides for a connecting client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Admit every client, without credentials (until enrollment lands).
    AllowAll,
    /// Refuse every client; lets tests prove the hook is really consulted.
    #[cfg(test)]
    DenyAll,
}

/// The `ClientAuthenticate` handler.
pub(super) struct Admission {
    policy: Policy,
}

impl Admission {
    pub(super) fn new(policy: Policy) -> Self {
        Self { policy }
    }

    fn decide(&self, param: &Parameter<'_>, acc: Option<HookResult>) -> ReturnType {
        let Parameter::ClientAuthenticate(_connect) = param else {
            return (true, acc);
        };
        let result = match self.policy {
            // Not a superuser: the ACL hooks, once added, still apply.
            Policy::AllowAll => AuthResult::Allow(false, None),
            #[cfg(test)]
            Policy::DenyAll => AuthResult::NotAuthorized,
        };
        // This handler has the final word on admission.
        (false, Some(HookResult::AuthResult(result)))
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
