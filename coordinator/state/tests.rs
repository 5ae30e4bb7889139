//! Decision tests on explicit instants: no sleeping, no network.

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::proto::{
    self, complete::Outcome, coordinator_message::Msg, Failure, Interrupted, Success,
};

const LEASE: Duration = Duration::from_secs(10);

struct Fixture {
    state: State,
    store: Store,
    now: SystemTime,
    _dir: tempfile::TempDir,
}

fn settings() -> Settings {
    Settings {
        lease_timeout: LEASE,
        heartbeat_interval: Duration::from_secs(1),
        default_shutdown_grace: Duration::from_secs(30),
        retention: Default::default(),
    }
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        Self::open(dir, store)
    }

    fn open(dir: tempfile::TempDir, store: Store) -> Fixture {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Self::open_at(dir, store, now, settings())
    }

    /// The model rebuilt from `store` at `now` with `settings`, jitter seeded.
    fn open_at(dir: tempfile::TempDir, store: Store, now: SystemTime, s: Settings) -> Fixture {
        let mut state = State::restore(s, store.snapshot().unwrap(), now).unwrap();
        state.seed_jitter(7);
        Fixture {
            state,
            store,
            now,
            _dir: dir,
        }
    }

    /// Makes the store durable, closes it and opens it again, as a restart
    /// does: the directory, the reopened store, and the fixture's clock.
    fn close_and_reopen(self) -> (tempfile::TempDir, Store, SystemTime) {
        let Fixture {
            store, _dir, now, ..
        } = self;
        store.sync().unwrap();
        drop(store);
        let store = Store::reopen_for_test(_dir.path());
        (_dir, store, now)
    }

    /// Closes the store and rebuilds the model from it, as a restart does.
    fn restart(self) -> Fixture {
        let (dir, store, now) = self.close_and_reopen();
        let mut f = Self::open(dir, store);
        f.now = now;
        f
    }

    /// What the engine does after deciding: timers, dispatch, write, effects.
    fn commit(&mut self) {
        self.state.fire_due(self.now);
        self.state.sweep(self.now, &self.store);
        self.state.dispatch(self.now);
        let round = self.state.take_round();
        self.store.apply(round.writes).unwrap();
        for e in round.effects {
            e(Ok(()));
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.commit();
    }

    fn submit(&mut self, job: Job) -> Job {
        let job = crate::coordinator::validate::new_job("job", job, 1 << 20).unwrap();
        let mut r = self.state.submit(vec![job], self.now, &self.store).unwrap();
        self.commit();
        r.pop().unwrap().job.unwrap()
    }

    fn get(&self, id: &str) -> Job {
        self.state
            .get_job(JobId::parse(id).unwrap(), &self.store)
            .unwrap()
    }

    fn connect(&mut self, worker: &str, slots: u32, kinds: &[&str], held: Vec<LeaseRef>) -> Conn {
        let (tx, rx) = mpsc::unbounded_channel();
        let hello = Hello {
            worker_id: worker.into(),
            slots,
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            held,
            ..Default::default()
        };
        let generation = self.state.hello(hello, tx, self.now);
        self.commit();
        let mut conn = Conn {
            worker: worker.into(),
            generation,
            rx,
        };
        match conn.next() {
            Some(Msg::Welcome(_)) => {}
            other => panic!("expected welcome first, got {other:?}"),
        }
        conn
    }

    fn complete(
        &mut self,
        conn: &Conn,
        job_id: &str,
        lease_id: &str,
        outcome: Outcome,
    ) -> CompleteAck {
        let done = proto::Complete {
            job_id: job_id.into(),
            lease_id: lease_id.into(),
            outcome: Some(outcome),
        };
        let ack = self
            .state
            .complete(&conn.worker, conn.generation, done, self.now);
        self.commit();
        ack
    }
}

fn job(kind: &str, priority: i32) -> Job {
    Job {
        kind: kind.into(),
        priority,
        retry: Some(proto::RetryPolicy {
            initial_backoff: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            max_backoff: Some(prost_types::Duration {
                seconds: 4,
                nanos: 0,
            }),
            multiplier: 2.0,
        }),
        ..Default::default()
    }
}

struct Conn {
    worker: String,
    generation: u64,
    rx: UnboundedReceiver<CoordinatorMessage>,
}

impl Conn {
    fn next(&mut self) -> Option<Msg> {
        self.rx.try_recv().ok().and_then(|m| m.msg)
    }

    fn assign(&mut self) -> proto::Assign {
        match self.next() {
            Some(Msg::Assign(a)) => a,
            other => panic!("expected an assign, got {other:?}"),
        }
    }

