//! `flotilla-agent`: parses flags, sets up logging, runs the agent until
//! SIGINT or SIGTERM, and alone decides the exit code. `flotilla-agent image
//! import|pull` work on the image store without running the agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use flotilla_agent::config::{Args, Config};
use flotilla_agent::image::{ImageStore, Images, PullObserver, PullProgress, PullSettings};
use tokio_util::sync::CancellationToken;

/// How long an idle blocking thread waits for work before it exits.
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// How long a stopping agent waits for blocking threads once its tasks
/// have ended.
const BLOCKING_AT_EXIT: Duration = Duration::from_secs(2);

/// `flotilla-agent image …`.
#[derive(Debug, Parser)]
#[command(
    name = "flotilla-agent image",
    about = "Work on the agent's image store"
)]
struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ImageCommand {
    /// Load a `docker save` or OCI archive, for sites with no registry.
    Import {
        /// The archive.
        file: PathBuf,
        /// Name the image (a registry reference) when the archive holds one.
        #[arg(long)]
        name: Option<String>,
        /// The agent's data directory.
        #[arg(long, env = "FLOTILLA_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Pull an image into the store, as the agent would.
    Pull {
        /// A registry reference, or oci:/oci-archive:.
        reference: String,
        /// The agent's data directory.
        #[arg(long, env = "FLOTILLA_DATA_DIR")]
        data_dir: PathBuf,
        /// Registry settings (TOML), as for the agent.
        #[arg(long, env = "FLOTILLA_REGISTRIES")]
        registries: Option<PathBuf>,
    },
}

/// `flotilla-agent join`: enroll this device with a join token.
#[derive(Debug, Parser)]
#[command(
    name = "flotilla-agent join",
    about = "Enroll this device with a join token"
)]
struct JoinArgs {
    /// The controller's API, `https://HOST:PORT`.
    #[arg(long, env = "FLOTILLA_SERVER")]
    server: String,
    /// The CA (PEM) to check the controller's certificate with (default:
    /// the CA fingerprint in the token, else the system's roots).
    #[arg(long, env = "FLOTILLA_CA")]
    ca: Option<PathBuf>,
    /// The token from `flotilla token create`.
    #[arg(long, env = "FLOTILLA_TOKEN")]
    token: String,
    /// This node's name.
    #[arg(long, env = "FLOTILLA_NODE")]
    node: String,
    /// The agent's data directory (the credential goes to `identity/` in it).
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: PathBuf,
}

fn main() -> ExitCode {
    // The runtime's single-threaded helper: nothing else may start first.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == flotilla_agent::runtime::youki::helper::ARG)
    {
        return flotilla_agent::runtime::youki::helper::main(std::env::args_os().skip(2).collect());
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "join") {
        let args = JoinArgs::parse_from(std::env::args_os().skip(1));
        return match flotilla_agent::enroll::join(
            &args.server,
            &args.token,
            &args.node,
            &args.data_dir,
            args.ca.as_deref(),
        ) {
            Ok(()) => {
                println!("joined as {}", args.node);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flotilla-agent: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "image") {
        let args = ImageArgs::parse_from(std::env::args_os().skip(1));
        init_logging();
        return image_command(args.command);
    }
    let args = Args::parse();
    init_logging();
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flotilla-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Blocking threads (creates, fsyncs, pulls, log rotation) keep the
        // stack pages they touched (~120 KiB each after a create) while they
        // idle: a burst of pod starts left eight of them for tokio's default
        // 10 s. Spawning one again costs tens of microseconds.
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla-agent: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    runtime.spawn(cancel_on_signal(shutdown.clone()));
    let outcome = runtime.block_on(flotilla_agent::run(config, shutdown));
    // Every task has ended; a blocking thread may still wait on a command
    // run in a container (an exec or an exec probe, up to its own timeout).
    // Dropping the runtime would wait for it; the command stays with its
    // container either way.
    runtime.shutdown_timeout(BLOCKING_AT_EXIT);
    match outcome {
        Ok(()) => {
            tracing::info!("stopped; containers keep running");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn image_command(command: ImageCommand) -> ExitCode {
    let result = match command {
        ImageCommand::Import {
            file,
            name,
            data_dir,
        } => ImageStore::new(data_dir.join("images"))
            .and_then(|store| store.import(&file, name.as_deref()))
            .map(|report| {
                for (name, digest) in &report.images {
                    println!("{name} {digest}");
                }
                if report.unnamed > 0 {
                    eprintln!(
                        "flotilla-agent: {} image(s) without a name were stored but cannot be used; give --name",
                        report.unnamed
                    );
                }
            })
            .map_err(|e| e.to_string()),
        ImageCommand::Pull {
            reference,
            data_dir,
            registries,
        } => {
            let settings = match registries.map(|p| PullSettings::load(&p)).transpose() {
                Ok(s) => s.unwrap_or_default(),
                Err(e) => {
                    eprintln!("flotilla-agent: registries file {e}");
                    return ExitCode::from(2);
                }
            };
            ImageStore::with_settings(data_dir.join("images"), settings)
                .and_then(|store| store.pull(&reference, &Stderr))
                .map(|image| println!("{} {}", image.digest, image.rootfs.display()))
                .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Shows pull progress on stderr.
struct Stderr;

impl PullObserver for Stderr {
    fn progress(&self, p: PullProgress) {
        eprintln!("pulled {} of {} bytes", p.done_bytes, p.total_bytes);
    }
}

/// Filter from `FLOTILLA_LOG` (`debug`, `info,flotilla_agent=debug`), default `info`.
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let default = || Targets::new().with_default(tracing::Level::INFO);
    let (filter, bad) = match std::env::var("FLOTILLA_LOG") {
        Ok(v) => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(_) => (default(), Some(v)),
        },
        Err(_) => (default(), None),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
    if let Some(v) = bad {
        tracing::warn!("FLOTILLA_LOG={v:?}: expected a level or target=level list; using info");
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                r = tokio::signal::ctrl_c() => {
                    if let Err(e) = r {
                        tracing::warn!("cannot watch SIGINT ({e}); only SIGTERM stops the agent");
                        term.recv().await;
                    }
                }
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); only SIGINT stops the agent");
            if let Err(e) = tokio::signal::ctrl_c().await {
                // Nothing can stop the agent but a kill: keep running.
                tracing::error!("cannot watch SIGINT either ({e})");
                std::future::pending::<()>().await;
            }
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
