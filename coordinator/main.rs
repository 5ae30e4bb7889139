//! `rota-coordinator`: the command line over [`rota::coordinator`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use rota::coordinator::config::Settings;
use rota::coordinator::Coordinator;
use tokio::signal::unix::{signal, SignalKind};

/// Rota's coordinator: a durable job queue leased to workers over gRPC.
///
/// Each option can also be set with its ROTA_* environment variable or in the
/// TOML file given with --config (keys in snake_case); a flag wins over the
/// environment, which wins over the file.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// TOML config file.
    #[arg(long, env = "ROTA_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "ROTA_LISTEN")]
    listen: Option<String>,
    /// Directory of the embedded database [default: ./rota-data].
    #[arg(long, env = "ROTA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A worker silent this long is lost and its jobs are retried [default: 30s].
    #[arg(long, env = "ROTA_LEASE_TIMEOUT")]
    lease_timeout: Option<String>,
    /// How often workers heartbeat [default: 5s].
    #[arg(long, env = "ROTA_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
    /// Largest job payload [default: 1MiB].
    #[arg(long, env = "ROTA_MAX_PAYLOAD")]
    max_payload: Option<String>,
    /// shutdown_grace of jobs that do not set one [default: 30s].
    #[arg(long, env = "ROTA_DEFAULT_SHUTDOWN_GRACE")]
    default_shutdown_grace: Option<String>,
    /// Size of the database's page cache [default: 256MiB].
    #[arg(long, env = "ROTA_CACHE_SIZE")]
    cache_size: Option<String>,
    /// New work (submits, retries, new schedules, triggers) is refused with
    /// RESOURCE_EXHAUSTED unless this much stays free on the data directory's
    /// disk beyond the room kept to finish the accepted jobs, which always
    /// complete. 0 turns the check off [default: 256MiB].
    #[arg(long, env = "ROTA_MIN_FREE_DISK")]
    min_free_disk: Option<String>,
}

/// mimalloc: faster than the system allocator for the many small, short-lived
/// allocations of message handling (and it speeds sled up).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let from_cli = Settings {
        listen: cli.listen,
        data_dir: cli.data_dir,
        lease_timeout: cli.lease_timeout,
        heartbeat_interval: cli.heartbeat_interval,
        max_payload: cli.max_payload,
        default_shutdown_grace: cli.default_shutdown_grace,
        cache_size: cli.cache_size,
        min_free_disk: cli.min_free_disk,
        schedules: None,
    };
    let from_file = match &cli.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let config = from_cli.merge(from_file).resolve()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let coordinator = Coordinator::open(config).await?;
    // Installed before the address is printed: a signal sent as soon as it is
    // serving stops it cleanly.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    println!("listening on {addr}");
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    coordinator.serve(listener, shutdown).await?;
    Ok(())
}
