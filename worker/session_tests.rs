//! The real session loop against a scripted fake coordinator: a tonic
//! `WorkerServiceServer` on 127.0.0.1:0 that hands each incoming session to the
//! test, which then plays the coordinator's side message by message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::proto::{
    self,
    complete::Outcome,
    coordinator_message, worker_message,
    worker_service_server::{WorkerService, WorkerServiceServer},
    CoordinatorMessage, WorkerMessage,
};
use crate::worker::{
    Notice, NoticeKind, RunSummary, ShutdownHandle, TaskContext, TaskError, Worker,
};

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// The coordinator's end of one session.
struct FakeSession {
    inbound: Streaming<WorkerMessage>,
    out: mpsc::Sender<Result<CoordinatorMessage, Status>>,
}

impl FakeSession {
    /// The next message other than a heartbeat; `None` once the worker hung up.
    async fn recv(&mut self) -> Option<worker_message::Msg> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.inbound.message())
                .await
                .expect("worker message in time")
                .ok()??;
            match msg.msg {
                Some(worker_message::Msg::Heartbeat(_)) => continue,
                other => return other,
            }
        }
    }

    async fn recv_hello(&mut self) -> proto::Hello {
        match self.recv().await {
            Some(worker_message::Msg::Hello(hello)) => hello,
            other => panic!("expected hello, got {other:?}"),
        }
    }

    async fn recv_complete(&mut self) -> proto::Complete {
        match self.recv().await {
            Some(worker_message::Msg::Complete(c)) => c,
            other => panic!("expected complete, got {other:?}"),
        }
    }

    async fn recv_draining(&mut self) {
        match self.recv().await {
            Some(worker_message::Msg::Draining(_)) => {}
            other => panic!("expected draining, got {other:?}"),
        }
    }

    async fn send(&self, msg: coordinator_message::Msg) {
        self.out
            .send(Ok(CoordinatorMessage { msg: Some(msg) }))
            .await
            .expect("worker still listening");
    }

    async fn welcome(&self, resumed: Vec<proto::LeaseRef>, rejected: Vec<proto::LeaseRef>) {
        self.send(coordinator_message::Msg::Welcome(proto::Welcome {
            session_id: "s-1".into(),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            lease_timeout: None,
            resumed,
            rejected,
        }))
        .await;
    }

    async fn assign(&self, job_id: &str, kind: &str, payload: &[u8]) {
        self.send(coordinator_message::Msg::Assign(proto::Assign {
            job: Some(proto::Job {
                id: job_id.into(),
                kind: kind.into(),
                payload: payload.to_vec(),
                attempt: 1,
                ..Default::default()
            }),
            lease_id: lease_of(job_id),
            deadline: None,
            shutdown_grace: None,
        }))
        .await;
    }

    /// An assign with a shutdown grace and, if `timeout` is given, a deadline
    /// of now + timeout; returns the deadline.
    async fn assign_with(
        &self,
        job_id: &str,
        kind: &str,
        payload: &[u8],
        grace: Duration,
        timeout: Option<Duration>,
    ) -> Option<SystemTime> {
        let deadline = timeout.map(|t| SystemTime::now() + t);
        self.send(coordinator_message::Msg::Assign(proto::Assign {
            job: Some(proto::Job {
                id: job_id.into(),
                kind: kind.into(),
                payload: payload.to_vec(),
                attempt: 1,
                timeout: timeout.map(|t| t.try_into().expect("small")),
                shutdown_grace: Some(grace.try_into().expect("small")),
                ..Default::default()
            }),
            lease_id: lease_of(job_id),
            deadline: deadline.map(Into::into),
            shutdown_grace: Some(grace.try_into().expect("small")),
        }))
        .await;
        deadline
    }

    async fn cancel(&self, job_id: &str, reason: &str, stop_by: SystemTime) {
        self.send(coordinator_message::Msg::Cancel(proto::Cancel {
            job_id: job_id.into(),
            lease_id: lease_of(job_id),
            reason: reason.into(),
            stop_by: Some(stop_by.into()),
        }))
        .await;
    }

    async fn shutdown(&self, reason: &str, tasks: &[(&str, SystemTime)]) {
        self.send(coordinator_message::Msg::Shutdown(proto::Shutdown {
            reason: reason.into(),
            tasks: tasks
                .iter()
                .map(|(job_id, stop_by)| proto::TaskDeadline {
                    job_id: (*job_id).into(),
                    lease_id: lease_of(job_id),
                    stop_by: Some((*stop_by).into()),
                })
                .collect(),
        }))
        .await;
    }

    /// The next `n` completions by job id, each acked.
    async fn recv_completes(&mut self, n: usize) -> BTreeMap<String, Outcome> {
        let mut got = BTreeMap::new();
        for _ in 0..n {
            let c = self.recv_complete().await;
            self.ack(&c).await;
            got.insert(c.job_id.clone(), outcome(&c).clone());
        }
        got
    }

    /// Assigns a job, waits for its completion, acknowledges it, and returns
    /// its outcome.
    async fn run_one(&mut self, job_id: &str, kind: &str, payload: &[u8]) -> Outcome {
        self.assign(job_id, kind, payload).await;
        let c = self.recv_complete().await;
        assert_eq!(c.job_id, job_id);
        assert_eq!(c.lease_id, lease_of(job_id));
        self.ack(&c).await;
        outcome(&c).clone()
    }

    async fn ack(&self, complete: &proto::Complete) {
        self.send(coordinator_message::Msg::CompleteAck(proto::CompleteAck {
            job_id: complete.job_id.clone(),
            lease_id: complete.lease_id.clone(),
            accepted: true,
            reason: String::new(),
        }))
        .await;
    }
}

