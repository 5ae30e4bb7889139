//! Chaos runs against the real binaries: under mixed load (clients submitting with
//! idempotency keys and retrying every error, command and SDK workers whose jobs succeed,
//! fail retryably or fail permanently, a schedule firing every second), the coordinator is
//! `kill -9`ed and restarted at random moments (now and then with a worker frozen across the
//! restart, so that its leases expire under it), or the workers are `kill -9`ed and restarted.
//! Afterwards every acknowledged job, every run and every schedule fire is accounted for (see
//! [`audit`]).
//!
//! The moments are drawn from a seeded RNG; the seed is printed, and `ROTA_CHAOS_SEED=N`
//! replays the same plan (the processes' own timing still varies from run to run).

#[path = "../common/mod.rs"]
mod common;

mod audit;
mod load;
mod monitor;
mod runlog;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{try_list_jobs, wait_until, wait_worker_connected, Coordinator, Worker};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rota::proto::admin_service_client::AdminServiceClient;
use rota::proto::job_service_client::JobServiceClient;
use rota::proto::schedule_service_client::ScheduleServiceClient;
use rota::proto::{
    schedule_spec, IntervalAnchor, IntervalSpec, Job, JobState, ListWorkersRequest, MisfirePolicy,
    OverlapPolicy, PauseScheduleRequest, PutScheduleRequest, Schedule, ScheduleSpec,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use audit::{Crash, Evidence, Figures, Mode};
use load::{Acked, CMD, SDK_WORKER};
use monitor::Monitor;
use runlog::OrphanGuard;

/// Coordinator kills in the first run.
const COORDINATOR_KILLS: usize = 22;
/// Worker kills in the second run.
const WORKER_KILLS: usize = 24;
/// The command workers of the coordinator run.
const WORKER_IDS: [&str; 2] = ["w1", "w2"];
/// Every this many coordinator kills, a worker is frozen across the restart.
const FREEZE_EVERY: usize = 5;
/// Short, so lost leases end fast; still fifteen heartbeats, so that a loaded machine does not
/// lose a live worker.
const LEASE_TIMEOUT: Duration = Duration::from_secs(3);
const COORDINATOR_FLAGS: &[&str] = &["--lease-timeout", "3s", "--heartbeat-interval", "200ms"];
/// Concurrent submitting clients.
const CLIENTS: u64 = 3;
/// Bound on the load settling once the kills stop (every job finished).
const SETTLE_BOUND: Duration = Duration::from_secs(120);
/// The schedule's name and period.
const SCHEDULE: &str = "tick";
const TICK: Duration = Duration::from_secs(1);

/// The seed: `ROTA_CHAOS_SEED`, or one drawn now. Printed either way.
fn seed(test: &str) -> u64 {
    let seed = match std::env::var("ROTA_CHAOS_SEED") {
        Ok(s) => s.parse().expect("ROTA_CHAOS_SEED is a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: chaos seed {seed} (replay the plan with ROTA_CHAOS_SEED={seed})");
    seed
}

/// Every job once the load has settled: polls until every job is finished, feeding each
/// listing to the monitor. Panics after [`SETTLE_BOUND`] with the count of jobs per state.
async fn settled_jobs(url: &str, monitor: &Mutex<Monitor>) -> Vec<Job> {
    let client = JobServiceClient::new(load::lazy_channel(url)).max_decoding_message_size(64 << 20);
    let deadline = Instant::now() + SETTLE_BOUND;
    let mut last = BTreeMap::new();
    loop {
        if let Ok(jobs) = try_list_jobs(&client, Default::default()).await {
            monitor.lock().unwrap().observe(&jobs, "settling");
            if jobs.iter().all(|j| common::is_terminal(j.state())) {
                return jobs;
            }
            last = BTreeMap::new();
            for j in &jobs {
                *last.entry(format!("{:?}", j.state())).or_insert(0) += 1;
            }
        }
        assert!(
            Instant::now() < deadline,
            "jobs still unfinished after {SETTLE_BOUND:?}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the clients (each finishes the submit it started) and returns what they were told.
async fn stop_clients(
    stop: CancellationToken,
    mut clients: tokio::task::JoinSet<()>,
    acked: &Acked,
) -> BTreeMap<String, String> {
    stop.cancel();
    while let Some(done) = clients.join_next().await {
        done.expect("a client panicked");
    }
    acked.jobs.lock().unwrap().clone()
}

/// Panics with every violation, or returns the figures.
fn audit_or_panic(jobs: &[Job], evidence: &Evidence<'_>, monitor: &Monitor) -> Figures {
    let mut violations = monitor.violations.clone();
    let figures = match audit::audit(jobs, evidence) {
        Ok(f) => Some(f),
        Err(v) => {
            violations.extend(v);
            None
        }
    };
    if !violations.is_empty() {
        let shown: Vec<&String> = violations.iter().take(40).collect();
        let kills: Vec<String> = evidence
            .crashes
            .iter()
            .map(|c| match c {
                Crash::Coordinator { down, up } => format!(
                    "coordinator down {} up {}",
                    runlog::unix_seconds(*down),
                    runlog::unix_seconds(*up)
                ),
                Crash::Worker { id, at } => format!("{id} at {}", runlog::unix_seconds(*at)),
            })
            .collect();
        panic!(
            "{} violations (first {}):\n{}\nkills: {kills:?}",
            violations.len(),
            shown.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    figures.expect("no violations")
}

/// Kills the commands still running (all their jobs have finished, so their leases were lost)
/// and waits until they are gone; returns how many there were.
async fn kill_leftover_runs(orphans: &OrphanGuard) -> usize {
    let leftover = orphans.kill_orphans();
    wait_until(common::BOUND, "leftover commands gone", || async {
        (orphans.kill_orphans() == 0).then_some(())
    })
    .await;
    leftover
}

/// A command worker of the coordinator run that holds leases now, if one does within a
/// few seconds (the one to freeze, so that the freeze fences runs off).
async fn busy_worker(admin: &AdminServiceClient<Channel>) -> Option<usize> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(r) = admin.clone().list_workers(ListWorkersRequest {}).await {
            let busy = r.into_inner().workers.into_iter().find_map(|w| {
                let i = WORKER_IDS.iter().position(|id| *id == w.worker_id)?;
                (!w.running.is_empty()).then_some(i)
            });
            if busy.is_some() {
                return busy;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Accepted runs that were in flight while a coordinator was killed: the work a restart must
/// neither kill nor duplicate.
fn runs_across_kills(runs: &[runlog::Run], jobs: &[Job], crashes: &[Crash]) -> usize {
    let accepted: std::collections::HashSet<(&str, u32)> = jobs
        .iter()
        .flat_map(|j| {
            j.attempts
                .iter()
                .filter(|a| a.outcome == "succeeded" || a.outcome == "failed")
                .map(move |a| (j.id.as_str(), a.number))
        })
        .collect();
    runs.iter()
        .filter(|r| accepted.contains(&(r.job.as_str(), r.attempt)))
        .filter(|r| {
            crashes.iter().any(|c| match (c, r.end) {
                (Crash::Coordinator { down, .. }, Some((end, _))) => r.start < *down && *down < end,
                _ => false,
            })
        })
        .count()
}

/// The schedule of the first run: every second on the grid, every due time run (RUN_ALL,
/// ALLOW), so that each due time must have exactly one job.
async fn put_schedule(url: &str) -> SystemTime {
    let mut client = ScheduleServiceClient::new(common::channel(url).await);
    let job = load::chaos_job(CMD, Mode::Ok, 0.05, String::new());
    client
        .put_schedule(PutScheduleRequest {
            schedule: Some(Schedule {
                name: SCHEDULE.into(),
                job: Some(job),
                spec: Some(ScheduleSpec {
                    kind: Some(schedule_spec::Kind::Interval(IntervalSpec {
                        every: Some(common::duration(TICK)),
                        anchor: IntervalAnchor::Start as i32,
                        offset: None,
                    })),
                }),
                overlap: OverlapPolicy::Allow as i32,
                misfire: MisfirePolicy::RunAll as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("PutSchedule: {e}"));
    SystemTime::now()
}

/// Pauses the schedule (so the load can settle) and returns when.
async fn pause_schedule(url: &str) -> SystemTime {
    let mut client = ScheduleServiceClient::new(common::channel(url).await);
    client
        .pause_schedule(PauseScheduleRequest {
            name: SCHEDULE.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("PauseSchedule: {e}"));
    SystemTime::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_kill_9_under_load_loses_and_repeats_nothing() {
    let seed = seed("coordinator chaos");
    let mut rng = StdRng::seed_from_u64(seed);
    let began = Instant::now();
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("runs.log");
    let orphans = OrphanGuard { log: log.clone() };
    let mut coord = Coordinator::start(dir.path(), COORDINATOR_FLAGS);
    let url = coord.url();

    let scheduled_at = put_schedule(&url).await;
    let workers: Vec<Worker> = WORKER_IDS
        .iter()
        .map(|id| Worker::start(&url, &load::worker_config(id, 4, &log), dir.path()))
        .collect();
    let (sdk, sdk_handle) = load::spawn_sdk_worker(&url, &log);
    for id in WORKER_IDS.into_iter().chain([SDK_WORKER]) {
        wait_worker_connected(&url, id).await;
    }
    let acked = Arc::new(Acked::default());
    let monitor = Arc::new(Mutex::new(Monitor::default()));
    let (stop_clients_token, stop_snapshots) = (CancellationToken::new(), CancellationToken::new());
    let clients = load::spawn_clients(
        &url,
        CLIENTS,
        seed,
        stop_clients_token.clone(),
        acked.clone(),
    );
    let snapshots = load::spawn_snapshots(&url, monitor.clone(), stop_snapshots.clone());

    // The chaos: up for a random while, kill -9, down for a random while, restart. Now and
    // then the outage is long enough for the workers' reconnect backoff to outgrow the lease
    // timeout. And every few kills one worker is frozen (SIGSTOP) across the restart until
    // its restored leases have expired: its runs are fenced off, and it comes back holding
    // results for leases that are no longer its own.
    let admin = common::admin_client(&url).await;
    let mut crashes = Vec::new();
    let mut frozen = 0;
    for k in 0..COORDINATOR_KILLS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1500))).await;
        let freeze = if k % FREEZE_EVERY == FREEZE_EVERY - 1 {
            let i = busy_worker(&admin)
                .await
                .unwrap_or_else(|| rng.gen_range(0..workers.len()));
            workers[i].signal(libc::SIGSTOP);
            Some(i)
        } else {
            None
        };
        let down = SystemTime::now();
        tokio::task::block_in_place(|| coord.kill9());
        let down_for = match rng.gen_range(0..100) {
            0..=64 => rng.gen_range(0..400),
            65..=89 => rng.gen_range(1000..3000),
            _ => rng.gen_range(4000..6000),
        };
        tokio::time::sleep(Duration::from_millis(down_for)).await;
        tokio::task::block_in_place(|| coord.restart());
        crashes.push(Crash::Coordinator {
            down,
            up: SystemTime::now(),
        });
        if let Some(i) = freeze {
            let id = WORKER_IDS[i];
            let held = wait_until(common::BOUND, "the frozen worker's leases expired", || {
                let admin = admin.clone();
                async move {
                    let listed = admin
                        .clone()
                        .list_workers(ListWorkersRequest {})
                        .await
                        .ok()?
                        .into_inner()
                        .workers;
                    listed.iter().all(|w| w.worker_id != id).then_some(())
                }
            });
            held.await;
            frozen += 1;
            workers[i].signal(libc::SIGCONT);
        }
    }
    let chaos_secs = began.elapsed().as_secs_f64();

    let acked_jobs = stop_clients(stop_clients_token, clients, &acked).await;
    let paused_at = pause_schedule(&url).await;
    // One reader at a time from here, so the monitor sees the listings in the order they
    // were read.
    stop_snapshots.cancel();
    snapshots.await.unwrap();
    let jobs = settled_jobs(&url, &monitor).await;
    sdk_handle.drain();
    let summary = tokio::time::timeout(common::BOUND, sdk)
        .await
        .expect("the SDK worker drains")
        .unwrap();
    assert!(summary.is_clean(), "{summary:?}");
    // A run fenced off while its worker was away is killed when the worker returns; kill any
    // still running now, so the log is complete when read.
    kill_leftover_runs(&orphans).await;
    let runs = runlog::read(&log);
    let due = paused_at.duration_since(scheduled_at).unwrap().as_secs() as usize;
    let evidence = Evidence {
        acked: &acked_jobs,
        runs: &runs,
        crashes: &crashes,
        lease_timeout: LEASE_TIMEOUT,
        schedule: Some((SCHEDULE, TICK, due.saturating_sub(2))),
    };
    let monitor = monitor.lock().unwrap();
    let figures = audit_or_panic(&jobs, &evidence, &monitor);
    let across = runs_across_kills(&runs, &jobs, &crashes);
    eprintln!(
        "coordinator chaos: {} kill -9s ({frozen} with a worker frozen across the restart) in {chaos_secs:.1}s, {:.1}s in all; {} keys acknowledged \
         ({} submit errors retried, {} answered deduplicated); {} snapshots; {figures}; {across} \
         accepted runs were in flight across a kill",
        crashes.len(),
        began.elapsed().as_secs_f64(),
        acked_jobs.len(),
        acked.errors.load(Ordering::Relaxed),
        acked.deduplicated.load(Ordering::Relaxed),
        monitor.snapshots,
    );
    assert_eq!(crashes.len(), COORDINATOR_KILLS);
    assert!(
        acked.errors.load(Ordering::Relaxed) > 0,
        "the kills hit the clients"
    );
    assert!(across > 0, "the kills hit runs in flight");
    // No worker restarts here, so a worker never comes back without a lease it got: one it
    // comes back without was lost with a crash and must not cost the job an attempt.
    assert_eq!(
        figures.lost_on_reconnect, 0,
        "a lease lost with the coordinator cost an attempt: {figures}"
    );
    assert!(
        figures.fenced_finished + figures.fenced_killed > 0,
        "the frozen workers' runs were fenced off: {figures}"
    );
    assert!(
        monitor.snapshots > COORDINATOR_KILLS,
        "snapshots between the kills"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_kill_9_under_load_loses_nothing_and_counts_each_attempt() {
    let seed = seed("worker chaos");
    let mut rng = StdRng::seed_from_u64(seed);
    let began = Instant::now();
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("runs.log");
    let orphans = OrphanGuard { log: log.clone() };
    let coord = Coordinator::start(dir.path(), COORDINATOR_FLAGS);
    let url = coord.url();

    // Three worker places; each kill restarts its place with the same id (which gives the
    // old leases up at once) or a new one (whose old leases wait out the lease timeout).
    let mut ids: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let mut workers: Vec<Worker> = ids
        .iter()
        .map(|id| Worker::start(&url, &load::worker_config(id, 4, &log), dir.path()))
        .collect();
    let (sdk, sdk_handle) = load::spawn_sdk_worker(&url, &log);
    for id in ids.iter().map(|s| s.as_str()).chain([SDK_WORKER]) {
        wait_worker_connected(&url, id).await;
    }
    let acked = Arc::new(Acked::default());
    let monitor = Arc::new(Mutex::new(Monitor::default()));
    let (stop_clients_token, stop_snapshots) = (CancellationToken::new(), CancellationToken::new());
    let clients = load::spawn_clients(
        &url,
        CLIENTS,
        seed,
        stop_clients_token.clone(),
        acked.clone(),
    );
    let snapshots = load::spawn_snapshots(&url, monitor.clone(), stop_snapshots.clone());

    let mut crashes = Vec::new();
    let mut renamed = 0;
    for k in 0..WORKER_KILLS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(400..1400))).await;
        let place = rng.gen_range(0..workers.len());
        tokio::task::block_in_place(|| workers[place].kill9());
        crashes.push(Crash::Worker {
            id: ids[place].clone(),
            at: SystemTime::now(),
        });
        if rng.gen_bool(0.5) {
            renamed += 1;
            ids[place] = format!("{}-{k}", &ids[place][..1]);
        }
        workers[place] =
            Worker::start(&url, &load::worker_config(&ids[place], 4, &log), dir.path());
    }
    let chaos_secs = began.elapsed().as_secs_f64();

    let acked_jobs = stop_clients(stop_clients_token, clients, &acked).await;
    stop_snapshots.cancel();
    snapshots.await.unwrap();
    let jobs = settled_jobs(&url, &monitor).await;
    sdk_handle.drain();
    let summary = tokio::time::timeout(common::BOUND, sdk)
        .await
        .expect("the SDK worker drains")
        .unwrap();
    assert!(summary.is_clean(), "{summary:?}");

    // Commands orphaned by the kills may still run: kill them, and read the log once they
    // are gone.
    let orphaned = kill_leftover_runs(&orphans).await;
    let runs = runlog::read(&log);
    let evidence = Evidence {
        acked: &acked_jobs,
        runs: &runs,
        crashes: &crashes,
        lease_timeout: LEASE_TIMEOUT,
        schedule: None,
    };
    let monitor = monitor.lock().unwrap();
    let figures = audit_or_panic(&jobs, &evidence, &monitor);
    eprintln!(
        "worker chaos: {} kill -9s ({renamed} restarted under a new id) in {chaos_secs:.1}s, \
         {:.1}s in all; {} keys acknowledged; {} snapshots; {figures}; {orphaned} orphaned \
         commands still running at the end",
        crashes.len(),
        began.elapsed().as_secs_f64(),
        acked_jobs.len(),
        monitor.snapshots,
    );
    assert_eq!(crashes.len(), WORKER_KILLS);
    let lost = figures.fenced_finished + figures.fenced_killed + figures.lost_before_run;
    assert!(lost > 0, "the kills cost some attempts: {figures}");
    assert!(
        figures.lost_on_reconnect > 0,
        "a worker restarted under its old id gave its old leases up at once: {figures}"
    );
    assert!(
        figures.by_state.get(&format!("{:?}", JobState::Succeeded)) > Some(&0),
        "jobs still succeed: {figures}"
    );
    drop(coord);
}
