//! `flotilla`: the controller (`serve`, `up`) and its CLI (`apply`, `get`,
//! `describe`, `delete`, `logs`). This file only parses arguments and picks the exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use flotilla_controller::cli::{self, Client, Kind, LogsOptions};
use flotilla_controller::identity;
use flotilla_controller::output::Format;
use flotilla_controller::serve::{self, BrokerChoice, ServeConfig};
use flotilla_controller::up::{self, UpConfig};
use flotilla_proto::Topics;
use tokio_util::sync::CancellationToken;

/// Flotilla: containers on a fleet of edge devices.
#[derive(Parser)]
#[command(name = "flotilla", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: HTTP API, store, control loop and (by default) an embedded MQTT broker.
    Serve(ServeArgs),
    /// Run a one-machine cluster: the controller plus a local agent.
    Up {
        #[command(flatten)]
        serve: ServeArgs,
        /// Name of the local node (default: this machine's hostname).
        #[arg(long)]
        node: Option<String>,
        /// Labels of the local node, `key=value`.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// The agent binary (default: flotilla-agent next to this binary, else from PATH).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
    },
    /// Create or update workloads from manifest files (`-` reads standard input).
    Apply {
        /// Manifest files (YAML or JSON, several documents each).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List nodes, workloads or pods.
    Get {
        /// nodes | workloads | pods
        kind: String,
        /// Only this one.
        name: Option<String>,
        /// Only nodes with all these labels, `key=value[,key2=value2]`.
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
        /// Output format: wide, json or yaml.
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Show one node, workload or pod in detail.
    Describe {
        /// node | workload | pod
        kind: String,
        /// Its name (pods are named WORKLOAD@NODE).
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Delete a workload (its pods are removed from every node).
    Delete {
        /// workload
        kind: String,
        /// Its name.
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// A workload's revisions: `rollout history`, `rollout undo`.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Set (`key=value`) or remove (`key-`) labels of a node at the controller.
    Label {
        /// node
        kind: String,
        /// The node's name.
        name: String,
        /// `key=value` to set, `key-` to remove.
        #[arg(required = true)]
        changes: Vec<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Join tokens for enrolling devices (`token create`).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Node administration (`node revoke NAME`).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Print a container's log, fetched from its node.
    Logs {
        /// The pod (WORKLOAD@NODE).
        pod: String,
        /// The container (default: the pod's only one).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Start this many lines before the end (default: all that is kept).
        #[arg(long)]
        tail: Option<u32>,
        /// Keep printing new output.
        #[arg(short = 'f', long)]
        follow: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// List a workload's revisions (the current one marked `*`).
    History {
        /// The workload.
        workload: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Show a rollout's progress; `--watch` follows it to the end.
    Status {
        /// The workload.
        workload: String,
        /// Keep printing progress until the rollout ends (fails if it was rolled back).
        #[arg(short = 'w', long)]
        watch: bool,
        /// Output format: json or yaml (default: a progress bar).
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Hold a rollout: no more nodes switch until `resume`.
    Pause {
        /// The workload.
        workload: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Let a paused rollout go on.
    Resume {
        /// The workload.
        workload: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Run the pods of an earlier revision again, as a new revision.
    Undo {
        /// The workload.
        workload: String,
        /// The revision to go back to (default: the one before the current).
        #[arg(long)]
        to_revision: Option<u64>,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new join token for `flotilla-agent join`.
    Create {
        /// How long it can be used (`30m`, `24h`).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many devices can join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Labels given to the nodes that join with it, `key=value`.
        #[arg(long = "labels", value_delimiter = ',')]
        labels: Vec<String>,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Refuse the node's credential from now on.
    Revoke {
        /// The node.
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Args, Clone)]
struct ServerArg {
    /// The controller's API.
    #[arg(long, env = "FLOTILLA_SERVER", default_value = "http://127.0.0.1:7470")]
    server: String,
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Where the store (and, for `up`, the local agent's state) lives.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "/var/lib/flotilla")]
    data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, env = "FLOTILLA_API_LISTEN", default_value = "127.0.0.1:7470")]
    api_listen: SocketAddr,
    /// Address of the embedded MQTT broker (devices connect here).
    #[arg(
        long,
        env = "FLOTILLA_MQTT_LISTEN",
        default_value = "127.0.0.1:1883",
        conflicts_with = "broker"
    )]
    mqtt_listen: SocketAddr,
    /// Use this external broker instead of the embedded one: mqtt://HOST[:PORT].
    #[arg(long, env = "FLOTILLA_BROKER")]
    broker: Option<String>,
    /// MQTT topic root.
    #[arg(long, env = "FLOTILLA_TOPIC_PREFIX", default_value = flotilla_proto::DEFAULT_PREFIX)]
    topic_prefix: String,
    /// A node not heard from for this long is NotReady even without its last
    /// will (`90s`, `75m`, `2h`); keep it above the agents' --resync (30m).
    #[arg(long, env = "FLOTILLA_NODE_TIMEOUT", default_value = "75m", value_parser = parse_duration)]
    node_timeout: Duration,
    /// Let clients without credentials use the embedded broker, with every
    /// right (enrolled devices are still held to their own topics).
    #[arg(long, env = "FLOTILLA_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
}

/// Parses `500ms`, `30s`, `5m`, `1h`, or a bare number of seconds; not zero.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: expected a number with ms, s, m or h"))?;
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => {
            return Err(format!(
                "duration {s:?}: unknown unit {unit:?}, expected ms, s, m or h"
            ));
        }
    };
    match d {
        Some(d) if !d.is_zero() => Ok(d),
        Some(_) => Err(format!("duration {s:?}: must be longer than zero")),
        None => Err(format!("duration {s:?}: too long")),
    }
}

impl ServeArgs {
    fn config(&self, data_dir: PathBuf) -> anyhow::Result<ServeConfig> {
        let broker = match &self.broker {
            Some(url) => {
                let (host, port) = serve::parse_broker_url(url)?;
                BrokerChoice::External { host, port }
            }
            None => BrokerChoice::Embedded {
                listen: self.mqtt_listen,
            },
        };
        Ok(ServeConfig {
            data_dir,
            api_listen: self.api_listen,
            broker,
            topics: Topics::new(&self.topic_prefix),
            node_timeout: self.node_timeout,
            allow_anonymous: self.allow_anonymous,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            init_tracing();
            let config = args.config(args.data_dir.clone())?;
            server_runtime()?.block_on(async {
                let shutdown = shutdown_on_signal();
                serve::run(config, shutdown).await
            })
        }
        Command::Up {
            serve,
            node,
            labels,
            agent_bin,
        } => {
            init_tracing();
            let node = node.unwrap_or_else(up::default_node_name);
            if let Err(e) = flotilla_proto::check_name(&node) {
                anyhow::bail!("--node {node:?}: {e}");
            }
            let config = UpConfig {
                serve: serve.config(serve.data_dir.join("controller"))?,
                agent_bin: agent_bin.unwrap_or_else(up::default_agent_bin),
                agent_data_dir: serve.data_dir.join("agent"),
                node,
                labels,
            };
            server_runtime()?.block_on(async {
                let shutdown = shutdown_on_signal();
                up::run(config, shutdown).await
            })
        }
        Command::Apply { files, server } => cli::apply(&Client::new(&server.server), &files),
        Command::Get {
            kind,
            name,
            selector,
            output,
            server,
        } => cli::get(
            &Client::new(&server.server),
            Kind::parse(&kind)?,
            name.as_deref(),
            selector.as_deref(),
            Format::parse(output.as_deref())?,
        ),
        Command::Rollout {
            command: RolloutCommand::History { workload, server },
        } => cli::rollout_history(&Client::new(&server.server), &workload),
        Command::Rollout {
            command:
                RolloutCommand::Status {
                    workload,
                    watch,
                    output,
                    server,
                },
        } => cli::rollout_status(
            &Client::new(&server.server),
            &workload,
            watch,
            Format::parse(output.as_deref())?,
        ),
        Command::Rollout {
            command: RolloutCommand::Pause { workload, server },
        } => cli::rollout_hold(&Client::new(&server.server), &workload, true),
        Command::Rollout {
            command: RolloutCommand::Resume { workload, server },
        } => cli::rollout_hold(&Client::new(&server.server), &workload, false),
        Command::Rollout {
            command:
                RolloutCommand::Undo {
                    workload,
                    to_revision,
                    server,
                },
        } => cli::rollout_undo(&Client::new(&server.server), &workload, to_revision),
        Command::Label {
            kind,
            name,
            changes,
            server,
        } => cli::label(
            &Client::new(&server.server),
            Kind::parse(&kind)?,
            &name,
            &changes,
        ),
        Command::Describe { kind, name, server } => {
            cli::describe(&Client::new(&server.server), Kind::parse(&kind)?, &name)
        }
        Command::Delete { kind, name, server } => {
            cli::delete(&Client::new(&server.server), Kind::parse(&kind)?, &name)
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    ttl,
                    uses,
                    labels,
                    server,
                },
        } => identity::cli::create_token(&server.server, ttl, uses, &labels),
        Command::Node {
            command: NodeCommand::Revoke { name, server },
        } => identity::cli::revoke(&server.server, &name),
        Command::Logs {
            pod,
            container,
            tail,
            follow,
            server,
        } => cli::logs(
            &Client::new(&server.server),
            &pod,
            &LogsOptions {
                container,
                tail,
                follow,
            },
        ),
    }
}

fn server_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A token cancelled on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot listen for SIGTERM: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

fn init_tracing() {
    let filter = std::env::var("FLOTILLA_LOG")
        .ok()
        .and_then(|s| s.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing::Level::INFO)
                .with_target("rmqtt", tracing::Level::WARN)
        });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
}
