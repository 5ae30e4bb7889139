//! The worker's book of leases: tasks still running and finished tasks whose
//! `Complete` the coordinator has not acknowledged yet.
//!
//! Pure logic with no I/O: the session driver ([`super::session`]) feeds it
//! what happened (an assign, a task's end, a Welcome, an ack, a notice, the
//! clock reaching a deadline) and performs the actions it returns (messages to
//! send, tasks to abort). The ledger outlives every session, which is what lets
//! running tasks and unacknowledged results survive a reconnect.
//!
//! Notices: each running task keeps the notices it got (cancel, shutdown,
//! timeout) and the earliest `stop_by` among them, its kill time. The notices
//! decide what a task's end is reported as; see [`Ledger::finish`].

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::task::{Notice, NoticeKind, NoticeSlot, ProgressSlot, TaskError};
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

/// A task's timeout (`Assign.deadline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeout {
    /// When the task gets its timeout notice.
    pub(crate) at: SystemTime,
    /// The job's `timeout`, for the error message.
    pub(crate) after: Duration,
}

impl Timeout {
    /// `Failure.error` of a timed-out attempt: `timed out after 2s`.
    fn message(&self) -> String {
        format!("timed out after {}", humantime::format_duration(self.after))
    }
}

/// One task in flight.
#[derive(Debug)]
pub(crate) struct RunningTask {
    /// Cancelling it drops the handler's future (and kills a command's group).
    pub(crate) abort: CancellationToken,
    /// The handler's latest progress message, taken by each heartbeat.
    pub(crate) progress: ProgressSlot,
    /// Where notices go to the handler's context.
    notices: NoticeSlot,
    /// How long the task may take to stop after a notice the worker starts
    /// itself (a drain, a timeout, a notice without `stop_by`).
    grace: Duration,
    /// When the attempt times out, if it does.
    timeout: Option<Timeout>,
    /// When the task is aborted if it still runs: the earliest `stop_by` of
    /// its notices.
    kill_at: Option<SystemTime>,
    /// The abort was fired at `kill_at` (so it is not fired again).
    killed: bool,
    /// A cancel notice arrived, with this reason.
    cancelled: Option<String>,
    /// The timeout notice was given.
    timed_out: bool,
    /// A shutdown notice arrived, with this reason.
    shutdown: Option<String>,
    /// Set when the worker itself aborts the task (stop now): the reason sent
    /// back as `Interrupted`.
    stop_reason: Option<String>,
}

impl RunningTask {
    pub(crate) fn new(
        abort: CancellationToken,
        progress: ProgressSlot,
        notices: NoticeSlot,
        grace: Duration,
        timeout: Option<Timeout>,
    ) -> Self {
        Self {
            abort,
            progress,
            notices,
            grace,
            timeout,
            kill_at: None,
            killed: false,
            cancelled: None,
            timed_out: false,
            shutdown: None,
            stop_reason: None,
        }
    }

    /// Records a notice, moves the kill time earlier if it says so, and tells
    /// the handler.
    fn give(&mut self, kind: NoticeKind, reason: &str, stop_by: SystemTime) {
        match kind {
            NoticeKind::Cancel => {
                self.cancelled.get_or_insert_with(|| reason.to_owned());
            }
            NoticeKind::Shutdown => {
                self.shutdown.get_or_insert_with(|| reason.to_owned());
            }
            NoticeKind::Timeout => self.timed_out = true,
        }
        self.kill_at = Some(self.kill_at.map_or(stop_by, |at| at.min(stop_by)));
        self.notices.post(Notice {
            kind,
            reason: reason.to_owned(),
            stop_by,
        });
    }