fn lease_of(job_id: &str) -> String {
    format!("lease-{job_id}")
}

fn lease_ref(job_id: &str) -> proto::LeaseRef {
    proto::LeaseRef {
        job_id: job_id.into(),
        lease_id: lease_of(job_id),
    }
}

/// Hands every incoming session to the test.
struct FakeCoordinator {
    sessions: mpsc::UnboundedSender<FakeSession>,
}

#[tonic::async_trait]
impl WorkerService for FakeCoordinator {
    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (out, rx) = mpsc::channel(64);
        self.sessions
            .send(FakeSession {
                inbound: request.into_inner(),
                out,
            })
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Harness {
    sessions: mpsc::UnboundedReceiver<FakeSession>,
    server: JoinHandle<()>,
    shutdown: ShutdownHandle,
    worker: JoinHandle<RunSummary>,
    /// Releases one `slow` task per permit.
    release: Arc<Semaphore>,
    /// One message per `slow` task whose future was dropped or finished.
    slow_ended: mpsc::UnboundedReceiver<()>,
    /// The job id of each `slow` task, once it runs.
    slow_started: mpsc::UnboundedReceiver<String>,
    /// Each notice a `polite` task got, with its job id.
    noticed: mpsc::UnboundedReceiver<(String, Notice)>,
}

impl Harness {
    /// The next session, its Hello read and answered with a Welcome that
    /// resumes and rejects nothing.
    async fn welcomed_session(&mut self) -> FakeSession {
        let mut s = self.next_session().await;
        s.recv_hello().await;
        s.welcome(vec![], vec![]).await;
        s
    }

    async fn next_session(&mut self) -> FakeSession {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("worker connects in time")
            .expect("server running")
    }

    /// Waits until `n` more `slow` tasks run, so the worker has taken them.
    async fn started(&mut self, n: usize) {
        for _ in 0..n {
            tokio::time::timeout(WAIT, self.slow_started.recv())
                .await
                .expect("task starts in time")
                .expect("worker alive");
        }
    }

    /// The next notice a `polite` task got.
    async fn noticed(&mut self) -> (String, Notice) {
        tokio::time::timeout(WAIT, self.noticed.recv())
            .await
            .expect("notice in time")
            .expect("worker alive")
    }

