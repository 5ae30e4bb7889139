//! The worker's book of leases: tasks still running and finished tasks whose
//! `Complete` the coordinator has not acknowledged yet.
//!
//! Pure logic with no I/O: the session driver ([`super::session`]) feeds it
//! what happened (an assign, a task's end, a Welcome, an ack) and performs the
//! actions it returns (messages to send, tasks to abort). The ledger outlives
//! every session, which is what lets running tasks and unacknowledged results
//! survive a reconnect.

use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;

use super::task::{ProgressSlot, TaskError};
use crate::proto::{self, complete::Outcome};

/// A lease as the worker tracks it: the job and its fencing token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct LeaseKey {
    pub(crate) job_id: String,
    pub(crate) lease_id: String,
}

impl LeaseKey {
    pub(crate) fn new(job_id: impl Into<String>, lease_id: impl Into<String>) -> Self {
        Self {
            job_id: job_id.into(),
            lease_id: lease_id.into(),
        }
    }

    fn to_ref(&self) -> proto::LeaseRef {
        proto::LeaseRef {
            job_id: self.job_id.clone(),
            lease_id: self.lease_id.clone(),
        }
    }
}

impl From<&proto::LeaseRef> for LeaseKey {
    fn from(r: &proto::LeaseRef) -> Self {
        Self::new(r.job_id.clone(), r.lease_id.clone())
    }
}

/// How a task's future ended.
#[derive(Debug)]
pub(crate) enum TaskEnd {
    /// The handler returned.
    Returned(Result<Vec<u8>, TaskError>),
    /// The handler panicked with this message.
    Panicked(String),
    /// The task was aborted before it returned.
    Aborted,
}

/// One task in flight.
#[derive(Debug)]
pub(crate) struct RunningTask {
    /// Cancelling it drops the handler's future (and kills a command's group).
    pub(crate) abort: CancellationToken,
    /// The handler's latest progress message, taken by each heartbeat.
    pub(crate) progress: ProgressSlot,
    /// Set when the worker itself aborts the task (stop now): the reason sent
    /// back as `Interrupted`.
    stop_reason: Option<String>,
}

impl RunningTask {
    pub(crate) fn new(abort: CancellationToken, progress: ProgressSlot) -> Self {
        Self {
            abort,
            progress,
            stop_reason: None,
        }
    }
}

/// What to do after a Welcome.
#[derive(Debug, Default)]
pub(crate) struct WelcomePlan {
    /// Rejected leases whose tasks still run: abort them, report nothing.
    pub(crate) abort: Vec<(LeaseKey, RunningTask)>,
    /// Completions to send again (the lease was resumed, or not mentioned at
    /// all: the coordinator answers a stale one with `accepted = false`).
    pub(crate) resend: Vec<proto::Complete>,
    /// Unacknowledged completions dropped because their lease was rejected.
    pub(crate) dropped: Vec<LeaseKey>,
}

/// What an ack meant.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AckResult {
    Accepted,
    Refused(String),
    /// No pending completion for that lease (a duplicate ack, say).
    Unknown,
}

/// Running tasks and unacknowledged completions, keyed by lease.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    running: BTreeMap<LeaseKey, RunningTask>,
    pending: BTreeMap<LeaseKey, proto::Complete>,
}