    fn nothing(&mut self) {
        if let Ok(m) = self.rx.try_recv() {
            panic!("expected nothing, got {m:?}");
        }
    }
}

fn success() -> Outcome {
    Outcome::Success(Success {
        result: b"ok".to_vec(),
    })
}

fn failure(permanent: bool) -> Outcome {
    Outcome::Failure(Failure {
        error: "boom".into(),
        permanent,
    })
}

#[test]
fn dispatches_by_priority_then_age_within_slots() {
    let mut f = Fixture::new();
    let low = f.submit(job("k", 0));
    let high1 = f.submit(job("k", 5));
    let high2 = f.submit(job("k", 5));
    let mut w = f.connect("w1", 1, &[], vec![]);
    let mut order = Vec::new();
    for _ in 0..3 {
        let a = w.assign();
        w.nothing(); // one slot: one job at a time
        let id = a.job.unwrap().id;
        order.push(id.clone());
        assert!(f.complete(&w, &id, &a.lease_id, success()).accepted);
        let _ack = w.next();
    }
    assert_eq!(order, vec![high1.id, high2.id, low.id.clone()]);
    let done = f.get(&low.id);
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(done.result, b"ok");
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].outcome, "succeeded");
}

#[test]
fn honours_kinds_and_queues() {
    let mut f = Fixture::new();
    let a = f.submit(job("a", 0));
    let mut other = job("a", 0);
    other.queue = "other".into();
    f.submit(other);
    let b = f.submit(job("b", 0));
    let mut w = f.connect("w1", 4, &["b"], vec![]);
    assert_eq!(w.assign().job.unwrap().id, b.id);
    w.nothing();
    assert_eq!(f.get(&a.id).state(), JobState::Queued);
}

#[test]
fn a_silent_worker_loses_its_lease_and_the_job_is_retried_as_a_new_attempt() {
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w1", 1, &[], vec![]);
    let a = w.assign();
    // Heartbeats keep the lease past one timeout.
    f.advance(LEASE - Duration::from_secs(1));
    f.state.heartbeat("w1", w.generation, f.now);
    f.advance(LEASE - Duration::from_secs(1));
    assert_eq!(f.get(&j.id).state(), JobState::Running);
    // Then silence.
    f.advance(LEASE);
    let lost = f.get(&j.id);
    assert_eq!(
        lost.state(),
        JobState::Scheduled,
        "retry waits for its backoff"
    );
    assert_eq!(lost.attempts[0].outcome, "lease_expired");
    assert!(
        w.rx.try_recv().is_err(),
        "the lost worker's stream is closed"
    );
    // The stale lease is fenced.
    let mut w2 = f.connect("w2", 1, &[], vec![]);
    assert!(!f.complete(&w2, &j.id, &a.lease_id, success()).accepted);
    let _ack = w2.next();
    f.advance(Duration::from_secs(2));
    let a2 = w2.assign();
    assert_eq!(a2.job.unwrap().attempt, 2);
}

#[test]
fn a_stale_complete_is_rejected_and_changes_nothing() {
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w1", 1, &[], vec![]);
    let a = w.assign();
    let before = f.get(&j.id);
    let wrong = LeaseId::generate().to_string();
    let ack = f.complete(&w, &j.id, &wrong, success());
    assert!(!ack.accepted);
    assert!(ack.reason.contains("stale lease"), "{}", ack.reason);
    assert_eq!(f.get(&j.id), before);
    assert!(f.complete(&w, &j.id, &a.lease_id, success()).accepted);
    assert!(
        !f.complete(&w, &j.id, &a.lease_id, success()).accepted,
        "a second completion is stale"
    );
}

#[test]
fn a_reconnecting_worker_keeps_the_leases_it_names() {
    let mut f = Fixture::new();
    let j1 = f.submit(job("k", 0));
    let j2 = f.submit(job("k", 0));
    let mut w = f.connect("w1", 2, &[], vec![]);
    let a1 = w.assign();
    let _a2 = w.assign();
    f.state.disconnected("w1", w.generation);
    f.advance(Duration::from_secs(3));
    let held = vec![LeaseRef {
        job_id: j1.id.clone(),
        lease_id: a1.lease_id.clone(),
    }];
    let (tx, mut rx) = mpsc::unbounded_channel();
    let generation = f.state.hello(
        Hello {
            worker_id: "w1".into(),
            slots: 2,
            held,
            ..Default::default()
        },
        tx,
        f.now,
    );
    f.commit();
    let Some(Msg::Welcome(welcome)) = rx.try_recv().unwrap().msg else {
        panic!("expected welcome")
    };
    assert_eq!(welcome.resumed.len(), 1);
    assert!(welcome.rejected.is_empty());
    // j2 was not named: its lease ended, and it is retried (after backoff).
    assert_eq!(f.get(&j2.id).state(), JobState::Scheduled);
    let w2 = Conn {
        worker: "w1".into(),
        generation,
        rx,
    };
    assert!(f.complete(&w2, &j1.id, &a1.lease_id, success()).accepted);
    assert_eq!(f.get(&j1.id).state(), JobState::Succeeded);
}

