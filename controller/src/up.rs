//! `flotilla up`: a whole cluster on one machine for a first try — the
//! controller with its embedded broker and store, and a local agent started
//! as a child process (the controller never links the agent's code).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::serve::{self, BrokerChoice, ServeConfig};

/// What `up` runs.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// The controller.
    pub serve: ServeConfig,
    /// The agent binary.
    pub agent_bin: PathBuf,
    /// The local node's name.
    pub node: String,
    /// The agent's data directory.
    pub agent_data_dir: PathBuf,
    /// Labels for the local node, `k=v`.
    pub labels: Vec<String>,
}

/// The agent binary next to this one, else `flotilla-agent` from `PATH`.
pub fn default_agent_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("flotilla-agent"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("flotilla-agent"))
}

/// This machine's hostname made into a valid node name, or `local`.
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let name = name.trim_matches('-').to_string();
    if flotilla_proto::check_name(&name).is_ok() {
        name
    } else {
        "local".into()
    }
}

/// Runs the controller and the local agent until `shutdown`; stops the agent
/// (SIGTERM) before returning. The agent's containers keep running, as they
/// would across any agent restart.
pub async fn run(config: UpConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let BrokerChoice::Embedded { listen } = config.serve.broker else {
        anyhow::bail!(
            "flotilla up runs the embedded broker; use flotilla serve for an external one"
        );
    };
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        listen.ip().to_string()
    };
    let broker_url = format!("mqtt://{host}:{}", listen.port());

    // The key is made before the agent starts, so the agent can pin it. The
    // local agent connects without credentials: `up` is the one-machine
    // quick start, its broker on the loopback.
    let data_dir = config.serve.data_dir.clone();
    let key_file = data_dir.join(crate::identity::signing::PUBLIC_FILE);
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&data_dir)?;
        crate::identity::SigningKey::load_or_create(&data_dir)?;
        anyhow::Ok(())
    })
    .await??;
    let mut serve_config = config.serve.clone();
    serve_config.allow_anonymous = true;

    let stop = shutdown.child_token();
    let mut controller = tokio::spawn(serve::run(serve_config, stop.clone()));

    let mut cmd = tokio::process::Command::new(&config.agent_bin);
    cmd.arg("--broker")
        .arg(&broker_url)
        .arg("--node")
        .arg(&config.node)
        .arg("--data-dir")
        .arg(&config.agent_data_dir)
        .arg("--topic-prefix")
        .arg(config.serve.topics.prefix())
        .arg("--controller-key")
        .arg(&key_file);
    for label in &config.labels {
        cmd.arg("--label").arg(label);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let mut agent = cmd.spawn().with_context(|| {
        format!(
            "starting the agent {} (build it with cargo build)",
            config.agent_bin.display()
        )
    })?;
    tracing::info!(node = %config.node, broker = %broker_url, "local agent started");

    let result = tokio::select! {
        () = stop.cancelled() => Ok(()),
        status = agent.wait() => {
            let status = status.context("waiting for the agent")?;
            Err(anyhow::anyhow!("the local agent exited: {status}"))
        }
        r = &mut controller => {
            return r.context("controller task")?.context("controller");
        }
    };

    if let Some(pid) = agent.id() {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
    }
    let _ = agent.kill().await;
    stop.cancel();
    controller
        .await
        .context("controller task")?
        .context("controller")?;
    result
}
