//! `rota-worker`: runs each job kind as a command from its config file.
//!
//! A thin CLI over [`rota::worker`]: parse flags, init tracing, load the config,
//! map SIGTERM/SIGINT to drain (first: each task gets its notice) and stop now
//! (second), run; exit 0 after a clean drain, whoever started it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use rota::worker::{ShutdownHandle, WorkerConfig};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

/// Run Rota jobs as commands.
#[derive(Debug, Parser)]
#[command(name = "rota-worker", version, about)]
struct Cli {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "ROTA_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// The worker config file (TOML).
    #[arg(long, env = "ROTA_WORKER_CONFIG")]
    config: PathBuf,
}

/// The bearer token, from the environment (never a flag: flags show in `ps`).
const TOKEN_ENV: &str = "ROTA_TOKEN";

/// mimalloc: faster than the system allocator for the many small, short-lived
/// allocations of message handling (and it speeds sled up).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    rota::init_logging("info");
    let cli = Cli::parse();
    let config = WorkerConfig::load(&cli.config)
        .with_context(|| format!("loading config {}", cli.config.display()))?;
    let mut builder = config.worker_builder(&cli.coordinator)?;
    if let Some(token) = std::env::var_os(TOKEN_ENV) {
        let token = token
            .into_string()
            .map_err(|_| anyhow::anyhow!("{TOKEN_ENV} is not valid UTF-8"))?;
        builder = builder.token(token);
    }
    let worker = builder.build().context("building the worker")?;
    info!(worker = %worker.worker_id(), coordinator = %cli.coordinator, "rota-worker starting");

    let shutdown = ShutdownHandle::new();
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let signals = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! { _ = sigterm.recv() => {}, _ = sigint.recv() => {} }
        info!("signal received, draining (signal again to stop now)");
        signals.drain();
        tokio::select! { _ = sigterm.recv() => {}, _ = sigint.recv() => {} }
        warn!("second signal received, stopping now");
        signals.stop_now();
    });

    // Returns once drained, whether the drain began with a signal here or
    // with the coordinator's Shutdown (DrainWorker): a clean drain exits 0,
    // so a process supervisor simply starts the worker again.
    let summary = worker.run_with(shutdown).await;
    if summary.is_clean() {
        info!("drained, exiting");
        Ok(ExitCode::SUCCESS)
    } else {
        warn!(
            stopped_now = summary.stopped_now,
            unacknowledged = summary.unacknowledged,
            abandoned = summary.abandoned,
            "worker did not drain cleanly"
        );
        Ok(ExitCode::FAILURE)
    }
}
