//! `rota-bench retention`: the data directory with a million finished jobs
//! kept and after retention deleted them, how fast a backlog of deletions
//! goes, and what it costs the work going on beside it.

use std::time::{Duration, Instant};

use anyhow::Result;
use rota::proto::admin_service_client::AdminServiceClient;
use rota::proto::SubmitJobRequest;
use tonic::transport::Channel;

use crate::figure;
use crate::harness::{
    channel, dir_size, jobs as job_client, Coordinator, Scratch, WorkerRuntime, Workers,
};
use crate::workloads::{noop, quantile, run_e2e, stats, submit_batched, SLOTS, WORKERS};

/// Jobs of the e2e runs measured beside the sweep.
const SIDE_JOBS: usize = 100_000;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// The size of sled's log file (`db`), which holds every record.
fn db_file(dir: &std::path::Path) -> u64 {
    std::fs::metadata(dir.join("db"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Polls until no job is SCHEDULED, QUEUED or RUNNING.
async fn wait_all_finished(admin: &mut AdminServiceClient<Channel>) -> Result<Instant> {
    loop {
        let s = stats(admin).await?;
        if s.scheduled + s.queued + s.running == 0 {
            return Ok(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls until no SUCCEEDED job is left (each was deleted).
async fn wait_all_deleted(admin: &mut AdminServiceClient<Channel>) -> Result<Instant> {
    loop {
        if stats(admin).await?.succeeded == 0 {
            return Ok(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `SubmitJob` round trips (each durable) at 200/s for 5 s: p50 and p99, in ms.
async fn submit_latency(url: &str) -> Result<(f64, f64)> {
    let client = job_client(url).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        tick.tick().await;
        let mut c = client.clone();
        tasks.spawn(async move {
            let t = Instant::now();
            c.submit_job(SubmitJobRequest { job: Some(noop()) }).await?;
            Ok::<_, tonic::Status>(t.elapsed().as_secs_f64() * 1e3)
        });
    }
    let mut ms = Vec::new();
    while let Some(r) = tasks.join_next().await {
        ms.push(r??);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok((quantile(&ms, 0.5), quantile(&ms, 0.99)))
}

/// Runs `n` no-op jobs to the end on `coord` with SDK workers; returns jobs/s.
async fn run(coord: &Coordinator, n: usize) -> Result<f64> {
    let mut admin = AdminServiceClient::new(channel(&coord.url).await?);
    let _workers = Workers::sdk(&coord.url, WORKERS, SLOTS, WorkerRuntime::default())?;
    Workers::wait_connected(&coord.url, WORKERS).await?;
    let t = Instant::now();
    submit_batched(&coord.url, n, 1000).await?;
    let done = wait_all_finished(&mut admin).await?;
    Ok(n as f64 / done.duration_since(t).as_secs_f64())
}

/// Prints the data directory's size and its `db` file's.
fn sizes(what: &str, data: &std::path::Path) {
    figure(&format!("data_dir_{what}"), mib(dir_size(data)), "MiB");
    figure(&format!("db_file_{what}"), mib(db_file(data)), "MiB");
}

/// Restarts on `data` with `--retention RETENTION`; prints the time to serving.
fn restart(
    data: &std::path::Path,
    listen: &str,
    retention: &str,
    what: &str,
) -> Result<Coordinator> {
    let t = Instant::now();
    let coord = Coordinator::start_with_args(data, listen, &["--retention", retention])?;
    figure(
        &format!("restart_to_serving_{what}"),
        t.elapsed().as_secs_f64(),
        "s",
    );
    Ok(coord)
}

pub async fn retention(n: usize, kept: &str, kept_only: bool) -> Result<()> {
    // The e2e rate of this machine now, on a fresh coordinator with nothing to delete.
    figure(
        "e2e_sdk_baseline",
        run_e2e(SIDE_JOBS, false, WorkerRuntime::default()).await?,
        "jobs/s",
    );
    let scratch = Scratch::new("retention")?;
    let data = scratch.0.join("data");

    // 1. n jobs run and kept (`kept`, default 1 h): n finished jobs on disk.
    let coord = Coordinator::start_with_args(&data, "127.0.0.1:0", &["--retention", kept])?;
    let listen = coord.listen().to_string();
    figure("e2e_sdk_first_run", run(&coord, n).await?, "jobs/s");
    let (p50, p99) = submit_latency(&coord.url).await?;
    figure("submit_200_per_s_p50_no_sweep", p50, "ms");
    figure("submit_200_per_s_p99_no_sweep", p99, "ms");
    sizes(&format!("{n}_finished_kept"), &data);
    figure(
        &format!("coordinator_peak_rss_{n}_finished_kept"),
        mib(coord.peak_rss()?),
        "MiB",
    );
    coord.stop()?;
    if kept_only {
        return Ok(());
    }

    // A restart alone (nothing due): what rebuilding the model from n finished jobs costs.
    let coord = restart(&data, &listen, "1h", &format!("{n}_finished_none_due"))?;
    figure(
        &format!("coordinator_peak_rss_restart_{n}_finished_none_due"),
        mib(coord.peak_rss()?),
        "MiB",
    );
    coord.stop()?;

    // 2. Back with retention 1 s and nothing else to do: the backlog's sweep rate.
    let coord = restart(&data, &listen, "1s", &format!("{n}_finished"))?;
    let mut admin = AdminServiceClient::new(channel(&coord.url).await?);
    let t = Instant::now();
    let backlog = stats(&mut admin).await?.succeeded;
    let swept = wait_all_deleted(&mut admin).await?;
    figure(
        "sweep_rate_idle",
        backlog as f64 / swept.duration_since(t).as_secs_f64(),
        "jobs/s",
    );
    figure(
        &format!("coordinator_peak_rss_sweeping_{n}"),
        mib(coord.peak_rss()?),
        "MiB",
    );
    sizes(&format!("after_deleting_{n}"), &data);
    coord.stop()?;

    // 3. Another n kept, then deleted while other work goes on.
    let coord = restart(&data, &listen, "1h", "empty")?;
    run(&coord, n).await?;
    sizes(&format!("{n}_more_finished_kept"), &data);
    coord.stop()?;
    let coord = restart(&data, &listen, "1s", &format!("{n}_finished_again"))?;
    let mut admin = AdminServiceClient::new(channel(&coord.url).await?);
    let (p50, p99) = submit_latency(&coord.url).await?;
    figure("submit_200_per_s_p50_during_sweep", p50, "ms");
    figure("submit_200_per_s_p99_during_sweep", p99, "ms");
    let left = stats(&mut admin).await?.succeeded;
    figure("backlog_left_at_e2e_start", left as f64, "jobs");
    figure(
        "e2e_sdk_during_sweep",
        run(&coord, SIDE_JOBS).await?,
        "jobs/s",
    );
    wait_all_deleted(&mut admin).await?;
    sizes(&format!("after_deleting_{n}_again"), &data);

    // 4. Rounds of n jobs at retention 1 s, each deleted a second after it ends.
    for round in 1..=3 {
        let rate = run(&coord, n).await?;
        wait_all_deleted(&mut admin).await?;
        figure(
            &format!("e2e_sdk_retention_1s_round_{round}"),
            rate,
            "jobs/s",
        );
        sizes(
            &format!("after_round_{round}_of_{n}_deleted_as_they_go"),
            &data,
        );
    }
    figure(
        "coordinator_peak_rss_retention_1s",
        mib(coord.peak_rss()?),
        "MiB",
    );
    coord.stop()?;
    Ok(())
}
