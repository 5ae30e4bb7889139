//! The session driver: one loop that keeps a `Session` stream to the
//! coordinator, runs assigned tasks, and reports their outcomes.
//!
//! The loop owns all state, so nothing is locked: each turn waits for one
//! [`Step`] (a shutdown signal, a task's end, a task's deadline, the give-up
//! deadline, or an event of the link) and applies it. The link is a small state machine — down
//! (waiting out the backoff), connecting (Hello sent, waiting for Welcome), up —
//! and losing it only sends the loop back to "down": tasks keep running, and
//! their results wait in the [`Ledger`] until a later Welcome resumes them.
//!
//! Notices: a `Cancel`, a `Shutdown`, a drain started here (first signal) and a
//! task's timeout each give tasks a notice with a stop-by time; the ledger keeps
//! the earliest per task and the loop sleeps until the next one, then aborts
//! what still runs. A `Shutdown` also puts the worker into its drain.

use futures::FutureExt;
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant, Interval, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::ledger::{AckResult, LeaseKey, Ledger, NoticeResult, RunningTask, TaskEnd, Timeout};
use super::task::{
    instant_at, std_duration, system_time, Handler, NoticeKind, NoticeSlot, ProgressSlot,
    TaskContext,
};
use super::{error_chain, Handlers, RunSummary, Settings, ShutdownHandle};
use crate::proto::{
    self, complete::Outcome, coordinator_message, worker_message,
    worker_service_client::WorkerServiceClient, CoordinatorMessage, WorkerMessage,
};

/// Largest message either way; payloads and results can be big.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Outbound messages buffered before `send` waits.
const OUTBOUND_CAPACITY: usize = 256;
/// Connecting, sending Hello and getting Welcome must fit in this.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A send that cannot get into the outbound buffer this long means a dead link.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat period when the Welcome does not give one.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// After a stop-now, how long to wait for interrupted results to be acked.
const STOP_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a drained worker keeps its session open for in-flight assigns.
const DRAIN_QUIET: Duration = Duration::from_millis(500);
/// The `Interrupted.reason` of tasks aborted by a stop-now.
const STOP_REASON: &str = "worker stopped";
/// The `Interrupted.reason` of assigns refused while draining, and of tasks
/// killed by a drain the coordinator gave no reason for.
const DRAIN_REASON: &str = "worker draining";
/// A task's shutdown grace when its `Assign` gives none (the coordinator
/// always does; this matches its default).
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why a session could not be opened or was lost. Logged, then retried.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The TCP/HTTP2 connection could not be made.
    #[error("cannot connect")]
    Connect(#[from] tonic::transport::Error),
    /// The coordinator answered the Session call with an error status.
    #[error("session refused: {0}")]
    Refused(tonic::Status),
    /// The inbound stream failed.
    #[error("stream failed: {0}")]
    Stream(tonic::Status),
    /// The coordinator ended the stream.
    #[error("coordinator closed the session")]
    Closed,
    /// The first message was not a Welcome.
    #[error("expected welcome as the first message")]
    NoWelcome,
    /// No Welcome in time.
    #[error("no welcome within {0:?}")]
    WelcomeTimeout(Duration),
    /// The outbound stream was dropped (the call ended).
    #[error("outbound stream closed")]
    SendClosed,
    /// The outbound buffer stayed full.
    #[error("outbound stream stuck for {0:?}")]
    SendTimeout(Duration),
}

/// A task's end, sent by its supervisor to the loop.
#[derive(Debug)]
struct TaskEvent {
    key: LeaseKey,
    end: TaskEnd,
}

/// Where the worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Taking nothing new. `ack_deadline` is set once the last task ended
    /// with results unacknowledged; `quiet_until` once nothing is held.
    Draining {
        ack_deadline: Option<Instant>,
        quiet_until: Option<Instant>,
    },
    /// Tasks aborted; returning at `deadline` at the latest.
    Stopping {
        deadline: Instant,
    },
}

impl Phase {
    fn deadline(self) -> Option<Instant> {
        match self {
            Phase::Running => None,
            Phase::Draining {
                ack_deadline,
                quiet_until,
            } => match (ack_deadline, quiet_until) {
                (Some(a), Some(q)) => Some(a.min(q)),
                (a, q) => a.or(q),
            },
            Phase::Stopping { deadline } => Some(deadline),
        }
    }
}

