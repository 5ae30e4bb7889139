//! Retention decisions on explicit instants: which finished jobs are deleted
//! when, in what chunks, what happens to their idempotency keys and schedules,
//! and what a restart rebuilds.

use super::*;
use crate::coordinator::retention::{Keep, Retention};
use crate::coordinator::state::SWEEP_CHUNK;
use crate::proto::SubmitJobResponse;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// SUCCEEDED 10 s, FAILED 100 s, CANCELLED for ever, EXPIRED 1 s.
fn per_state() -> Retention {
    Retention {
        succeeded: Keep::For(secs(10)),
        failed: Keep::For(secs(100)),
        cancelled: Keep::Forever,
        expired: Keep::For(secs(1)),
    }
}

impl Fixture {
    fn with_retention(retention: Retention) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Self::reopen(dir, store, now, retention)
    }

    fn reopen(dir: tempfile::TempDir, store: Store, now: SystemTime, r: Retention) -> Fixture {
        let mut s = settings();
        s.retention = r;
        Fixture::open_at(dir, store, now, s)
    }

    /// A restart (at the same instant) with retention `r`.
    fn restart_with(self, r: Retention) -> Fixture {
        let (dir, store, now) = self.close_and_reopen();
        Self::reopen(dir, store, now, r)
    }

    /// Whether a job is gone: NOT_FOUND from the model, and no record stored.
    fn gone(&self, id: &str) -> bool {
        let id = JobId::parse(id).unwrap();
        let not_found = matches!(self.state.get_job(id, &self.store), Err(Error::NotFound(_)));
        let unstored = self.store.get_job(id).unwrap().is_none();
        assert_eq!(
            not_found, unstored,
            "the model and the store disagree on {id}"
        );
        not_found
    }

    /// The ids the store lists (what ListJobs sees).
    fn stored_ids(&self) -> BTreeSet<String> {
        self.store
            .scan_jobs(None)
            .map(|r| r.unwrap().job.id)
            .collect()
    }

    fn submit_response(&mut self, job: Job) -> SubmitJobResponse {
        let job = crate::coordinator::validate::new_job("job", job, 1 << 20).unwrap();
        let r = self.state.submit(vec![job], self.now, &self.store).unwrap();
        self.commit();
        r.into_iter().next().unwrap()
    }

    /// Runs the next job assigned to `w` to the end with `outcome`.
    fn finish_next(&mut self, w: &mut Conn, outcome: Outcome) -> String {
        let a = w.assign();
        let id = a.job.unwrap().id;
        assert!(self.complete(w, &id, &a.lease_id, outcome).accepted);
        let _ack = w.next();
        id
    }

    /// Moves to `start + at`, with a heartbeat from `w` so it keeps its session.
    fn step(&mut self, w: &Conn, start: SystemTime, at: u64) {
        self.now = start + secs(at);
        self.state.heartbeat(&w.worker, w.generation, self.now);
        self.commit();
    }
}

fn stats(f: &Fixture) -> QueueStat {
    f.state
        .queue_stats("default", f.now)
        .into_iter()
        .next()
        .unwrap()
}