    /// Waits until the next `slow` task's future is gone (aborted or done).
    async fn slow_ended(&mut self) {
        tokio::time::timeout(WAIT, self.slow_ended.recv())
            .await
            .expect("slow task ends in time")
            .expect("signal");
    }

    async fn summary(self) -> RunSummary {
        let summary = tokio::time::timeout(WAIT, self.worker)
            .await
            .expect("worker returns in time")
            .expect("worker did not panic");
        self.server.abort();
        summary
    }
}

/// Sends on drop: tells the test that a task's future is gone.
struct EndSignal(mpsc::UnboundedSender<()>);

impl Drop for EndSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Starts the fake coordinator and a worker with these kinds: `echo` (result =
/// payload), `fail` (permanent failure), `panic`, `progress` (reports progress,
/// then waits like `slow`), `slow` (waits for a permit on `release`, ignoring
/// notices), and `polite` (waits for its notice, reports it on `noticed`, then
/// ends as its payload says: `ok` succeeds, `err` fails, `stop` returns
/// [`TaskError::stopped`]).
async fn start() -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (sessions_tx, sessions) = mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        let service = WorkerServiceServer::new(FakeCoordinator {
            sessions: sessions_tx,
        });
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });

    let release = Arc::new(Semaphore::new(0));
    let (ended_tx, slow_ended) = mpsc::unbounded_channel();
    let (started_tx, slow_started) = mpsc::unbounded_channel();
    let slow = {
        let release = Arc::clone(&release);
        move |ctx: TaskContext| {
            let release = Arc::clone(&release);
            let guard = EndSignal(ended_tx.clone());
            let _ = started_tx.send(ctx.job().id.clone());
            async move {
                let _guard = guard;
                let permit = release
                    .acquire()
                    .await
                    .map_err(|e| TaskError::retryable(e.to_string()))?;
                permit.forget();
                Ok(ctx.job().payload.clone())
            }
        }
    };
    let (noticed_tx, noticed) = mpsc::unbounded_channel();
    let polite = move |ctx: TaskContext| {
        let noticed = noticed_tx.clone();
        async move {
            let notice = ctx.notice().await;
            assert_eq!(ctx.notified(), Some(notice.clone()));
            let _ = noticed.send((ctx.job().id.clone(), notice));
            match ctx.job().payload.as_slice() {
                b"ok" => Ok(b"stopped cleanly".to_vec()),
                b"stop" => Err(TaskError::stopped("checkpointed")),
                _ => Err(TaskError::retryable("gave up")),
            }
        }
    };
    let progress = {
        let slow = slow.clone();
        move |ctx: TaskContext| {
            ctx.report_progress("halfway");
            slow(ctx)
        }
    };
    let worker = Worker::builder(format!("http://{addr}"))
        .worker_id("w-1")
        .slots(3)
        .queues(["default", "media"])
        .label("zone", "a")
        .handler("echo", |ctx: TaskContext| async move {
            Ok::<_, TaskError>(ctx.job().payload.clone())
        })
        .handler("fail", |_ctx: TaskContext| async move {
            Err::<Vec<u8>, _>(TaskError::permanent("bad input"))
        })
        .handler("panic", |_ctx: TaskContext| async move {
            if true {
                panic!("handler blew up");
            }
            Ok::<_, TaskError>(Vec::new())
        })
        .handler("polite", polite)
        .handler("progress", progress)
        .handler("slow", slow)
        .drain_ack_timeout(Duration::from_millis(300))
        .max_shutdown_grace(Duration::from_secs(30))
        .build()
        .expect("valid worker");
    let shutdown = ShutdownHandle::new();
    let worker = tokio::spawn(worker.run_with(shutdown.clone()));
    Harness {
        sessions,
        server,
        shutdown,
        worker,
        release,
        slow_ended,
        slow_started,
        noticed,
    }
}

fn outcome(complete: &proto::Complete) -> &Outcome {
    complete.outcome.as_ref().expect("complete has an outcome")
}

