//! Leasing rules: fencing by lease id, resuming held leases on reconnect, losing a silent or
//! killed worker, and coordinator restarts that neither kill nor duplicate running work.

mod common;

use common::*;
use rota::proto::coordinator_message::Msg as CoordMsg;
use rota::proto::{JobState, LeaseRef};
use tempfile::TempDir;

/// Short leases so the lost-worker tests are quick.
const FAST_LEASES: &[&str] = &["--lease-timeout", "2s", "--heartbeat-interval", "300ms"];

fn random_lease_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_with_a_stale_lease_is_rejected_and_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let client = job_client(&url).await;
    let mut session = RawSession::open(&url, hello("raw-1", &["raw"])).await;
    assert!(
        !session.welcome.session_id.is_empty(),
        "Welcome names the session"
    );

    let id = submit_id(&client, job("raw", b"in")).await;
    let assign = session.next_assign(BOUND).await;
    let assigned = assign.job.clone().expect("Assign carries the job");
    assert_eq!(assigned.id, id);
    assert_eq!(assigned.payload, b"in");
    assert_eq!(assigned.attempt, 1);
    assert!(!assign.lease_id.is_empty());
    let running = wait_job_state(&client, &id, JobState::Running, BOUND).await;

    // A lease id that was never this job's.
    let stale = random_lease_id();
    let ack = session.complete(&id, &stale, success(b"forged")).await;
    assert!(
        !ack.accepted,
        "a Complete with a wrong lease id must be rejected: {ack:?}"
    );
    let after = get_job(&client, &id).await;
    assert_eq!(
        after.state(),
        JobState::Running,
        "a stale Complete changed the state"
    );
    assert!(after.result.is_empty(), "a stale Complete stored a result");
    assert_eq!(after.attempt, running.attempt);
    assert_eq!(after.attempts, running.attempts);

    // The real lease still works.
    let ack = session
        .complete(&id, &assign.lease_id, success(b"real"))
        .await;
    assert!(ack.accepted, "{ack:?}");
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"real");

    // The used-up lease is stale now: a second Complete changes nothing.
    let ack = session
        .complete(&id, &assign.lease_id, failure("late failure", false))
        .await;
    assert!(
        !ack.accepted,
        "a second Complete on a finished lease: {ack:?}"
    );
    let after = get_job(&client, &id).await;
    assert_eq!(after.state(), JobState::Succeeded);
    assert_eq!(after.result, b"real");
    assert_eq!(after.attempts, done.attempts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_worker_keeps_its_held_lease() {
    let dir = TempDir::new().unwrap();
    // A long lease timeout: the reconnect must land well inside it even on a loaded machine.
    let coord = Coordinator::start(
        dir.path(),
        &["--lease-timeout", "20s", "--heartbeat-interval", "300ms"],
    );
    let url = coord.url();
    let client = job_client(&url).await;

    let mut first = RawSession::open(&url, hello("raw-resume", &["raw"])).await;
    let id = submit_id(&client, job("raw", b"")).await;
    let assign = first.next_assign(BOUND).await;
    assert_eq!(assign.job.as_ref().unwrap().id, id);
    let lease = LeaseRef {
        job_id: id.clone(),
        lease_id: assign.lease_id.clone(),
    };
    drop(first); // the stream drops; the worker is not lost

    let mut second = RawSession::open(
        &url,
        rota::proto::Hello {
            held: vec![lease.clone()],
            ..hello("raw-resume", &["raw"])
        },
    )
    .await;
    assert_eq!(
        second.welcome.resumed,
        vec![lease.clone()],
        "{:?}",
        second.welcome
    );
    assert!(second.welcome.rejected.is_empty(), "{:?}", second.welcome);
    let job = get_job(&client, &id).await;
    assert_eq!(
        job.state(),
        JobState::Running,
        "a dropped stream is not a lost worker"
    );
    assert_eq!(job.attempt, 1);

    let ack = second
        .complete(&id, &lease.lease_id, success(b"resumed"))
        .await;
    assert!(ack.accepted, "{ack:?}");
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"resumed");
    assert_eq!(done.attempt, 1, "the job ran once");
    assert_eq!(done.attempts.len(), 1, "{:#?}", done.attempts);
    assert_eq!(done.attempts[0].worker_id, "raw-resume");
    assert_eq!(done.attempts[0].outcome, "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_worker_is_lost_and_its_job_retried_elsewhere() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), FAST_LEASES);
    let url = coord.url();
    let client = job_client(&url).await;

    // Connected first, so it is the only one that can take the job; it never heartbeats.
    let mut silent = RawSession::open_silent(&url, hello("raw-silent", &["raw"])).await;
    let id = submit_id(&client, job("raw", b"")).await;
    let first = silent.next_assign(BOUND).await;
    assert_eq!(first.job.as_ref().unwrap().id, id);

    let mut live = RawSession::open(&url, hello("raw-live", &["raw"])).await;
    let second = live.next_assign(BOUND).await;
    let retried = second.job.clone().expect("Assign carries the job");
    assert_eq!(retried.id, id, "the lost worker's job goes to the live one");
    assert_eq!(retried.attempt, 2, "the lost lease counts as an attempt");
    assert_ne!(second.lease_id, first.lease_id);

    let ack = live
        .complete(&id, &second.lease_id, success(b"second"))
        .await;
    assert!(ack.accepted, "{ack:?}");
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.attempt, 2);
    assert_eq!(done.result, b"second");
    assert_eq!(done.attempts.len(), 2, "{:#?}", done.attempts);
    assert_eq!(done.attempts[0].worker_id, "raw-silent");
    assert_eq!(done.attempts[0].outcome, "lease_expired");
    assert_eq!(done.attempts[1].worker_id, "raw-live");
    assert_eq!(done.attempts[1].outcome, "succeeded");
    drop(silent);

    // The lost worker comes back naming its old lease: it is rejected, and its Complete
    // changes nothing.
    let old = LeaseRef {
        job_id: id.clone(),
        lease_id: first.lease_id.clone(),
    };
    let mut back = RawSession::open(
        &url,
        rota::proto::Hello {
            held: vec![old.clone()],
            ..hello("raw-silent", &["raw"])
        },
    )
    .await;
    assert!(back.welcome.resumed.is_empty(), "{:?}", back.welcome);
    assert_eq!(
        back.welcome.rejected,
        vec![old.clone()],
        "{:?}",
        back.welcome
    );
    let ack = back
        .complete(&id, &old.lease_id, success(b"too late"))
        .await;
    assert!(!ack.accepted, "{ack:?}");
    let after = get_job(&client, &id).await;
    assert_eq!(after.result, b"second");
    assert_eq!(after.attempts, done.attempts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_runs_again_on_another_worker() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), FAST_LEASES);
    let url = coord.url();
    let client = job_client(&url).await;

    // Attempt 1 records its pid and sleeps "forever"; later attempts succeed at once.
    let pid_file = dir.path().join("attempt-1.pid");
    let _orphan = PidFileGuard(pid_file.clone());
    let script = format!(
        r#"if [ "$ROTA_ATTEMPT" = 1 ]; then echo $$ > '{}.tmp' && mv '{0}.tmp' '{0}'; exec sleep 600; fi; echo ok"#,
        pid_file.display()
    );
    let mut w1 = Worker::start(
        &url,
        &worker_config("w1", &["default"], 1, &[("slow", &script)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;

    let id = submit_id(&client, job("slow", b"")).await;
    let running = wait_job_state(&client, &id, JobState::Running, BOUND).await;
    assert_eq!(running.attempt, 1);
    wait_for(BOUND, "attempt 1's command to start", || {
        let p = pid_file.clone();
        async move { p.exists() }
    })
    .await;

    w1.kill9();
    let _w2 = Worker::start(
        &url,
        &worker_config("w2", &["default"], 1, &[("slow", &script)]),
        dir.path(),
    );
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.attempt, 2);
    assert_eq!(done.result, b"ok\n");
    assert_eq!(done.attempts.len(), 2, "{:#?}", done.attempts);
    assert_eq!(done.attempts[0].number, 1);
    assert_eq!(done.attempts[0].worker_id, "w1");
    assert_eq!(done.attempts[0].outcome, "lease_expired");
    assert_eq!(done.attempts[1].number, 2);
    assert_eq!(done.attempts[1].worker_id, "w2");
    assert_eq!(done.attempts[1].outcome, "succeeded");
}

/// How the coordinator goes down in `restart_keeps_running_job`.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill9,
    Sigterm,
}

