//! What a handler sees and returns: [`TaskContext`], [`TaskError`] and the
//! [`Handler`] trait, plus the [`Notice`] a task gets when it must stop.
//!
//! A handler is anything that turns a [`TaskContext`] into a future of
//! `Result<Vec<u8>, TaskError>`. Plain async closures qualify through a blanket
//! impl; the command runner ([`crate::worker::CommandHandler`]) implements the
//! trait by hand, so it is just another handler.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::proto;

/// Runs one kind of job.
///
/// Implemented for every `Fn(TaskContext) -> impl Future<Output = Result<Vec<u8>,
/// TaskError>>` that is `Send + Sync + 'static`, so an async closure is a handler.
/// The future runs in its own tokio task; dropping it (on abort) must stop the work.
pub trait Handler: Send + Sync + 'static {
    /// Starts the task. The returned future resolves to the job's result.
    fn call(&self, ctx: TaskContext) -> BoxFuture<'static, Result<Vec<u8>, TaskError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, TaskError>> + Send + 'static,
{
    fn call(&self, ctx: TaskContext) -> BoxFuture<'static, Result<Vec<u8>, TaskError>> {
        Box::pin(self(ctx))
    }
}

/// A failed attempt, as the handler reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    /// What went wrong, for a person; becomes `Failure.error`.
    message: String,
    /// Never retry this job.
    permanent: bool,
    /// The task ended because of its notice (it stopped on purpose, died from
    /// its stop signal, or was killed at its stop-by time), so the notice
    /// decides what is reported, not this error.
    stopped: bool,
}

impl TaskError {
    /// A failure the coordinator may retry per the job's policy.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            stopped: false,
        }
    }

    /// A failure that must not be retried (bad input, say).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
            stopped: false,
        }
    }

    /// The task stopped early because of its [`Notice`] (after saving a
    /// checkpoint, say). It is reported as the notice says: `Interrupted` on a
    /// shutdown (re-queued, attempt not used up), `Cancelled` on a cancel, a
    /// timeout failure on a timeout. Without a notice it is a retryable failure.
    pub fn stopped(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            stopped: true,
        }
    }

    /// The error message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the job must not be retried.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// Whether the task ended because of its notice (see [`TaskError::stopped`]).
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
}

/// Why a task is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    /// The job was cancelled (`CancelJob`).
    Cancel,
    /// The worker is shutting down (a signal, or `DrainWorker`).
    Shutdown,
    /// The attempt ran past its `timeout`.
    Timeout,
}

/// A request to stop: wind down (finish, checkpoint, clean up) before
/// `stop_by`, when the worker kills what is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub kind: NoticeKind,
    /// Why, for a person (the cancel or shutdown reason, or the timeout).
    pub reason: String,
    /// When the task is killed if it still runs.
    pub stop_by: SystemTime,
}

/// The notice in force for one task, shared by the session (which posts) and
/// the task's context (which waits).
#[derive(Debug, Clone)]
pub(crate) struct NoticeSlot(Arc<watch::Sender<Option<Notice>>>);

impl Default for NoticeSlot {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(None)))
    }
}

impl NoticeSlot {
    /// Posts a notice. The first one always counts; a later one replaces it
    /// only if it moves `stop_by` earlier. Returns whether it was taken.
    pub(crate) fn post(&self, notice: Notice) -> bool {
        self.0.send_if_modified(|current| match current {
            Some(c) if c.stop_by <= notice.stop_by => false,
            _ => {
                *current = Some(notice);
                true
            }
        })
    }

    /// The notice in force, if any.
    pub(crate) fn get(&self) -> Option<Notice> {
        self.0.borrow().clone()
    }

    /// A receiver that sees every change of the notice in force.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Notice>> {
        self.0.subscribe()
    }
}

/// The latest progress message of one task, taken by the next heartbeat.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProgressSlot(Arc<Mutex<Option<String>>>);

impl ProgressSlot {
    fn set(&self, message: String) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(message);
    }

    /// Takes the message reported since the last call, if any.
    pub(crate) fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Everything a handler knows about the task it runs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskContext {
    inner: Arc<ContextInner>,
}

#[derive(Debug)]
struct ContextInner {
    /// The job as the coordinator sent it in `Assign`.
    job: proto::Job,
    /// The fencing token of this attempt.
    lease_id: String,
    /// When the attempt times out (`Assign.deadline`), if it does.
    deadline: Option<SystemTime>,
    /// How long the task may take to stop after a notice (`Assign.shutdown_grace`).
    shutdown_grace: Option<Duration>,
    /// Where `report_progress` leaves its message for the heartbeat.
    progress: ProgressSlot,
    /// Where the session posts this task's notice.
    notices: NoticeSlot,
}

impl TaskContext {
    /// Builds the context for one `Assign`, sharing `progress` and `notices`
    /// with the session.
    pub(crate) fn new(
        job: proto::Job,
        lease_id: String,
        deadline: Option<SystemTime>,
        shutdown_grace: Option<Duration>,
        progress: ProgressSlot,
        notices: NoticeSlot,
    ) -> Self {
        Self {
            inner: Arc::new(ContextInner {
                job,
                lease_id,
                deadline,
                shutdown_grace,
                progress,
                notices,
            }),
        }
    }