#[test]
fn leases_survive_a_restart_for_one_lease_timeout() {
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w1", 1, &[], vec![]);
    let a = w.assign();
    let mut f = f.restart();
    assert_eq!(f.get(&j.id).state(), JobState::Running);
    let held = vec![LeaseRef {
        job_id: j.id.clone(),
        lease_id: a.lease_id.clone(),
    }];
    let w = f.connect("w1", 1, &[], held);
    assert!(f.complete(&w, &j.id, &a.lease_id, success()).accepted);
    let done = f.get(&j.id);
    assert_eq!(
        (done.state(), done.attempt, done.attempts.len()),
        (JobState::Succeeded, 1, 1)
    );

    // Without a reconnect, the restored lease ends after the timeout.
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w2", 1, &[], vec![]);
    w.assign();
    let mut f = f.restart();
    f.advance(LEASE);
    assert_eq!(f.get(&j.id).state(), JobState::Scheduled);
}

#[test]
fn a_lease_the_worker_never_got_before_a_restart_costs_no_attempt() {
    // The lease is durable, but the coordinator dies before its Assign reaches the worker.
    let mut f = Fixture::new();
    let mut one_shot = job("k", 0);
    one_shot.max_attempts = 1;
    let j = f.submit(one_shot);
    let mut w = f.connect("w1", 1, &[], vec![]);
    w.assign();
    let mut f = f.restart();
    // The same worker comes back without it: it never had it. The job runs again at once,
    // with its one attempt intact.
    let mut w = f.connect("w1", 1, &[], vec![]);
    let again = w.assign().job.unwrap();
    assert_eq!(again.id, j.id);
    assert_eq!((again.state(), again.attempt), (JobState::Running, 1));
    assert_eq!(again.attempts.len(), 2);
    assert_eq!(again.attempts[0].outcome, "interrupted");
    assert!(
        again.attempts[0].error.contains("restart"),
        "{:?}",
        again.attempts[0].error
    );

    // A restored lease the worker named is confirmed: leaving it out on a later reconnect
    // costs the attempt, as for any lease.
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w1", 1, &[], vec![]);
    let a = w.assign();
    let mut f = f.restart();
    let held = vec![LeaseRef {
        job_id: j.id.clone(),
        lease_id: a.lease_id.clone(),
    }];
    let w = f.connect("w1", 1, &[], held);
    f.state.disconnected("w1", w.generation);
    f.connect("w1", 1, &[], vec![]);
    let lost = f.get(&j.id);
    assert_eq!((lost.state(), lost.attempt), (JobState::Scheduled, 1));
    assert_eq!(lost.attempts[0].outcome, "lease_expired");
}

#[test]
fn failures_retry_with_backoff_until_attempts_run_out() {
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w1", 1, &[], vec![]);
    for attempt in 1..=3 {
        let a = w.assign();
        assert_eq!(a.job.as_ref().unwrap().attempt, attempt);
        assert!(f.complete(&w, &j.id, &a.lease_id, failure(false)).accepted);
        let _ack = w.next();
        if attempt < 3 {
            let job = f.get(&j.id);
            assert_eq!(job.state(), JobState::Scheduled);
            let wait = SystemTime::try_from(job.run_time.unwrap())
                .unwrap()
                .duration_since(f.now)
                .unwrap();
            let base = Duration::from_secs(1 << (attempt - 1));
            assert!(
                wait >= base / 2 && wait <= base,
                "attempt {attempt}: {wait:?}"
            );
            f.advance(wait - Duration::from_millis(1));
            w.nothing();
            f.advance(Duration::from_millis(1));
        }
    }
    let failed = f.get(&j.id);
    assert_eq!(failed.state(), JobState::Failed);
    assert_eq!(failed.error, "boom");
    assert_eq!(failed.attempts.len(), 3);
}

#[test]
fn a_permanent_failure_is_not_retried() {
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w1", 1, &[], vec![]);
    let a = w.assign();
    f.complete(&w, &j.id, &a.lease_id, failure(true));
    assert_eq!(f.get(&j.id).state(), JobState::Failed);
    assert_eq!(f.get(&j.id).attempt, 1);
}