/// An open session.
struct Up {
    session_id: String,
    /// Outbound messages; dropping it ends our half of the stream.
    tx: mpsc::Sender<WorkerMessage>,
    inbound: Streaming<CoordinatorMessage>,
    heartbeat: Interval,
}

type Connecting = BoxFuture<'static, Result<(Up, proto::Welcome), SessionError>>;

enum Link {
    Down { retry_at: Instant },
    Connecting(Connecting),
    Up(Box<Up>),
}

/// One thing that happened; the loop applies one per turn.
enum Step {
    Drain,
    Stop,
    Task(TaskEvent),
    /// A task's timeout or kill time came.
    Deadline,
    /// The phase's deadline passed.
    Timer,
    Retry,
    Connected(Result<(Up, proto::Welcome), SessionError>),
    Inbound(Result<Option<CoordinatorMessage>, tonic::Status>),
    Beat,
}

impl Link {
    async fn next(&mut self) -> Step {
        match self {
            Link::Down { retry_at } => {
                sleep_until(*retry_at).await;
                Step::Retry
            }
            Link::Connecting(fut) => Step::Connected(fut.as_mut().await),
            Link::Up(up) => tokio::select! {
                msg = up.inbound.message() => Step::Inbound(msg),
                _ = up.heartbeat.tick() => Step::Beat,
            },
        }
    }
}

/// The worker's event loop; see the module docs.
pub(crate) struct Driver {
    settings: Arc<Settings>,
    handlers: Arc<Handlers>,
    /// Running tasks and unacknowledged results; outlives every session.
    ledger: Ledger,
    /// Cloned into each task's supervisor; the loop keeps one so `recv` never ends.
    events_tx: mpsc::UnboundedSender<TaskEvent>,
    events_rx: mpsc::UnboundedReceiver<TaskEvent>,
    backoff: Backoff,
    phase: Phase,
    link: Link,
}