    /// The job: kind, payload, attempt, labels and the rest.
    pub fn job(&self) -> &proto::Job {
        &self.inner.job
    }

    /// The lease (fencing token) of this attempt.
    pub fn lease_id(&self) -> &str {
        &self.inner.lease_id
    }

    /// Which attempt this is, counting from 1 (`job.attempt`).
    pub fn attempt(&self) -> u32 {
        self.inner.job.attempt
    }

    /// When this attempt times out; `None`: no timeout.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.inner.deadline
    }

    /// How long the task may take to stop once told to; `None`: not given.
    pub fn shutdown_grace(&self) -> Option<Duration> {
        self.inner.shutdown_grace
    }

    /// Reports progress; the latest message goes out with the next heartbeat.
    pub fn report_progress(&self, message: impl Into<String>) {
        self.inner.progress.set(message.into());
    }

    /// Resolves when the task is told to stop (cancelled, worker shutting
    /// down, or timed out), at once if it already was. Await it as often as
    /// you like, from any clone, typically in a `tokio::select!` against the
    /// work. A task still running at the notice's `stop_by` is aborted (its
    /// future dropped).
    pub fn notice(&self) -> impl Future<Output = Notice> + Send + 'static {
        let mut rx = self.inner.notices.subscribe();
        async move {
            let notice = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|n| n.clone());
            match notice {
                Some(notice) => notice,
                // The slot lives in this context and in the session's
                // ledger; with both gone no notice can come.
                None => std::future::pending().await,
            }
        }
    }

    /// The notice in force, if one arrived; never waits. A later notice with
    /// an earlier `stop_by` replaces the first one.
    pub fn notified(&self) -> Option<Notice> {
        self.inner.notices.get()
    }

    /// Every change of the notice in force, for the command runner.
    pub(crate) fn notices(&self) -> watch::Receiver<Option<Notice>> {
        self.inner.notices.subscribe()
    }
}

/// The tokio instant at which the wall clock reads `at` (now if it passed).
pub(crate) fn instant_at(at: SystemTime) -> Instant {
    let now = Instant::now();
    now + at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// Converts a protobuf timestamp to a `SystemTime`; `None` when out of range.
pub(crate) fn system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(*ts).ok()
}

/// Converts a protobuf duration to a `Duration`; `None` when negative.
pub(crate) fn std_duration(d: &prost_types::Duration) -> Option<Duration> {
    Duration::try_from(*d).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(notices: &NoticeSlot) -> TaskContext {
        TaskContext::new(
            proto::Job::default(),
            "l1".into(),
            None,
            None,
            ProgressSlot::default(),
            notices.clone(),
        )
    }

    fn notice(kind: NoticeKind, in_ms: u64) -> Notice {
        Notice {
            kind,
            reason: format!("{kind:?}"),
            stop_by: SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000 + in_ms),
        }
    }

    #[test]
    fn progress_is_taken_once() {
        let slot = ProgressSlot::default();
        let ctx = TaskContext::new(
            proto::Job::default(),
            "l1".into(),
            None,
            None,
            slot.clone(),
            NoticeSlot::default(),
        );
        ctx.report_progress("half");
        ctx.report_progress("most");
        assert_eq!(slot.take().as_deref(), Some("most"));
        assert_eq!(slot.take(), None);
    }

    #[test]
    fn task_error_flags() {
        assert!(TaskError::permanent("bad input").is_permanent());
        let e = TaskError::retryable("flaky");
        assert!(!e.is_permanent() && !e.is_stopped());
        assert_eq!(e.to_string(), "flaky");
        let e = TaskError::stopped("checkpointed");
        assert!(e.is_stopped() && !e.is_permanent());
    }

    #[tokio::test]
    async fn notice_future_resolves_for_every_waiter() {
        let slot = NoticeSlot::default();
        let ctx = ctx(&slot);
        assert_eq!(ctx.notified(), None);
        let clone = ctx.clone();
        let early = tokio::spawn(ctx.notice());
        let from_clone = tokio::spawn(async move { clone.notice().await });
        tokio::task::yield_now().await;
        assert!(!early.is_finished());

        let first = notice(NoticeKind::Cancel, 500);
        assert!(slot.post(first.clone()));
        assert_eq!(early.await.expect("no panic"), first);
        assert_eq!(from_clone.await.expect("no panic"), first);
        // Once a notice arrived, awaiting again resolves at once.
        assert_eq!(ctx.notice().await, first);
        assert_eq!(ctx.notified(), Some(first));
    }

    #[tokio::test]
    async fn only_an_earlier_stop_by_replaces_the_notice() {
        let slot = NoticeSlot::default();
        let ctx = ctx(&slot);
        let first = notice(NoticeKind::Shutdown, 500);
        assert!(slot.post(first.clone()));
        assert!(!slot.post(notice(NoticeKind::Timeout, 900)));
        assert_eq!(ctx.notified(), Some(first));
        let earlier = notice(NoticeKind::Cancel, 100);
        assert!(slot.post(earlier.clone()));
        assert_eq!(ctx.notified(), Some(earlier.clone()));
        assert_eq!(ctx.notice().await, earlier);
    }
}