#[test]
fn an_interrupted_attempt_is_requeued_without_using_an_attempt() {
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w1", 1, &[], vec![]);
    let a = w.assign();
    let interrupted = Outcome::Interrupted(Interrupted {
        reason: "worker draining".into(),
    });
    f.complete(&w, &j.id, &a.lease_id, interrupted);
    let _ack = w.next();
    let again = w.assign().job.unwrap();
    assert_eq!(again.attempt, 1);
    assert_eq!(again.attempts[0].outcome, "interrupted");
}

#[test]
fn a_job_keeps_only_its_newest_runs_however_often_it_is_interrupted() {
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w1", 1, &[], vec![]);
    let runs = MAX_ATTEMPT_HISTORY + 50;
    for run in 0..runs {
        let a = w.assign();
        let interrupted = Outcome::Interrupted(Interrupted {
            reason: format!("stop {run}"),
        });
        f.complete(&w, &j.id, &a.lease_id, interrupted);
        let _ack = w.next();
    }
    let a = w.assign();
    let job = a.job.unwrap();
    assert_eq!(job.attempts.len(), MAX_ATTEMPT_HISTORY);
    // The oldest runs went; the newest (running now) is last.
    assert_eq!(
        job.attempts[0].error,
        format!("stop {}", runs + 1 - MAX_ATTEMPT_HISTORY)
    );
    assert_eq!(
        job.attempts[MAX_ATTEMPT_HISTORY - 2].error,
        format!("stop {}", runs - 1)
    );
    assert_eq!(job.attempts[MAX_ATTEMPT_HISTORY - 1].outcome, "");
    f.complete(&w, &j.id, &a.lease_id, Outcome::Success(Default::default()));
    let done = f.get(&j.id);
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(done.attempts.len(), MAX_ATTEMPT_HISTORY);
    assert_eq!(done.attempts.last().unwrap().outcome, "succeeded");
}

#[test]
fn delayed_and_expiring_jobs() {
    let mut f = Fixture::new();
    let mut delayed = job("k", 0);
    delayed.run_time = Some((f.now + Duration::from_secs(60)).into());
    let delayed = f.submit(delayed);
    assert_eq!(delayed.state(), JobState::Scheduled);
    let mut expiring = job("other-kind", 0);
    expiring.expire_time = Some((f.now + Duration::from_secs(30)).into());
    let expiring = f.submit(expiring);
    f.advance(Duration::from_secs(59));
    assert_eq!(f.get(&expiring.id).state(), JobState::Expired);
    let mut w = f.connect("w1", 1, &["k"], vec![]);
    w.nothing();
    f.advance(Duration::from_secs(1));
    assert_eq!(w.assign().job.unwrap().id, delayed.id);
}

#[test]
fn idempotency_cancel_and_retry() {
    let mut f = Fixture::new();
    let mut keyed = job("k", 0);
    keyed.idempotency_key = "once".into();
    let first = f.submit(keyed.clone());
    let keyed = crate::coordinator::validate::new_job("job", keyed, 100).unwrap();
    let again = f
        .state
        .submit(vec![keyed], f.now, &f.store)
        .unwrap()
        .pop()
        .unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.job.unwrap().id, first.id);

    let id = JobId::parse(&first.id).unwrap();
    let cancelled = f.state.cancel(id, "not needed", f.now, &f.store).unwrap();
    f.commit();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    let err = f.state.cancel(id, "", f.now, &f.store).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    let retried = f.state.retry(id, f.now, &f.store).unwrap();
    f.commit();
    assert_eq!((retried.state(), retried.attempt), (JobState::Queued, 0));
    let err = f.state.retry(id, f.now, &f.store).unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)));
    let missing = f
        .state
        .cancel(JobId::generate(), "", f.now, &f.store)
        .unwrap_err();
    assert!(matches!(missing, Error::NotFound(_)));

    let mut w = f.connect("w1", 1, &[], vec![]);
    let a = w.assign();
    let running = f.state.cancel(id, "", f.now, &f.store).unwrap();
    f.commit();
    assert!(running.cancel_requested);
    assert_eq!(running.state(), JobState::Running);
    f.complete(&w, &first.id, &a.lease_id, failure(false));
    assert_eq!(
        f.get(&first.id).state(),
        JobState::Cancelled,
        "a cancelled job is not retried"
    );
}