impl Driver {
    pub(crate) fn new(settings: Arc<Settings>, handlers: Arc<Handlers>) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            settings,
            handlers,
            ledger: Ledger::default(),
            events_tx,
            events_rx,
            backoff: Backoff::new(),
            phase: Phase::Running,
            link: Link::Down {
                retry_at: Instant::now(),
            },
        }
    }

    /// Runs until drained or stopped. Never returns early on a lost link.
    pub(crate) async fn run(mut self, shutdown: ShutdownHandle) -> RunSummary {
        info!(
            worker = %self.settings.worker_id,
            slots = self.settings.slots,
            kinds = ?self.handlers.keys().collect::<Vec<_>>(),
            "worker starting"
        );
        self.link = Link::Connecting(self.connect());
        loop {
            if let Some(summary) = self.settle() {
                info!(
                    unacknowledged = summary.unacknowledged,
                    stopped_now = summary.stopped_now,
                    "worker stopped"
                );
                return summary;
            }
            let step = self.next_step(&shutdown).await;
            if let Some(summary) = self.apply(step).await {
                return summary;
            }
        }
    }

    async fn next_step(&mut self, shutdown: &ShutdownHandle) -> Step {
        let draining = self.phase != Phase::Running;
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let deadline = self.phase.deadline();
        let task_deadline = self.ledger.next_deadline().map(instant_at);
        tokio::select! {
            biased;
            () = shutdown.stop_token().cancelled(), if !stopping => Step::Stop,
            () = shutdown.drain_token().cancelled(), if !draining => Step::Drain,
            Some(event) = self.events_rx.recv() => Step::Task(event),
            () = sleep_until_some(task_deadline) => Step::Deadline,
            () = sleep_until_some(deadline) => Step::Timer,
            step = self.link.next() => step,
        }
    }

    async fn apply(&mut self, step: Step) -> Option<RunSummary> {
        match step {
            Step::Drain => self.begin_drain().await,
            Step::Stop => self.begin_stop().await,
            Step::Task(event) => self.on_task_end(event).await,
            Step::Deadline => self.on_deadline(),
            Step::Timer => {
                if let Some(summary) = self.on_timer() {
                    return Some(summary);
                }
            }
            Step::Retry => self.link = Link::Connecting(self.connect()),
            Step::Connected(Ok((up, welcome))) => self.on_welcome(up, welcome).await,
            Step::Connected(Err(e)) => self.lose_link(&e),
            Step::Inbound(Ok(Some(msg))) => self.on_message(msg).await,
            Step::Inbound(Ok(None)) => self.lose_link(&SessionError::Closed),
            Step::Inbound(Err(status)) => self.lose_link(&SessionError::Stream(status)),
            Step::Beat => {
                let progress = self.ledger.take_progress();
                self.send(worker_message::Msg::Heartbeat(proto::Heartbeat {
                    progress,
                }))
                .await;
            }
        }
        None
    }

    /// Returns the summary once a drain or stop is complete, and arms the
    /// drain's timers: the ack grace once the last task has ended, and a short
    /// quiet period once nothing is held, so that an Assign the coordinator sent
    /// before it saw our Draining is still answered (`Interrupted`) rather than
    /// left to expire with its lease.
    fn settle(&mut self) -> Option<RunSummary> {
        let running = self.ledger.running_len();
        let pending = self.ledger.pending_len();
        let up = matches!(self.link, Link::Up(_));
        let now = Instant::now();
        match &mut self.phase {
            Phase::Running => None,
            Phase::Stopping { .. } => (running == 0 && pending == 0).then(|| self.summary()),
            Phase::Draining { .. } if running > 0 => None,
            Phase::Draining { ack_deadline, .. } if pending > 0 => {
                if ack_deadline.is_none() {
                    info!(unacknowledged = pending, "tasks done, waiting for acks");
                    *ack_deadline = Some(now + self.settings.drain_ack_timeout);
                }
                None
            }
            Phase::Draining { quiet_until, .. } => match *quiet_until {
                _ if !up => Some(self.summary()),
                None => {
                    *quiet_until = Some(now + DRAIN_QUIET);
                    None
                }
                Some(at) if now >= at => Some(self.summary()),
                Some(_) => None,
            },
        }
    }

    /// The phase's deadline passed: give up, or let [`Driver::settle`] decide.
    fn on_timer(&mut self) -> Option<RunSummary> {
        let now = Instant::now();
        let give_up = match self.phase {
            Phase::Running => false,
            Phase::Stopping { deadline } => now >= deadline,
            Phase::Draining { ack_deadline, .. } => ack_deadline.is_some_and(|at| now >= at),
        };
        if !give_up {
            return None;
        }
        warn!(
            unacknowledged = self.ledger.pending_len(),
            running = self.ledger.running_len(),
            "giving up on unacknowledged results"
        );
        Some(self.summary())
    }

    fn summary(&self) -> RunSummary {
        RunSummary {
            stopped_now: matches!(self.phase, Phase::Stopping { .. }),
            unacknowledged: self.ledger.pending_len(),
            abandoned: self.ledger.running_len(),
        }
    }

    /// Opens a session: connect, send Hello, wait for Welcome.
    fn connect(&self) -> Connecting {
        let endpoint = self.settings.endpoint.clone();
        let hello = worker_message::Msg::Hello(proto::Hello {
            worker_id: self.settings.worker_id.clone(),
            hostname: self.settings.hostname.clone(),
            queues: self.settings.queues.clone(),
            kinds: self.handlers.keys().cloned().collect(),
            slots: self.settings.slots,
            labels: self.settings.labels.clone(),
            held: self.ledger.held(),
            max_shutdown_grace: self
                .settings
                .max_shutdown_grace
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        });
        let authorization = self.settings.authorization.clone();
        debug!(endpoint = %endpoint.uri(), "connecting");
        Box::pin(async move {
            let open = async {
                let mut client = WorkerServiceClient::connect(endpoint)
                    .await?
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE);
                let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
                // Queued before the call, so a coordinator that waits for Hello
                // before answering the call gets it.
                tx.send(WorkerMessage { msg: Some(hello) })
                    .await
                    .map_err(|_| SessionError::SendClosed)?;
                let mut request = tonic::Request::new(ReceiverStream::new(rx));
                if let Some(auth) = &authorization {
                    request.metadata_mut().insert("authorization", auth.clone());
                }
                let mut inbound = client
                    .session(request)
                    .await
                    .map_err(SessionError::Refused)?
                    .into_inner();
                let first = inbound.message().await.map_err(SessionError::Stream)?;
                match first.and_then(|m| m.msg) {
                    Some(coordinator_message::Msg::Welcome(welcome)) => {
                        let period = welcome
                            .heartbeat_interval
                            .as_ref()
                            .and_then(std_duration)
                            .filter(|d| !d.is_zero())
                            .unwrap_or(DEFAULT_HEARTBEAT);
                        let mut heartbeat =
                            tokio::time::interval_at(Instant::now() + period, period);
                        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        let up = Up {
                            session_id: welcome.session_id.clone(),
                            tx,
                            inbound,
                            heartbeat,
                        };
                        Ok((up, welcome))
                    }
                    Some(_) => Err(SessionError::NoWelcome),
                    None => Err(SessionError::Closed),
                }
            };
            timeout(WELCOME_TIMEOUT, open)
                .await
                .unwrap_or(Err(SessionError::WelcomeTimeout(WELCOME_TIMEOUT)))
        })
    }

    fn lose_link(&mut self, error: &SessionError) {
        let delay = self.backoff.next_delay();
        match &self.link {
            Link::Up(up) => {
                warn!(session = %up.session_id, error = %error_chain(error), retry_in = ?delay, "session lost")
            }
            _ => warn!(error = %error_chain(error), retry_in = ?delay, "cannot open session"),
        }
        self.link = Link::Down {
            retry_at: Instant::now() + delay,
        };
    }

    /// Sends on the open session. Without one, nothing is lost: results stay
    /// pending and go out after the next Welcome; heartbeats are moot.
    async fn send(&mut self, msg: worker_message::Msg) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        let error = match timeout(SEND_TIMEOUT, up.tx.send(WorkerMessage { msg: Some(msg) })).await
        {
            Ok(Ok(())) => return,
            Ok(Err(_)) => SessionError::SendClosed,
            Err(_) => SessionError::SendTimeout(SEND_TIMEOUT),
        };
        self.lose_link(&error);
    }

    async fn on_welcome(&mut self, up: Up, welcome: proto::Welcome) {
        self.backoff.reset();
        info!(
            session = %welcome.session_id,
            resumed = welcome.resumed.len(),
            rejected = welcome.rejected.len(),
            "connected"
        );
        let plan = self.ledger.on_welcome(&welcome);
        for (key, task) in plan.abort {
            warn!(job = %key.job_id, lease = %key.lease_id, "lease rejected, aborting its task");
            task.abort.cancel();
        }
        for key in plan.dropped {
            warn!(job = %key.job_id, lease = %key.lease_id, "lease rejected, dropping its result");
        }
        self.link = Link::Up(Box::new(up));
        if self.phase != Phase::Running {
            self.send(worker_message::Msg::Draining(proto::Draining {}))
                .await;
        }
        for complete in plan.resend {
            debug!(job = %complete.job_id, lease = %complete.lease_id, "resending result");
            self.send(worker_message::Msg::Complete(complete)).await;
        }
    }

    async fn on_message(&mut self, msg: CoordinatorMessage) {
        match msg.msg {
            Some(coordinator_message::Msg::Assign(assign)) => self.on_assign(assign).await,
            Some(coordinator_message::Msg::CompleteAck(ack)) => self.on_ack(&ack),
            Some(coordinator_message::Msg::Cancel(cancel)) => self.on_cancel(&cancel),
            Some(coordinator_message::Msg::Shutdown(shutdown)) => self.on_shutdown(shutdown),
            Some(coordinator_message::Msg::Welcome(welcome)) => {
                warn!(session = %welcome.session_id, "unexpected welcome mid-session, ignored");
            }
            None => debug!("empty coordinator message, ignored"),
        }
    }

    async fn on_assign(&mut self, assign: proto::Assign) {
        let Some(job) = assign.job else {
            warn!(lease = %assign.lease_id, "assign without a job, ignored");
            return;
        };
        let key = LeaseKey::new(job.id.clone(), assign.lease_id.clone());
        if self.ledger.knows(&key) {
            warn!(job = %key.job_id, lease = %key.lease_id, "duplicate assign, ignored");
            return;
        }
        if self.phase != Phase::Running {
            info!(job = %key.job_id, lease = %key.lease_id, "assign while draining, refused");
            let outcome = Outcome::Interrupted(proto::Interrupted {
                reason: DRAIN_REASON.to_owned(),
            });
            let complete = self.ledger.refuse(key, outcome);
            return self.send(worker_message::Msg::Complete(complete)).await;
        }
        let Some(handler) = self.handlers.get(&job.kind).cloned() else {
            warn!(job = %key.job_id, kind = %job.kind, "assign for a kind without handler");
            let outcome = Outcome::Failure(proto::Failure {
                error: format!("no handler for kind {}", job.kind),
                permanent: false,
            });
            let complete = self.ledger.refuse(key, outcome);
            return self.send(worker_message::Msg::Complete(complete)).await;
        };
        debug!(
            job = %key.job_id,
            lease = %key.lease_id,
            kind = %job.kind,
            attempt = job.attempt,
            "task started"
        );
        let deadline: Option<SystemTime> = assign.deadline.as_ref().and_then(system_time);
        let grace = assign.shutdown_grace.as_ref().and_then(std_duration);
        let timeout = deadline.map(|at| Timeout {
            at,
            after: job
                .timeout
                .as_ref()
                .and_then(std_duration)
                .unwrap_or_else(|| whole_millis(at.duration_since(SystemTime::now()))),
        });
        // The grace the worker itself applies (drain, timeout); capped by
        // what it can honour, which a conforming coordinator never exceeds.
        let own_grace = grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        let own_grace = self
            .settings
            .max_shutdown_grace
            .map_or(own_grace, |max| own_grace.min(max));
        let abort = CancellationToken::new();
        let progress = ProgressSlot::default();
        let notices = NoticeSlot::default();
        let ctx = TaskContext::new(
            job,
            assign.lease_id,
            deadline,
            grace,
            progress.clone(),
            notices.clone(),
        );
        let task = RunningTask::new(abort.clone(), progress, notices, own_grace, timeout);
        self.ledger.start(key.clone(), task);
        tokio::spawn(supervise(key, handler, ctx, abort, self.events_tx.clone()));
    }

    /// A cancel notice: tell the task; it is killed at `stop_by` if it still runs.
    fn on_cancel(&mut self, cancel: &proto::Cancel) {
        let key = LeaseKey::new(cancel.job_id.clone(), cancel.lease_id.clone());
        let stop_by = cancel.stop_by.as_ref().and_then(system_time);
        let reason = if cancel.reason.is_empty() {
            "job cancelled"
        } else {
            &cancel.reason
        };
        let now = SystemTime::now();
        match self
            .ledger
            .notify(&key, NoticeKind::Cancel, reason, stop_by, now)
        {
            NoticeResult::Given => info!(
                job = %key.job_id,
                lease = %key.lease_id,
                reason = %reason,
                stop_by = ?stop_by.map(humantime::format_rfc3339_millis),
                "cancel notice given to the task"
            ),
            NoticeResult::Ended => debug!(
                job = %key.job_id,
                lease = %key.lease_id,
                "cancel notice for a task that already ended, ignored"
            ),
            NoticeResult::Unknown => warn!(
                job = %key.job_id,
                lease = %key.lease_id,
                "cancel notice for an unknown lease, ignored"
            ),
        }
    }

    /// A shutdown notice: drain (if not already), and tell every running task
    /// to stop by its listed time, or now + its grace if not listed.
    fn on_shutdown(&mut self, shutdown: proto::Shutdown) {
        let reason = if shutdown.reason.is_empty() {
            DRAIN_REASON.to_owned()
        } else {
            shutdown.reason
        };
        if self.phase == Phase::Running {
            info!(reason = %reason, "shutdown notice from the coordinator, draining");
            self.phase = Phase::Draining {
                ack_deadline: None,
                quiet_until: None,
            };
        }
        let listed: Vec<(LeaseKey, Option<SystemTime>)> = shutdown
            .tasks
            .iter()
            .map(|t| {
                let key = LeaseKey::new(t.job_id.clone(), t.lease_id.clone());
                (key, t.stop_by.as_ref().and_then(system_time))
            })
            .collect();
        let report = self.ledger.shutdown(&reason, &listed, SystemTime::now());
        for key in report.unknown {
            warn!(job = %key.job_id, lease = %key.lease_id, "shutdown notice for an unknown lease, ignored");
        }
        info!(reason = %reason, noticed = report.noticed, "shutdown notice given to running tasks");
    }

    /// A task's timeout or kill time came: give timeout notices, abort what
    /// still runs at its stop-by time.
    fn on_deadline(&mut self) {
        let expired = self.ledger.expire(SystemTime::now());
        for key in expired.timed_out {
            info!(job = %key.job_id, lease = %key.lease_id, "task timed out, notice given");
        }
        for (key, abort) in expired.kill {
            warn!(job = %key.job_id, lease = %key.lease_id, "task still running at its stop-by time, killing it");
            abort.cancel();
        }
    }

    fn on_ack(&mut self, ack: &proto::CompleteAck) {
        match self.ledger.on_ack(ack) {
            AckResult::Accepted => {
                debug!(job = %ack.job_id, lease = %ack.lease_id, "result acknowledged")
            }
            AckResult::Refused(reason) => warn!(
                job = %ack.job_id,
                lease = %ack.lease_id,
                reason = %reason,
                "result not accepted by coordinator, dropped"
            ),
            AckResult::Unknown => {
                debug!(job = %ack.job_id, lease = %ack.lease_id, "ack for no pending result")
            }
        }
    }

    async fn on_task_end(&mut self, event: TaskEvent) {
        let TaskEvent { key, end } = event;
        let Some(complete) = self.ledger.finish(key.clone(), end) else {
            debug!(job = %key.job_id, lease = %key.lease_id, "rejected task ended, nothing to report");
            return;
        };
        match &complete.outcome {
            Some(Outcome::Failure(f)) => {
                info!(job = %key.job_id, lease = %key.lease_id, error = %f.error, permanent = f.permanent, "task failed");
            }
            Some(Outcome::Interrupted(i)) => {
                info!(job = %key.job_id, lease = %key.lease_id, reason = %i.reason, "task interrupted");
            }
            _ => debug!(job = %key.job_id, lease = %key.lease_id, "task succeeded"),
        }
        self.send(worker_message::Msg::Complete(complete)).await;
    }

    async fn begin_drain(&mut self) {
        info!(
            running = self.ledger.running_len(),
            unacknowledged = self.ledger.pending_len(),
            "draining"
        );
        self.phase = Phase::Draining {
            ack_deadline: None,
            quiet_until: None,
        };
        // Notices start here, so they work with the coordinator unreachable;
        // its Shutdown may still move a task's stop-by earlier.
        let report = self.ledger.shutdown(DRAIN_REASON, &[], SystemTime::now());
        if report.noticed > 0 {
            info!(
                noticed = report.noticed,
                "running tasks told to stop within their grace"
            );
        }
        self.send(worker_message::Msg::Draining(proto::Draining {}))
            .await;
    }

    async fn begin_stop(&mut self) {
        let was_running = self.phase == Phase::Running;
        self.phase = Phase::Stopping {
            deadline: Instant::now() + STOP_ACK_TIMEOUT,
        };
        let tokens = self.ledger.stop_all(STOP_REASON);
        warn!(
            aborted = tokens.len(),
            "stopping now, aborting running tasks"
        );
        for token in tokens {
            token.cancel();
        }
        if was_running {
            self.send(worker_message::Msg::Draining(proto::Draining {}))
                .await;
        }
    }
}

