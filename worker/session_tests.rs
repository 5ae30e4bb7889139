//! The real session loop against a scripted fake coordinator: a tonic
//! `WorkerServiceServer` on 127.0.0.1:0 that hands each incoming session to the
//! test, which then plays the coordinator's side message by message.

use std::sync::Arc;
use std::time::Duration;

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
use crate::worker::{RunSummary, ShutdownHandle, TaskContext, TaskError, Worker};

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
}

impl Harness {
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
/// then waits like `slow`), and `slow` (waits for a permit on `release`).
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
        .handler("progress", progress)
        .handler("slow", slow)
        .drain_ack_timeout(Duration::from_millis(300))
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
    assert_eq!(hello.kinds, ["echo", "fail", "panic", "progress", "slow"]);
    assert_eq!(hello.queues, ["default", "media"]);
    assert_eq!(hello.slots, 3);
    assert_eq!(hello.labels.get("zone").map(String::as_str), Some("a"));
    assert!(hello.held.is_empty());
    assert!(!hello.hostname.is_empty());
    s.welcome(vec![], vec![]).await;

    s.assign("j1", "echo", b"hi").await;
    let c = s.recv_complete().await;
    assert_eq!((c.job_id.as_str(), c.lease_id.as_str()), ("j1", "lease-j1"));
    assert_eq!(
        outcome(&c),
        &Outcome::Success(proto::Success {
            result: b"hi".to_vec()
        })
    );
    s.ack(&c).await;

    s.assign("j2", "fail", b"").await;
    let c = s.recv_complete().await;
    assert_eq!(
        outcome(&c),
        &Outcome::Failure(proto::Failure {
            error: "bad input".into(),
            permanent: true
        })
    );
    s.ack(&c).await;

    s.assign("j3", "panic", b"").await;
    let c = s.recv_complete().await;
    assert_eq!(
        outcome(&c),
        &Outcome::Failure(proto::Failure {
            error: "handler panicked: handler blew up".into(),
            permanent: false
        })
    );
    s.ack(&c).await;

    s.assign("j4", "unknown", b"").await;
    let c = s.recv_complete().await;
    assert_eq!(
        outcome(&c),
        &Outcome::Failure(proto::Failure {
            error: "no handler for kind unknown".into(),
            permanent: false
        })
    );
    s.ack(&c).await;

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
    let mut s = h.next_session().await;
    s.recv_hello().await;
    s.welcome(vec![], vec![]).await;

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
    let mut s = h.next_session().await;
    s.recv_hello().await;
    s.welcome(vec![], vec![]).await;
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
    let mut s = h.next_session().await;
    s.recv_hello().await;
    s.welcome(vec![], vec![]).await;
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
    let mut s = h.next_session().await;
    s.recv_hello().await;
    s.welcome(vec![], vec![]).await;
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
