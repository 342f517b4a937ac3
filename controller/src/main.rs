//! `flotilla`: the controller (`serve`, `up`) and its CLI (`apply`, `get`,
//! `describe`, `delete`, `logs`, `exec`). This file only parses arguments and picks the exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use flotilla_controller::auth;
use flotilla_controller::auth::tls::ApiTls;
use flotilla_controller::cli::{self, Client, ClientOptions, Kind, LogsOptions};
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
    /// List nodes, workloads, pods, secrets or namespaces.
    Get {
        /// nodes | workloads | pods | secrets | namespaces (ns)
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
    /// Show one node, workload, pod, secret or namespace in detail.
    Describe {
        /// node | workload | pod | secret | namespace
        kind: String,
        /// Its name (pods are named WORKLOAD@NODE).
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Delete a workload (its pods are removed from every node), a secret or
    /// a namespace.
    Delete {
        /// workload | secret | namespace
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
    /// Configuration for an external broker (`broker-config mosquitto`).
    BrokerConfig {
        #[command(subcommand)]
        command: BrokerConfigCommand,
    },
    /// Node administration (`node revoke NAME`).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Bearer tokens of the API, each with a role: viewer, operator, admin.
    ApiToken {
        #[command(subcommand)]
        command: ApiTokenCommand,
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
    /// Run a command in a container on its node (no input, no terminal),
    /// print its output and exit with its exit code.
    Exec {
        /// The pod (WORKLOAD@NODE).
        pod: String,
        /// The container (default: the pod's only one).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Kill the command after this long (at most 5m).
        #[arg(long, default_value = "30s", value_parser = parse_exec_timeout)]
        timeout: Duration,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
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
enum BrokerConfigCommand {
    /// Write mosquitto.conf, its ACL, revocation list and TLS files into a
    /// directory, only those that changed, then run --reload-cmd if any did
    /// (flotilla-mosquitto-config.timer runs it hourly).
    Mosquitto {
        /// The directory (the broker's key is made there once and kept).
        #[arg(long, env = "FLOTILLA_MOSQUITTO_DIR")]
        out: PathBuf,
        /// Address of the TLS listener, HOST:PORT.
        #[arg(
            long,
            env = "FLOTILLA_MOSQUITTO_LISTEN",
            default_value = "0.0.0.0:8883"
        )]
        listen: String,
        /// Names or addresses devices reach the broker by (repeatable; at least one).
        #[arg(
            long = "san",
            env = "FLOTILLA_MOSQUITTO_SANS",
            value_delimiter = ',',
            required = true
        )]
        sans: Vec<String>,
        /// Give the broker's key to this user (Mosquitto's, `mosquitto`):
        /// Mosquitto 2 reads it after dropping root.
        #[arg(long, env = "FLOTILLA_MOSQUITTO_KEY_OWNER")]
        key_owner: Option<String>,
        /// Run by `sh -c` when a file changed (`systemctl reload mosquitto`:
        /// SIGHUP re-reads the ACL, revocation list, certificate and key).
        #[arg(long, env = "FLOTILLA_MOSQUITTO_RELOAD")]
        reload_cmd: Option<String>,
        /// Run instead of --reload-cmd when the CA or mosquitto.conf changed,
        /// which SIGHUP does not re-read (`systemctl restart mosquitto`).
        #[arg(long, env = "FLOTILLA_MOSQUITTO_RESTART")]
        restart_cmd: Option<String>,
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

#[derive(Subcommand)]
enum ApiTokenCommand {
    /// Print a new API token (shown once).
    Create {
        /// viewer (reads), operator (also changes workloads, labels,
        /// rollouts; reads logs) or admin (also join tokens, node
        /// revocation, API tokens).
        #[arg(long)]
        role: String,
        /// Its name (default: ROLE-RANDOM).
        #[arg(long)]
        name: Option<String>,
        /// How long it works (`30m`, `24h`; default: until revoked).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List API tokens: names, roles, expiry (never the tokens).
    List {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Refuse an API token from now on.
    Revoke {
        /// Its name.
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Args, Clone)]
struct ServerArg {
    /// The controller's API.
    #[arg(long, env = "FLOTILLA_SERVER", default_value = flotilla_controller::client::DEFAULT_SERVER)]
    server: String,
    /// API token (default, for a server on this machine: the controller's
    /// admin.token in FLOTILLA_DATA_DIR, /var/lib/flotilla).
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the API token (for units and scripts: no token in
    /// the process list or the environment).
    #[arg(long, env = "FLOTILLA_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to check the API's certificate with (default,
    /// for a server on this machine: the controller's ca.pem; else the
    /// system's roots).
    #[arg(long, env = "FLOTILLA_CA")]
    ca: Option<PathBuf>,
}

impl ServerArg {
    fn client(&self) -> anyhow::Result<Client> {
        Client::new(&ClientOptions {
            server: self.server.clone(),
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            ca: self.ca.clone(),
        })
    }
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
    /// Use this external broker instead of the embedded one: mqtt://HOST[:PORT],
    /// or mqtts://HOST[:PORT] (the controller then presents a client
    /// certificate of the fleet CA, CN `flotilla:controller`).
    #[arg(long, env = "FLOTILLA_BROKER")]
    broker: Option<String>,
    /// The embedded broker's mTLS listener (devices with certificates connect
    /// here); with it, `join` gives devices certificates instead of passwords.
    #[arg(long, env = "FLOTILLA_MQTTS_LISTEN", conflicts_with = "broker")]
    mqtts_listen: Option<SocketAddr>,
    /// A name or address for the embedded broker's TLS certificate
    /// (repeatable; default: the --mqtts-listen address, or for 0.0.0.0 the
    /// host name, localhost and 127.0.0.1). The first is advertised.
    #[arg(long = "broker-san")]
    broker_sans: Vec<String>,
    /// The broker address devices are told at join, mqtts://HOST:PORT
    /// (default: the first --broker-san and the TLS port, or --broker).
    #[arg(long, env = "FLOTILLA_MQTT_ADVERTISE")]
    mqtt_advertise: Option<String>,
    /// How long device certificates are valid (`90d`, `2160h`); agents renew
    /// when a third is left.
    #[arg(long, env = "FLOTILLA_CERT_LIFETIME", default_value = "90d", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// How long after its certificate expired a device may still renew it
    /// with its key, e.g. after months switched off (`180d`; `0s`: never,
    /// such a device needs a new join token). Revoked devices never renew.
    #[arg(long, env = "FLOTILLA_RENEW_GRACE", default_value = "180d", value_parser = parse_duration_or_zero)]
    renew_grace: Duration,
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
    /// The API's certificate chain (PEM); default: one from the fleet CA.
    #[arg(
        long,
        env = "FLOTILLA_API_TLS_CERT",
        requires = "api_tls_key",
        conflicts_with = "api_plain"
    )]
    api_tls_cert: Option<PathBuf>,
    /// The API certificate's private key (PEM).
    #[arg(long, env = "FLOTILLA_API_TLS_KEY", requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
    /// Another name or address for the fleet CA's API certificate
    /// (repeatable; loopback, the host name and the listen addresses are in it).
    #[arg(long = "api-tls-san", conflicts_with_all = ["api_tls_cert", "api_plain"])]
    api_tls_sans: Vec<String>,
    /// Serve the API over plain HTTP: on a loopback address only (a TLS
    /// proxy in front, or a benchmark).
    #[arg(long, env = "FLOTILLA_API_PLAIN")]
    api_plain: bool,
}

/// Parses `500ms`, `30s`, `5m`, `1h`, or a bare number of seconds; not zero.
fn parse_duration(s: &str) -> Result<Duration, String> {
    match parse_duration_or_zero(s)? {
        d if d.is_zero() => Err(format!("duration {s:?}: must be longer than zero")),
        d => Ok(d),
    }
}

/// A duration where zero means "never" (`--renew-grace 0s`).
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: expected a number with ms, s, m, h or d"))?;
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        "d" => n.checked_mul(86_400).map(Duration::from_secs),
        _ => {
            return Err(format!(
                "duration {s:?}: unknown unit {unit:?}, expected ms, s, m, h or d"
            ));
        }
    };
    d.ok_or_else(|| format!("duration {s:?}: too long"))
}

impl ServeArgs {
    fn config(&self, data_dir: PathBuf) -> anyhow::Result<ServeConfig> {
        let broker = match &self.broker {
            Some(url) => {
                let (host, port, tls) = serve::parse_broker_url(url)?;
                BrokerChoice::External { host, port, tls }
            }
            None => BrokerChoice::Embedded {
                listen: self.mqtt_listen,
            },
        };
        let api_tls = match (&self.api_tls_cert, &self.api_tls_key) {
            _ if self.api_plain => ApiTls::Plain,
            (Some(cert), Some(key)) => ApiTls::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => ApiTls::FleetCa {
                extra_names: self.api_tls_sans.clone(),
            },
        };
        Ok(ServeConfig {
            data_dir,
            api_listen: self.api_listen,
            api_tls,
            mqtt_tls: serve::MqttTls {
                listen: self.mqtts_listen,
                sans: self.broker_sans.clone(),
                advertise: self.mqtt_advertise.clone(),
                cert_lifetime: self.cert_lifetime,
                renew_grace: self.renew_grace,
            },
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
        // `exec` ends with the command's exit code.
        Err(e) => match e.downcast::<cli::CommandExit>() {
            Ok(exit) => {
                if let Some(m) = exit.message {
                    eprintln!("error: {m}");
                }
                ExitCode::from(exit.code)
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `--timeout` of `exec`: whole seconds, 1 s to 5 min.
fn parse_exec_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 || d < Duration::from_secs(1) || d > Duration::from_secs(300) {
        return Err(format!("{s:?}: expected whole seconds from 1s to 5m"));
    }
    Ok(d)
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
        Command::Apply { files, server } => cli::apply(&server.client()?, &files),
        Command::Get {
            kind,
            name,
            selector,
            output,
            server,
        } => cli::get(
            &server.client()?,
            Kind::parse(&kind)?,
            name.as_deref(),
            selector.as_deref(),
            Format::parse(output.as_deref())?,
        ),
        Command::Rollout {
            command: RolloutCommand::History { workload, server },
        } => cli::rollout_history(&server.client()?, &workload),
        Command::Rollout {
            command:
                RolloutCommand::Status {
                    workload,
                    watch,
                    output,
                    server,
                },
        } => cli::rollout_status(
            &server.client()?,
            &workload,
            watch,
            Format::parse(output.as_deref())?,
        ),
        Command::Rollout {
            command: RolloutCommand::Pause { workload, server },
        } => cli::rollout_hold(&server.client()?, &workload, true),
        Command::Rollout {
            command: RolloutCommand::Resume { workload, server },
        } => cli::rollout_hold(&server.client()?, &workload, false),
        Command::Rollout {
            command:
                RolloutCommand::Undo {
                    workload,
                    to_revision,
                    server,
                },
        } => cli::rollout_undo(&server.client()?, &workload, to_revision),
        Command::Label {
            kind,
            name,
            changes,
            server,
        } => cli::label(&server.client()?, Kind::parse(&kind)?, &name, &changes),
        Command::Describe { kind, name, server } => {
            cli::describe(&server.client()?, Kind::parse(&kind)?, &name)
        }
        Command::Delete { kind, name, server } => {
            cli::delete(&server.client()?, Kind::parse(&kind)?, &name)
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    ttl,
                    uses,
                    labels,
                    server,
                },
        } => identity::cli::create_token(&server.client()?, ttl, uses, &labels),
        Command::BrokerConfig {
            command:
                BrokerConfigCommand::Mosquitto {
                    out,
                    listen,
                    sans,
                    key_owner,
                    reload_cmd,
                    restart_cmd,
                    server,
                },
        } => flotilla_controller::broker_config::write_mosquitto(
            &server.client()?,
            &flotilla_controller::broker_config::MosquittoOptions {
                dir: out,
                listen,
                sans,
                key_owner,
                reload_cmd,
                restart_cmd,
            },
        )
        .map(drop),
        Command::Node {
            command: NodeCommand::Revoke { name, server },
        } => identity::cli::revoke(&server.client()?, &name),
        Command::ApiToken { command } => match command {
            ApiTokenCommand::Create {
                role,
                name,
                ttl,
                server,
            } => auth::cli::create(&server.client()?, &role, name.as_deref(), ttl),
            ApiTokenCommand::List { server } => auth::cli::list(&server.client()?),
            ApiTokenCommand::Revoke { name, server } => auth::cli::revoke(&server.client()?, &name),
        },
        Command::Logs {
            pod,
            container,
            tail,
            follow,
            server,
        } => cli::logs(
            &server.client()?,
            &pod,
            &LogsOptions {
                container,
                tail,
                follow,
            },
        ),
        Command::Exec {
            pod,
            container,
            timeout,
            command,
            server,
        } => cli::exec(
            &server.client()?,
            &pod,
            &cli::ExecOptions {
                container,
                timeout,
                command,
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