#[tokio::test]
async fn hello_assign_complete_ack_and_drain() {
    let mut h = start().await;
    let mut s = h.next_session().await;
    let hello = s.recv_hello().await;
    assert_eq!(hello.worker_id, "w-1");
    assert_eq!(
        hello.kinds,
        ["echo", "fail", "panic", "polite", "progress", "slow"]
    );
    assert_eq!(hello.queues, ["default", "media"]);
    assert_eq!(hello.slots, 3);
    assert_eq!(hello.labels.get("zone").map(String::as_str), Some("a"));
    assert!(hello.held.is_empty());
    assert!(!hello.hostname.is_empty());
    s.welcome(vec![], vec![]).await;

    assert_eq!(
        s.run_one("j1", "echo", b"hi").await,
        Outcome::Success(proto::Success {
            result: b"hi".to_vec()
        })
    );
    assert_eq!(
        s.run_one("j2", "fail", b"").await,
        Outcome::Failure(proto::Failure {
            error: "bad input".into(),
            permanent: true
        })
    );
    assert_eq!(
        s.run_one("j3", "panic", b"").await,
        Outcome::Failure(proto::Failure {
            error: "handler panicked: handler blew up".into(),
            permanent: false
        })
    );
    assert_eq!(
        s.run_one("j4", "unknown", b"").await,
        Outcome::Failure(proto::Failure {
            error: "no handler for kind unknown".into(),
            permanent: false
        })
    );

    // Drain with a task running: new work is refused, the running one finishes.
    s.assign("j5", "slow", b"slow result").await;
    h.started(1).await;
    h.shutdown.drain();
    s.recv_draining().await;
    s.assign("j6", "echo", b"").await;
    let c = s.recv_complete().await;
    assert_eq!(c.job_id, "j6");
    assert_eq!(
        outcome(&c),
        &Outcome::Interrupted(proto::Interrupted {
            reason: "worker draining".into()
        })
    );
    s.ack(&c).await;
    h.release.add_permits(1);
    let c = s.recv_complete().await;
    assert_eq!(c.job_id, "j5");
    assert_eq!(
        outcome(&c),
        &Outcome::Success(proto::Success {
            result: b"slow result".to_vec()
        })
    );
    s.ack(&c).await;
    assert_eq!(s.recv().await, None, "worker hangs up after the drain");
    let summary = h.summary().await;
    assert!(summary.is_clean(), "{summary:?}");
}

#[tokio::test]
async fn results_and_running_tasks_survive_a_reconnect() {
    let mut h = start().await;
    let mut s = h.welcomed_session().await;

    // j1 finishes but is never acked; j2 is still running when the link drops.
    s.assign("j1", "echo", b"one").await;
    let first = s.recv_complete().await;
    assert_eq!(first.job_id, "j1");
    s.assign("j2", "slow", b"two").await;
    h.started(1).await;
    drop(s);

    let mut s = h.next_session().await;
    let hello = s.recv_hello().await;
    assert_eq!(hello.held, vec![lease_ref("j1"), lease_ref("j2")]);
    s.welcome(vec![lease_ref("j1"), lease_ref("j2")], vec![])
        .await;
    let resent = s.recv_complete().await;
    assert_eq!(resent, first, "the unacknowledged result is sent again");
    s.ack(&resent).await;

    // j2 kept running across the reconnect and reports on the new session.
    h.release.add_permits(1);
    let c = s.recv_complete().await;
    assert_eq!(c.job_id, "j2");
    assert_eq!(
        outcome(&c),
        &Outcome::Success(proto::Success {
            result: b"two".to_vec()
        })
    );
    s.ack(&c).await;

    h.shutdown.drain();
    s.recv_draining().await;
    assert_eq!(s.recv().await, None);
    assert!(h.summary().await.is_clean());
}

