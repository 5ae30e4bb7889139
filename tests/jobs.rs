//! Job life end to end: submit, run on a real `rota-worker`, results, errors, retries,
//! priority and FIFO order, delayed jobs, idempotency.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use rota::proto::{Job, JobState, RetryPolicy};
use tempfile::TempDir;

/// Retries 100 ms apart at first, so failing jobs finish fast.
fn fast_retry() -> Option<RetryPolicy> {
    Some(RetryPolicy {
        initial_backoff: Some(duration(Duration::from_millis(100))),
        max_backoff: Some(duration(Duration::from_millis(400))),
        multiplier: 2.0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_job_succeeds_with_stdout_as_result() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let config = worker_config(
        "w1",
        &["default"],
        1,
        &[
            ("echo", "cat"),
            (
                "env",
                r#"printf '%s %s %s' "$ROTA_JOB_ID" "$ROTA_JOB_KIND" "$ROTA_ATTEMPT""#,
            ),
        ],
    );
    let _worker = Worker::start(&url, &config, dir.path());
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;

    let payload = b"hello rota\nsecond line \x00\xff".to_vec();
    let response = submit(&client, job("echo", &payload)).await;
    assert!(!response.deduplicated);
    let submitted = response.job.expect("response has a job");
    let uuid = uuid::Uuid::parse_str(&submitted.id).expect("job id is a UUID");
    assert_eq!(uuid.get_version_num(), 7, "job ids are UUID v7");
    assert_eq!(submitted.kind, "echo");
    assert_eq!(
        submitted.queue, "default",
        "the queue defaults to \"default\""
    );

    let done = wait_job_state(&client, &submitted.id, JobState::Succeeded, BOUND).await;
    assert_eq!(
        done.result, payload,
        "result is the command's stdout (cat of the payload)"
    );
    assert_eq!(done.attempt, 1);
    assert_eq!(done.attempts.len(), 1, "{:#?}", done.attempts);
    let attempt = &done.attempts[0];
    assert_eq!(attempt.number, 1);
    assert_eq!(attempt.worker_id, "w1");
    assert_eq!(attempt.outcome, "succeeded");
    let start = system_time(&done.start_time, "start_time");
    let end = system_time(&done.end_time, "end_time");
    let created = system_time(&done.create_time, "create_time");
    assert!(
        created <= start && start <= end,
        "create <= start <= end: {done:#?}"
    );

    // The command's environment names the job, its kind and the attempt.
    let id = submit_id(&client, job("env", b"")).await;
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(String::from_utf8_lossy(&done.result), format!("{id} env 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_first_then_fifo() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let client = job_client(&url).await;
    let order_file = dir.path().join("order.txt");

    // Everything is queued before any worker exists, so the order is the coordinator's choice.
    let plan: [(&str, i32); 8] = [
        ("a", 0),
        ("b", 0),
        ("c", 5),
        ("d", 0),
        ("e", 10),
        ("f", 5),
        ("g", -3),
        ("h", 10),
    ];
    let mut names = std::collections::HashMap::new();
    for (name, priority) in plan {
        let id = submit_id(
            &client,
            Job {
                priority,
                ..job("record", name.as_bytes())
            },
        )
        .await;
        names.insert(id, name);
    }

    let script = format!(r#"echo "$ROTA_JOB_ID" >> '{}'"#, order_file.display());
    let config = worker_config("w1", &["default"], 1, &[("record", &script)]);
    let _worker = Worker::start(&url, &config, dir.path());
    for id in names.keys() {
        wait_job_state(&client, id, JobState::Succeeded, BOUND).await;
    }

    let ran: Vec<&str> = std::fs::read_to_string(&order_file)
        .expect("order file")
        .lines()
        .map(|id| {
            *names
                .get(id)
                .unwrap_or_else(|| panic!("unknown id {id} in order file"))
        })
        .collect();
    assert_eq!(ran, ["e", "h", "c", "f", "a", "b", "d", "g"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_job_does_not_start_before_run_time() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let config = worker_config("w1", &["default"], 1, &[("echo", "cat")]);
    let _worker = Worker::start(&url, &config, dir.path());
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;

    let run_time = SystemTime::now() + Duration::from_secs(3);
    let response = submit(
        &client,
        Job {
            run_time: Some(timestamp(run_time)),
            ..job("echo", b"later")
        },
    )
    .await;
    let submitted = response.job.expect("response has a job");
    assert_eq!(
        submitted.state(),
        JobState::Scheduled,
        "a job with a future run_time waits"
    );

    let done = wait_job_state(&client, &submitted.id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"later");
    let started = system_time(&done.start_time, "start_time");
    assert!(
        started >= run_time,
        "started {:?} before its run_time",
        run_time.duration_since(started).unwrap_or_default()
    );
    let attempt_start = system_time(&done.attempts[0].start_time, "attempts[0].start_time");
    assert!(attempt_start >= run_time);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_is_retried_then_fails_with_stderr_tail() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let runs_file = dir.path().join("runs.txt");
    let script = format!(
        r#"echo "$ROTA_ATTEMPT" >> '{}'; i=0; while [ $i -lt 200 ]; do echo "noise line $i" >&2; i=$((i+1)); done; echo "boom on attempt $ROTA_ATTEMPT" >&2; exit 3"#,
        runs_file.display()
    );
    let config = worker_config("w1", &["default"], 1, &[("fail", &script)]);
    let _worker = Worker::start(&url, &config, dir.path());
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;

    // Default max_attempts (3).
    let id = submit_id(
        &client,
        Job {
            retry: fast_retry(),
            ..job("fail", b"")
        },
    )
    .await;
    let failed = wait_job_state(&client, &id, JobState::Failed, BOUND).await;
    assert_eq!(failed.attempt, 3, "default max_attempts is 3");
    assert!(
        failed.error.contains("boom on attempt 3"),
        "error holds the tail of stderr: {:?}",
        failed.error
    );
    assert_eq!(failed.attempts.len(), 3, "{:#?}", failed.attempts);
    for (i, attempt) in failed.attempts.iter().enumerate() {
        assert_eq!(attempt.number as usize, i + 1);
        assert_eq!(attempt.outcome, "failed", "{attempt:#?}");
        assert_eq!(attempt.worker_id, "w1");
        assert!(
            attempt
                .error
                .contains(&format!("boom on attempt {}", i + 1)),
            "{attempt:#?}"
        );
    }
    for pair in failed.attempts.windows(2) {
        let end = system_time(&pair[0].end_time, "end_time");
        let next = system_time(&pair[1].start_time, "start_time");
        assert!(
            next >= end,
            "an attempt started before the previous one ended"
        );
    }
    let runs = std::fs::read_to_string(&runs_file).unwrap();
    assert_eq!(runs.lines().collect::<Vec<_>>(), ["1", "2", "3"]);

    // An explicit max_attempts is honoured.
    let id = submit_id(
        &client,
        Job {
            retry: fast_retry(),
            max_attempts: 2,
            ..job("fail", b"")
        },
    )
    .await;
    let failed = wait_job_state(&client, &id, JobState::Failed, BOUND).await;
    assert_eq!(failed.attempt, 2);
    assert_eq!(failed.attempts.len(), 2);
    assert!(
        failed.error.contains("boom on attempt 2"),
        "{:?}",
        failed.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_is_never_retried() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let client = job_client(&url).await;
    let mut session = RawSession::open(&url, hello("raw-1", &["raw"])).await;

    let id = submit_id(
        &client,
        Job {
            retry: fast_retry(),
            priority: 10,
            ..job("raw", b"")
        },
    )
    .await;
    let assign = session.next_assign(BOUND).await;
    let assigned = assign.job.clone().expect("Assign carries the job");
    assert_eq!(assigned.id, id);
    assert_eq!(assigned.attempt, 1);
    let ack = session
        .complete(
            &id,
            &assign.lease_id,
            failure("bad input, do not retry", true),
        )
        .await;
    assert!(ack.accepted, "{ack:?}");

    let failed = wait_job_state(&client, &id, JobState::Failed, BOUND).await;
    assert_eq!(
        failed.attempt, 1,
        "a permanent failure uses no more attempts"
    );
    assert!(
        failed.error.contains("bad input, do not retry"),
        "{:?}",
        failed.error
    );
    assert_eq!(failed.attempts.len(), 1);
    assert_eq!(failed.attempts[0].outcome, "failed");

    // A plain failure is retried: the next Assign is the same job, attempt 2.
    let id2 = submit_id(
        &client,
        Job {
            retry: fast_retry(),
            ..job("raw", b"")
        },
    )
    .await;
    let assign = session.next_assign(BOUND).await;
    assert_eq!(
        assign.job.as_ref().unwrap().id,
        id2,
        "the failed job was not retried"
    );
    let ack = session
        .complete(&id2, &assign.lease_id, failure("transient", false))
        .await;
    assert!(ack.accepted, "{ack:?}");
    let again = session.next_assign(BOUND).await;
    let job2 = again.job.expect("Assign carries the job");
    assert_eq!(job2.id, id2);
    assert_eq!(job2.attempt, 2);
    assert_ne!(
        again.lease_id, assign.lease_id,
        "each attempt gets a new lease"
    );
    let ack = session
        .complete(&id2, &again.lease_id, success(b"ok"))
        .await;
    assert!(ack.accepted, "{ack:?}");
    let done = wait_job_state(&client, &id2, JobState::Succeeded, BOUND).await;
    assert_eq!(done.attempt, 2);
    assert_eq!(done.result, b"ok");
    assert_eq!(
        done.attempts
            .iter()
            .map(|a| a.outcome.as_str())
            .collect::<Vec<_>>(),
        ["failed", "succeeded"]
    );

    // The permanently failed job is still FAILED after all that.
    assert_eq!(get_job(&client, &id).await.state(), JobState::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_first_job() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let client = job_client(&coord.url()).await;

    let first = submit(
        &client,
        Job {
            idempotency_key: "order-42".into(),
            ..job("nobody-handles-this", b"first")
        },
    )
    .await;
    assert!(!first.deduplicated);
    let first = first.job.unwrap();

    let second = submit(
        &client,
        Job {
            idempotency_key: "order-42".into(),
            ..job("nobody-handles-this", b"second")
        },
    )
    .await;
    assert!(second.deduplicated, "same key: deduplicated");
    let second = second.job.unwrap();
    assert_eq!(second.id, first.id, "same key: the first job's id");
    assert_eq!(
        second.payload, b"first",
        "same key: the first job, not the new one"
    );

    let other = submit(
        &client,
        Job {
            idempotency_key: "order-43".into(),
            ..job("nobody-handles-this", b"other")
        },
    )
    .await;
    assert!(!other.deduplicated);
    assert_ne!(other.job.unwrap().id, first.id);

    // No key: never deduplicated.
    let a = submit_id(&client, job("nobody-handles-this", b"x")).await;
    let b = submit_id(&client, job("nobody-handles-this", b"x")).await;
    assert_ne!(a, b);

    assert_eq!(
        list_all_jobs(&client).await.len(),
        4,
        "the duplicate created no job"
    );
    assert_eq!(get_job(&client, &first.id).await.payload, b"first");
}