#[test]
fn queue_stats_count_every_state() {
    let mut f = Fixture::new();
    f.submit(job("k", 0));
    f.submit(job("k", 0));
    let mut w = f.connect("w1", 1, &[], vec![]);
    let a = w.assign();
    f.advance(Duration::from_secs(5));
    let stats = f.state.queue_stats("default", f.now);
    assert_eq!((stats[0].queued, stats[0].running), (1, 1));
    assert_eq!(stats[0].oldest_queued_age.unwrap().seconds, 5);
    let id = a.job.unwrap().id;
    f.complete(&w, &id, &a.lease_id, success());
    let f = f.restart();
    let stats = f.state.queue_stats("", f.now);
    assert_eq!(
        (stats[0].succeeded, stats[0].queued, stats[0].running),
        (1, 0, 1)
    );
}

// ----- schedules --------------------------------------------------------------

use crate::coordinator::schedule::check::new_schedule;
use crate::proto::{
    schedule_spec, IntervalAnchor, IntervalSpec, MisfirePolicy, OverlapPolicy, Schedule,
    ScheduleSpec,
};

fn interval_schedule(
    name: &str,
    every_s: i64,
    anchor: IntervalAnchor,
    overlap: OverlapPolicy,
    misfire: MisfirePolicy,
) -> Schedule {
    Schedule {
        name: name.into(),
        job: Some(job("tick", 0)),
        spec: Some(ScheduleSpec {
            kind: Some(schedule_spec::Kind::Interval(IntervalSpec {
                every: Some(prost_types::Duration {
                    seconds: every_s,
                    nanos: 0,
                }),
                anchor: anchor as i32,
                offset: None,
            })),
        }),
        overlap: overlap as i32,
        misfire: misfire as i32,
        ..Default::default()
    }
}

impl Fixture {
    fn put(&mut self, s: Schedule) -> Schedule {
        let (s, spec) = new_schedule("schedule", s, 1 << 20).unwrap();
        let out = self.state.put_schedule(s, spec, self.now, false).unwrap();
        self.commit();
        out
    }

    fn runs(&self, name: &str) -> Vec<Job> {
        self.store
            .scan_jobs(None)
            .map(|r| r.unwrap().job)
            .filter(|j| j.schedule == name)
            .collect()
    }

    fn next_run(&self, name: &str) -> Option<SystemTime> {
        let s = self.state.get_schedule(name).unwrap();
        s.next_run_time.map(|t| SystemTime::try_from(t).unwrap())
    }

    /// Moves to `t` (seconds past the fixture's start) and commits.
    fn to(&mut self, start: SystemTime, secs: u64) {
        self.now = start + Duration::from_secs(secs);
        self.commit();
    }
}

fn fire_times(jobs: &[Job]) -> Vec<String> {
    jobs.iter()
        .map(|j| j.labels[FIRE_TIME_LABEL].clone())
        .collect()
}

#[test]
fn a_start_anchored_schedule_fires_on_its_grid_and_skips_while_busy() {
    let mut f = Fixture::new();
    let start = f.now; // a multiple of 10 s since the epoch
    f.put(interval_schedule(
        "s",
        10,
        IntervalAnchor::Start,
        OverlapPolicy::Skip,
        MisfirePolicy::RunOnce,
    ));
    assert_eq!(f.next_run("s"), Some(start + Duration::from_secs(10)));
    f.to(start, 9);
    assert!(f.runs("s").is_empty());
    f.to(start, 10);
    let runs = f.runs("s");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state(), JobState::Queued);
    assert_eq!(f.next_run("s"), Some(start + Duration::from_secs(20)));
    // The run is unfinished at 20: SKIP.
    f.to(start, 20);
    assert_eq!(f.runs("s").len(), 1);
    // It finishes; the next grid slot fires.
    let mut w = f.connect("w", 1, &[], vec![]);
    let a = w.assign();
    f.complete(&w, &runs[0].id, &a.lease_id, success());
    let s = f.state.get_schedule("s").unwrap();
    assert_eq!(s.last_job_state(), JobState::Succeeded);
    f.state.heartbeat("w", w.generation, f.now);
    f.to(start, 30);
    assert_eq!(f.runs("s").len(), 2);
}