#[tokio::test]
async fn rejected_leases_are_aborted_and_not_reported() {
    let mut h = start().await;
    let mut s = h.welcomed_session().await;
    s.assign("j1", "slow", b"").await;
    h.started(1).await;
    s.assign("j2", "echo", b"").await;
    let unacked = s.recv_complete().await;
    assert_eq!(unacked.job_id, "j2");
    drop(s);

    let mut s = h.next_session().await;
    let hello = s.recv_hello().await;
    assert_eq!(hello.held, vec![lease_ref("j1"), lease_ref("j2")]);
    s.welcome(vec![], vec![lease_ref("j1"), lease_ref("j2")])
        .await;
    tokio::time::timeout(WAIT, h.slow_ended.recv())
        .await
        .expect("rejected task aborted in time")
        .expect("signal");

    // Nothing is reported for either lease: the next message is the drain.
    h.shutdown.drain();
    s.recv_draining().await;
    assert_eq!(s.recv().await, None);
    assert!(h.summary().await.is_clean());
}

#[tokio::test]
async fn stop_now_interrupts_running_tasks() {
    let mut h = start().await;
    let mut s = h.welcomed_session().await;
    s.assign("j1", "slow", b"").await;
    s.assign("j2", "slow", b"").await;
    h.started(2).await;

    h.shutdown.drain();
    s.recv_draining().await;
    h.shutdown.stop_now();
    let mut interrupted = Vec::new();
    for _ in 0..2 {
        let c = s.recv_complete().await;
        assert_eq!(
            outcome(&c),
            &Outcome::Interrupted(proto::Interrupted {
                reason: "worker stopped".into()
            })
        );
        s.ack(&c).await;
        interrupted.push(c.job_id);
    }
    interrupted.sort();
    assert_eq!(interrupted, ["j1", "j2"]);
    assert_eq!(s.recv().await, None);
    let summary = h.summary().await;
    assert!(summary.stopped_now);
    assert_eq!((summary.unacknowledged, summary.abandoned), (0, 0));
}

#[tokio::test]
async fn drain_gives_up_on_acks_when_the_coordinator_is_gone() {
    let mut h = start().await;
    let mut s = h.welcomed_session().await;
    s.assign("j1", "echo", b"").await;
    s.recv_complete().await;
    // The coordinator goes away for good before acknowledging.
    h.server.abort();
    drop(s);
    h.shutdown.drain();
    let summary = h.summary().await;
    assert_eq!(
        summary,
        RunSummary {
            stopped_now: false,
            unacknowledged: 1,
            abandoned: 0
        }
    );
}

#[tokio::test]
async fn progress_rides_on_heartbeats() {
    let mut h = start().await;
    let mut s = h.next_session().await;
    s.recv_hello().await;
    s.send(coordinator_message::Msg::Welcome(proto::Welcome {
        session_id: "s-hb".into(),
        heartbeat_interval: Some(prost_types::Duration {
            seconds: 0,
            nanos: 20_000_000,
        }),
        ..Default::default()
    }))
    .await;
    s.assign("j1", "progress", b"").await;
    let progress = loop {
        let msg = tokio::time::timeout(WAIT, s.inbound.message())
            .await
            .expect("heartbeat in time")
            .expect("stream ok")
            .expect("stream open");
        if let Some(worker_message::Msg::Heartbeat(hb)) = msg.msg {
            if !hb.progress.is_empty() {
                break hb.progress;
            }
        }
    };
    assert_eq!(
        progress,
        vec![proto::TaskProgress {
            job_id: "j1".into(),
            lease_id: "lease-j1".into(),
            message: "halfway".into()
        }]
    );
    h.shutdown.stop_now();
    s.recv_draining().await;
    let c = s.recv_complete().await;
    s.ack(&c).await;
    assert!(h.summary().await.stopped_now);
}

#[tokio::test]
async fn run_drains_when_the_future_resolves() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    // Nobody listens: the worker keeps retrying until told to drain, then,
    // holding nothing, returns at once.
    let worker = Worker::builder(format!("http://{addr}"))
        .handler("echo", |ctx: TaskContext| async move {
            Ok::<_, TaskError>(ctx.job().payload.clone())
        })
        .build()
        .expect("valid");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = rx.await;
    }));
    tx.send(()).expect("worker waiting");
    let summary = tokio::time::timeout(WAIT, run)
        .await
        .expect("returns in time")
        .expect("no panic");
    assert!(summary.is_clean());
}

