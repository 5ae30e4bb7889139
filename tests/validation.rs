//! Bad requests: each gets the right status code and a message naming the problem, and
//! changes nothing (the job count stays the same, a rejected idempotency key stays free).

mod common;

use std::time::Duration;

use common::*;
use rota::proto::{
    CancelJobRequest, GetJobRequest, Job, RetryPolicy, SubmitJobRequest, SubmitJobsRequest,
};
use tempfile::TempDir;
use tonic::Code;

/// The coordinator's payload limit in these tests (`--max-payload 1MiB`).
const MAX_PAYLOAD: usize = 1024 * 1024;

fn negative_duration() -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    })
}

async fn count(client: &JobClient) -> usize {
    list_all_jobs(client).await.len()
}

async fn submit(client: &JobClient, job: Job) -> Result<Job, tonic::Status> {
    client
        .clone()
        .submit_job(SubmitJobRequest { job: Some(job) })
        .await
        .map(|r| r.into_inner().job.expect("response has a job"))
}

async fn start() -> (TempDir, Coordinator, JobClient) {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &["--max-payload", "1MiB"]);
    let client = job_client(&coord.url()).await;
    // One job already there, so "nothing changed" is not just "still empty".
    submit(&client, job("idle", b"baseline")).await.unwrap();
    (dir, coord, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_kind_is_rejected() {
    let (_dir, _coord, client) = start().await;
    let before = count(&client).await;

    let bad = Job {
        idempotency_key: "key-of-a-bad-request".into(),
        ..job("", b"x")
    };
    assert_status(
        "empty kind",
        submit(&client, bad).await,
        Code::InvalidArgument,
        &["kind"],
    );
    assert_eq!(
        count(&client).await,
        before,
        "a rejected job must not be stored"
    );

    // The rejected request did not claim its idempotency key.
    let good = client
        .clone()
        .submit_job(SubmitJobRequest {
            job: Some(Job {
                idempotency_key: "key-of-a-bad-request".into(),
                ..job("idle", b"x")
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !good.deduplicated,
        "a rejected submit must not register its key"
    );
    assert_eq!(count(&client).await, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_over_the_limit_is_rejected() {
    let (_dir, _coord, client) = start().await;
    let before = count(&client).await;

    let too_big = vec![b'x'; MAX_PAYLOAD + 1];
    assert_status(
        "payload one byte over the limit",
        submit(&client, job("idle", &too_big)).await,
        Code::InvalidArgument,
        &["payload", &MAX_PAYLOAD.to_string()],
    );
    assert_eq!(count(&client).await, before);

    // Exactly at the limit is fine ("at most the coordinator's max payload").
    let at_limit = vec![b'y'; MAX_PAYLOAD];
    let stored = submit(&client, job("idle", &at_limit)).await.unwrap();
    assert_eq!(count(&client).await, before + 1);
    assert_eq!(
        get_job(&client, &stored.id).await.payload.len(),
        MAX_PAYLOAD
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_durations_are_rejected_naming_the_field() {
    let (_dir, _coord, client) = start().await;
    let before = count(&client).await;

    let cases: [(&str, Job); 3] = [
        (
            "timeout",
            Job {
                timeout: negative_duration(),
                ..job("idle", b"")
            },
        ),
        (
            "shutdown_grace",
            Job {
                shutdown_grace: negative_duration(),
                ..job("idle", b"")
            },
        ),
        (
            "initial_backoff",
            Job {
                retry: Some(RetryPolicy {
                    initial_backoff: negative_duration(),
                    ..Default::default()
                }),
                ..job("idle", b"")
            },
        ),
    ];
    for (field, bad) in cases {
        assert_status(
            &format!("negative {field}"),
            submit(&client, bad).await,
            Code::InvalidArgument,
            &[field],
        );
        assert_eq!(
            count(&client).await,
            before,
            "negative {field} stored a job"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_bad_job_stores_nothing() {
    let (_dir, _coord, client) = start().await;
    let before = count(&client).await;

    let batch = vec![
        job("idle", b"1"),
        job("idle", b"2"),
        job("", b"3"),
        job("idle", b"4"),
    ];
    let result = client
        .clone()
        .submit_jobs(SubmitJobsRequest { jobs: batch })
        .await;
    assert_status(
        "batch with an empty kind",
        result,
        Code::InvalidArgument,
        &["kind"],
    );
    assert_eq!(count(&client).await, before, "SubmitJobs is all or nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_ids() {
    let (_dir, _coord, client) = start().await;
    let before = list_all_jobs(&client).await;
    let unknown = uuid::Uuid::now_v7().to_string();

    let get = |id: &str| {
        let mut c = client.clone();
        let id = id.to_string();
        async move { c.get_job(GetJobRequest { id }).await }
    };
    let cancel = |id: &str| {
        let mut c = client.clone();
        let id = id.to_string();
        async move {
            c.cancel_job(CancelJobRequest {
                id,
                reason: "test".into(),
            })
            .await
        }
    };

    assert_status(
        "GetJob unknown id",
        get(&unknown).await,
        Code::NotFound,
        &[],
    );
    assert_status(
        "CancelJob unknown id",
        cancel(&unknown).await,
        Code::NotFound,
        &[],
    );
    for malformed in ["not-a-uuid", "", "0190f0c2-zzzz-7000-8000-000000000000"] {
        assert_status(
            &format!("GetJob id {malformed:?}"),
            get(malformed).await,
            Code::InvalidArgument,
            &["id"],
        );
        assert_status(
            &format!("CancelJob id {malformed:?}"),
            cancel(malformed).await,
            Code::InvalidArgument,
            &["id"],
        );
    }

    // Nothing changed: same jobs, same states.
    let after = list_all_jobs(&client).await;
    let summary = |jobs: &[Job]| {
        jobs.iter()
            .map(|j| (j.id.clone(), j.state, j.cancel_requested))
            .collect::<Vec<_>>()
    };
    assert_eq!(summary(&after), summary(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_submit_still_works_after_rejections() {
    // The coordinator stays healthy after a run of bad requests.
    let (_dir, _coord, client) = start().await;
    for _ in 0..20 {
        let _ = submit(&client, job("", b"")).await;
    }
    let ok = submit(
        &client,
        Job {
            timeout: Some(duration(Duration::from_secs(5))),
            ..job("idle", b"fine")
        },
    )
    .await
    .expect("a valid job is accepted");
    assert_eq!(get_job(&client, &ok.id).await.payload, b"fine");
    assert_eq!(count(&client).await, 2);
}