#[test]
fn an_end_anchored_schedule_waits_for_its_run_to_end() {
    let mut f = Fixture::new();
    let start = f.now;
    f.put(interval_schedule(
        "e",
        5,
        IntervalAnchor::End,
        OverlapPolicy::Skip,
        MisfirePolicy::RunOnce,
    ));
    assert_eq!(f.next_run("e"), Some(start + Duration::from_secs(5)));
    f.to(start, 5);
    assert_eq!(f.runs("e").len(), 1);
    assert_eq!(f.next_run("e"), None, "unset while the run is unfinished");
    let mut w = f.connect("w", 1, &[], vec![]);
    let a = w.assign();
    f.to(start, 8);
    f.state.heartbeat("w", w.generation, f.now);
    let id = a.job.unwrap().id;
    f.complete(&w, &id, &a.lease_id, success());
    assert_eq!(
        f.next_run("e"),
        Some(start + Duration::from_secs(13)),
        "every after the end"
    );
    f.to(start, 12);
    assert_eq!(f.runs("e").len(), 1);
    f.to(start, 13);
    assert_eq!(f.runs("e").len(), 2);
}

#[test]
fn buffer_one_starts_the_waiting_run_when_the_previous_ends() {
    let mut f = Fixture::new();
    let start = f.now;
    f.put(interval_schedule(
        "b",
        10,
        IntervalAnchor::Start,
        OverlapPolicy::BufferOne,
        MisfirePolicy::RunOnce,
    ));
    f.to(start, 10);
    f.to(start, 20);
    f.to(start, 30);
    assert_eq!(
        f.runs("b").len(),
        1,
        "one runs, one waits, the rest are dropped"
    );
    let mut w = f.connect("w", 1, &[], vec![]);
    let a = w.assign();
    f.complete(&w, &f.runs("b")[0].id.clone(), &a.lease_id, success());
    assert_eq!(f.runs("b").len(), 2, "the buffered run starts at once");
}

#[test]
fn missed_fires_follow_the_misfire_policy_after_a_restart() {
    for (misfire, window, expected) in [
        (MisfirePolicy::RunOnce, None, vec!["40"]),
        (MisfirePolicy::RunAll, None, vec!["10", "20", "30", "40"]),
        (MisfirePolicy::Skip, None, vec![]),
        (MisfirePolicy::RunAll, Some(15), vec!["30", "40"]),
    ] {
        let mut f = Fixture::new();
        let start = f.now;
        let mut s = interval_schedule(
            "m",
            10,
            IntervalAnchor::Start,
            OverlapPolicy::Allow,
            misfire,
        );
        s.catchup_window = window.map(|w| prost_types::Duration {
            seconds: w,
            nanos: 0,
        });
        f.put(s);
        // Down from just after the put until 45 s later.
        let mut f = f.restart();
        f.to(start, 45);
        let expected: Vec<String> = expected
            .iter()
            .map(|s| {
                humantime::format_rfc3339_nanos(start + Duration::from_secs(s.parse().unwrap()))
                    .to_string()
            })
            .collect();
        assert_eq!(
            fire_times(&f.runs("m")),
            expected,
            "{misfire:?} window {window:?}"
        );
        assert_eq!(f.next_run("m"), Some(start + Duration::from_secs(50)));
        // Nothing fires twice.
        f.to(start, 49);
        assert_eq!(f.runs("m").len(), expected.len());
    }
}

#[test]
fn a_paused_schedule_fires_nothing_and_catches_up_once_on_resume() {
    let mut f = Fixture::new();
    let start = f.now;
    f.put(interval_schedule(
        "p",
        10,
        IntervalAnchor::Start,
        OverlapPolicy::Allow,
        MisfirePolicy::RunOnce,
    ));
    f.state.pause_schedule("p", f.now).unwrap();
    f.to(start, 35);
    assert!(f.runs("p").is_empty());
    f.state.resume_schedule("p", f.now).unwrap();
    f.commit();
    assert_eq!(fire_times(&f.runs("p")).len(), 1);
    assert_eq!(f.next_run("p"), Some(start + Duration::from_secs(40)));
    let job = f.state.trigger_schedule("p", f.now).unwrap();
    f.commit();
    assert_eq!(job.schedule, "p");
    assert_eq!(f.runs("p").len(), 2);
    f.state.delete_schedule("p").unwrap();
    f.commit();
    assert!(matches!(f.state.get_schedule("p"), Err(Error::NotFound(_))));
    f.to(start, 40);
    assert_eq!(f.runs("p").len(), 2, "a deleted schedule fires nothing");
}

#[test]
fn an_unchanged_declared_schedule_keeps_its_due_fire() {
    let mut f = Fixture::new();
    let start = f.now;
    let declared = interval_schedule(
        "d",
        10,
        IntervalAnchor::Start,
        OverlapPolicy::Allow,
        MisfirePolicy::RunOnce,
    );
    let (s, spec) = new_schedule("s", declared.clone(), 100).unwrap();
    f.state.declare_schedule(s, spec, f.now).unwrap();
    f.commit();
    let mut f = f.restart();
    f.now = start + Duration::from_secs(25);
    let (s, spec) = new_schedule("s", declared, 100).unwrap();
    f.state.declare_schedule(s, spec, f.now).unwrap();
    f.commit();
    assert_eq!(
        f.runs("d").len(),
        1,
        "the missed fire at 20 still runs once"
    );
    assert_eq!(f.next_run("d"), Some(start + Duration::from_secs(30)));
}

