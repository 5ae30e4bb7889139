//! Limits, through the real binaries: each class of limit refused with a status that names the
//! field or setting and the limit, and nothing changed; workers that flood or send garbage cut
//! off without harm to the others.

mod common;

use std::time::Duration;

use common::raw_grpc::{frame, RawConn};
use common::*;
use prost::Message;
use rota::proto::admin_service_client::AdminServiceClient;
use rota::proto::schedule_service_client::ScheduleServiceClient;
use rota::proto::worker_message::Msg as WorkerMsg;
use rota::proto::{
    schedule_spec, CancelJobRequest, CronSpec, DrainWorkerRequest, GetJobRequest,
    GetQueueStatsRequest, GetScheduleRequest, Heartbeat, Hello, JobState, ListJobsRequest,
    ListSchedulesRequest, PreviewScheduleRequest, PutScheduleRequest, Schedule, ScheduleSpec,
    SubmitJobRequest, SubmitJobsRequest, WatchJobRequest, WorkerMessage,
};
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::Code;

async fn schedule_client(url: &str) -> ScheduleServiceClient<Channel> {
    ScheduleServiceClient::new(channel(url).await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn far_timestamp() -> Option<prost_types::Timestamp> {
    // Year 10000: past protobuf's (and chrono's comfortable) range.
    Some(prost_types::Timestamp {
        seconds: 253_402_300_800,
        nanos: 0,
    })
}

fn cron_schedule(name: &str, expression: &str, timezone: &str) -> Schedule {
    Schedule {
        name: name.into(),
        job: Some(job("report", b"")),
        spec: Some(ScheduleSpec {
            kind: Some(schedule_spec::Kind::Cron(CronSpec {
                expression: expression.into(),
                timezone: timezone.into(),
            })),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_resource_exhausted_and_changes_nothing() {
    let dir = TempDir::new().unwrap();
    // The smallest allowed for a 1KiB payload is 10MiB + 2KiB.
    let coord = Coordinator::start(
        dir.path(),
        &["--max-payload", "1KiB", "--max-message-size", "11MiB"],
    );
    let url = coord.url();
    let client = job_client(&url).await;
    submit_id(&client, job("idle", b"baseline")).await;
    let before = list_all_jobs(&client).await.len();

    let huge = vec![b'x'; 12 << 20];
    let r = client
        .clone()
        .submit_job(SubmitJobRequest {
            job: Some(job("idle", &huge)),
        })
        .await;
    assert_status(
        "a 12MiB SubmitJob",
        r,
        Code::ResourceExhausted,
        &[
            "message",
            "the limit is 11534336 bytes",
            "--max-message-size",
        ],
    );
    assert_eq!(list_all_jobs(&client).await.len(), before);

    // The same limit on the worker stream, for its first message.
    let hello = Hello {
        hostname: "h".repeat(12 << 20),
        ..common::hello("big-hello", &[])
    };
    let r = RawSession::try_open_silent(&url, hello).await.map(|_| ());
    assert_status(
        "a 12MiB Hello",
        r,
        Code::ResourceExhausted,
        &["the limit is 11534336 bytes", "--max-message-size"],
    );
    assert!(list_workers(&admin_client(&url).await).await.is_empty());

    // And the coordinator still serves.
    submit_id(&client, job("idle", b"after")).await;
    assert_eq!(list_all_jobs(&client).await.len(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_payload_limit_fails_the_attempt_naming_the_limit() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &["--max-payload", "1KiB"]);
    let url = coord.url();
    let client = job_client(&url).await;
    let mut session = RawSession::open(&url, hello("big-result", &["k"])).await;
    let id = submit_id(
        &client,
        rota::proto::Job {
            max_attempts: 1,
            ..job("k", b"")
        },
    )
    .await;
    let assign = session.next_assign(BOUND).await;
    let ack = session
        .complete(&id, &assign.lease_id, success(&[7; 2048]))
        .await;
    assert!(ack.accepted, "the report ends the task: {ack:?}");
    let done = wait_job_state(&client, &id, JobState::Failed, BOUND).await;
    assert_eq!(
        done.error,
        "complete.success.result: is 2048 bytes; the limit is 1024 bytes (--max-payload)"
    );
    assert!(done.result.is_empty(), "no part of the result is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_fields_and_labels_over_their_limits_are_refused_naming_the_field() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let client = job_client(&url).await;
    let schedules = schedule_client(&url).await;
    let admin: AdminServiceClient<Channel> = admin_client(&url).await;
    let baseline = submit_id(&client, job("idle", b"baseline")).await;
    let jobs_before = list_all_jobs(&client).await;

    let name = "n".repeat(257);
    let text = "t".repeat(8193);
    let submit = |job: rota::proto::Job| {
        let client = client.clone();
        async move {
            client
                .clone()
                .submit_job(SubmitJobRequest { job: Some(job) })
                .await
        }
    };
    let label_map = |n: usize, key_len: usize, value_len: usize| {
        (0..n)
            .map(|i| {
                (
                    format!("{i:0>width$}", width = key_len),
                    "v".repeat(value_len),
                )
            })
            .collect()
    };
    let big_job = |f: &dyn Fn(&mut rota::proto::Job)| {
        let mut j = job("idle", b"");
        f(&mut j);
        j
    };

    let cases: Vec<(&str, Result<(), tonic::Status>, &[&str])> = vec![
        (
            "kind",
            submit(big_job(&|j| j.kind = name.clone())).await.map(drop),
            &["job.kind", "257 bytes", "the limit is 256 bytes"],
        ),
        (
            "queue",
            submit(big_job(&|j| j.queue = name.clone())).await.map(drop),
            &["job.queue", "the limit is 256 bytes"],
        ),
        (
            "idempotency key",
            submit(big_job(&|j| j.idempotency_key = "k".repeat(1025)))
                .await
                .map(drop),
            &["job.idempotency_key", "the limit is 1024 bytes"],
        ),
        (
            "label count",
            submit(big_job(&|j| j.labels = label_map(65, 3, 1)))
                .await
                .map(drop),
            &["job.labels", "65 entries", "the limit is 64"],
        ),
        (
            "label key",
            submit(big_job(&|j| j.labels = label_map(1, 1025, 1)))
                .await
                .map(drop),
            &["job.labels", "1025 bytes", "1 to 1024 bytes"],
        ),
        (
            "label value",
            submit(big_job(&|j| j.labels = label_map(1, 3, 1025)))
                .await
                .map(drop),
            &["job.labels", "value 1025 bytes", "at most 1024 bytes"],
        ),
        (
            "run_time past year 9999",
            submit(big_job(&|j| j.run_time = far_timestamp()))
                .await
                .map(drop),
            &["job.run_time", "out of range", "9999-12-31"],
        ),
        (
            "batch",
            client
                .clone()
                .submit_jobs(SubmitJobsRequest {
                    jobs: vec![job("idle", b""), big_job(&|j| j.kind = name.clone())],
                })
                .await
                .map(drop),
            &["jobs[1].kind", "the limit is 256 bytes"],
        ),
        (
            "job id",
            client
                .clone()
                .get_job(GetJobRequest {
                    id: "i".repeat(100),
                })
                .await
                .map(drop),
            &["id", "100 bytes", "the limit is 64 bytes"],
        ),
        (
            "cancel reason",
            client
                .clone()
                .cancel_job(CancelJobRequest {
                    id: baseline.clone(),
                    reason: text.clone(),
                })
                .await
                .map(drop),
            &["reason", "8193 bytes", "the limit is 8192 bytes"],
        ),
        (
            "list queue",
            client
                .clone()
                .list_jobs(ListJobsRequest {
                    queue: name.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
            &["queue", "the limit is 256 bytes"],
        ),
        (
            "list kind",
            client
                .clone()
                .list_jobs(ListJobsRequest {
                    kind: name.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
            &["kind", "the limit is 256 bytes"],
        ),
        (
            "list schedule",
            client
                .clone()
                .list_jobs(ListJobsRequest {
                    schedule: name.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
            &["schedule", "the limit is 256 bytes"],
        ),
        (
            "schedule name",
            schedules
                .clone()
                .put_schedule(PutScheduleRequest {
                    schedule: Some(cron_schedule(&name, "@daily", "")),
                })
                .await
                .map(drop),
            &["schedule.name", "the limit is 256 bytes"],
        ),
        (
            "cron expression",
            schedules
                .clone()
                .put_schedule(PutScheduleRequest {
                    schedule: Some(cron_schedule(
                        "s",
                        &format!("0 0 * * {}", "1,".repeat(600)),
                        "",
                    )),
                })
                .await
                .map(drop),
            &["schedule.spec.cron.expression", "the limit is 1024 bytes"],
        ),
        (
            "timezone",
            schedules
                .clone()
                .put_schedule(PutScheduleRequest {
                    schedule: Some(cron_schedule("s", "@daily", &name)),
                })
                .await
                .map(drop),
            &["schedule.spec.cron.timezone", "the limit is 256 bytes"],
        ),
        (
            "template labels",
            schedules
                .clone()
                .put_schedule(PutScheduleRequest {
                    schedule: Some(Schedule {
                        job: Some(big_job(&|j| j.labels = label_map(65, 3, 1))),
                        ..cron_schedule("s", "@daily", "")
                    }),
                })
                .await
                .map(drop),
            &["schedule.job.labels", "the limit is 64"],
        ),
        (
            "get schedule",
            schedules
                .clone()
                .get_schedule(GetScheduleRequest { name: name.clone() })
                .await
                .map(drop),
            &["name", "the limit is 256 bytes"],
        ),
        (
            "schedule page token",
            schedules
                .clone()
                .list_schedules(ListSchedulesRequest {
                    page_size: 0,
                    page_token: name.clone(),
                })
                .await
                .map(drop),
            &["page_token", "the limit is 256 bytes"],
        ),
        (
            "preview after",
            schedules
                .clone()
                .preview_schedule(PreviewScheduleRequest {
                    source: Some(rota::proto::preview_schedule_request::Source::Spec(
                        cron_schedule("s", "@daily", "").spec.unwrap(),
                    )),
                    after: far_timestamp(),
                    count: 3,
                })
                .await
                .map(drop),
            &["after", "out of range"],
        ),
        (
            "drain worker id",
            admin
                .clone()
                .drain_worker(DrainWorkerRequest {
                    worker_id: name.clone(),
                    reason: String::new(),
                })
                .await
                .map(drop),
            &["worker_id", "the limit is 256 bytes"],
        ),
        (
            "drain reason",
            admin
                .clone()
                .drain_worker(DrainWorkerRequest {
                    worker_id: "w".into(),
                    reason: text.clone(),
                })
                .await
                .map(drop),
            &["reason", "the limit is 8192 bytes"],
        ),
        (
            "queue stats",
            admin
                .clone()
                .get_queue_stats(GetQueueStatsRequest {
                    queue: name.clone(),
                })
                .await
                .map(drop),
            &["queue", "the limit is 256 bytes"],
        ),
    ];
    for (case, result, needles) in cases {
        assert_status(case, result, Code::InvalidArgument, needles);
    }

    // Hello fields: the session is refused and no worker appears.
    let hellos: Vec<(&str, Hello, &[&str])> = vec![
        (
            "worker id",
            Hello {
                worker_id: name.clone(),
                ..hello("w", &[])
            },
            &["hello.worker_id", "the limit is 256 bytes"],
        ),
        (
            "hostname",
            Hello {
                hostname: name.clone(),
                ..hello("w", &[])
            },
            &["hello.hostname", "the limit is 256 bytes"],
        ),
        (
            "worker labels",
            Hello {
                labels: label_map(65, 3, 1),
                ..hello("w", &[])
            },
            &["hello.labels", "the limit is 64"],
        ),
        (
            "kinds",
            Hello {
                kinds: vec!["k".into(); 1001],
                ..hello("w", &[])
            },
            &["hello.kinds", "1001 entries", "the limit is 1000"],
        ),
        (
            "kind name",
            Hello {
                kinds: vec!["k".into(), name.clone()],
                ..hello("w", &[])
            },
            &["hello.kinds[1]", "the limit is 256 bytes"],
        ),
    ];
    for (case, hello, needles) in hellos {
        let r = RawSession::try_open_silent(&url, hello).await.map(|_| ());
        assert_status(case, r, Code::InvalidArgument, needles);
    }

    // Nothing changed.
    assert_eq!(list_all_jobs(&client).await, jobs_before);
    let listed = schedules
        .clone()
        .list_schedules(ListSchedulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.schedules.is_empty(), "{listed:?}");
    assert!(list_workers(&admin).await.is_empty());
    let still = get_job(&client, &baseline).await;
    assert_eq!(still.state(), JobState::Queued);
    assert!(!still.cancel_requested);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_size_is_capped_and_pages_fit_the_message_limit() {
    let dir = TempDir::new().unwrap();
    // The smallest allowed for 1MiB payloads is 12MiB.
    let coord = Coordinator::start(
        dir.path(),
        &["--max-payload", "1MiB", "--max-message-size", "13MiB"],
    );
    let url = coord.url();
    let client = job_client(&url).await;
    let schedules = schedule_client(&url).await;

    client
        .clone()
        .submit_jobs(SubmitJobsRequest {
            jobs: (0..1100).map(|_| job("small", b"")).collect(),
        })
        .await
        .unwrap();
    let page = client
        .clone()
        .list_jobs(ListJobsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 1000, "page_size is capped at 1000");
    assert!(!page.next_page_token.is_empty());
    assert_status(
        "negative page_size",
        client
            .clone()
            .list_jobs(ListJobsRequest {
                page_size: -1,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["page_size", "negative"],
    );

    // 14 jobs of 1MiB do not fit in one 13MiB answer: pages stop short and the tokens go on.
    let payload = vec![b'p'; 1 << 20];
    let mut ids = Vec::new();
    for _ in 0..14 {
        ids.push(submit_id(&client, job("big", &payload)).await);
        let s = Schedule {
            paused: true,
            job: Some(job("big", &payload)),
            ..cron_schedule(&format!("big-{}", ids.len()), "@daily", "")
        };
        schedules
            .clone()
            .put_schedule(PutScheduleRequest { schedule: Some(s) })
            .await
            .unwrap();
    }
    let limit = 13 << 20;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .clone()
            .list_jobs(ListJobsRequest {
                kind: "big".into(),
                page_size: 100,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ListJobs page {pages}: {e}"))
            .into_inner();
        pages += 1;
        assert!(page.encoded_len() <= limit, "a page over the limit");
        assert!(!page.jobs.is_empty() || page.next_page_token.is_empty());
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 2, "14MiB of jobs came in {pages} page(s)");
    assert_eq!(seen, ids, "every job once, in order");

    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = schedules
            .clone()
            .list_schedules(ListSchedulesRequest {
                page_size: 100,
                page_token: token.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("ListSchedules page {pages}: {e}"))
            .into_inner();
        pages += 1;
        assert!(page.encoded_len() <= limit, "a page over the limit");
        names.extend(page.schedules.into_iter().map(|s| s.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 2, "14MiB of schedules came in {pages} page(s)");
    let mut expected: Vec<String> = (1..=14).map(|i| format!("big-{i}")).collect();
    expected.sort();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_per_connection_are_capped() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &["--max-concurrent-streams", "2"]);
    let client = job_client(&coord.url()).await;
    let id = submit_id(&client, job("nobody-runs-this", b"")).await;

    let mut conn = RawConn::connect(coord.addr()).await;
    assert_eq!(conn.wait_max_streams(2, BOUND).await, 2);
    let watch = frame(&WatchJobRequest { id: id.clone() }.encode_to_vec());
    let path = "/rota.v1.JobService/WatchJob";

    // Two watches stay open (the job never finishes): the connection is full.
    let (first, first_send) = conn.start(path, watch.clone(), true).await;
    let first = tokio::time::timeout(BOUND, first)
        .await
        .expect("first watch answered")
        .expect("first watch");
    let (second, _second_send) = conn.start(path, watch.clone(), true).await;
    let _second = tokio::time::timeout(BOUND, second)
        .await
        .expect("second watch answered")
        .expect("second watch");
    let (third, _third_send) = conn.start(path, watch.clone(), true).await;
    let mut third = Box::pin(read_head(third));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "a third stream was served while two were open"
    );

    // Closing one lets the third through.
    drop(first);
    drop(first_send);
    let head = tokio::time::timeout(BOUND, third)
        .await
        .expect("the third watch is served once a stream is free");
    assert_eq!(head, http::StatusCode::OK);
}

async fn read_head(response: h2::client::ResponseFuture) -> http::StatusCode {
    response.await.expect("a response").status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_max_workers_get_resource_exhausted() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &["--max-workers", "2"]);
    let url = coord.url();
    let admin = admin_client(&url).await;
    let first = RawSession::open(&url, hello("w-1", &[])).await;
    let _second = RawSession::open(&url, hello("w-2", &[])).await;

    let r = RawSession::try_open_silent(&url, hello("w-3", &[]))
        .await
        .map(|_| ());
    assert_status(
        "a third worker",
        r,
        Code::ResourceExhausted,
        &["2 sessions are open", "--max-workers"],
    );
    let mut ids: Vec<String> = list_workers(&admin)
        .await
        .into_iter()
        .map(|w| w.worker_id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["w-1", "w-2"], "the refused worker is not registered");

    // A worker's second session (a reconnect while its old stream is still
    // open, as after a lost connection) takes the old one's place.
    let again = RawSession::try_open_silent(&url, hello("w-1", &[]))
        .await
        .unwrap_or_else(|e| panic!("w-1 reconnecting was refused: {e}"));
    let r = RawSession::try_open_silent(&url, hello("w-3", &[]))
        .await
        .map(|_| ());
    assert_status(
        "a third worker, with w-1 reconnected",
        r,
        Code::ResourceExhausted,
        &["2 sessions are open"],
    );

    // When one leaves, the next may come in.
    drop(first);
    drop(again);
    let _third = wait_until(BOUND, "a session once one closed", || async {
        RawSession::try_open_silent(&url, hello("w-3", &[]))
            .await
            .ok()
    })
    .await;
}

/// Short leases, so that a cut-off worker's lease ends quickly.
const FAST_LEASES: &[&str] = &["--lease-timeout", "2s", "--heartbeat-interval", "300ms"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_worker_is_cut_off_its_lease_ends_by_the_rules_and_others_work_on() {
    let dir = TempDir::new().unwrap();
    let mut args = FAST_LEASES.to_vec();
    args.extend(["--worker-flood-rate", "5", "--worker-flood-burst", "10"]);
    let coord = Coordinator::start(dir.path(), &args);
    let url = coord.url();
    let client = job_client(&url).await;

    let mut flooder = RawSession::open(&url, hello("flooder", &["k"])).await;
    let id = submit_id(&client, job("k", b"")).await;
    let first = flooder.next_assign(BOUND).await;
    assert_eq!(first.job.as_ref().unwrap().id, id);
    let mut steady = RawSession::open(&url, hello("steady", &["k"])).await;

    for _ in 0..200 {
        let beat = WorkerMessage {
            msg: Some(WorkerMsg::Heartbeat(Heartbeat::default())),
        };
        if flooder.tx.send(beat).await.is_err() {
            break;
        }
    }
    let ended = flooder.end_status(BOUND).await;
    assert_status(
        "a heartbeat flood",
        ended,
        Code::ResourceExhausted,
        &[
            "worker flooder",
            "heartbeats faster than 5 per heartbeat interval",
            "--worker-flood-rate",
        ],
    );

    // The flooder's lease ends at its lease timeout, like any dropped worker's, and the
    // steady worker runs the job.
    let second = steady.next_assign(BOUND).await;
    assert_eq!(second.job.as_ref().unwrap().id, id);
    let ack = steady
        .complete(&id, &second.lease_id, success(b"done"))
        .await;
    assert!(ack.accepted, "{ack:?}");
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.attempts.len(), 2, "{:?}", done.attempts);
    assert_eq!(done.attempts[0].worker_id, "flooder");
    assert_eq!(done.attempts[1].worker_id, "steady");

    // The steady worker is still connected and still gets work.
    let next = submit_id(&client, job("k", b"")).await;
    let assign = steady.next_assign(BOUND).await;
    assert_eq!(assign.job.as_ref().unwrap().id, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_sending_garbage_is_cut_off_and_others_work_on() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &["--worker-bad-messages", "3"]);
    let url = coord.url();
    let client = job_client(&url).await;
    let mut steady = RawSession::open(&url, hello("steady", &["k"])).await;
    let mut garbage = RawSession::open(&url, hello("garbage", &["other"])).await;

    // One refused completion is answered like any stale one.
    let stale = uuid::Uuid::now_v7().to_string();
    let ack = garbage
        .complete(&stale, &uuid::Uuid::new_v4().to_string(), success(b""))
        .await;
    assert!(!ack.accepted, "{ack:?}");
    // Then a stream of nonsense: completions of leases it never held, empty messages, hellos.
    for i in 0..30 {
        let msg = match i % 3 {
            0 => Some(WorkerMsg::Complete(rota::proto::Complete {
                job_id: uuid::Uuid::now_v7().to_string(),
                lease_id: uuid::Uuid::new_v4().to_string(),
                outcome: Some(success(b"")),
            })),
            1 => None,
            _ => Some(WorkerMsg::Hello(hello("garbage", &[]))),
        };
        if garbage.tx.send(WorkerMessage { msg }).await.is_err() {
            break;
        }
    }
    let ended = garbage.end_status(BOUND).await;
    assert_status(
        "garbage",
        ended,
        Code::InvalidArgument,
        &[
            "worker garbage",
            "more than 4 messages the protocol does not allow",
            "--worker-bad-messages 3 plus its 1 slots",
        ],
    );

    // The other worker is untouched.
    let id = submit_id(&client, job("k", b"")).await;
    let assign = steady.next_assign(BOUND).await;
    let ack = steady.complete(&id, &assign.lease_id, success(b"ok")).await;
    assert!(ack.accepted, "{ack:?}");
    wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    let workers = list_workers(&admin_client(&url).await).await;
    assert!(workers.iter().any(|w| w.worker_id == "steady"));
    assert!(
        !workers.iter().any(|w| w.worker_id == "garbage"),
        "the cut-off worker held no lease, so it is gone: {workers:?}"
    );
}