#[test]
fn each_finished_state_is_deleted_when_its_own_retention_has_passed() {
    let mut f = Fixture::with_retention(per_state());
    let start = f.now;
    let ok = f.submit(job("ok", 0));
    let bad = f.submit(job("bad", 0));
    let mut w = f.connect("w", 1, &["ok", "bad"], vec![]);
    assert_eq!(f.finish_next(&mut w, success()), ok.id);
    assert_eq!(f.finish_next(&mut w, failure(true)), bad.id);
    let queued = f.submit(job("nobody", 0));
    let mut later = job("nobody", 0);
    later.run_time = Some((start + secs(20 * 365 * 86400)).into());
    let later = f.submit(later);
    let cancelled = f.submit(job("nobody", 0));
    f.state
        .cancel(JobId::parse(&cancelled.id).unwrap(), "", f.now, &f.store)
        .unwrap();
    f.commit();
    let mut expiring = job("nobody", 0);
    expiring.expire_time = Some((start + secs(5)).into());
    let expiring = f.submit(expiring);

    f.step(&w, start, 5);
    assert_eq!(f.get(&expiring.id).state(), JobState::Expired);
    f.step(&w, start, 6);
    assert!(f.gone(&expiring.id), "EXPIRED: 1 s after its end");
    f.step(&w, start, 9);
    assert!(!f.gone(&ok.id), "SUCCEEDED is kept 10 s");
    f.step(&w, start, 10);
    assert!(f.gone(&ok.id), "SUCCEEDED: 10 s after its end");
    f.step(&w, start, 99);
    assert!(!f.gone(&bad.id), "FAILED is kept 100 s");
    f.step(&w, start, 100);
    assert!(f.gone(&bad.id), "FAILED: 100 s after its end");

    // Ten years on: CANCELLED is kept for ever; unfinished jobs are never deleted.
    f.step(&w, start, 10 * 365 * 86400);
    assert_eq!(f.get(&cancelled.id).state(), JobState::Cancelled);
    assert_eq!(f.get(&queued.id).state(), JobState::Queued);
    assert_eq!(f.get(&later.id).state(), JobState::Scheduled);
    let want: BTreeSet<String> = [&cancelled.id, &queued.id, &later.id]
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(f.stored_ids(), want);
    let s = stats(&f);
    assert_eq!(
        (
            s.succeeded,
            s.failed,
            s.expired,
            s.cancelled,
            s.queued,
            s.scheduled
        ),
        (0, 0, 0, 1, 1, 1),
        "deleted jobs leave the counts"
    );
    assert_eq!(f.state.sweep_pending(), 0);
}

#[test]
fn a_deleted_jobs_idempotency_key_names_a_new_job_even_after_a_restart() {
    let mut f = Fixture::with_retention(per_state());
    let start = f.now;
    let mut keyed = job("ok", 0);
    keyed.idempotency_key = "report-2027-01-15".into();
    let first = f.submit_response(keyed.clone()).job.unwrap();
    let mut w = f.connect("w", 1, &["ok"], vec![]);
    f.finish_next(&mut w, success());
    f.step(&w, start, 9);
    let dup = f.submit_response(keyed.clone());
    assert!(dup.deduplicated, "the key still names the finished job");
    assert_eq!(dup.job.unwrap().id, first.id);

    f.step(&w, start, 10);
    assert!(f.gone(&first.id));
    assert!(!f.state.idempotency.contains_key(&keyed.idempotency_key));
    assert!(
        f.store.snapshot().unwrap().idempotency.is_empty(),
        "the key's record went with its job"
    );
    let second = f.submit_response(keyed.clone());
    assert!(
        !second.deduplicated,
        "after the deletion the key makes a new job"
    );
    let second = second.job.unwrap();
    assert_ne!(second.id, first.id);

    // A restart rebuilds from the store: the key names the second job, and
    // the first one's deletion is not done again.
    let mut f = f.restart_with(per_state());
    let third = f.submit_response(keyed);
    assert!(third.deduplicated);
    assert_eq!(third.job.unwrap().id, second.id);
    assert!(f.gone(&first.id));
}

