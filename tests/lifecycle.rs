//! The rest of JobService end to end: WatchJob, ListJobs paging and filters,
//! CancelJob and RetryJob, with the test acting as the worker.

mod common;

use common::*;
use rota::proto::{CancelJobRequest, JobState, ListJobsRequest, RetryJobRequest, WatchJobRequest};
use tempfile::TempDir;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_each_change_and_ends_at_a_terminal_state() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let client = job_client(&coord.url()).await;
    let id = submit_id(&client, job("watched", b"in")).await;
    let mut stream = client
        .clone()
        .watch_job(WatchJobRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("the current state");
    assert_eq!(first.state(), JobState::Queued);

    let mut worker = RawSession::open(&coord.url(), hello("raw-w", &["watched"])).await;
    let assign = worker.next_assign(BOUND).await;
    let running = stream.message().await.unwrap().expect("a change");
    assert_eq!(running.state(), JobState::Running);
    assert_eq!(running.attempt, 1);
    let ack = worker
        .complete(&id, &assign.lease_id, success(b"out"))
        .await;
    assert!(ack.accepted);
    let done = stream.message().await.unwrap().expect("the final state");
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(done.result, b"out");
    assert!(
        stream.message().await.unwrap().is_none(),
        "the stream ends at a terminal state"
    );

    // Watching a finished job yields it once and ends.
    let mut again = client
        .clone()
        .watch_job(WatchJobRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.message().await.unwrap().unwrap().state(),
        JobState::Succeeded
    );
    assert!(again.message().await.unwrap().is_none());
    let missing = client
        .clone()
        .watch_job(WatchJobRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_in_creation_order_and_filters() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let client = job_client(&coord.url()).await;
    let mut ids = Vec::new();
    for i in 0..25 {
        let mut j = job(if i % 2 == 0 { "even" } else { "odd" }, b"");
        j.queue = if i < 10 { "q1" } else { "q2" }.into();
        ids.push(submit_id(&client, j).await);
    }
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .clone()
            .list_jobs(ListJobsRequest {
                page_size: 10,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.jobs.len() <= 10);
        pages.push(page.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![10, 10, 5]
    );
    assert_eq!(pages.concat(), ids, "every job once, in creation order");

    let filter = |queue: &str, kind: &str, state: JobState| ListJobsRequest {
        queue: queue.into(),
        kind: kind.into(),
        state: state as i32,
        ..Default::default()
    };
    assert_eq!(
        list_jobs(&client, filter("", "even", JobState::Unspecified))
            .await
            .len(),
        13
    );
    assert_eq!(
        list_jobs(&client, filter("q1", "odd", JobState::Unspecified))
            .await
            .len(),
        5
    );
    assert_eq!(
        list_jobs(&client, filter("q2", "", JobState::Queued))
            .await
            .len(),
        15
    );
    assert_eq!(
        list_jobs(&client, filter("", "", JobState::Succeeded))
            .await
            .len(),
        0
    );

    let bad_token = client
        .clone()
        .list_jobs(ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_token.code(), Code::InvalidArgument);
    assert!(
        bad_token.message().contains("page_token"),
        "{}",
        bad_token.message()
    );
    let bad_size = client
        .clone()
        .list_jobs(ListJobsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_size.code(), Code::InvalidArgument);
    assert!(
        bad_size.message().contains("page_size"),
        "{}",
        bad_size.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_retry_follow_the_job_life() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let client = job_client(&coord.url()).await;
    let cancel = |id: &str| {
        let mut c = client.clone();
        let req = CancelJobRequest {
            id: id.to_string(),
            reason: "no longer needed".into(),
        };
        async move { c.cancel_job(req).await }
    };
    let retry = |id: &str| {
        let mut c = client.clone();
        let req = RetryJobRequest { id: id.to_string() };
        async move { c.retry_job(req).await }
    };

    // A queued job is cancelled at once, and cannot be cancelled twice.
    let id = submit_id(&client, job("c", b"")).await;
    let cancelled = cancel(&id).await.unwrap().into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert!(
        cancelled.error.contains("no longer needed"),
        "{}",
        cancelled.error
    );
    assert_eq!(
        cancel(&id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // Retry runs it again, with fresh attempts.
    let retried = retry(&id).await.unwrap().into_inner();
    assert_eq!((retried.state(), retried.attempt), (JobState::Queued, 0));
    assert_eq!(
        retry(&id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // A running job is only marked; its failure then ends it CANCELLED, not retried.
    let mut worker = RawSession::open(&coord.url(), hello("raw-w", &["c"])).await;
    let assign = worker.next_assign(BOUND).await;
    let marked = cancel(&id).await.unwrap().into_inner();
    assert_eq!(marked.state(), JobState::Running);
    assert!(marked.cancel_requested);
    let ack = worker
        .complete(&id, &assign.lease_id, failure("stopped", false))
        .await;
    assert!(ack.accepted);
    let end = get_job(&client, &id).await;
    assert_eq!((end.state(), end.attempt), (JobState::Cancelled, 1));

    // A succeeded job cannot be retried; unknown ids are NOT_FOUND.
    let ok = submit_id(&client, job("c", b"")).await;
    let assign = worker.next_assign(BOUND).await;
    assert!(
        worker
            .complete(&ok, &assign.lease_id, success(b""))
            .await
            .accepted
    );
    assert_eq!(
        retry(&ok).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(retry(&unknown).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(cancel(&unknown).await.unwrap_err().code(), Code::NotFound);
}
