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
    /// Largest job payload, and largest result a worker may report [default: 1MiB].
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
    /// How long finished jobs (SUCCEEDED, FAILED, CANCELLED, EXPIRED) are kept
    /// after they end before they are deleted, with their idempotency keys: a
    /// duration of at least 1s, or `forever` [default: 7d].
    #[arg(long, env = "ROTA_RETENTION")]
    retention: Option<String>,
    /// Retention of SUCCEEDED jobs [default: --retention].
    #[arg(long, env = "ROTA_RETENTION_SUCCEEDED")]
    retention_succeeded: Option<String>,
    /// Retention of FAILED jobs [default: --retention].
    #[arg(long, env = "ROTA_RETENTION_FAILED")]
    retention_failed: Option<String>,
    /// Retention of CANCELLED jobs [default: --retention].
    #[arg(long, env = "ROTA_RETENTION_CANCELLED")]
    retention_cancelled: Option<String>,
    /// Retention of EXPIRED jobs [default: --retention].
    #[arg(long, env = "ROTA_RETENTION_EXPIRED")]
    retention_expired: Option<String>,
    /// Bearer tokens as `role:sha256` entries (roles: client, worker, admin;
    /// the SHA-256 of each token in hex, e.g. `printf %s TOKEN | sha256sum`),
    /// separated by commas. Replaces the config file's `[[tokens]]`. With none
    /// configured, nothing is authenticated.
    #[arg(long, env = "ROTA_TOKENS", hide_env_values = true)]
    tokens: Option<String>,
    /// Serve without tokens on a non-loopback address (anyone who can reach
    /// it can submit, run and drain jobs).
    #[arg(long, env = "ROTA_INSECURE")]
    insecure: bool,
    /// PEM certificate chain to serve TLS with (needs --tls-key).
    #[arg(long, env = "ROTA_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ROTA_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA: require clients (workers) to present a certificate it signed (mTLS).
    #[arg(long, env = "ROTA_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Largest gRPC message either way; at least twice --max-payload plus 10MiB
    /// [default: 16MiB, or that minimum if larger].
    #[arg(long, env = "ROTA_MAX_MESSAGE_SIZE")]
    max_message_size: Option<String>,
    /// Most concurrent calls (HTTP/2 streams) on one connection [default: 1024].
    #[arg(long, env = "ROTA_MAX_CONCURRENT_STREAMS")]
    max_concurrent_streams: Option<u32>,
    /// Most workers with a session open at once; the next worker gets RESOURCE_EXHAUSTED (a
    /// worker's new session takes its old one's place) [default: 10000].
    #[arg(long, env = "ROTA_MAX_WORKERS")]
    max_workers: Option<usize>,
    /// Heartbeats and drain messages a worker session may send per heartbeat
    /// interval on average (a worker sends one); a session that sends more is
    /// ended [default: 10].
    #[arg(long, env = "ROTA_WORKER_FLOOD_RATE")]
    worker_flood_rate: Option<u32>,
    /// How many of those a session may send at once before the rate applies [default: 100].
    #[arg(long, env = "ROTA_WORKER_FLOOD_BURST")]
    worker_flood_burst: Option<u32>,
    /// Messages the protocol does not allow (completions of leases the worker
    /// does not hold, a second hello, empty messages) a session may send in a
    /// burst, on top of its slots, before it is ended; one more each second
    /// after that [default: 100].
    #[arg(long, env = "ROTA_WORKER_BAD_MESSAGES")]
    worker_bad_messages: Option<u32>,
}

/// mimalloc: faster than the system allocator for the many small, short-lived
/// allocations of message handling (and it speeds sled up).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rota::init_logging("info");
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
        retention: cli.retention,
        retention_succeeded: cli.retention_succeeded,
        retention_failed: cli.retention_failed,
        retention_cancelled: cli.retention_cancelled,
        retention_expired: cli.retention_expired,
        tokens: None,
        token_list: cli.tokens,
        insecure: cli.insecure.then_some(true),
        tls_cert: cli.tls_cert,
        tls_key: cli.tls_key,
        tls_client_ca: cli.tls_client_ca,
        max_message_size: cli.max_message_size,
        max_concurrent_streams: cli.max_concurrent_streams,
        max_workers: cli.max_workers,
        worker_flood_rate: cli.worker_flood_rate,
        worker_flood_burst: cli.worker_flood_burst,
        worker_bad_messages: cli.worker_bad_messages,
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
    if config.tokens.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "--insecure: serving without authentication on a non-loopback address");
    }
    let coordinator = Coordinator::open(config).await?;
    // Installed before the address is printed: a signal sent as soon as it is
    // serving stops it cleanly.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Not println!, which panics when stdout's reader is gone.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}").and_then(|()| out.flush());
    }
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    coordinator.serve(listener, shutdown).await?;
    Ok(())
}
