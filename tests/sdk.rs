//! The Rust SDK's handlers against the real coordinator: a handler's notice
//! future resolves with its stop-by time, and a handler that ignores its
//! notice is aborted at that time and its job re-queued.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use rota::proto::JobState;
use rota::worker::{NoticeKind, ShutdownHandle, TaskContext, TaskError, Worker};
use tempfile::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notice_future_resolves_and_an_ignoring_handler_is_aborted_at_stop_by() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let worker = Worker::builder(url.clone())
        .worker_id("sdk")
        .slots(2)
        .handler("listen", |ctx: TaskContext| async move {
            let notice = ctx.notice().await;
            assert_eq!(notice.kind, NoticeKind::Shutdown);
            let left = notice
                .stop_by
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            Ok::<_, TaskError>(left.as_millis().to_string().into_bytes())
        })
        .handler("ignore", |_ctx: TaskContext| async move {
            std::future::pending::<()>().await;
            Ok::<_, TaskError>(Vec::new())
        })
        .build()
        .unwrap();
    let handle = ShutdownHandle::new();
    let running = tokio::spawn(worker.run_with(handle.clone()));
    let client = job_client(&url).await;
    let grace = Duration::from_secs(2);
    let mut listen = job("listen", b"");
    listen.shutdown_grace = Some(duration(Duration::from_secs(10)));
    let listen = submit_id(&client, listen).await;
    let mut ignore = job("ignore", b"");
    ignore.shutdown_grace = Some(duration(grace));
    let ignore = submit_id(&client, ignore).await;
    wait_job_state(&client, &listen, JobState::Running, BOUND).await;
    wait_job_state(&client, &ignore, JobState::Running, BOUND).await;

    let drained_at = SystemTime::now();
    handle.drain();
    let done = wait_job_state(&client, &listen, JobState::Succeeded, BOUND).await;
    let text = String::from_utf8(done.result).unwrap();
    let left: u64 = text.parse().unwrap_or_else(|_| panic!("result {text:?}"));
    assert!(
        (5_000..=10_000).contains(&left),
        "stop_by is about the job's 10s grace away ({left}ms)"
    );
    let summary = tokio::time::timeout(BOUND, running)
        .await
        .expect("the worker stops")
        .unwrap();
    assert!(summary.is_clean(), "{summary:?}");
    let requeued = get_job(&client, &ignore).await;
    assert_eq!((requeued.state(), requeued.attempt), (JobState::Queued, 0));
    assert_eq!(requeued.attempts[0].outcome, "interrupted");
    let aborted = system_time(&requeued.attempts[0].end_time, "end_time");
    assert!(
        aborted.duration_since(drained_at).unwrap() >= grace,
        "not aborted before stop_by"
    );
}
