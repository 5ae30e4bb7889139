//! The workloads. Each prints its figures with [`crate::figure`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rota::proto::admin_service_client::AdminServiceClient;
use rota::proto::schedule_service_client::ScheduleServiceClient;
use rota::proto::{
    schedule_spec, CronSpec, GetQueueStatsRequest, IntervalSpec, Job, ListJobsRequest,
    OverlapPolicy, PreviewScheduleRequest, PutScheduleRequest, Schedule, ScheduleSpec,
    SubmitJobRequest, SubmitJobsRequest,
};
use rota::worker::{TaskContext, TaskError, Worker};

use crate::figure;
use crate::harness::{
    channel, dir_size, jobs as job_client, Coordinator, Scratch, WorkerRuntime, Workers,
};

pub(crate) const WORKERS: usize = 4;
pub(crate) const SLOTS: u32 = 16;
/// Jobs run through a fresh coordinator and its workers before an e2e or a
/// latency run is timed: as many as the peers' drivers send for their warm-up.
const WARM_UP: usize = 200;
const SUBMITTERS: usize = 4;

pub(crate) fn noop() -> Job {
    Job {
        kind: "noop".into(),
        ..Default::default()
    }
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

fn time(ts: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    ts.and_then(|t| SystemTime::try_from(t).ok())
}

/// The value at quantile `q` of sorted `v`.
pub(crate) fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The no-op SDK worker process: its result is the instant the handler started.
pub async fn noop_worker(url: String, slots: u32, id: String) -> Result<()> {
    let worker = Worker::builder(url)
        .worker_id(id)
        .slots(slots)
        .handler("noop", |_ctx: TaskContext| async move {
            Ok::<_, TaskError>(nanos(SystemTime::now()).to_string().into_bytes())
        })
        .build()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    worker
        .run(async move {
            term.recv().await;
        })
        .await;
    Ok(())
}

/// Submits `n` no-op jobs in batches of `batch` from `SUBMITTERS` concurrent clients.
pub(crate) async fn submit_batched(url: &str, n: usize, batch: usize) -> Result<()> {
    let client = job_client(url).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..SUBMITTERS {
        let mut c = client.clone();
        let mine = n / SUBMITTERS + usize::from(s < n % SUBMITTERS);
        tasks.spawn(async move {
            let mut left = mine;
            while left > 0 {
                let k = left.min(batch);
                let jobs = (0..k).map(|_| noop()).collect();
                c.submit_jobs(SubmitJobsRequest { jobs }).await?;
                left -= k;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

pub(crate) async fn stats(
    admin: &mut AdminServiceClient<tonic::transport::Channel>,
) -> Result<rota::proto::QueueStat> {
    let s = admin
        .get_queue_stats(GetQueueStatsRequest {
            queue: "default".into(),
        })
        .await?
        .into_inner();
    s.queues
        .into_iter()
        .next()
        .context("no stats for the default queue")
}

/// Polls until `n` jobs succeeded.
async fn wait_succeeded(url: &str, n: u64) -> Result<Instant> {
    let mut admin = AdminServiceClient::new(channel(url).await?);
    loop {
        if stats(&mut admin).await?.succeeded >= n {
            return Ok(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn submit(n: usize) -> Result<()> {
    let scratch = Scratch::new("submit")?;
    let coord = Coordinator::start(&scratch.0.join("data"), "127.0.0.1:0")?;
    let client = job_client(&coord.url).await?;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let mut c = client.clone();
        let mine = n / 64 + usize::from(i < n % 64);
        tasks.spawn(async move {
            for _ in 0..mine {
                c.submit_job(SubmitJobRequest { job: Some(noop()) }).await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    figure(
        "submit_single_64_in_flight",
        n as f64 / t.elapsed().as_secs_f64(),
        "jobs/s",
    );
    for batch in [100, 1000] {
        let t = Instant::now();
        submit_batched(&coord.url, n, batch).await?;
        figure(
            &format!("submit_batch_{batch}"),
            n as f64 / t.elapsed().as_secs_f64(),
            "jobs/s",
        );
    }
    coord.stop()
}

/// One end-to-end run; returns jobs/s.
pub(crate) async fn run_e2e(n: usize, command: bool, runtime: WorkerRuntime) -> Result<f64> {
    let scratch = Scratch::new("e2e")?;
    let coord = Coordinator::start(&scratch.0.join("data"), "127.0.0.1:0")?;
    let _workers = if command {
        Workers::command(&coord.url, WORKERS, SLOTS, &scratch.0)?
    } else {
        Workers::sdk(&coord.url, WORKERS, SLOTS, runtime)?
    };
    Workers::wait_connected(&coord.url, WORKERS).await?;
    // Not timed, like the peers' warm-up (bench/peers: 200 tasks through the started workers).
    submit_batched(&coord.url, WARM_UP, WARM_UP).await?;
    wait_succeeded(&coord.url, WARM_UP as u64).await?;
    let t = Instant::now();
    submit_batched(&coord.url, n, 1000).await?;
    let done = wait_succeeded(&coord.url, (WARM_UP + n) as u64).await?;
    let rate = n as f64 / done.duration_since(t).as_secs_f64();
    coord.stop()?;
    Ok(rate)
}

pub async fn e2e(n: usize, sdk_only: bool, runtime: WorkerRuntime) -> Result<f64> {
    let rate = run_e2e(n, false, runtime).await?;
    let name = match runtime {
        WorkerRuntime::CurrentThread => "e2e_sdk",
        WorkerRuntime::MultiThread => "e2e_sdk_multi_thread",
    };
    figure(name, rate, "jobs/s");
    if !sdk_only {
        figure(
            "e2e_command_true",
            run_e2e(n, true, runtime).await?,
            "jobs/s",
        );
    }
    Ok(rate)
}

/// All jobs, by id.
async fn all_jobs(url: &str) -> Result<HashMap<String, Job>> {
    let mut client = job_client(url).await?;
    let mut out = HashMap::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_jobs(ListJobsRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.jobs.into_iter().map(|j| (j.id.clone(), j)));
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

pub async fn latency(seconds: u64) -> Result<()> {
    latency_at(&[200, 2000], seconds).await.map(|_| ())
}

/// Runs open-loop loads at each rate in turn, prints their percentiles, and
/// returns the submit->start p99 (ms) of each.
async fn latency_at(rates: &[u64], seconds: u64) -> Result<Vec<f64>> {
    let mut p99s = Vec::new();
    let scratch = Scratch::new("latency")?;
    let coord = Coordinator::start(&scratch.0.join("data"), "127.0.0.1:0")?;
    let _workers = Workers::sdk(&coord.url, WORKERS, SLOTS, WorkerRuntime::default())?;
    Workers::wait_connected(&coord.url, WORKERS).await?;
    let mut client = job_client(&coord.url).await?;
    // Not timed, like the peers' warm-up before their open loop
    // (bench/peers: 200 tasks sent one by one through the started workers).
    for _ in 0..WARM_UP {
        client
            .submit_job(SubmitJobRequest { job: Some(noop()) })
            .await?;
    }
    let mut total = WARM_UP as u64;
    wait_succeeded(&coord.url, total).await?;
    for &rate in rates {
        // Open loop: one submit every 1/rate s, each in its own task, whatever
        // the answers take.
        let n = rate * seconds;
        let sent = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
        let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            tick.tick().await;
            // Finished submits are reaped as the load goes on: kept to the
            // end, their tasks' memory grows by megabytes a second, and the
            // page faults that zero it take this client's thread for up to
            // 18 ms at a time (perf), a CPU the coordinator needs.
            while let Some(r) = tasks.try_join_next() {
                r??;
            }
            let mut c = client.clone();
            let sent = sent.clone();
            tasks.spawn(async move {
                let at = SystemTime::now();
                let r = c.submit_job(SubmitJobRequest { job: Some(noop()) }).await?;
                let id = r.into_inner().job.map(|j| j.id).unwrap_or_default();
                sent.lock().unwrap().push((id, at));
                Ok::<_, tonic::Status>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        total += n;
        wait_succeeded(&coord.url, total).await?;
        let jobs = all_jobs(&coord.url).await?;
        let (mut start, mut complete) = (Vec::new(), Vec::new());
        for (id, at) in sent.lock().unwrap().iter() {
            let job = jobs.get(id).context("submitted job missing")?;
            let started: u128 = String::from_utf8_lossy(&job.result)
                .parse()
                .context("worker start time")?;
            start.push((started as f64 - nanos(*at) as f64) / 1e6);
            let end = time(&job.end_time).context("end_time")?;
            complete.push(end.duration_since(*at).unwrap_or_default().as_secs_f64() * 1e3);
        }
        start.sort_by(|a, b| a.total_cmp(b));
        p99s.push(quantile(&start, 0.99));
        for (what, v) in [
            ("submit_to_start", &mut start),
            ("submit_to_complete", &mut complete),
        ] {
            v.sort_by(|a, b| a.total_cmp(b));
            for (q, label) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
                figure(
                    &format!("latency_{rate}_per_s_{what}_{label}"),
                    quantile(v, q),
                    "ms",
                );
            }
        }
    }
    coord.stop()?;
    Ok(p99s)
}

/// Keeps at least `depth` jobs queued until `stop`.
async fn feed(url: String, depth: u64, stop: Arc<AtomicBool>) -> Result<()> {
    let mut admin = AdminServiceClient::new(channel(&url).await?);
    let mut client = job_client(&url).await?;
    while !stop.load(Ordering::Relaxed) {
        if stats(&mut admin).await?.queued < depth {
            let jobs = (0..1000).map(|_| noop()).collect();
            client.submit_jobs(SubmitJobsRequest { jobs }).await?;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(())
}

pub async fn depth(deep: usize) -> Result<()> {
    const WINDOW: Duration = Duration::from_secs(5);
    for depth in [1000, deep] {
        let scratch = Scratch::new("depth")?;
        let coord = Coordinator::start(&scratch.0.join("data"), "127.0.0.1:0")?;
        submit_batched(&coord.url, depth, 1000).await?;
        let (rss, size) = (coord.peak_rss()?, dir_size(&coord.data_dir));
        let stop = Arc::new(AtomicBool::new(false));
        let feeder = tokio::spawn(feed(coord.url.clone(), depth as u64, stop.clone()));
        let workers = Workers::sdk(&coord.url, WORKERS, SLOTS, WorkerRuntime::default())?;
        Workers::wait_connected(&coord.url, WORKERS).await?;
        let mut admin = AdminServiceClient::new(channel(&coord.url).await?);
        let before = stats(&mut admin).await?.succeeded;
        let t = Instant::now();
        tokio::time::sleep(WINDOW).await;
        let after = stats(&mut admin).await?.succeeded;
        let rate = (after - before) as f64 / t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        feeder.await??;
        drop(workers);
        figure(&format!("dispatch_rate_depth_{depth}"), rate, "jobs/s");
        if depth == deep {
            figure(
                &format!("coordinator_peak_rss_depth_{depth}"),
                coord.peak_rss()?.max(rss) as f64 / (1 << 20) as f64,
                "MiB",
            );
            figure(
                &format!("data_dir_size_depth_{depth}"),
                size as f64 / (1 << 20) as f64,
                "MiB",
            );
            let (dir, listen) = (coord.data_dir.clone(), coord.listen().to_string());
            coord.stop()?;
            let t = Instant::now();
            let again = Coordinator::start(&dir, &listen)?;
            let mut admin = AdminServiceClient::new(channel(&again.url).await?);
            stats(&mut admin).await?;
            figure(
                &format!("restart_to_serving_depth_{depth}"),
                t.elapsed().as_secs_f64(),
                "s",
            );
            figure(
                &format!("coordinator_restart_peak_rss_depth_{depth}"),
                again.peak_rss()? as f64 / (1 << 20) as f64,
                "MiB",
            );
            again.stop()?;
        } else {
            coord.stop()?;
        }
    }
    Ok(())
}

pub async fn schedules(n: usize, seconds: u64) -> Result<()> {
    let scratch = Scratch::new("schedules")?;
    let coord = Coordinator::start(&scratch.0.join("data"), "127.0.0.1:0")?;
    let client = ScheduleServiceClient::new(channel(&coord.url).await?);
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..16 {
        let mut c = client.clone();
        tasks.spawn(async move {
            for i in (s..n).step_by(16) {
                let schedule = Schedule {
                    name: format!("every-second-{i}"),
                    job: Some(noop()),
                    spec: Some(ScheduleSpec {
                        kind: Some(schedule_spec::Kind::Interval(IntervalSpec {
                            every: Some(prost_types::Duration {
                                seconds: 1,
                                nanos: 0,
                            }),
                            ..Default::default()
                        })),
                    }),
                    // No workers run: ALLOW so that every fire makes a job.
                    overlap: OverlapPolicy::Allow as i32,
                    ..Default::default()
                };
                c.put_schedule(PutScheduleRequest {
                    schedule: Some(schedule),
                })
                .await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let mut late: Vec<f64> = all_jobs(&coord.url)
        .await?
        .values()
        .filter_map(|j| {
            let fire = humantime::parse_rfc3339(j.labels.get("rota.fire_time")?).ok()?;
            let created = time(&j.create_time)?;
            Some(
                created
                    .duration_since(fire)
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1e3,
            )
        })
        .collect();
    if late.is_empty() {
        bail!("no schedule fired");
    }
    late.sort_by(|a, b| a.total_cmp(b));
    figure("schedule_fires", late.len() as f64, "fires");
    figure("schedule_fire_lateness_p50", quantile(&late, 0.5), "ms");
    figure("schedule_fire_lateness_p99", quantile(&late, 0.99), "ms");

    // PreviewSchedule of 1,000 cron times: over gRPC, and the computation alone.
    let mut c = client.clone();
    let spec = ScheduleSpec {
        kind: Some(schedule_spec::Kind::Cron(CronSpec {
            expression: "*/5 * * * *".into(),
            timezone: "Europe/Berlin".into(),
        })),
    };
    let mut rpc = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let r = c
            .preview_schedule(PreviewScheduleRequest {
                source: Some(rota::proto::preview_schedule_request::Source::Spec(
                    spec.clone(),
                )),
                after: None,
                count: 1000,
            })
            .await?
            .into_inner();
        rpc.push(t.elapsed().as_secs_f64() * 1e6);
        if r.times.len() != 1000 {
            bail!("preview returned {} times", r.times.len());
        }
    }
    rpc.sort_by(|a, b| a.total_cmp(b));
    figure("preview_1000_cron_times_rpc_p50", quantile(&rpc, 0.5), "us");
    let cron =
        rota::coordinator::schedule::cron::CronSchedule::parse("*/5 * * * *", "Europe/Berlin")?;
    let mut compute = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let mut at = SystemTime::now();
        for _ in 0..1000 {
            at = cron.next_after(at).context("a next time")?;
        }
        compute.push(t.elapsed().as_secs_f64() * 1e6);
    }
    compute.sort_by(|a, b| a.total_cmp(b));
    figure(
        "preview_1000_cron_times_compute_p50",
        quantile(&compute, 0.5),
        "us",
    );
    coord.stop()
}

pub async fn compare(n: usize) -> Result<()> {
    // Rota's run is a few seconds long, a peer's 20-50 s: one short run swings with this shared
    // machine's speed (30% between back-to-back runs), so Rota's figure is the median of three.
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(run_e2e(n, false, WorkerRuntime::default()).await?);
    }
    runs.sort_by(f64::total_cmp);
    let rota = runs[1];
    figure("e2e_sdk", rota, "jobs/s");
    figure("e2e_sdk_min", runs[0], "jobs/s");
    figure("e2e_sdk_max", runs[2], "jobs/s");
    let rota_p99 = latency_at(&[200], 20).await?[0];
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peers/run.sh");
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .env("PEERS_JOBS", n.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("running {script}"))?;
    if !out.status.success() {
        bail!("{script} failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let value: f64 = rest
            .split_whitespace()
            .next()
            .unwrap_or("")
            .parse()
            .unwrap_or(f64::NAN);
        if let Some(peer) = name.strip_suffix("_e2e") {
            figure(&format!("ratio_rota_vs_{peer}"), rota / value, "x");
        }
        if let Some(peer) = name.strip_suffix("_submit_to_start_p99") {
            // Below 1: Rota's p99 is lower than the peer's at the same load.
            figure(
                &format!("latency_200_per_s_p99_ratio_rota_vs_{peer}"),
                rota_p99 / value,
                "x",
            );
        }
    }
    Ok(())
}