// ----- notices ----------------------------------------------------------------

fn with_grace(mut j: Job, secs: i64) -> Job {
    j.shutdown_grace = Some(prost_types::Duration {
        seconds: secs,
        nanos: 0,
    });
    j
}

#[test]
fn draining_answers_with_each_tasks_stop_by_and_assigns_nothing_more() {
    let mut f = Fixture::new();
    let a = f.submit(with_grace(job("k", 0), 7));
    let b = f.submit(job("k", 0));
    let mut w = f.connect("w", 2, &[], vec![]);
    let first = w.assign();
    w.assign();
    f.submit(job("k", 0));
    f.state.draining("w", w.generation, f.now);
    f.commit();
    let Some(Msg::Shutdown(shutdown)) = w.next() else {
        panic!("expected a shutdown")
    };
    let stop_by = |id: &str| {
        let t = shutdown.tasks.iter().find(|t| t.job_id == id).unwrap();
        SystemTime::try_from(t.stop_by.unwrap()).unwrap()
    };
    assert_eq!(
        stop_by(&a.id),
        f.now + Duration::from_secs(7),
        "the job's own grace"
    );
    assert_eq!(
        stop_by(&b.id),
        f.now + Duration::from_secs(30),
        "the default grace"
    );
    let first_id = first.job.unwrap().id;
    assert!(
        f.complete(&w, &first_id, &first.lease_id, success())
            .accepted
    );
    assert!(matches!(w.next(), Some(Msg::CompleteAck(_))));
    f.advance(Duration::from_secs(1));
    w.nothing(); // a slot is free and a job waits, but the worker drains
    assert!(matches!(
        f.state.drain_worker("nobody", "", f.now),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn drain_worker_sends_the_same_notice() {
    let mut f = Fixture::new();
    f.submit(job("k", 0));
    let mut w = f.connect("w", 1, &[], vec![]);
    w.assign();
    let info = f.state.drain_worker("w", "deploy", f.now).unwrap();
    f.commit();
    assert!(info.draining);
    let Some(Msg::Shutdown(s)) = w.next() else {
        panic!("expected a shutdown")
    };
    assert_eq!((s.reason.as_str(), s.tasks.len()), ("deploy", 1));
}

#[test]
fn a_cancelled_running_job_gets_a_notice_and_a_backstop() {
    let mut f = Fixture::new();
    let j = f.submit(with_grace(job("k", 0), 5));
    let mut w = f.connect("w", 1, &[], vec![]);
    let a = w.assign();
    let id = JobId::parse(&j.id).unwrap();
    f.state.cancel(id, "stop", f.now, &f.store).unwrap();
    f.commit();
    let Some(Msg::Cancel(c)) = w.next() else {
        panic!("expected a cancel notice")
    };
    assert_eq!(
        (c.lease_id.as_str(), c.reason.as_str()),
        (a.lease_id.as_str(), "stop")
    );
    assert_eq!(
        SystemTime::try_from(c.stop_by.unwrap()).unwrap(),
        f.now + Duration::from_secs(5)
    );
    // The worker heartbeats but never reports: stop_by + lease timeout ends it here.
    for _ in 0..14 {
        f.state.heartbeat("w", w.generation, f.now);
        f.advance(Duration::from_secs(1));
    }
    assert_eq!(f.get(&j.id).state(), JobState::Running);
    f.state.heartbeat("w", w.generation, f.now);
    f.advance(Duration::from_secs(1));
    let ended = f.get(&j.id);
    assert_eq!(ended.state(), JobState::Cancelled);
    assert_eq!(ended.attempts[0].outcome, "cancelled");
    assert!(
        !f.complete(&w, &j.id, &a.lease_id, success()).accepted,
        "the lease is fenced"
    );
}

#[test]
fn a_silent_timeout_is_failed_by_the_backstop_and_retried() {
    let mut f = Fixture::new();
    let mut timed = with_grace(job("k", 0), 2);
    timed.timeout = Some(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    let j = f.submit(timed);
    let mut w = f.connect("w", 1, &[], vec![]);
    let a = w.assign();
    assert_eq!(
        SystemTime::try_from(a.deadline.unwrap()).unwrap(),
        f.now + Duration::from_secs(5)
    );
    for _ in 0..17 {
        f.state.heartbeat("w", w.generation, f.now);
        f.advance(Duration::from_secs(1));
    }
    let failed = f.get(&j.id);
    assert_eq!(failed.state(), JobState::Scheduled, "retried after backoff");
    assert_eq!(failed.attempts[0].outcome, "timed_out");
    assert!(
        failed.error.contains("timed out after 5s"),
        "{}",
        failed.error
    );
}

#[test]
fn a_job_goes_only_to_a_worker_that_can_honour_its_grace() {
    let mut f = Fixture::new();
    let long = f.submit(with_grace(job("k", 0), 60));
    let short = f.submit(with_grace(job("k", 0), 5));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hello = Hello {
        worker_id: "small".into(),
        slots: 2,
        max_shutdown_grace: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
        ..Default::default()
    };
    f.state.hello(hello, tx, f.now);
    f.commit();
    let mut small = Conn {
        worker: "small".into(),
        generation: 1,
        rx: std::mem::replace(&mut rx, mpsc::unbounded_channel().1),
    };
    assert!(matches!(small.next(), Some(Msg::Welcome(_))));
    assert_eq!(small.assign().job.unwrap().id, short.id);
    small.nothing();
    let mut big = f.connect("big", 1, &[], vec![]);
    assert_eq!(big.assign().job.unwrap().id, long.id);
}

// ----- review fixes -----------------------------------------------------------

#[test]
fn a_lease_named_twice_in_hello_is_resumed_once_and_not_rejected() {
    let mut f = Fixture::new();
    let j = f.submit(job("k", 0));
    let mut w = f.connect("w", 1, &[], vec![]);
    let a = w.assign();
    f.state.disconnected("w", w.generation);
    let held = LeaseRef {
        job_id: j.id.clone(),
        lease_id: a.lease_id.clone(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hello = Hello {
        worker_id: "w".into(),
        slots: 1,
        held: vec![held.clone(), held],
        ..Default::default()
    };
    f.state.hello(hello, tx, f.now);
    f.commit();
    let Some(Msg::Welcome(welcome)) = rx.try_recv().unwrap().msg else {
        panic!("expected welcome")
    };
    assert_eq!((welcome.resumed.len(), welcome.rejected.len()), (1, 0));
    assert_eq!(f.get(&j.id).state(), JobState::Running);
}

#[test]
fn a_session_whose_stream_is_gone_gets_no_work() {
    let mut f = Fixture::new();
    let w = f.connect("w", 1, &[], vec![]);
    drop(w); // the receiver is gone; the disconnect has not been processed yet
    let j = f.submit(job("k", 0));
    assert_eq!(f.get(&j.id).state(), JobState::Queued);
}

#[test]
fn abandoned_watch_streams_do_not_pile_up() {
    let mut f = Fixture::new();
    let mut delayed = job("k", 0);
    delayed.run_time = Some((f.now + Duration::from_secs(3600)).into());
    let j = f.submit(delayed);
    let id = JobId::parse(&j.id).unwrap();
    for _ in 0..1000 {
        let (_, rx) = f.state.watch(id, &f.store).unwrap();
        drop(rx);
    }
    assert!(
        f.state.watchers[&id].len() <= 1,
        "closed watchers are pruned"
    );
}

#[test]
fn live_bytes_count_the_records_of_unfinished_jobs_only() {
    let mut f = Fixture::new();
    assert_eq!(f.state.live_bytes(), 0);
    let small = f.submit(job("k", 0));
    let after_one = f.state.live_bytes();
    assert!(after_one > 0);
    let big = f.submit(Job {
        payload: vec![7; 10_000],
        ..job("k", 0)
    });
    assert!(f.state.live_bytes() >= after_one + 10_000);
    let restored = f.restart();
    let mut f = restored;
    let total = f.state.live_bytes();
    assert!(total >= after_one + 10_000, "rebuilt at start-up too");
    // A lease rewrites a record (bigger by the lease); a completion takes it out.
    let mut w = f.connect("w1", 2, &[], vec![]);
    let (a, b) = (w.assign(), w.assign());
    assert!(f.state.live_bytes() > total);
    for assign in [a, b] {
        let id = assign.job.unwrap().id;
        assert!(f.complete(&w, &id, &assign.lease_id, success()).accepted);
    }
    assert_eq!(f.state.live_bytes(), 0);
    assert_eq!(f.get(&small.id).state(), JobState::Succeeded);
    assert_eq!(f.get(&big.id).state(), JobState::Succeeded);
}
mod retention;
