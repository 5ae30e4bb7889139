//! `rota-bench`: Rota's benchmark harness. Each subcommand starts a real
//! coordinator on a fresh data directory and real worker processes, drives
//! them over loopback, and prints one `name: value unit` line per figure on
//! stdout (nothing else). Build with `cargo build --release`.

mod harness;
mod retention;
mod workloads;

use anyhow::Result;
use clap::{Parser, Subcommand};
use harness::WorkerRuntime;

/// Rota's benchmarks.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Durable submit throughput: SubmitJob with 64 in flight, SubmitJobs of 100 and 1,000.
    Submit {
        /// Jobs per figure.
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
    },
    /// No-op jobs from first submit to last completion, 4 workers x 16 slots (SDK, then the command runner with `true`).
    E2e {
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        /// Skip the command-runner run.
        #[arg(long)]
        sdk_only: bool,
        /// The SDK workers' tokio runtime (`multi-thread` prints `e2e_sdk_multi_thread`).
        #[arg(long, value_enum, default_value_t)]
        worker_runtime: WorkerRuntime,
    },
    /// Open-loop loads of 200 and 2,000 jobs/s: submit->start and submit->complete percentiles.
    Latency {
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Dispatch rate with 1,000 and 1,000,000 jobs queued; RSS, data size and restart time at 1,000,000.
    Depth {
        #[arg(long, default_value_t = 1_000_000)]
        deep: usize,
    },
    /// 10,000 interval schedules every second: fire lateness; PreviewSchedule of 1,000 cron times.
    Schedules {
        #[arg(long, default_value_t = 10_000)]
        schedules: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Rota's e2e, then the huey and celery peers (bench/peers/run.sh), and the ratios.
    Compare {
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
    },
    /// Data-dir size with N finished jobs kept, then deleted by retention; the sweep's rate and e2e beside it.
    Retention {
        #[arg(long, default_value_t = 1_000_000)]
        jobs: usize,
        /// Retention while the first N run (`forever`: no deletion index, for comparing memory).
        #[arg(long, default_value = "1h")]
        kept: String,
        /// Stop after the first N ran (their size and memory).
        #[arg(long)]
        kept_only: bool,
    },
    /// (internal) A no-op SDK worker process.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        coordinator: String,
        #[arg(long)]
        slots: u32,
        #[arg(long)]
        id: String,
        #[arg(long, value_enum, default_value_t)]
        runtime: WorkerRuntime,
    },
}

/// Prints one figure.
pub fn figure(name: &str, value: f64, unit: &str) {
    if value >= 100.0 {
        println!("{name}: {value:.0} {unit}");
    } else {
        println!("{name}: {value:.3} {unit}");
    }
}

/// mimalloc: faster than the system allocator for the many small, short-lived
/// allocations of message handling (and it speeds sled up).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = match cli.command {
        Cmd::Worker {
            runtime: WorkerRuntime::CurrentThread,
            ..
        } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Cmd) -> Result<()> {
    rota::init_logging("warn");
    match command {
        Cmd::Submit { jobs } => workloads::submit(jobs).await,
        Cmd::E2e {
            jobs,
            sdk_only,
            worker_runtime,
        } => workloads::e2e(jobs, sdk_only, worker_runtime)
            .await
            .map(|_| ()),
        Cmd::Latency { seconds } => workloads::latency(seconds).await,
        Cmd::Depth { deep } => workloads::depth(deep).await,
        Cmd::Schedules { schedules, seconds } => workloads::schedules(schedules, seconds).await,
        Cmd::Compare { jobs } => workloads::compare(jobs).await,
        Cmd::Retention {
            jobs,
            kept,
            kept_only,
        } => retention::retention(jobs, &kept, kept_only).await,
        Cmd::Worker {
            coordinator,
            slots,
            id,
            runtime: _,
        } => workloads::noop_worker(coordinator, slots, id).await,
    }
}
