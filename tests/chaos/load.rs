//! The load of a chaos run: clients that submit with idempotency keys and retry every error
//! until they are acknowledged (so the set of acknowledged jobs is known exactly), the job
//! mix, the workers (command runners and an SDK worker, all logging their runs), and a
//! snapshotter that lists every job again and again for the [`Monitor`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::common::try_list_jobs;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rota::proto::job_service_client::JobServiceClient;
use rota::proto::{Job, RetryPolicy, SubmitJobRequest, SubmitJobsRequest};
use rota::worker::{RunSummary, ShutdownHandle, TaskContext, TaskError, Worker as SdkWorker};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::audit::{parse_payload, payload, Mode};
use crate::monitor::Monitor;
use crate::runlog::{self, unix_seconds};

/// The kind run by `rota-worker` processes (a shell command).
pub const CMD: &str = "cmd";
/// The kind run by the in-process SDK worker.
pub const SDK: &str = "sdk";
/// The SDK worker's id.
pub const SDK_WORKER: &str = "sdk";

/// How long a client keeps retrying one submit before the test gives up on the coordinator.
const SUBMIT_BOUND: Duration = Duration::from_secs(90);
/// Pause between retries of a failed submit.
const RETRY_EVERY: Duration = Duration::from_millis(50);
/// Pause between snapshots.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(300);
/// Bound on one RPC, so a call into a dying coordinator cannot hang a client.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel that connects on first use and reconnects after the coordinator comes back.
pub fn lazy_channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(2))
        .timeout(CALL_TIMEOUT)
        .connect_lazy()
}

/// What the clients were told.
#[derive(Default)]
pub struct Acked {
    /// Idempotency key → the job id the coordinator acknowledged for it.
    pub jobs: Mutex<BTreeMap<String, String>>,
    /// Submit calls that failed (and were retried).
    pub errors: AtomicUsize,
    /// Retried keys the coordinator answered `deduplicated`: the first try had been stored
    /// although its answer was lost.
    pub deduplicated: AtomicUsize,
}

/// A random job of the mix, with its idempotency key.
fn random_job(rng: &mut StdRng, key: String) -> Job {
    let (kind, mode) = match rng.gen_range(0..100) {
        0..=39 => (CMD, Mode::Ok),
        40..=54 => (CMD, Mode::Flaky),
        55..=64 => (CMD, Mode::Fail),
        65..=79 => (SDK, Mode::Ok),
        80..=84 => (SDK, Mode::Flaky),
        _ => (SDK, Mode::Perm),
    };
    let secs = rng.gen_range(0.02..0.3);
    chaos_job(kind, mode, secs, key)
}

/// A chaos job: fast retries, and attempts enough for a few lost leases.
pub fn chaos_job(kind: &str, mode: Mode, secs: f64, key: String) -> Job {
    Job {
        kind: kind.to_string(),
        payload: payload(mode, secs),
        max_attempts: match mode {
            Mode::Fail => 3,
            Mode::Perm => 4,
            Mode::Ok | Mode::Flaky => 6,
        },
        retry: Some(RetryPolicy {
            initial_backoff: Some(common_duration(Duration::from_millis(50))),
            max_backoff: Some(common_duration(Duration::from_millis(400))),
            multiplier: 2.0,
        }),
        idempotency_key: key,
        ..Default::default()
    }
}

fn common_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).expect("in range")
}

/// Starts `clients` clients that submit random jobs (one at a time or in batches of 2–6)
/// until `stop`; each finishes the submit it has started, retrying until acknowledged.
pub fn spawn_clients(
    url: &str,
    clients: u64,
    seed: u64,
    stop: CancellationToken,
    acked: Arc<Acked>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for c in 0..clients {
        let client = JobServiceClient::new(lazy_channel(url));
        let (stop, acked) = (stop.clone(), acked.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ (c + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        set.spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let size = if rng.gen_bool(0.25) {
                    rng.gen_range(2..=6)
                } else {
                    1
                };
                let jobs: Vec<Job> = (0..size)
                    .map(|_| {
                        n += 1;
                        random_job(&mut rng, format!("client{c}-{n}"))
                    })
                    .collect();
                submit_until_acked(&client, jobs, &acked).await;
                let pause = Duration::from_millis(rng.gen_range(200..600));
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        });
    }
    set
}

