//! Rota: a durable job coordinator.
//!
//! One coordinator process keeps the job queue in an embedded sled database and
//! leases jobs over long-lived gRPC streams to worker processes on any number of
//! hosts. See `README.md` and `DESIGN.md` for the whole picture.
//!
//! - [`proto`]: the generated wire contract (`rota.v1`).
//! - [`coordinator`]: the coordinator library; `rota-coordinator` is a thin CLI over it.
//! - [`worker`]: the worker SDK and the command runner behind `rota-worker`.

pub mod coordinator;
pub mod worker;

/// Logs to stderr at `RUST_LOG`'s levels (`default` when it is unset), for
/// the binaries. A line that cannot be written (the reader of stderr is
/// gone) is dropped: tracing's fallback would `eprintln!` the failure, which
/// panics the task that logged (the one handling SIGTERM, say).
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .init();
}

/// Parsers for the durations and sizes that settings are written in, shared by
/// the coordinator's and the worker's configs.
pub mod units {
    use std::time::Duration;

    /// Parses a duration such as `500ms`, `2s`, `1m` or `1h 30m`.
    pub fn parse_duration(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration like 500ms, 2s or 1m ({e})"))
    }

    /// Parses a size such as `1048576`, `512KiB`, `1MiB`, `1MB` or `2GiB`.
    pub fn parse_size(s: &str) -> Result<u64, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 1048576, 512KiB or 1MiB"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "{s:?}: unknown size unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
                ))
            }
        };
        n.checked_mul(mult)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

/// The generated wire contract, package `rota.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("rota.v1");

    /// The encoded file-descriptor set served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rota_descriptor");
}
