//! Fake runtime: runs no processes, only records what it was asked, for
//! reconciler tests and simulated fleets.
//!
//! Behaviour is chosen by the container's `args`: `["fake-exit", "N"]` exits
//! at once with code N, `["fake-fail"]` fails to start, anything else runs
//! until killed. An `exec` gives what [`FakeRuntime::set_exec`] chose for
//! its command line, 127 (command not found) for any other; `exec_output`
//! also prints the command line.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use flotilla_proto::{ExecEnd, ExecResult};
use tokio::sync::watch;

use super::{ContainerConfig, Existing, Exit, Runtime, RuntimeError};

/// A runtime that keeps containers as entries in memory. Clones share them.
#[derive(Clone, Default)]
pub struct FakeRuntime {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, watch::Sender<Option<Exit>>>,
    starts: HashMap<String, u32>,
    /// By command line (argv joined with spaces): exit code, `None` for a
    /// command that never finishes.
    exec_results: HashMap<String, Option<i32>>,
    execs: HashMap<String, u32>,
}

impl FakeRuntime {
    /// An empty runtime.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ids of the containers whose process runs, sorted.
    pub fn running_ids(&self) -> Vec<String> {
        let state = self.state();
        let mut ids: Vec<String> = state
            .containers
            .iter()
            .filter(|(_, exit)| exit.borrow().is_none())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Ids of every container not deleted, running or exited, sorted.
    pub fn all_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.state().containers.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// How many times `start` was called for `id`, failed attempts included.
    pub fn start_count(&self, id: &str) -> u32 {
        self.state().starts.get(id).copied().unwrap_or(0)
    }

    /// What an `exec` of `command` (argv joined with spaces), in any
    /// container, gives from now on: `Some(code)`, or `None` for a command
    /// that never finishes — reported as a timeout at once, as if the
    /// timeout had passed.
    pub fn set_exec(&self, command: &str, result: Option<i32>) {
        self.state().exec_results.insert(command.to_owned(), result);
    }

    /// How many times `command` was run by `exec` in a running container.
    pub fn exec_count(&self, command: &str) -> u32 {
        self.state().execs.get(command).copied().unwrap_or(0)
    }
}

/// Signals whose default action does not end a process.
fn ignored_by_default(signal: i32) -> bool {
    matches!(
        signal,
        0 | libc::SIGCHLD | libc::SIGCONT | libc::SIGURG | libc::SIGWINCH
    )
}

impl Runtime for FakeRuntime {
    fn start(&self, config: &ContainerConfig) -> Result<(), RuntimeError> {
        let id = config.id.clone();
        let mut state = self.state();
        *state.starts.entry(id.clone()).or_default() += 1;
        if state.containers.contains_key(&id) {
            return Err(RuntimeError::Create {
                id,
                reason: "a container with this id already exists".into(),
            });
        }
        let exit = match config.args.as_slice() {
            [cmd] if cmd == "fake-fail" => {
                return Err(RuntimeError::Create {
                    id,
                    reason: "fake-fail: start refused as asked".into(),
                });
            }
            [cmd, code] if cmd == "fake-exit" => {
                let code = code.parse().map_err(|_| RuntimeError::Create {
                    id: id.clone(),
                    reason: format!("fake-exit: {code:?} is not an exit code"),
                })?;
                Some(Exit {
                    code,
                    signal: None,
                    oom_killed: false,
                })
            }
            _ => None,
        };
        state.containers.insert(id, watch::Sender::new(exit));
        Ok(())
    }