    /// The next instant something is due for this task: its timeout notice or
    /// its kill.
    fn next_deadline(&self) -> Option<SystemTime> {
        let timeout = self.timeout.filter(|_| !self.timed_out).map(|t| t.at);
        let kill = self.kill_at.filter(|_| !self.killed);
        match (timeout, kill) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What the task's end is reported as:
    /// - a success is a success, unless the attempt had timed out by then;
    /// - after a cancel notice, any other end is `Cancelled`;
    /// - after the timeout notice, any other end is the timeout failure;
    /// - a task aborted (killed at `stop_by`, or by a stop-now) or stopped by
    ///   its shutdown notice is `Interrupted`;
    /// - anything else is reported as it ended.
    fn outcome(&self, end: TaskEnd) -> Outcome {
        let interrupted = || {
            Outcome::Interrupted(proto::Interrupted {
                reason: self
                    .stop_reason
                    .clone()
                    .or_else(|| self.shutdown.clone())
                    .unwrap_or_else(|| "task aborted".to_owned()),
            })
        };
        match end {
            TaskEnd::Returned(Ok(result)) if !self.timed_out => {
                Outcome::Success(proto::Success { result })
            }
            _ if self.cancelled.is_some() => Outcome::Cancelled(proto::Cancelled {
                reason: self.cancelled.clone().unwrap_or_default(),
            }),
            _ if self.timed_out => Outcome::Failure(proto::Failure {
                error: self
                    .timeout
                    .map_or_else(|| "timed out".to_owned(), |t| t.message()),
                permanent: false,
            }),
            TaskEnd::Aborted => interrupted(),
            TaskEnd::Returned(Err(e))
                if e.is_stopped() && (self.shutdown.is_some() || self.stop_reason.is_some()) =>
            {
                interrupted()
            }
            TaskEnd::Returned(Ok(result)) => Outcome::Success(proto::Success { result }),
            TaskEnd::Returned(Err(e)) => Outcome::Failure(proto::Failure {
                error: e.message().to_owned(),
                permanent: e.is_permanent(),
            }),
            TaskEnd::Panicked(message) => Outcome::Failure(proto::Failure {
                error: format!("handler panicked: {message}"),
                permanent: false,
            }),
        }
    }
}

/// What became of a notice for one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoticeResult {
    /// The task runs and was told.
    Given,
    /// The task already ended (its result may await its ack): ignored.
    Ended,
    /// Not a lease of ours: ignored.
    Unknown,
}

/// What a shutdown notice did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ShutdownReport {
    /// Running tasks told to stop.
    pub(crate) noticed: usize,
    /// Listed leases that are not ours.
    pub(crate) unknown: Vec<LeaseKey>,
}

/// What came due at a tick of the clock.
#[derive(Debug, Default)]
pub(crate) struct Expired {
    /// Tasks that just got their timeout notice.
    pub(crate) timed_out: Vec<LeaseKey>,
    /// Tasks still running at their kill time: abort them.
    pub(crate) kill: Vec<(LeaseKey, CancellationToken)>,
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
    /// The notices the task got decide the outcome; see [`RunningTask::outcome`].
    pub(crate) fn finish(&mut self, key: LeaseKey, end: TaskEnd) -> Option<proto::Complete> {
        let task = self.running.remove(&key)?;
        let outcome = task.outcome(end);
        Some(self.refuse(key, outcome))
    }

    /// Gives one task a notice. Without `stop_by` it gets now + its grace.
    pub(crate) fn notify(
        &mut self,
        key: &LeaseKey,
        kind: NoticeKind,
        reason: &str,
        stop_by: Option<SystemTime>,
        now: SystemTime,
    ) -> NoticeResult {
        match self.running.get_mut(key) {
            Some(task) => {
                let stop_by = stop_by.unwrap_or(now + task.grace);
                task.give(kind, reason, stop_by);
                NoticeResult::Given
            }
            None if self.pending.contains_key(key) => NoticeResult::Ended,
            None => NoticeResult::Unknown,
        }
    }

    /// A shutdown: every listed running task is told to stop by its given
    /// time (now + its grace when none is given), and so is every running task
    /// not listed. A task keeps the earliest stop-by it was given.
    pub(crate) fn shutdown(
        &mut self,
        reason: &str,
        listed: &[(LeaseKey, Option<SystemTime>)],
        now: SystemTime,
    ) -> ShutdownReport {
        let mut report = ShutdownReport::default();
        let given: BTreeMap<&LeaseKey, Option<SystemTime>> =
            listed.iter().map(|(k, at)| (k, *at)).collect();
        for (key, _) in listed {
            if !self.knows(key) {
                report.unknown.push(key.clone());
            }
        }
        for (key, task) in &mut self.running {
            let stop_by = given.get(key).copied().flatten();
            task.give(
                NoticeKind::Shutdown,
                reason,
                stop_by.unwrap_or(now + task.grace),
            );
            report.noticed += 1;
        }
        report
    }