/// Submits `jobs` (one call: `SubmitJob` for one, `SubmitJobs` for more), retrying the same
/// request on every error, and records what was acknowledged.
async fn submit_until_acked(client: &JobServiceClient<Channel>, jobs: Vec<Job>, acked: &Acked) {
    let started = Instant::now();
    loop {
        let answer = if jobs.len() == 1 {
            client
                .clone()
                .submit_job(SubmitJobRequest {
                    job: Some(jobs[0].clone()),
                })
                .await
                .map(|r| vec![r.into_inner()])
        } else {
            client
                .clone()
                .submit_jobs(SubmitJobsRequest { jobs: jobs.clone() })
                .await
                .map(|r| r.into_inner().results)
        };
        match answer {
            Ok(results) => {
                assert_eq!(results.len(), jobs.len(), "one result per submitted job");
                let mut map = acked.jobs.lock().unwrap();
                for (job, r) in jobs.iter().zip(results) {
                    if r.deduplicated {
                        acked.deduplicated.fetch_add(1, Ordering::Relaxed);
                    }
                    let id = r.job.expect("a result carries its job").id;
                    let before = map.insert(job.idempotency_key.clone(), id.clone());
                    assert!(
                        before.is_none(),
                        "key {} acknowledged twice",
                        job.idempotency_key
                    );
                }
                return;
            }
            Err(status) => {
                acked.errors.fetch_add(1, Ordering::Relaxed);
                assert!(
                    started.elapsed() < SUBMIT_BOUND,
                    "a submit failed for {SUBMIT_BOUND:?}; last error: {status}"
                );
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }
}

/// Lists every job every [`SNAPSHOT_EVERY`] until `stop`, and hands each complete listing to
/// the monitor (listings cut short by a kill are dropped).
pub fn spawn_snapshots(
    url: &str,
    monitor: Arc<Mutex<Monitor>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let client = JobServiceClient::new(lazy_channel(url)).max_decoding_message_size(64 << 20);
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SNAPSHOT_EVERY) => {}
            }
            let asked = SystemTime::now();
            if let Ok(jobs) = try_list_jobs(&client, Default::default()).await {
                n += 1;
                let label = format!(
                    "{n} (asked at {}, answered at {})",
                    unix_seconds(asked),
                    unix_seconds(SystemTime::now())
                );
                monitor.lock().unwrap().observe(&jobs, &label);
            }
        }
    })
}

/// A `rota-worker` config: `slots` slots running the `cmd` kind, which logs to `log`.
pub fn worker_config(worker_id: &str, slots: u32, log: &Path) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    format!(
        "worker_id = {id}\nqueues = [\"default\"]\nslots = {slots}\n\n[kinds.{CMD}]\n\
         command = [\"sh\", \"-c\", {script}]\nenv = {{ WORKER = {id} }}\n",
        id = quote(worker_id),
        script = quote(&runlog::command_script(log)),
    )
}

/// Starts the in-process SDK worker for the `sdk` kind: each run logs like the command does,
/// sleeps, and succeeds, fails retryably or fails permanently as its mode says.
pub fn spawn_sdk_worker(url: &str, log: &Path) -> (JoinHandle<RunSummary>, ShutdownHandle) {
    let log: PathBuf = log.to_path_buf();
    let worker = SdkWorker::builder(url.to_string())
        .worker_id(SDK_WORKER)
        .slots(4)
        .handler(SDK, move |ctx: TaskContext| {
            let log = log.clone();
            async move {
                let job = ctx.job();
                let (mode, secs) = parse_payload(&job.payload)
                    .ok_or_else(|| TaskError::permanent("not a chaos payload"))?;
                let line = |what: &str| {
                    format!(
                        "{what} {} {} {SDK_WORKER} {} {}",
                        job.id,
                        ctx.attempt(),
                        std::process::id(),
                        unix_seconds(SystemTime::now())
                    )
                };
                runlog::append(&log, &line("start"));
                tokio::time::sleep(secs).await;
                let ok = mode.succeeds_on(ctx.attempt());
                runlog::append(
                    &log,
                    &format!("{} {}", line("end"), if ok { "ok" } else { "fail" }),
                );
                match mode {
                    _ if ok => Ok(b"done".to_vec()),
                    Mode::Perm => Err(TaskError::permanent("chaos-perm-failure")),
                    _ => Err(TaskError::retryable(format!(
                        "chaos-{}-failure",
                        mode.word()
                    ))),
                }
            }
        })
        .build()
        .expect("SDK worker builds");
    let handle = ShutdownHandle::new();
    (tokio::spawn(worker.run_with(handle.clone())), handle)
}