/// The grace given to tasks in the notice tests: short, but nothing below
/// depends on how long anything takes within it.
const GRACE: Duration = Duration::from_millis(300);

fn cancelled(reason: &str) -> Outcome {
    Outcome::Cancelled(proto::Cancelled {
        reason: reason.into(),
    })
}

fn interrupted(reason: &str) -> Outcome {
    Outcome::Interrupted(proto::Interrupted {
        reason: reason.into(),
    })
}

fn success(result: &[u8]) -> Outcome {
    Outcome::Success(proto::Success {
        result: result.to_vec(),
    })
}

fn failure(error: &str) -> Outcome {
    Outcome::Failure(proto::Failure {
        error: error.into(),
        permanent: false,
    })
}

/// Drains (if not already), waits for the worker to hang up, checks it was clean.
async fn finish_cleanly(h: Harness, mut s: FakeSession, send_drain: bool) {
    if send_drain {
        h.shutdown.drain();
        s.recv_draining().await;
    }
    assert_eq!(s.recv().await, None, "worker hangs up once drained");
    let summary = h.summary().await;
    assert!(summary.is_clean(), "{summary:?}");
}

#[tokio::test]
async fn hello_carries_max_shutdown_grace() {
    let mut h = start().await;
    let mut s = h.next_session().await;
    let hello = s.recv_hello().await;
    assert_eq!(
        hello.max_shutdown_grace,
        Some(prost_types::Duration {
            seconds: 30,
            nanos: 0
        })
    );
    s.welcome(vec![], vec![]).await;
    // A round trip, so the session is up before the drain.
    s.assign("j1", "echo", b"").await;
    s.recv_completes(1).await;
    finish_cleanly(h, s, true).await;
}

#[tokio::test]
async fn cancel_notice_then_cancelled_or_real_success() {
    let mut h = start().await;
    let mut s = h.welcomed_session().await;

    // An ignoring task is killed at stop_by and reported Cancelled.
    s.assign_with("j1", "slow", b"", GRACE, None).await;
    h.started(1).await;
    s.cancel("stranger", "not ours", SystemTime::now()).await;
    let stop_by = SystemTime::now() + GRACE;
    s.cancel("j1", "no longer needed", stop_by).await;
    let c = s.recv_complete().await;
    assert!(SystemTime::now() >= stop_by, "not killed before stop_by");
    assert_eq!(c.job_id, "j1");
    assert_eq!(outcome(&c), &cancelled("no longer needed"));
    s.ack(&c).await;
    h.slow_ended().await;

    // A task that hears the notice: success stands, a failure is Cancelled.
    s.assign_with("j2", "polite", b"ok", GRACE, None).await;
    s.assign_with("j3", "polite", b"err", GRACE, None).await;
    let stop_by = SystemTime::now() + Duration::from_secs(60);
    s.cancel("j2", "changed my mind", stop_by).await;
    s.cancel("j3", "changed my mind", stop_by).await;
    for _ in 0..2 {
        let (_, notice) = h.noticed().await;
        assert_eq!(
            notice,
            Notice {
                kind: NoticeKind::Cancel,
                reason: "changed my mind".into(),
                stop_by
            }
        );
    }
    let got = s.recv_completes(2).await;
    assert_eq!(got["j2"], success(b"stopped cleanly"));
    assert_eq!(got["j3"], cancelled("changed my mind"));
    finish_cleanly(h, s, true).await;
}

