//! The libcontainer executor that installs the seccomp filter and then
//! execs the container's process, as libcontainer's default executor does.

use std::ffi::CString;

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;

use super::Program;

/// Runs in the container's init (or an exec'd process) as its last step:
/// capabilities are dropped and `no_new_privs` is set by then, so the
/// filter (when there is one) covers exactly the payload.
#[derive(Clone)]
pub struct FilteredExecutor {
    filter: Option<Program>,
}

impl FilteredExecutor {
    /// An executor that installs `filter` before the exec; `None` execs
    /// with no filter (an unconfined container).
    pub fn new(filter: Option<Program>) -> Self {
        Self { filter }
    }
}

impl Executor for FilteredExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .filter(|a| !a.is_empty())
            .ok_or(ExecutorError::InvalidArg)?;
        // Everything that allocates happens before the filter: after it,
        // only the exec itself should run.
        let argv: Vec<CString> = args
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| ExecutorError::InvalidArg)?;
        if let Some(filter) = &self.filter {
            filter
                .install()
                .map_err(|e| ExecutorError::Other(e.to_string()))?;
        }
        let err = match nix::unistd::execvp(&argv[0], &argv) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        Err(ExecutorError::Other(format!(
            "executing {:?}: {err}",
            args[0]
        )))
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}
