//! Shutdown notices bounded by per-task deadlines, end to end with real
//! `rota-worker` processes running shell handlers that record their PIDs and
//! what happened to them.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use rota::proto::{CancelJobRequest, DrainWorkerRequest, Job, JobState};
use tempfile::TempDir;

fn graced(kind: &str, grace: Duration) -> Job {
    let mut j = job(kind, b"");
    j.shutdown_grace = Some(duration(grace));
    j
}

fn events(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn wait_running(client: &JobClient, id: &str) -> Job {
    wait_job_state(client, id, JobState::Running, BOUND).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_traps_sigterm_finishes_with_its_real_outcome_and_the_worker_exits() {
    let dir = TempDir::new().unwrap();
    let d = dir.path().display();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let script = format!(
        "echo $$ > {d}/pid; trap 'echo term >> {d}/events; echo cleaned; exit 0' TERM; \
         echo started >> {d}/events; while true; do sleep 0.05; done"
    );
    let mut worker = Worker::start(
        &url,
        &worker_config("w1", &["default"], 1, &[("graceful", &script)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;
    let id = submit_id(&client, graced("graceful", Duration::from_secs(20))).await;
    wait_running(&client, &id).await;
    let pid = read_pid(&dir.path().join("pid")).await;
    wait_for(BOUND, "the handler started", || async {
        events(&dir.path().join("events")) == ["started"]
    })
    .await;

    worker.signal(libc::SIGTERM);
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"cleaned\n", "its real outcome");
    assert_eq!(done.attempt, 1);
    assert_eq!(events(&dir.path().join("events")), ["started", "term"]);
    assert!(
        worker.wait_exit(BOUND).success(),
        "the worker exits 0 once drained"
    );
    assert!(!alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_ignores_sigterm_is_killed_at_stop_by_and_runs_again_elsewhere() {
    let dir = TempDir::new().unwrap();
    let d = dir.path().display();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let stubborn =
        format!("trap '' TERM; echo $$ > {d}/pid; sleep 300 & echo $! > {d}/child; wait; wait");
    let mut w1 = Worker::start(
        &url,
        &worker_config("w1", &["default"], 1, &[("stubborn", &stubborn)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;
    let grace = Duration::from_secs(2);
    let id = submit_id(&client, graced("stubborn", grace)).await;
    wait_running(&client, &id).await;
    let (pid, child) = (
        read_pid(&dir.path().join("pid")).await,
        read_pid(&dir.path().join("child")).await,
    );

    let noticed = SystemTime::now();
    w1.signal(libc::SIGTERM);
    assert!(
        w1.wait_exit(BOUND).success(),
        "the worker exits once its task was killed"
    );
    let killed = SystemTime::now();
    assert!(
        !alive(pid) && !alive(child),
        "the handler and its child are gone"
    );
    assert!(
        killed.duration_since(noticed).unwrap() >= grace,
        "not killed before stop_by"
    );

    let requeued = get_job(&client, &id).await;
    assert_eq!(requeued.state(), JobState::Queued, "re-queued at once");
    assert_eq!(
        requeued.attempt, 0,
        "the interrupted attempt is not used up"
    );
    assert_eq!(requeued.attempts[0].outcome, "interrupted");
    let ended = system_time(&requeued.attempts[0].end_time, "end_time");
    assert!(ended.duration_since(noticed).unwrap() >= grace);

    let _w2 = Worker::start(
        &url,
        &worker_config("w2", &["default"], 1, &[("stubborn", "echo finished")]),
        dir.path(),
    );
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.attempt, 1);
    let who: Vec<(&str, &str)> = done
        .attempts
        .iter()
        .map(|a| (a.worker_id.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(who, [("w1", "interrupted"), ("w2", "succeeded")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_ends_it_cancelled_and_kills_the_process() {
    let dir = TempDir::new().unwrap();
    let d = dir.path().display();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let script = format!("echo $$ > {d}/pid; exec sleep 300");
    let _worker = Worker::start(
        &url,
        &worker_config("w1", &["default"], 1, &[("long", &script)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;
    let id = submit_id(&client, graced("long", Duration::from_secs(10))).await;
    wait_running(&client, &id).await;
    let pid = read_pid(&dir.path().join("pid")).await;
    let marked = client
        .clone()
        .cancel_job(CancelJobRequest {
            id: id.clone(),
            reason: "not needed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(marked.cancel_requested);
    let done = wait_job_state(&client, &id, JobState::Cancelled, BOUND).await;
    assert_eq!(done.attempts[0].outcome, "cancelled");
    wait_for(BOUND, "the cancelled process is gone", || async {
        !alive(pid)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_fails_as_timed_out_and_is_retried() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let script = "if [ \"$ROTA_ATTEMPT\" = 1 ]; then exec sleep 300; fi; echo fast";
    let _worker = Worker::start(
        &url,
        &worker_config("w1", &["default"], 1, &[("slow", script)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;
    let mut j = graced("slow", Duration::from_secs(1));
    j.timeout = Some(duration(Duration::from_secs(1)));
    j.retry = Some(rota::proto::RetryPolicy {
        initial_backoff: Some(duration(Duration::from_millis(100))),
        ..Default::default()
    });
    let id = submit_id(&client, j).await;
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.attempt, 2);
    assert_eq!(done.attempts[0].outcome, "failed");
    assert!(
        done.attempts[0].error.contains("timed out after 1s"),
        "{:?}",
        done.attempts[0].error
    );
    let first = &done.attempts[0];
    let ran = system_time(&first.end_time, "end")
        .duration_since(system_time(&first.start_time, "start"))
        .unwrap();
    assert!(
        ran >= Duration::from_secs(1),
        "not stopped before its timeout ({ran:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_worker_makes_the_worker_finish_and_exit() {
    let dir = TempDir::new().unwrap();
    let d = dir.path().display();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    // Finishes its work (about a second) even when told to stop.
    let script = format!(
        "trap 'echo term >> {d}/events' TERM; : > {d}/trapped; i=0; \
         while [ $i -lt 10 ]; do sleep 0.1; i=$((i+1)); done; echo done"
    );
    let mut worker = Worker::start(
        &url,
        &worker_config("w1", &["default"], 1, &[("work", &script)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;
    let id = submit_id(&client, graced("work", Duration::from_secs(30))).await;
    wait_running(&client, &id).await;
    // The notice must find the trap installed (a shell that gets SIGTERM
    // before its `trap` line simply dies, which is not what this tests).
    let trapped = dir.path().join("trapped");
    wait_for(BOUND, "the task's trap to be installed", || {
        let ready = trapped.exists();
        async move { ready }
    })
    .await;
    let drained = admin_client(&url)
        .await
        .drain_worker(DrainWorkerRequest {
            worker_id: "w1".into(),
            reason: "deploy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.draining);
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"done\n", "the task finished within its grace");
    assert_eq!(done.attempt, 1);
    assert_eq!(
        events(&dir.path().join("events")),
        ["term"],
        "the task got its notice"
    );
    assert!(
        worker.wait_exit(BOUND).success(),
        "the drained worker exits"
    );
    let unknown = admin_client(&url)
        .await
        .drain_worker(DrainWorkerRequest {
            worker_id: "nobody".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_grace_exceeds_a_workers_limit_goes_to_one_that_can_honour_it() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let client = job_client(&url).await;
    let long = submit_id(&client, graced("k", Duration::from_secs(600))).await;
    let short = submit_id(&client, graced("k", Duration::from_secs(2))).await;
    // Its command outlives a kill -9 of its worker (its own process group): the guard ends it.
    let pid_file = dir.path().join("small.pid");
    let _orphan = PidFileGuard(pid_file.clone());
    let script = format!("echo $$ > {}; exec sleep 300", pid_file.display());
    let small = format!(
        "max_shutdown_grace = \"5s\"\n{}",
        worker_config("small", &["default"], 1, &[("k", &script)])
    );
    let _small = Worker::start(&url, &small, dir.path());
    // FIFO would hand the older, long-grace job to `small` if it fit.
    wait_running(&client, &short).await;
    assert_eq!(get_job(&client, &long).await.state(), JobState::Queued);
    let _big = Worker::start(
        &url,
        &worker_config("big", &["default"], 1, &[("k", "echo big")]),
        dir.path(),
    );
    let done = wait_job_state(&client, &long, JobState::Succeeded, BOUND).await;
    assert_eq!(done.attempts[0].worker_id, "big");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_sigterm_while_jobs_run_finishes_each_job_once() {
    let dir = TempDir::new().unwrap();
    let d = dir.path().display();
    let mut coord = Coordinator::start(
        dir.path(),
        &["--lease-timeout", "10s", "--heartbeat-interval", "300ms"],
    );
    let url = coord.url();
    let script = format!("echo $ROTA_JOB_ID >> {d}/ran; sleep 3; echo done");
    let _worker = Worker::start(
        &url,
        &worker_config("w1", &["default"], 3, &[("work", &script)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit_id(&client, job("work", b"")).await);
    }
    for id in &ids {
        wait_running(&client, id).await;
    }
    let status = coord.terminate();
    assert!(
        status.success(),
        "the coordinator exits cleanly: {status:?}"
    );
    coord.restart();
    let client = job_client(&coord.url()).await;
    for id in &ids {
        let done = wait_job_state(&client, id, JobState::Succeeded, BOUND).await;
        assert_eq!(
            (done.attempt, done.attempts.len()),
            (1, 1),
            "job {id} ran once"
        );
        assert_eq!(done.attempts[0].worker_id, "w1");
    }
    let ran = events(&dir.path().join("ran"));
    assert_eq!(ran.len(), 3, "each command started exactly once: {ran:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_every_task_at_once() {
    let dir = TempDir::new().unwrap();
    let d = dir.path().display();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let stubborn = format!("trap '' TERM; echo $$ > {d}/pid; exec sleep 300");
    let mut worker = Worker::start(
        &url,
        &worker_config("w1", &["default"], 1, &[("stubborn", &stubborn)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;
    let id = submit_id(&client, graced("stubborn", Duration::from_secs(600))).await;
    wait_running(&client, &id).await;
    let pid = read_pid(&dir.path().join("pid")).await;
    worker.signal(libc::SIGINT);
    wait_for(BOUND, "the drain began", || async {
        list_workers(&admin_client(&url).await)
            .await
            .iter()
            .any(|w| w.worker_id == "w1" && w.draining)
    })
    .await;
    assert!(alive(pid), "the first signal only gives notice");
    worker.signal(libc::SIGINT);
    let status = worker.wait_exit(BOUND);
    assert!(
        !status.success(),
        "a stop-now is not a clean drain: {status:?}"
    );
    assert!(!alive(pid), "killed at once, not after its 600s grace");
    let requeued = get_job(&client, &id).await;
    assert_eq!((requeued.state(), requeued.attempt), (JobState::Queued, 0));
    assert_eq!(requeued.attempts[0].outcome, "interrupted");
}

/// A log collector that dies (the pipe's reader gone) must not take the
/// stop away: every log line then fails with EPIPE, and tracing's fallback
/// report of that failure used to panic the task that logged it, here the
/// one that turns SIGTERM into a shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_and_a_worker_whose_log_readers_are_gone_still_stop_on_sigterm() {
    let dir = TempDir::new().unwrap();
    let (mut coordinator, addr) = Unheard::coordinator(&dir.path().join("data"));
    let url = format!("http://{addr}");
    let config = worker_config("deaf", &["default"], 1, &[("ok", "true")]);
    let mut worker = Unheard::worker(&url, &config, dir.path());
    // Connected: the worker has logged (and failed to) by now.
    wait_worker_connected(&url, "deaf").await;
    let client = job_client(&url).await;
    let id = submit_id(&client, job("ok", b"")).await;
    wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;

    let status = worker.signal_and_wait_exit(libc::SIGTERM, BOUND);
    assert!(status.success(), "worker exit: {status:?}");
    let status = coordinator.signal_and_wait_exit(libc::SIGTERM, BOUND);
    assert!(status.success(), "coordinator exit: {status:?}");
}
