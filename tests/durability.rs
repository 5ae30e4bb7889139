//! Acknowledged means durable: jobs survive a `kill -9` of the coordinator.

mod common;

use std::collections::BTreeSet;

use common::*;
use rota::proto::{Job, JobState, SubmitJobRequest, SubmitJobsRequest};
use tempfile::TempDir;

/// Jobs submitted in batches (8 batches of 100) and one by one (4 tasks × 50).
const BATCHES: usize = 8;
const BATCH_SIZE: usize = 100;
const SINGLE_TASKS: usize = 4;
const SINGLES_PER_TASK: usize = 50;
const TOTAL: usize = BATCHES * BATCH_SIZE + SINGLE_TASKS * SINGLES_PER_TASK;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_jobs_survive_kill_9() {
    assert_eq!(TOTAL, 1000);
    let dir = TempDir::new().unwrap();
    let mut coord = Coordinator::start(dir.path(), &[]);
    let client = job_client(&coord.url()).await;

    // All submits run concurrently; each task returns the (id, payload) pairs it got acked.
    let mut tasks = tokio::task::JoinSet::new();
    for b in 0..BATCHES {
        let mut c = client.clone();
        tasks.spawn(async move {
            let jobs: Vec<Job> = (0..BATCH_SIZE)
                .map(|i| job("durable", format!("batch-{b}-{i}").as_bytes()))
                .collect();
            let results = c
                .submit_jobs(SubmitJobsRequest { jobs })
                .await
                .unwrap_or_else(|e| panic!("SubmitJobs: {e}"))
                .into_inner()
                .results;
            assert_eq!(results.len(), BATCH_SIZE, "one result per job, in order");
            results
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    let j = r.job.expect("result has a job");
                    assert!(j.payload.is_empty(), "batch results leave payloads out");
                    // Results come in request order; the payloads prove it after restart.
                    (j.id, format!("batch-{b}-{i}").into_bytes())
                })
                .collect::<Vec<_>>()
        });
    }
    for t in 0..SINGLE_TASKS {
        let mut c = client.clone();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..SINGLES_PER_TASK {
                let payload = format!("single-{t}-{i}").into_bytes();
                let j = c
                    .submit_job(SubmitJobRequest {
                        job: Some(job("durable", &payload)),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("SubmitJob: {e}"))
                    .into_inner()
                    .job
                    .expect("response has a job");
                acked.push((j.id, payload));
            }
            acked
        });
    }
    let mut acked = Vec::new();
    while let Some(done) = tasks.join_next().await {
        acked.extend(done.expect("submit task panicked"));
    }

    // Also an idempotency key, which must survive too.
    let keyed = client
        .clone()
        .submit_job(SubmitJobRequest {
            job: Some(Job {
                idempotency_key: "survives-restarts".into(),
                ..job("durable", b"keyed")
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();

    // Crash right after the last acknowledgement.
    coord.kill9();
    assert_eq!(acked.len(), TOTAL);
    let ids: BTreeSet<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), TOTAL, "every acknowledged job got its own id");

    coord.restart();
    let client = job_client(&coord.url()).await;
    let listed = list_all_jobs(&client).await;
    let listed_ids: Vec<String> = listed.iter().map(|j| j.id.clone()).collect();
    let listed_set: BTreeSet<String> = listed_ids.iter().cloned().collect();
    let missing: Vec<_> = ids.difference(&listed_set).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged jobs lost after kill -9, e.g. {missing:?}",
        ids.difference(&listed_set).count()
    );
    assert_eq!(
        listed.len(),
        TOTAL + 1,
        "no job appeared twice or out of nowhere"
    );
    let mut sorted = listed_ids.clone();
    sorted.sort();
    assert_eq!(
        listed_ids, sorted,
        "ListJobs returns jobs in creation (id) order"
    );

    // Contents survived, not just ids.
    let by_id: std::collections::HashMap<_, _> =
        listed.iter().map(|j| (j.id.as_str(), j)).collect();
    for (id, payload) in &acked {
        let j = by_id[id.as_str()];
        assert_eq!(&j.payload, payload, "job {id}");
        assert_eq!(j.kind, "durable");
        assert_eq!(j.state(), JobState::Queued, "job {id}");
    }

    let again = client
        .clone()
        .submit_job(SubmitJobRequest {
            job: Some(Job {
                idempotency_key: "survives-restarts".into(),
                ..job("durable", b"keyed again")
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.deduplicated, "the idempotency key survived the crash");
    assert_eq!(again.job.unwrap().id, keyed.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_survive_restart() {
    let dir = TempDir::new().unwrap();
    let mut coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let config = worker_config("w1", &["default"], 1, &[("echo", "cat")]);
    let mut worker = Worker::start(&url, &config, dir.path());
    wait_worker_connected(&url, "w1").await;
    let client = job_client(&url).await;
    let id = client
        .clone()
        .submit_job(SubmitJobRequest {
            job: Some(job("echo", b"kept")),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
        .id;
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    worker.kill9();

    coord.kill9();
    coord.restart();
    let client = job_client(&coord.url()).await;
    let after = get_job(&client, &id).await;
    assert_eq!(after.state(), JobState::Succeeded);
    assert_eq!(after.result, b"kept");
    assert_eq!(after.attempt, done.attempt);
    assert_eq!(after.attempts, done.attempts);
}
