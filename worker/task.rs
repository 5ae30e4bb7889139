//! What a handler sees and returns: [`TaskContext`], [`TaskError`] and the
//! [`Handler`] trait.
//!
//! A handler is anything that turns a [`TaskContext`] into a future of
//! `Result<Vec<u8>, TaskError>`. Plain async closures qualify through a blanket
//! impl; the command runner ([`crate::worker::CommandHandler`]) implements the
//! trait by hand, so it is just another handler.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

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
}

impl TaskError {
    /// A failure the coordinator may retry per the job's policy.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }

    /// A failure that must not be retried (bad input, say).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
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
}

impl TaskContext {
    /// Builds the context for one `Assign`, sharing `progress` with the session.
    pub(crate) fn new(
        job: proto::Job,
        lease_id: String,
        deadline: Option<SystemTime>,
        shutdown_grace: Option<Duration>,
        progress: ProgressSlot,
    ) -> Self {
        Self {
            inner: Arc::new(ContextInner {
                job,
                lease_id,
                deadline,
                shutdown_grace,
                progress,
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

    #[test]
    fn progress_is_taken_once() {
        let slot = ProgressSlot::default();
        let ctx = TaskContext::new(proto::Job::default(), "l1".into(), None, None, slot.clone());
        ctx.report_progress("half");
        ctx.report_progress("most");
        assert_eq!(slot.take().as_deref(), Some("most"));
        assert_eq!(slot.take(), None);
    }

    #[test]
    fn task_error_flags() {
        assert!(TaskError::permanent("bad input").is_permanent());
        let e = TaskError::retryable("flaky");
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "flaky");
    }
}