    async fn wait(&self, id: &str) -> Result<Exit, RuntimeError> {
        let mut rx = self
            .state()
            .containers
            .get(id)
            .map(watch::Sender::subscribe)
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_owned() })?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RuntimeError::NotFound { id: id.to_owned() })?;
        (*exit).ok_or_else(|| RuntimeError::NotFound { id: id.to_owned() })
    }

    fn kill(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        let state = self.state();
        let tx = state
            .containers
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_owned() })?;
        if !ignored_by_default(signal) {
            tx.send_if_modified(|exit| {
                if exit.is_some() {
                    return false;
                }
                *exit = Some(Exit {
                    code: 128 + signal,
                    signal: Some(signal),
                    oom_killed: false,
                });
                true
            });
        }
        Ok(())
    }

    fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(tx) = self.state().containers.remove(id) {
            // Waiters still see the container end, as SIGKILL would.
            tx.send_if_modified(|exit| {
                if exit.is_some() {
                    return false;
                }
                *exit = Some(Exit {
                    code: 128 + libc::SIGKILL,
                    signal: Some(libc::SIGKILL),
                    oom_killed: false,
                });
                true
            });
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<Existing>, RuntimeError> {
        let state = self.state();
        let mut out: Vec<Existing> = state
            .containers
            .iter()
            .map(|(id, exit)| Existing {
                id: id.clone(),
                running: exit.borrow().is_none(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        let mut state = self.state();
        let running = state
            .containers
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_owned() })?
            .borrow()
            .is_none();
        if !running {
            return Err(RuntimeError::Other {
                id: id.to_owned(),
                op: "exec",
                reason: "the container is not running".into(),
            });
        }
        let command = argv.join(" ");
        *state.execs.entry(command.clone()).or_default() += 1;
        match state.exec_results.get(&command).copied() {
            Some(Some(code)) => Ok(code),
            Some(None) => Err(RuntimeError::Timeout {
                id: id.to_owned(),
                op: "exec",
                after: timeout,
            }),
            None => Ok(127),
        }
    }

    fn exec_output(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
        max_output: usize,
    ) -> Result<ExecResult, RuntimeError> {
        let end = match self.exec(id, argv, timeout) {
            Ok(code) => ExecEnd::Exited(code),
            Err(RuntimeError::Timeout { .. }) => ExecEnd::TimedOut,
            Err(e) => return Err(e),
        };
        // The command line on stdout, as `echo` would print it.
        let mut stdout = format!("{}\n", argv.join(" ")).into_bytes();
        let stdout_cut = stdout.len().saturating_sub(max_output) as u64;
        stdout.truncate(max_output);
        let stderr = match end {
            ExecEnd::Exited(127) => {
                let command = argv.first().map_or("", String::as_str);
                format!("fake: {command}: not found\n").into_bytes()
            }
            _ => Vec::new(),
        };
        Ok(ExecResult {
            end,
            stdout,
            stderr,
            stdout_cut,
            stderr_cut: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use flotilla_proto::Resources;

    use super::*;

    fn config(id: &str, args: &[&str]) -> ContainerConfig {
        ContainerConfig {
            id: id.into(),
            image_rootfs: PathBuf::from("/nonexistent"),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "fake".into(),
            resources: Resources::default(),
            log_path: PathBuf::from("/nonexistent/log"),
            mounts: vec![],
            security: Default::default(),
        }
    }

    #[tokio::test]
    async fn fake_exit_ends_at_once_with_its_code() {
        let rt = FakeRuntime::new();
        rt.start(&config("a", &["fake-exit", "3"])).unwrap();
        let exit = rt.wait("a").await.unwrap();
        assert_eq!(
            exit,
            Exit {
                code: 3,
                signal: None,
                oom_killed: false
            }
        );
        assert!(rt.running_ids().is_empty());
        assert_eq!(rt.all_ids(), ["a"]);
        assert_eq!(
            rt.list().unwrap(),
            [Existing {
                id: "a".into(),
                running: false
            }]
        );
        // Waiting again gives the same exit.
        assert_eq!(rt.wait("a").await.unwrap(), exit);
    }

    #[tokio::test]
    async fn fake_fail_refuses_to_start_and_counts_attempts() {
        let rt = FakeRuntime::new();
        for _ in 0..2 {
            let err = rt.start(&config("f", &["fake-fail"])).unwrap_err();
            assert!(matches!(err, RuntimeError::Create { .. }), "{err}");
        }
        assert_eq!(rt.start_count("f"), 2);
        assert!(rt.all_ids().is_empty());
        assert!(matches!(
            rt.wait("f").await.unwrap_err(),
            RuntimeError::NotFound { .. }
        ));
    }

    #[tokio::test]
    async fn others_run_until_killed() {
        let rt = FakeRuntime::new();
        rt.start(&config("r", &["server", "--port", "80"])).unwrap();
        let clone = rt.clone();
        let waiter = tokio::spawn(async move { clone.wait("r").await });
        // The waiter really waits: on this single-threaded runtime it gets
        // to run at each yield, and stays pending while the container runs.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished());
        assert_eq!(rt.running_ids(), ["r"]);
        rt.kill("r", libc::SIGWINCH).unwrap();
        assert_eq!(rt.running_ids(), ["r"]);
        rt.kill("r", libc::SIGTERM).unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((exit.code, exit.signal), (143, Some(libc::SIGTERM)));
        // A later SIGKILL does not rewrite history.
        rt.kill("r", libc::SIGKILL).unwrap();
        assert_eq!(rt.wait("r").await.unwrap().code, 143);
        assert!(rt.start(&config("r", &["again"])).is_err());
        rt.delete("r").unwrap();
        rt.delete("r").unwrap();
        rt.start(&config("r", &["again"])).unwrap();
        assert_eq!(rt.start_count("r"), 3);
    }

    #[test]
    fn exec_gives_the_chosen_result_in_running_containers_only() {
        let rt = FakeRuntime::new();
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let t = Duration::from_secs(1);
        assert!(matches!(
            rt.exec("x", &argv(&["true"]), t),
            Err(RuntimeError::NotFound { .. })
        ));
        rt.start(&config("x", &["serve"])).unwrap();
        assert_eq!(rt.exec("x", &argv(&["true"]), t).unwrap(), 127);
        rt.set_exec("check it", Some(0));
        assert_eq!(rt.exec("x", &argv(&["check", "it"]), t).unwrap(), 0);
        rt.set_exec("check it", Some(3));
        assert_eq!(rt.exec("x", &argv(&["check", "it"]), t).unwrap(), 3);
        rt.set_exec("hang", None);
        let err = rt.exec("x", &argv(&["hang"]), t).unwrap_err();
        assert_eq!(err.to_string(), "container x: exec: no result after 1s");
        assert_eq!(rt.exec_count("check it"), 2);
        rt.kill("x", libc::SIGKILL).unwrap();
        assert!(rt.exec("x", &argv(&["check", "it"]), t).is_err());
        assert_eq!(rt.exec_count("check it"), 2);
    }

    #[tokio::test]
    async fn delete_ends_a_running_container_for_its_waiters() {
        let rt = FakeRuntime::new();
        rt.start(&config("d", &["sleep"])).unwrap();
        let clone = rt.clone();
        let waiter = tokio::spawn(async move { clone.wait("d").await });
        tokio::task::yield_now().await;
        rt.delete("d").unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((exit.code, exit.signal), (137, Some(libc::SIGKILL)));
        assert!(rt.all_ids().is_empty());
        assert!(matches!(
            rt.kill("d", libc::SIGTERM).unwrap_err(),
            RuntimeError::NotFound { .. }
        ));
    }
}