#[tokio::test]
async fn shutdown_lets_tasks_end_in_time_with_their_real_outcome() {
    let mut h = start().await;
    let mut s = h.welcomed_session().await;
    s.assign_with("j1", "polite", b"ok", GRACE, None).await;
    s.assign_with("j2", "polite", b"err", GRACE, None).await;
    let listed = SystemTime::now() + Duration::from_secs(60);
    let before = SystemTime::now();
    // j2 is not listed: it gets now + its grace.
    s.shutdown("deploy", &[("j1", listed)]).await;
    let mut notices = BTreeMap::new();
    for _ in 0..2 {
        let (job, notice) = h.noticed().await;
        assert_eq!(notice.kind, NoticeKind::Shutdown);
        assert_eq!(notice.reason, "deploy");
        notices.insert(job, notice.stop_by);
    }
    assert_eq!(notices["j1"], listed);
    assert!(notices["j2"] >= before + GRACE && notices["j2"] <= SystemTime::now() + GRACE);

    // Draining now: new work is refused.
    s.assign("j3", "echo", b"").await;
    let got = s.recv_completes(3).await;
    assert_eq!(got["j1"], success(b"stopped cleanly"));
    assert_eq!(got["j2"], failure("gave up"));
    assert_eq!(got["j3"], interrupted("worker draining"));
    // The coordinator started the drain: the worker still exits once drained.
    finish_cleanly(h, s, false).await;
}

#[tokio::test]
async fn shutdown_kills_an_ignoring_task_at_stop_by_as_interrupted() {
    let mut h = start().await;
    let mut s = h.welcomed_session().await;
    s.assign_with("j1", "slow", b"", GRACE, None).await;
    s.assign_with("j2", "polite", b"stop", GRACE, None).await;
    h.started(1).await;
    let stop_by = SystemTime::now() + GRACE;
    s.shutdown("deploy", &[("j1", stop_by), ("j2", stop_by)])
        .await;
    h.noticed().await;
    let got = s.recv_completes(2).await;
    assert!(SystemTime::now() >= stop_by, "not killed before stop_by");
    assert_eq!(got["j1"], interrupted("deploy"));
    // A task that stops because of its notice is interrupted, not failed.
    assert_eq!(got["j2"], interrupted("deploy"));
    h.slow_ended().await;
    finish_cleanly(h, s, false).await;
}

#[tokio::test]
async fn first_signal_gives_notices_itself_and_aborts_ignoring_tasks() {
    let mut h = start().await;
    let mut s = h.welcomed_session().await;
    s.assign_with("j1", "slow", b"", GRACE, None).await;
    s.assign_with("j2", "polite", b"ok", GRACE, None).await;
    h.started(1).await;
    let before = SystemTime::now();
    // The coordinator never answers with Shutdown here.
    h.shutdown.drain();
    s.recv_draining().await;
    let (job, notice) = h.noticed().await;
    assert_eq!(job, "j2");
    assert_eq!(notice.kind, NoticeKind::Shutdown);
    assert_eq!(notice.reason, "worker draining");
    assert!(notice.stop_by >= before + GRACE);
    let got = s.recv_completes(2).await;
    assert!(SystemTime::now() >= before + GRACE, "not killed early");
    assert_eq!(got["j2"], success(b"stopped cleanly"));
    assert_eq!(got["j1"], interrupted("worker draining"));
    h.slow_ended().await;
    finish_cleanly(h, s, false).await;
}

#[tokio::test]
async fn timeout_notice_then_timed_out_failure() {
    let mut h = start().await;
    let mut s = h.welcomed_session().await;
    let timeout = Some(Duration::from_millis(200));
    s.assign_with("j1", "slow", b"", GRACE, timeout).await;
    let deadline = s.assign_with("j2", "polite", b"ok", GRACE, timeout).await;
    let deadline = deadline.expect("has a deadline");
    let (job, notice) = h.noticed().await;
    assert_eq!(job, "j2");
    assert!(
        SystemTime::now() >= deadline,
        "no notice before the deadline"
    );
    assert_eq!(
        notice,
        Notice {
            kind: NoticeKind::Timeout,
            reason: "timed out after 200ms".into(),
            stop_by: deadline + GRACE
        }
    );
    // Whether it then succeeds (j2) or is killed at deadline + grace (j1).
    let got = s.recv_completes(2).await;
    assert_eq!(got["j1"], failure("timed out after 200ms"));
    assert_eq!(got["j2"], failure("timed out after 200ms"));
    h.slow_ended().await;
    finish_cleanly(h, s, true).await;
}
