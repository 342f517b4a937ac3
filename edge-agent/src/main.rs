//! `flotilla-agent`: parses flags, sets up logging, runs the agent until
//! SIGINT or SIGTERM, and alone decides the exit code.

use std::process::ExitCode;

use clap::Parser;
use flotilla_agent::config::{Args, Config};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
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
    match runtime.block_on(flotilla_agent::run(config, shutdown)) {
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
