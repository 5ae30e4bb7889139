//! Retention end to end: the real coordinator deletes finished jobs once their state's
//! retention has passed (per-state flags and environment variables), keeps unfinished and
//! not-yet-due ones, frees their idempotency keys, and rebuilds its pending deletions from
//! the store after a `kill -9`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::*;
use rota::proto::{CancelJobRequest, GetJobRequest, Job, JobState, WatchJobRequest};
use tempfile::TempDir;
use tonic::Code;

/// GetJob's status code for `id`: `Ok` while the job exists.
async fn get_code(client: &JobClient, id: &str) -> Code {
    match client
        .clone()
        .get_job(GetJobRequest { id: id.to_string() })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Waits (bounded) until GetJob answers NOT_FOUND for `id`.
async fn wait_deleted(client: &JobClient, id: &str) {
    wait_for(
        BOUND,
        &format!("job {id} deleted (GetJob NOT_FOUND)"),
        || async {
            match get_code(client, id).await {
                Code::Ok => false,
                Code::NotFound => true,
                other => panic!("GetJob {id}: unexpected {other:?}"),
            }
        },
    )
    .await;
}

/// Opens a WatchJob stream; `finished` then waits for its terminal state.
async fn watch(client: &JobClient, id: &str) -> tonic::Streaming<Job> {
    client
        .clone()
        .watch_job(WatchJobRequest { id: id.to_string() })
        .await
        .unwrap_or_else(|e| panic!("WatchJob {id}: {e}"))
        .into_inner()
}

async fn finished(mut stream: tonic::Streaming<Job>) -> Job {
    let mut last = None;
    loop {
        match tokio::time::timeout(BOUND, stream.message()).await {
            Ok(Ok(Some(job))) => last = Some(job),
            Ok(Ok(None)) => break,
            Ok(Err(e)) => panic!("WatchJob stream failed: {e}"),
            Err(_) => panic!("no terminal state within {BOUND:?}; last seen: {last:#?}"),
        }
    }
    let job = last.expect("WatchJob sent the job");
    assert!(
        is_terminal(job.state()),
        "the stream ends at a terminal state: {job:#?}"
    );
    job
}

fn keyed(kind: &str, key: &str) -> Job {
    Job {
        idempotency_key: key.to_string(),
        ..job(kind, b"")
    }
}

fn ids(jobs: &[Job]) -> BTreeSet<String> {
    jobs.iter().map(|j| j.id.clone()).collect()
}

fn worker_kinds() -> String {
    worker_config("w1", &["default"], 4, &[("ok", "true"), ("bad", "exit 3")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_deleted_per_state_and_the_rest_stay() {
    let dir = TempDir::new().unwrap();
    // SUCCEEDED 1 s by flag, CANCELLED 1 s by environment, FAILED and EXPIRED the general 1 h.
    let coord = Coordinator::start_with_env(
        dir.path(),
        &["--retention", "1h", "--retention-succeeded", "1s"],
        &[("ROTA_RETENTION_CANCELLED", "1s")],
    );
    let url = coord.url();
    let client = job_client(&url).await;

    let ok = submit(&client, keyed("ok", "nightly-ok"))
        .await
        .job
        .unwrap();
    let bad = submit_id(
        &client,
        Job {
            max_attempts: 1,
            ..job("bad", b"")
        },
    )
    .await;
    let queued = submit_id(&client, job("nobody", b"")).await;
    let scheduled = submit_id(
        &client,
        Job {
            run_time: Some(timestamp(SystemTime::now() + Duration::from_secs(3600))),
            ..job("ok", b"")
        },
    )
    .await;
    let cancelled = submit_id(&client, job("nobody", b"")).await;
    // Watched before any worker runs them, so no state is missed.
    let (ok_watch, bad_watch) = (watch(&client, &ok.id).await, watch(&client, &bad).await);
    let c = client
        .clone()
        .cancel_job(CancelJobRequest {
            id: cancelled.clone(),
            reason: "not needed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.state(), JobState::Cancelled);

    let _worker = Worker::start(&url, &worker_kinds(), dir.path());
    assert_eq!(finished(ok_watch).await.state(), JobState::Succeeded);
    assert_eq!(finished(bad_watch).await.state(), JobState::Failed);

    // SUCCEEDED and CANCELLED go: GetJob says NOT_FOUND and ListJobs no longer lists them.
    wait_deleted(&client, &ok.id).await;
    wait_deleted(&client, &cancelled).await;
    let listed = list_all_jobs(&client).await;
    let want: BTreeSet<String> = [&bad, &queued, &scheduled].into_iter().cloned().collect();
    assert_eq!(ids(&listed), want, "FAILED (1 h) and unfinished jobs stay");
    assert_eq!(get_job(&client, &bad).await.state(), JobState::Failed);
    assert_eq!(get_job(&client, &queued).await.state(), JobState::Queued);
    assert_eq!(
        get_job(&client, &scheduled).await.state(),
        JobState::Scheduled
    );
    let retry = client
        .clone()
        .retry_job(rota::proto::RetryJobRequest { id: ok.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(retry.code(), Code::NotFound, "{retry:?}");

    // The deleted job's idempotency key makes a new job, which runs and goes in turn.
    let again = submit(&client, keyed("ok", "nightly-ok")).await;
    assert!(!again.deduplicated, "the key went with the deleted job");
    let again = again.job.unwrap();
    assert_ne!(again.id, ok.id);
    wait_deleted(&client, &again.id).await;
    assert_eq!(get_job(&client, &bad).await.state(), JobState::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_no_pending_deletion_and_repeats_none() {
    let dir = TempDir::new().unwrap();
    // First run: SUCCEEDED jobs are kept an hour, so every deletion is still pending at the crash.
    let mut first = Coordinator::start(dir.path(), &["--retention-succeeded", "1h"]);
    let url = first.url();
    let client = job_client(&url).await;
    let mut done = Vec::new();
    for i in 0..20 {
        done.push(submit_id(&client, keyed("ok", &format!("key-{i}"))).await);
    }
    let worker = Worker::start(&url, &worker_kinds(), dir.path());
    for id in &done {
        wait_job_state(&client, id, JobState::Succeeded, BOUND).await;
    }
    drop(worker);
    first.kill9();

    // Second run, same data, SUCCEEDED kept 2 s: the deletions pending at the crash happen.
    let mut second = Coordinator::start(dir.path(), &["--retention-succeeded", "2s"]);
    let client = job_client(&second.url()).await;
    for id in &done {
        wait_deleted(&client, id).await;
    }
    assert!(list_all_jobs(&client).await.is_empty());
    // A freed key names a new job (kind `nobody`: it stays QUEUED, never deleted).
    let fresh = submit(&client, keyed("nobody", "key-0")).await;
    assert!(!fresh.deduplicated);
    let fresh = fresh.job.unwrap().id;
    second.kill9();

    // Third run: nothing deleted comes back, and the key still names the new job.
    second.restart();
    let client = job_client(&second.url()).await;
    let dup = submit(&client, keyed("nobody", "key-0")).await;
    assert!(dup.deduplicated, "the new job's key survived the restart");
    assert_eq!(dup.job.unwrap().id, fresh);
    for id in &done {
        assert_eq!(
            get_code(&client, id).await,
            Code::NotFound,
            "{id} stays deleted"
        );
    }
    let listed = list_all_jobs(&client).await;
    assert_eq!(ids(&listed), BTreeSet::from([fresh]));
}

#[test]
fn bad_retention_settings_stop_the_coordinator_with_a_message_naming_them() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("rota.toml");
    std::fs::write(&file, "retention_expired = \"never\"\n").unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rota-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} {env:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let zero = run(&["--retention", "0s"], &[]);
    assert!(
        zero.contains("retention: ") && zero.contains("forever"),
        "{zero}"
    );
    let env = run(&[], &[("ROTA_RETENTION_FAILED", "soon")]);
    assert!(
        env.contains("retention_failed") && env.contains("soon"),
        "{env}"
    );
    let toml = run(&["--config", file.to_str().unwrap()], &[]);
    assert!(
        toml.contains("retention_expired") && toml.contains("never"),
        "{toml}"
    );
}
