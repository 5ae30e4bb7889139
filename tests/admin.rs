//! The operator's view: connected workers and per-queue job counts; clean exit on signals.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::*;
use rota::proto::{CancelJobRequest, GetQueueStatsRequest, Job, JobState, LeaseRef, QueueStat};
use tempfile::TempDir;

fn set(items: &[String]) -> BTreeSet<&str> {
    items.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_workers_shows_a_connected_worker() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(
        dir.path(),
        &["--lease-timeout", "2s", "--heartbeat-interval", "300ms"],
    );
    let url = coord.url();
    let admin = admin_client(&url).await;
    assert!(list_workers(&admin).await.is_empty(), "no workers yet");

    let before = SystemTime::now();
    let config = worker_config(
        "adm-w",
        &["default", "emails"],
        3,
        &[("echo", "cat"), ("resize", "true")],
    );
    let mut worker = Worker::start(&url, &config, dir.path());
    let listed = wait_worker_connected(&url, "adm-w").await;
    assert_eq!(listed.slots, 3);
    assert_eq!(set(&listed.queues), BTreeSet::from(["default", "emails"]));
    assert_eq!(set(&listed.kinds), BTreeSet::from(["echo", "resize"]));
    assert!(listed.running.is_empty(), "{listed:?}");
    assert!(!listed.draining);
    assert!(
        !listed.hostname.is_empty(),
        "the worker reports its hostname"
    );
    let connected = system_time(&listed.connect_time, "connect_time");
    // One second of slack for clock granularity.
    assert!(connected + Duration::from_secs(1) >= before, "{listed:?}");

    // A worker that exits is no longer listed (at the latest after the lease timeout).
    worker.terminate();
    wait_for(BOUND, "adm-w to leave ListWorkers after it exits", || {
        let admin = admin.clone();
        async move {
            !list_workers(&admin)
                .await
                .iter()
                .any(|w| w.worker_id == "adm-w")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_workers_shows_running_leases() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let admin = admin_client(&url).await;
    let client = job_client(&url).await;
    let mut session = RawSession::open(&url, hello("raw-adm", &["raw"])).await;
    let id = submit_id(&client, job("raw", b"")).await;
    let assign = session.next_assign(BOUND).await;

    let lease = LeaseRef {
        job_id: id.clone(),
        lease_id: assign.lease_id.clone(),
    };
    let listed = wait_worker_connected(&url, "raw-adm").await;
    assert_eq!(listed.running, vec![lease], "{listed:?}");
    assert_eq!(listed.slots, 1);
    assert_eq!(set(&listed.kinds), BTreeSet::from(["raw"]));

    let ack = session.complete(&id, &assign.lease_id, success(b"")).await;
    assert!(ack.accepted);
    wait_for(BOUND, "raw-adm to list no running lease", || {
        let admin = admin.clone();
        async move {
            list_workers(&admin)
                .await
                .iter()
                .any(|w| w.worker_id == "raw-adm" && w.running.is_empty())
        }
    })
    .await;
}

/// The counters of a `QueueStat`, for comparison.
fn counts(s: &QueueStat) -> [u64; 7] {
    [
        s.scheduled,
        s.queued,
        s.running,
        s.succeeded,
        s.failed,
        s.cancelled,
        s.expired,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_stats_count_jobs_per_state() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let admin = admin_client(&url).await;
    let client = job_client(&url).await;
    let q = "stats-q";
    let in_q = |kind: &str| Job {
        queue: q.to_string(),
        ..job(kind, b"")
    };

    // One job of each finished or running state, through a raw worker on queue q.
    let mut session = RawSession::open(
        &url,
        rota::proto::Hello {
            queues: vec![q.to_string()],
            ..hello("raw-stats", &["k"])
        },
    )
    .await;
    for outcome in [success(b"ok"), failure("no", true)] {
        let id = submit_id(&client, in_q("k")).await;
        let assign = session.next_assign(BOUND).await;
        assert_eq!(assign.job.as_ref().unwrap().id, id);
        assert!(
            session
                .complete(&id, &assign.lease_id, outcome)
                .await
                .accepted
        );
    }
    let running = submit_id(&client, in_q("k")).await;
    session.next_assign(BOUND).await;
    wait_job_state(&client, &running, JobState::Running, BOUND).await;

    // Kind "idle": no worker takes it.
    submit_id(&client, in_q("idle")).await;
    submit_id(&client, in_q("idle")).await;
    let cancelled = submit_id(&client, in_q("idle")).await;
    client
        .clone()
        .cancel_job(CancelJobRequest {
            id: cancelled.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    submit_id(
        &client,
        Job {
            run_time: Some(timestamp(SystemTime::now() + Duration::from_secs(3600))),
            ..in_q("idle")
        },
    )
    .await;
    let expiring = submit_id(
        &client,
        Job {
            expire_time: Some(timestamp(SystemTime::now() + Duration::from_secs(2))),
            ..in_q("idle")
        },
    )
    .await;
    wait_job_state(&client, &expiring, JobState::Expired, BOUND).await;
    wait_job_state(&client, &cancelled, JobState::Cancelled, BOUND).await;
    // And one job in another queue.
    submit_id(&client, job("idle", b"")).await;

    // [scheduled, queued, running, succeeded, failed, cancelled, expired]
    let want = [1, 2, 1, 1, 1, 1, 1];
    let stat = wait_until(BOUND, "GetQueueStats(stats-q) to match", || {
        let mut admin = admin.clone();
        async move {
            let stats = admin
                .get_queue_stats(GetQueueStatsRequest { queue: q.into() })
                .await
                .unwrap_or_else(|e| panic!("GetQueueStats: {e}"))
                .into_inner();
            let stat = stats.queues.iter().find(|s| s.queue == q).cloned()?;
            assert_eq!(stats.queues.len(), 1, "asked for one queue: {stats:?}");
            if counts(&stat) == want {
                Some(stat)
            } else {
                eprintln!("stats-q so far: {stat:?}");
                None
            }
        }
    })
    .await;
    let age = stat
        .oldest_queued_age
        .expect("oldest_queued_age is set while jobs are queued");
    assert!(age.seconds >= 0 && age.nanos >= 0, "{age:?}");

    // An empty queue name: every queue.
    let all = admin
        .clone()
        .get_queue_stats(GetQueueStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: BTreeSet<&str> = all.queues.iter().map(|s| s.queue.as_str()).collect();
    assert!(names.contains(q) && names.contains("default"), "{all:?}");
    let default = all.queues.iter().find(|s| s.queue == "default").unwrap();
    assert_eq!(counts(default), [0, 1, 0, 0, 0, 0, 0]);
    let again = all.queues.iter().find(|s| s.queue == q).unwrap();
    assert_eq!(counts(again), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_exits_cleanly_on_sigterm_and_sigint() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let dir = TempDir::new().unwrap();
        let mut coord = Coordinator::start(dir.path(), &[]);
        let url = coord.url();
        // With a connected worker and a client, so the streams must be drained too.
        let _session = RawSession::open(&url, hello("raw-exit", &["raw"])).await;
        let client = job_client(&url).await;
        submit_id(&client, job("idle", b"")).await;
        let status = coord.signal_and_wait(signal);
        assert_eq!(
            status.code(),
            Some(0),
            "exit after signal {signal}: {status:?}"
        );
    }
}