impl Ledger {
    /// Leases to name in `Hello.held`: running tasks plus unacknowledged results.
    pub(crate) fn held(&self) -> Vec<proto::LeaseRef> {
        let mut keys: Vec<&LeaseKey> = self.running.keys().chain(self.pending.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter().map(LeaseKey::to_ref).collect()
    }

    pub(crate) fn running_len(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether the lease is running or has an unacknowledged result.
    pub(crate) fn knows(&self, key: &LeaseKey) -> bool {
        self.running.contains_key(key) || self.pending.contains_key(key)
    }

    /// Records a task that was just started.
    pub(crate) fn start(&mut self, key: LeaseKey, task: RunningTask) {
        self.running.insert(key, task);
    }

    /// Records an outcome decided without running anything (no handler, or
    /// draining) and returns the `Complete` to send.
    pub(crate) fn refuse(&mut self, key: LeaseKey, outcome: Outcome) -> proto::Complete {
        let complete = complete(&key, outcome);
        self.pending.insert(key, complete.clone());
        complete
    }

    /// A task ended: returns the `Complete` to send, now pending until acked.
    /// `None` when the lease is no longer ours (rejected, so its task was aborted).
    pub(crate) fn finish(&mut self, key: LeaseKey, end: TaskEnd) -> Option<proto::Complete> {
        let task = self.running.remove(&key)?;
        let outcome = match end {
            TaskEnd::Returned(Ok(result)) => Outcome::Success(proto::Success { result }),
            TaskEnd::Returned(Err(e)) => Outcome::Failure(proto::Failure {
                error: e.message().to_owned(),
                permanent: e.is_permanent(),
            }),
            TaskEnd::Panicked(message) => Outcome::Failure(proto::Failure {
                error: format!("handler panicked: {message}"),
                permanent: false,
            }),
            TaskEnd::Aborted => Outcome::Interrupted(proto::Interrupted {
                reason: task
                    .stop_reason
                    .unwrap_or_else(|| "task aborted".to_owned()),
            }),
        };
        Some(self.refuse(key, outcome))
    }

    /// Applies a Welcome: rejected leases are forgotten (their tasks returned
    /// for aborting), every other pending completion is to be sent again.
    pub(crate) fn on_welcome(&mut self, welcome: &proto::Welcome) -> WelcomePlan {
        let mut plan = WelcomePlan::default();
        for lease in &welcome.rejected {
            let key = LeaseKey::from(lease);
            if let Some(task) = self.running.remove(&key) {
                plan.abort.push((key.clone(), task));
            }
            if self.pending.remove(&key).is_some() {
                plan.dropped.push(key);
            }
        }
        plan.resend = self.pending.values().cloned().collect();
        plan
    }

    /// Applies a CompleteAck: the completion is settled either way.
    pub(crate) fn on_ack(&mut self, ack: &proto::CompleteAck) -> AckResult {
        let key = LeaseKey::new(ack.job_id.clone(), ack.lease_id.clone());
        match self.pending.remove(&key) {
            None => AckResult::Unknown,
            Some(_) if ack.accepted => AckResult::Accepted,
            Some(_) => AckResult::Refused(ack.reason.clone()),
        }
    }

    /// Marks every running task as stopped by the worker and returns their
    /// abort tokens; their ends are reported as `Interrupted { reason }`.
    pub(crate) fn stop_all(&mut self, reason: &str) -> Vec<CancellationToken> {
        self.running
            .values_mut()
            .map(|task| {
                task.stop_reason = Some(reason.to_owned());
                task.abort.clone()
            })
            .collect()
    }

    /// Progress reported since the last heartbeat, one entry per task at most.
    pub(crate) fn take_progress(&self) -> Vec<proto::TaskProgress> {
        self.running
            .iter()
            .filter_map(|(key, task)| {
                task.progress.take().map(|message| proto::TaskProgress {
                    job_id: key.job_id.clone(),
                    lease_id: key.lease_id.clone(),
                    message,
                })
            })
            .collect()
    }
}

fn complete(key: &LeaseKey, outcome: Outcome) -> proto::Complete {
    proto::Complete {
        job_id: key.job_id.clone(),
        lease_id: key.lease_id.clone(),
        outcome: Some(outcome),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> LeaseKey {
        LeaseKey::new(format!("job-{n}"), format!("lease-{n}"))
    }

    fn task() -> RunningTask {
        RunningTask::new(CancellationToken::new(), ProgressSlot::default())
    }

    fn lease(n: u32) -> proto::LeaseRef {
        key(n).to_ref()
    }

    #[test]
    fn held_covers_running_and_unacknowledged() {
        let mut ledger = Ledger::default();
        ledger.start(key(1), task());
        ledger.start(key(2), task());
        let sent = ledger.finish(key(2), TaskEnd::Returned(Ok(b"r".to_vec())));
        assert!(sent.is_some());
        assert_eq!(ledger.held(), vec![lease(1), lease(2)]);
        let ack = proto::CompleteAck {
            job_id: "job-2".into(),
            lease_id: "lease-2".into(),
            accepted: true,
            reason: String::new(),
        };
        assert_eq!(ledger.on_ack(&ack), AckResult::Accepted);
        assert_eq!(ledger.on_ack(&ack), AckResult::Unknown);
        assert_eq!(ledger.held(), vec![lease(1)]);
    }

    #[test]
    fn welcome_aborts_rejected_and_resends_the_rest() {
        let mut ledger = Ledger::default();
        ledger.start(key(1), task());
        ledger.start(key(2), task());
        ledger.start(key(3), task());
        ledger.finish(key(3), TaskEnd::Returned(Err(TaskError::permanent("no"))));
        ledger.start(key(4), task());
        ledger.finish(key(4), TaskEnd::Returned(Ok(vec![])));
        let plan = ledger.on_welcome(&proto::Welcome {
            resumed: vec![lease(1), lease(3)],
            rejected: vec![lease(2), lease(4)],
            ..Default::default()
        });
        assert_eq!(plan.abort.len(), 1);
        assert_eq!(plan.abort[0].0, key(2));
        assert_eq!(plan.dropped, vec![key(4)]);
        assert_eq!(plan.resend.len(), 1);
        assert_eq!(plan.resend[0].lease_id, "lease-3");
        assert!(matches!(
            plan.resend[0].outcome,
            Some(Outcome::Failure(proto::Failure {
                permanent: true,
                ..
            }))
        ));
        // The aborted task's end is not ours to report any more.
        assert!(ledger.finish(key(2), TaskEnd::Aborted).is_none());
        assert_eq!(ledger.held(), vec![lease(1), lease(3)]);
    }

    #[test]
    fn stop_all_reports_interrupted_with_reason() {
        let mut ledger = Ledger::default();
        let t = task();
        let token = t.abort.clone();
        ledger.start(key(1), t);
        let tokens = ledger.stop_all("worker stopping");
        assert_eq!(tokens.len(), 1);
        tokens[0].cancel();
        assert!(token.is_cancelled());
        let complete = ledger.finish(key(1), TaskEnd::Aborted).expect("still ours");
        assert_eq!(
            complete.outcome,
            Some(Outcome::Interrupted(proto::Interrupted {
                reason: "worker stopping".into()
            }))
        );
    }

    #[test]
    fn panics_are_retryable_failures() {
        let mut ledger = Ledger::default();
        ledger.start(key(1), task());
        let complete = ledger
            .finish(key(1), TaskEnd::Panicked("oops".into()))
            .expect("ours");
        assert_eq!(
            complete.outcome,
            Some(Outcome::Failure(proto::Failure {
                error: "handler panicked: oops".into(),
                permanent: false
            }))
        );
    }
}