/// A coordinator restart while a real worker runs a 3 s job: the job finishes once, on that
/// worker, as attempt 1; a second idle worker that could take a re-queued copy never does.
async fn restart_keeps_running_job(stop: Stop) {
    let dir = TempDir::new().unwrap();
    // The worker must reconnect within the lease timeout; its backoff is its own business,
    // so leave it room.
    let mut coord = Coordinator::start(
        dir.path(),
        &["--lease-timeout", "10s", "--heartbeat-interval", "300ms"],
    );
    let url = coord.url();
    let client = job_client(&url).await;

    let runs_file = dir.path().join("runs.txt");
    let script = format!(
        r#"echo "$ROTA_ATTEMPT" >> '{}'; sleep 3; echo done"#,
        runs_file.display()
    );
    let _w1 = Worker::start(
        &url,
        &worker_config("w1", &["default"], 1, &[("work", &script)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;
    let id = submit_id(&client, job("work", b"")).await;
    wait_job_state(&client, &id, JobState::Running, BOUND).await;
    wait_for(BOUND, "the job's command to start", || {
        let p = runs_file.clone();
        async move { p.exists() }
    })
    .await;
    // A second worker that would run the job if it were re-queued.
    let _w2 = Worker::start(
        &url,
        &worker_config("w2", &["default"], 1, &[("work", &script)]),
        dir.path(),
    );
    wait_worker_connected(&url, "w2").await;

    match stop {
        Stop::Kill9 => coord.kill9(),
        Stop::Sigterm => {
            let status = coord.terminate();
            assert!(status.success(), "coordinator exit on SIGTERM: {status:?}");
        }
    }
    coord.restart();
    let client = job_client(&coord.url()).await;

    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"done\n");
    assert_eq!(
        done.attempt, 1,
        "restart ({stop:?}) must not retry the job: {done:#?}"
    );
    assert_eq!(done.attempts.len(), 1, "{:#?}", done.attempts);
    assert_eq!(done.attempts[0].worker_id, "w1");
    assert_eq!(done.attempts[0].outcome, "succeeded");
    let runs = std::fs::read_to_string(&runs_file).unwrap();
    assert_eq!(
        runs.lines().collect::<Vec<_>>(),
        ["1"],
        "the command ran once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_keeps_running_job_on_its_worker() {
    restart_keeps_running_job(Stop::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_graceful_restart_keeps_running_job_on_its_worker() {
    restart_keeps_running_job(Stop::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assign_respects_kinds_and_slots() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let client = job_client(&url).await;
    let mut session = RawSession::open(&url, hello("raw-kinds", &["mine"])).await;

    // Not our kind: never assigned to us. Ours: assigned, one at a time (one slot).
    let other = submit_id(&client, job("theirs", b"")).await;
    let a = submit_id(&client, job("mine", b"a")).await;
    let b = submit_id(&client, job("mine", b"b")).await;
    let first = session.next_assign(BOUND).await;
    assert_eq!(first.job.as_ref().unwrap().id, a);
    // b waits for the slot: it is still QUEUED while a runs.
    wait_job_state(&client, &a, JobState::Running, BOUND).await;
    assert_eq!(get_job(&client, &b).await.state(), JobState::Queued);
    let ack = session.complete(&a, &first.lease_id, success(b"")).await;
    assert!(ack.accepted);
    let second = session.next_assign(BOUND).await;
    assert_eq!(second.job.as_ref().unwrap().id, b);
    let ack = session.complete(&b, &second.lease_id, success(b"")).await;
    assert!(ack.accepted);
    wait_job_state(&client, &b, JobState::Succeeded, BOUND).await;
    assert_eq!(get_job(&client, &other).await.state(), JobState::Queued);
    if let Some(CoordMsg::Assign(unexpected)) = session
        .try_next(std::time::Duration::from_millis(200))
        .await
    {
        panic!("assigned a job of a kind this worker does not handle: {unexpected:?}");
    }
}