#[test]
fn a_retried_job_is_kept_until_its_new_end_plus_retention() {
    let mut f = Fixture::with_retention(per_state());
    let start = f.now;
    let j = f.submit(job("bad", 0));
    let id = JobId::parse(&j.id).unwrap();
    let mut w = f.connect("w", 1, &["bad"], vec![]);
    f.finish_next(&mut w, failure(true)); // FAILED at 0: due at 100
    drop(w);
    f.now = start + secs(50);
    f.state.retry(id, f.now, &f.store).unwrap();
    f.commit();
    assert_eq!(f.state.sweep_pending(), 0, "a retried job leaves the index");
    // Stale entries, as if the index still had them: one due while the job
    // runs again, one due after it has failed again (at 120, so due at 220).
    f.state.sweep.insert(start + secs(100), id);
    f.state.sweep.insert(start + secs(150), id);
    f.now = start + secs(100);
    f.commit();
    assert_eq!(
        f.get(&j.id).state(),
        JobState::Queued,
        "not deleted while it runs again"
    );
    f.now = start + secs(120);
    let mut w = f.connect("w2", 1, &["bad"], vec![]);
    f.finish_next(&mut w, failure(true));
    f.step(&w, start, 150);
    f.step(&w, start, 219);
    assert!(
        !f.gone(&j.id),
        "kept 100 s after its new end, not its old one"
    );
    f.step(&w, start, 220);
    assert!(f.gone(&j.id));
    assert_eq!(f.state.sweep_pending(), 0);
    let err = f.state.retry(id, f.now, &f.store).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

#[test]
fn deletions_come_in_bounded_chunks_and_dispatch_goes_on_between_them() {
    let mut f = Fixture::with_retention(Retention::uniform(Keep::For(secs(10))));
    let start = f.now;
    let n = 2 * SWEEP_CHUNK + 10;
    let jobs: Vec<Job> = (0..n)
        .map(|i| {
            let mut j = job("idle", 0);
            j.idempotency_key = format!("key-{i}");
            crate::coordinator::validate::new_job("job", j, 100).unwrap()
        })
        .collect();
    let ids: Vec<JobId> = f
        .state
        .submit(jobs, f.now, &f.store)
        .unwrap()
        .into_iter()
        .map(|r| JobId::parse(&r.job.unwrap().id).unwrap())
        .collect();
    f.commit();
    for id in &ids {
        f.state.cancel(*id, "", f.now, &f.store).unwrap();
    }
    f.commit();
    assert_eq!(f.state.sweep_pending(), n);
    assert_eq!(
        f.state.next_due(),
        Some(start + secs(10)),
        "the engine sleeps until then"
    );

    // One round's worth, by hand: one chunk, each job with its key, one batch.
    f.now = start + secs(10);
    assert_eq!(f.state.sweep(f.now, &f.store), SWEEP_CHUNK);
    let round = f.state.take_round();
    assert_eq!(round.writes.len(), 2 * SWEEP_CHUNK);
    f.store.apply(round.writes).unwrap();
    assert_eq!(f.stored_ids().len(), n - SWEEP_CHUNK);
    assert!(
        f.state.next_due().is_some_and(|t| t <= f.now),
        "more is due: the engine runs the next round at once"
    );

    // The next round also dispatches: a job submitted meanwhile goes out in
    // the same round as the next chunk.
    let fresh = f.submit(job("k", 0)); // commit: a chunk
    assert_eq!(f.stored_ids().len(), n - 2 * SWEEP_CHUNK + 1);
    let mut w = f.connect("w", 1, &["k"], vec![]); // commit: the rest
    assert_eq!(w.assign().job.unwrap().id, fresh.id);
    assert_eq!(f.stored_ids().len(), 1);
    assert_eq!(f.state.sweep_pending(), 0);
    assert!(f.state.idempotency.is_empty());
    assert!(f.store.snapshot().unwrap().idempotency.is_empty());
}

#[test]
fn a_restart_rebuilds_pending_deletions_from_the_store() {
    let mut f = Fixture::with_retention(per_state());
    let start = f.now;
    for _ in 0..3 {
        f.submit(job("ok", 0));
    }
    let failed = f.submit(job("bad", 0));
    let mut w = f.connect("w", 1, &["ok", "bad"], vec![]);
    let a = f.finish_next(&mut w, success()); // due at 10
    f.step(&w, start, 5);
    let b = f.finish_next(&mut w, success()); // due at 15
    let c = f.finish_next(&mut w, success()); // due at 15
    assert_eq!(f.finish_next(&mut w, failure(true)), failed.id); // due at 105
    f.step(&w, start, 6);

    // Down at 6, before any is due; back with the same settings.
    let mut f = f.restart_with(per_state());
    assert_eq!(f.state.sweep_pending(), 4);
    assert_eq!(f.state.next_due(), Some(start + secs(10)));
    f.now = start + secs(10);
    f.commit();
    assert!(f.gone(&a) && !f.gone(&b) && !f.gone(&c));
    f.now = start + secs(15);
    f.commit();
    assert!(f.gone(&b) && f.gone(&c) && !f.gone(&failed.id));
    assert_eq!(stats(&f).succeeded, 0);
    assert_eq!(stats(&f).failed, 1);

    // Back again: nothing deleted is pending again, and the counts hold.
    let f = f.restart_with(per_state());
    assert_eq!(f.state.sweep_pending(), 1);
    assert_eq!((stats(&f).succeeded, stats(&f).failed), (0, 1));

    // A shorter retention at start-up applies to jobs that finished before it.
    let mut f = f.restart_with(Retention::uniform(Keep::For(secs(1))));
    f.commit();
    assert!(f.gone(&failed.id));
    assert!(
        f.state.queue_stats("", f.now).is_empty(),
        "no job left in any queue"
    );
}

#[test]
fn schedules_fire_on_after_their_finished_runs_are_deleted() {
    let mut f = Fixture::with_retention(Retention::uniform(Keep::For(secs(1))));
    let start = f.now;
    f.put(interval_schedule(
        "end",
        5,
        IntervalAnchor::End,
        OverlapPolicy::Skip,
        MisfirePolicy::RunOnce,
    ));
    f.put(interval_schedule(
        "start",
        10,
        IntervalAnchor::Start,
        OverlapPolicy::Skip,
        MisfirePolicy::RunOnce,
    ));
    let mut w = f.connect("w", 2, &["tick"], vec![]);
    let last = |f: &Fixture, name: &str| f.state.get_schedule(name).unwrap().last_job_id;

    f.step(&w, start, 5);
    let e1 = f.finish_next(&mut w, success()); // END run ends at 5: next at 10
    assert_eq!(last(&f, "end"), e1);
    f.step(&w, start, 6);
    assert!(f.gone(&e1));
    assert_eq!(f.next_run("end"), Some(start + secs(10)));

    f.step(&w, start, 10);
    let (a1, a2) = (w.assign(), w.assign());
    let (mut s1, mut e2) = (a1, a2);
    if s1.job.as_ref().unwrap().schedule != "start" {
        std::mem::swap(&mut s1, &mut e2);
    }
    let e2_id = e2.job.unwrap().id;
    assert_ne!(
        e2_id, e1,
        "the END schedule fired after its last run was deleted"
    );
    assert!(f.complete(&w, &e2_id, &e2.lease_id, success()).accepted);
    let _ack = w.next();
    f.step(&w, start, 11);
    assert!(f.gone(&e2_id));

    // The START run is still running at 20: SKIP, whatever was deleted.
    f.step(&w, start, 15);
    let e3 = f.finish_next(&mut w, success()); // next END run at 20
    f.step(&w, start, 16);
    assert!(f.gone(&e3));
    f.step(&w, start, 20);
    let s1_id = s1.job.unwrap().id;
    assert_eq!(
        last(&f, "start"),
        s1_id,
        "SKIP: no second run while the first runs"
    );
    let e4 = f.finish_next(&mut w, success()); // the END run of 20; next at 25
    assert_eq!(last(&f, "end"), e4);
    w.nothing();
    assert!(f.complete(&w, &s1_id, &s1.lease_id, success()).accepted);
    let _ack = w.next();
    f.step(&w, start, 21);
    assert!(f.gone(&s1_id) && f.gone(&e4));

    // Down and back: both schedules, their last runs deleted, fire on time.
    let mut f = f.restart_with(Retention::uniform(Keep::For(secs(1))));
    let mut w = f.connect("w", 2, &["tick"], vec![]);
    assert_eq!(f.next_run("end"), Some(start + secs(25)));
    assert_eq!(f.next_run("start"), Some(start + secs(30)));
    f.step(&w, start, 25);
    let e5 = f.finish_next(&mut w, success()); // next END run at 30
    assert_eq!(last(&f, "end"), e5);
    f.step(&w, start, 30);
    let both = [w.assign(), w.assign()];
    let runs: BTreeSet<String> = both
        .iter()
        .map(|a| a.job.as_ref().unwrap().id.clone())
        .collect();
    let lasts: BTreeSet<String> = [last(&f, "end"), last(&f, "start")].into_iter().collect();
    assert_eq!(runs, lasts, "both fired at 30");
    assert!(!runs.contains(&s1_id) && !runs.contains(&e5));
}