/// Runs one handler (this is its own tokio task) and reports how it ended.
/// Cancelling `abort` drops the handler's future (which kills a command's
/// process group). The handler runs inside this task rather than in a task of
/// its own, which would cost a second spawn and a wake-up of its join handle
/// per job.
async fn supervise(
    key: LeaseKey,
    handler: Arc<dyn Handler>,
    ctx: TaskContext,
    abort: CancellationToken,
    events: mpsc::UnboundedSender<TaskEvent>,
) {
    let run = std::panic::AssertUnwindSafe(handler.call(ctx)).catch_unwind();
    tokio::pin!(run);
    let end = tokio::select! {
        // A task that finished just before the abort keeps its result.
        biased;
        ended = &mut run => match ended {
            Ok(result) => TaskEnd::Returned(result),
            Err(payload) => TaskEnd::Panicked(panic_message(payload)),
        },
        () = abort.cancelled() => TaskEnd::Aborted,
    };
    if events.send(TaskEvent { key, end }).is_err() {
        debug!("worker loop gone, task result dropped");
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload.downcast_ref::<&str>().map_or_else(
            || "non-string panic payload".to_owned(),
            |s| (*s).to_owned(),
        ),
    }
}

/// `d` rounded down to whole milliseconds (zero if `Err`), for messages.
fn whole_millis<E>(d: Result<Duration, E>) -> Duration {
    d.map_or(Duration::ZERO, |d| {
        Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    })
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