    /// The next instant at which [`Ledger::expire`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<SystemTime> {
        self.running
            .values()
            .filter_map(RunningTask::next_deadline)
            .min()
    }

    /// Gives the timeout notice to tasks past their timeout (stop by the
    /// timeout + grace) and returns the tasks past their kill time to abort.
    pub(crate) fn expire(&mut self, now: SystemTime) -> Expired {
        let mut expired = Expired::default();
        for (key, task) in &mut self.running {
            if let Some(timeout) = task.timeout.filter(|t| !task.timed_out && t.at <= now) {
                let reason = timeout.message();
                task.give(NoticeKind::Timeout, &reason, timeout.at + task.grace);
                expired.timed_out.push(key.clone());
            }
            if !task.killed && task.kill_at.is_some_and(|at| at <= now) {
                task.killed = true;
                expired.kill.push((key.clone(), task.abort.clone()));
            }
        }
        expired
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
        task_with(GRACE, None)
    }

    const GRACE: Duration = Duration::from_millis(300);

    fn task_with(grace: Duration, timeout: Option<Timeout>) -> RunningTask {
        RunningTask::new(
            CancellationToken::new(),
            ProgressSlot::default(),
            NoticeSlot::default(),
            grace,
            timeout,
        )
    }

    /// A fixed "now" for the clock-driven tests.
    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_millis(ms)
    }

    fn ended(ledger: &mut Ledger, n: u32, end: TaskEnd) -> Outcome {
        ledger
            .finish(key(n), end)
            .expect("ours")
            .outcome
            .expect("has an outcome")
    }

    fn interrupted(reason: &str) -> Outcome {
        Outcome::Interrupted(proto::Interrupted {
            reason: reason.into(),
        })
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

    #[test]
    fn cancel_notice_decides_every_end_but_success() {
        let mut ledger = Ledger::default();
        for n in 1..=4 {
            ledger.start(key(n), task());
            let r = ledger.notify(
                &key(n),
                NoticeKind::Cancel,
                "no longer needed",
                Some(t(300)),
                t(0),
            );
            assert_eq!(r, NoticeResult::Given);
        }
        let cancelled = Outcome::Cancelled(proto::Cancelled {
            reason: "no longer needed".into(),
        });
        assert_eq!(
            ended(&mut ledger, 1, TaskEnd::Returned(Ok(b"done".to_vec()))),
            Outcome::Success(proto::Success {
                result: b"done".to_vec()
            })
        );
        let failed = TaskEnd::Returned(Err(TaskError::permanent("x")));
        assert_eq!(ended(&mut ledger, 2, failed), cancelled);
        let stopped = TaskEnd::Returned(Err(TaskError::stopped("signal")));
        assert_eq!(ended(&mut ledger, 3, stopped), cancelled);
        assert_eq!(ended(&mut ledger, 4, TaskEnd::Aborted), cancelled);
        // A notice for an ended task or a stranger is ignored.
        let r = ledger.notify(&key(1), NoticeKind::Cancel, "again", None, t(0));
        assert_eq!(r, NoticeResult::Ended);
        let r = ledger.notify(&key(9), NoticeKind::Cancel, "who", None, t(0));
        assert_eq!(r, NoticeResult::Unknown);
    }

    #[test]
    fn shutdown_keeps_real_outcomes_but_interrupts_stopped_tasks() {
        let mut ledger = Ledger::default();
        for n in 1..=4 {
            ledger.start(key(n), task());
        }
        let report = ledger.shutdown(
            "deploy",
            &[(key(1), Some(t(5000))), (key(7), Some(t(5000)))],
            t(0),
        );
        assert_eq!(report.noticed, 4);
        assert_eq!(report.unknown, vec![key(7)]);
        let failed = TaskEnd::Returned(Err(TaskError::retryable("broke")));
        assert_eq!(
            ended(&mut ledger, 1, failed),
            Outcome::Failure(proto::Failure {
                error: "broke".into(),
                permanent: false
            })
        );
        let by_signal = TaskEnd::Returned(Err(TaskError::stopped("killed by signal 15")));
        assert_eq!(ended(&mut ledger, 2, by_signal), interrupted("deploy"));
        assert_eq!(
            ended(&mut ledger, 3, TaskEnd::Aborted),
            interrupted("deploy")
        );
        assert!(matches!(
            ended(&mut ledger, 4, TaskEnd::Returned(Ok(vec![]))),
            Outcome::Success(_)
        ));
    }

    #[test]
    fn stopped_without_a_notice_is_a_plain_failure() {
        let mut ledger = Ledger::default();
        ledger.start(key(1), task());
        assert!(matches!(
            ended(
                &mut ledger,
                1,
                TaskEnd::Returned(Err(TaskError::stopped("x")))
            ),
            Outcome::Failure(proto::Failure {
                permanent: false,
                ..
            })
        ));
    }

    #[test]
    fn the_earliest_stop_by_wins_and_kills_once() {
        let mut ledger = Ledger::default();
        let t1 = task();
        let notices = t1.notices.clone();
        let token = t1.abort.clone();
        ledger.start(key(1), t1);
        ledger.start(key(2), task());
        assert_eq!(ledger.next_deadline(), None);

        // Unlisted: now + grace. Then a later shutdown names an earlier time
        // for key 1, and one even later (ignored).
        ledger.shutdown("worker draining", &[], t(0));
        assert_eq!(ledger.next_deadline(), Some(t(300)));
        ledger.shutdown("deploy", &[(key(1), Some(t(100)))], t(50));
        ledger.shutdown("deploy", &[(key(1), Some(t(900)))], t(60));
        assert_eq!(notices.get().map(|n| n.stop_by), Some(t(100)));
        assert_eq!(ledger.next_deadline(), Some(t(100)));

        assert!(ledger.expire(t(99)).kill.is_empty());
        let expired = ledger.expire(t(100));
        assert_eq!(expired.kill.len(), 1);
        assert_eq!(expired.kill[0].0, key(1));
        expired.kill[0].1.cancel();
        assert!(token.is_cancelled());
        // Killed once: the next deadline is the other task's.
        assert_eq!(ledger.next_deadline(), Some(t(300)));
        assert!(ledger.expire(t(200)).kill.is_empty());
        // The first shutdown's reason is the one reported.
        assert_eq!(
            ended(&mut ledger, 1, TaskEnd::Aborted),
            interrupted("worker draining")
        );
    }

    #[test]
    fn timeout_notices_then_kills_and_fails_whatever_happens() {
        let mut ledger = Ledger::default();
        let timeout = Timeout {
            at: t(2000),
            after: Duration::from_secs(2),
        };
        for n in 1..=3 {
            ledger.start(key(n), task_with(GRACE, Some(timeout)));
        }
        // Ended before the deadline: the real outcome.
        assert!(matches!(
            ended(&mut ledger, 3, TaskEnd::Returned(Ok(vec![]))),
            Outcome::Success(_)
        ));
        assert_eq!(ledger.next_deadline(), Some(t(2000)));
        let expired = ledger.expire(t(2000));
        assert_eq!(expired.timed_out, vec![key(1), key(2)]);
        assert!(expired.kill.is_empty());
        assert_eq!(ledger.next_deadline(), Some(t(2300)));
        let expired = ledger.expire(t(2300));
        assert_eq!(expired.kill.len(), 2);
        let timed_out = Outcome::Failure(proto::Failure {
            error: "timed out after 2s".into(),
            permanent: false,
        });
        // Even a success after the notice, and an abort at the kill time.
        assert_eq!(
            ended(&mut ledger, 1, TaskEnd::Returned(Ok(vec![]))),
            timed_out
        );
        assert_eq!(ended(&mut ledger, 2, TaskEnd::Aborted), timed_out);
    }

    #[test]
    fn stop_now_reason_wins_over_the_shutdown_reason() {
        let mut ledger = Ledger::default();
        ledger.start(key(1), task());
        ledger.shutdown("worker draining", &[], t(0));
        ledger.stop_all("worker stopped");
        assert_eq!(
            ended(&mut ledger, 1, TaskEnd::Aborted),
            interrupted("worker stopped")
        );
    }
}
