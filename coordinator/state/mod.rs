//! The in-memory dispatch model and every decision about jobs and leases.
//!
//! The store is the truth; this model is rebuilt from it at start-up
//! ([`State::restore`]) and changed in step with it: each method stages its
//! record writes and the effects that tell others about them (replies, `Assign`
//! messages, watch updates) into the current [`Round`]. The engine applies the
//! round's writes, makes them durable, and only then runs its effects, so nobody
//! hears of a change before it is on disk. Apart from reading records of
//! finished jobs, nothing here does I/O.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

mod dispatch;
pub use dispatch::MAX_ATTEMPT_HISTORY;
mod jobs;
pub use jobs::finished_job;
mod reads;
mod schedules;
pub use schedules::FIRE_TIME_LABEL;
mod sessions;
mod sweep;
pub use sweep::SWEEP_CHUNK;
#[cfg(test)]
mod tests;

use rand::{Rng, SeedableRng};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use crate::coordinator::backoff::retry_delay;
use crate::coordinator::error::Error;
use crate::coordinator::ids::{JobId, LeaseId};
use crate::coordinator::ready::{ReadyIndex, Slot};
use crate::coordinator::record::{JobRecord, Lease};
use crate::coordinator::retention::{Retention, SweepIndex};
use crate::coordinator::store::{Snapshot, Store, StoreError, Writes};
use crate::coordinator::workers::{SessionHandle, WorkerEntry, Workers};
use crate::proto::{
    self, complete, coordinator_message, Assign, Attempt, CompleteAck, CoordinatorMessage, Hello,
    Job, JobState, LeaseRef, QueueStat, SubmitJobResponse, Welcome,
};

/// The coordinator settings that decisions depend on.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A worker silent this long is lost, and its leases end.
    pub lease_timeout: Duration,
    /// How often workers are asked to heartbeat.
    pub heartbeat_interval: Duration,
    /// `shutdown_grace` of jobs that do not set one.
    pub default_shutdown_grace: Duration,
    /// How long finished jobs are kept, per terminal state.
    pub retention: Retention,
}

/// Something to do once the round's writes are durable. It is given the
/// commit's outcome: `Err` carries why the writes could not be made durable.
pub type Effect = Box<dyn FnOnce(Result<(), &str>) + Send>;

/// The writes and effects staged since the last [`State::take_round`].
#[derive(Default)]
pub struct Round {
    /// Record writes, applied as one atomic batch.
    pub writes: Writes,
    /// Whether the round wrote anything (set by the engine once it applied them).
    pub dirty: bool,
    /// The engine's number for a round that wrote (0 for one that did not).
    pub number: u64,
    /// Run in order after the writes are durable.
    pub effects: Vec<Effect>,
}

/// A timer: something to look at when its time comes. Stale timers are
/// harmless: each is checked against the current state when it fires.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// A SCHEDULED job's `run_time`.
    Run(JobId),
    /// A job's `expire_time`.
    Expire(JobId),
    /// A worker's lease deadline (`last_seen + lease_timeout`).
    Worker(String),
    /// A schedule's `next_run_time`.
    Schedule(String),
    /// A cancelled job's stop-by time plus the lease timeout: the
    /// coordinator's backstop when its worker does not report.
    CancelDeadline(JobId, LeaseId),
    /// A job's start + timeout + grace + lease timeout: the backstop for
    /// timeouts when its worker does not report.
    TimeoutDeadline(JobId, LeaseId),
}

/// A job that has not reached a terminal state.
struct Live {
    /// The job and its lease, as stored.
    rec: JobRecord,
    /// Where it sits in the ready index while QUEUED.
    ready: Option<Slot>,
}

/// The unfinished jobs, kept encoded (a few hundred bytes each instead of the
/// decoded `Job`'s inline 512 plus its allocations), so that a queue of a
/// million jobs stays small. Each access decodes a copy; each change stores
/// the bytes it wrote to the store.
#[derive(Default)]
struct LiveJobs {
    /// The encoded record and ready-index slot, by job.
    map: HashMap<JobId, Packed>,
    /// The bytes of every record in `map`: what finishing them will write
    /// again (the disk guard keeps room for it).
    bytes: u64,
}

/// One unfinished job, encoded.
struct Packed {
    /// [`JobRecord::encode`]'s bytes.
    record: Box<[u8]>,
    /// Where it sits in the ready index while QUEUED.
    ready: Option<Slot>,
}

impl LiveJobs {
    fn unpack(p: &Packed) -> Live {
        Live {
            rec: JobRecord::decode(&p.record)
                .expect("records in the model were encoded by the model"),
            ready: p.ready.clone(),
        }
    }

    /// A decoded copy.
    fn get(&self, id: &JobId) -> Option<Live> {
        self.map.get(id).map(Self::unpack)
    }

    fn contains_key(&self, id: &JobId) -> bool {
        self.map.contains_key(id)
    }

    /// Takes a job out, decoded.
    fn remove(&mut self, id: &JobId) -> Option<Live> {
        self.map.remove(id).map(|p| {
            self.bytes -= p.record.len() as u64;
            Live {
                rec: JobRecord::decode(&p.record)
                    .expect("records in the model were encoded by the model"),
                ready: p.ready,
            }
        })
    }

    /// Puts a job (back) in.
    fn insert(&mut self, id: JobId, live: Live) {
        self.insert_encoded(id, live.rec.encode(), live.ready);
    }

    fn insert_encoded(&mut self, id: JobId, record: Vec<u8>, ready: Option<Slot>) {
        self.bytes += record.len() as u64;
        let replaced = self.map.insert(
            id,
            Packed {
                record: record.into_boxed_slice(),
                ready,
            },
        );
        if let Some(old) = replaced {
            self.bytes -= old.record.len() as u64;
        }
    }
}

/// Job counts per state, per queue.
#[derive(Default)]
struct Stats {
    /// Indexed by `JobState as usize`.
    by_queue: HashMap<String, [u64; 8]>,
}

impl Stats {
    fn moved(&mut self, queue: &str, from: JobState, to: JobState) {
        if from == to {
            return;
        }
        let counts = match self.by_queue.get_mut(queue) {
            Some(c) => c,
            None => self.by_queue.entry(queue.to_string()).or_default(),
        };
        if from != JobState::Unspecified {
            counts[from as usize] = counts[from as usize].saturating_sub(1);
        }
        if to != JobState::Unspecified {
            counts[to as usize] += 1;
        } else if counts.iter().all(|c| *c == 0) {
            // The queue's last job was deleted: the queue leaves the stats.
            self.by_queue.remove(queue);
        }
    }
}

/// Whether a job in `state` is finished for good.
pub fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Expired
    )
}

fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(t.into())
}

fn state_name(s: JobState) -> &'static str {
    s.as_str_name().trim_start_matches("JOB_STATE_")
}

/// The dispatch model.
pub struct State {
    /// Settings the decisions use.
    settings: Settings,
    /// Jobs not yet finished, by id.
    jobs: LiveJobs,
    /// Every idempotency key seen, and its job.
    idempotency: HashMap<String, JobId>,
    /// QUEUED jobs in dispatch order.
    ready: ReadyIndex,
    /// Timers, earliest first.
    due: BTreeSet<(SystemTime, Due)>,
    /// Finished jobs by deletion due time (retention).
    sweep: SweepIndex,
    /// Connected and recently connected workers.
    workers: Workers,
    /// Counts for `GetQueueStats`.
    stats: Stats,
    /// Every schedule, by name.
    schedules:
        std::collections::BTreeMap<String, crate::coordinator::schedule::record::ScheduleEntry>,
    /// Open `WatchJob` streams, by job.
    watchers: HashMap<JobId, Vec<UnboundedSender<Job>>>,
    /// What has been staged since the engine last took it.
    round: Round,
    /// Set when a job became ready or a slot freed since the last dispatch.
    dispatch_needed: bool,
    /// Source of backoff jitter.
    rng: rand::rngs::StdRng,
}

impl State {
    /// Rebuilds the model from everything stored. RUNNING jobs keep their
    /// leases for one lease timeout from `now`, so their workers can reconnect.
    pub fn restore(
        settings: Settings,
        snapshot: Snapshot<'_>,
        now: SystemTime,
    ) -> Result<State, StoreError> {
        let mut state = State {
            settings,
            jobs: LiveJobs::default(),
            idempotency: snapshot.idempotency.into_iter().collect(),
            ready: ReadyIndex::default(),
            due: BTreeSet::new(),
            sweep: SweepIndex::default(),
            workers: Workers::default(),
            stats: Stats::default(),
            watchers: HashMap::new(),
            schedules: Default::default(),
            round: Round::default(),
            dispatch_needed: true,
            rng: rand::rngs::StdRng::from_entropy(),
        };
        for rec in snapshot.jobs {
            let rec = rec?;
            let s = rec.state();
            state.stats.moved(&rec.job.queue, JobState::Unspecified, s);
            if is_terminal(s) {
                state.note_finished(rec.id(), &rec.job, now);
                continue;
            }
            let id = rec.id();
            let mut live = Live { rec, ready: None };
            state.arm_expiry(&live);
            match (s, live.rec.lease.clone()) {
                (JobState::Scheduled, _) => {
                    let at = live.run_time().unwrap_or(now);
                    state.due.insert((at, Due::Run(id)));
                }
                (JobState::Running, Some(lease)) => {
                    let lease_timeout = state.settings.lease_timeout;
                    let w = state
                        .workers
                        .map
                        .entry(lease.worker_id.clone())
                        .or_insert_with(|| WorkerEntry::restored(lease.worker_id.clone(), now));
                    w.leases.insert(id, lease.id);
                    w.unconfirmed.insert(id);
                    state
                        .due
                        .insert((now + lease_timeout, Due::Worker(lease.worker_id)));
                }
                _ => {
                    // QUEUED, or a RUNNING record without a lease (never written
                    // by this code): ready to run.
                    live.rec.job.state = JobState::Queued as i32;
                    state.stats.moved(&live.rec.job.queue, s, JobState::Queued);
                    state.enqueue(&mut live, now);
                }
            }
            state.jobs.insert(id, live);
        }
        for mut entry in snapshot.schedules {
            // Runs that finished (or vanished) while the store was closed no longer count.
            entry.active.retain(|id| state.jobs.contains_key(id));
            if entry.active.is_empty() && entry.schedule.next_run_time.is_none() {
                // An END-anchored schedule whose run is gone would wait forever.
                entry.schedule.next_run_time = entry.spec.after_end(now).and_then(ts);
            }
            state.arm_schedule(&entry);
            state.schedules.insert(entry.schedule.name.clone(), entry);
        }
        Ok(state)
    }

    /// Opens (creating if need be) the store in `dir` and rebuilds the model
    /// from it while its records stream out: what a start and an in-process
    /// reopen both do. Blocking.
    pub fn load(
        dir: &std::path::Path,
        cache_bytes: u64,
        settings: Settings,
        now: SystemTime,
    ) -> Result<(Store, State), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Sync {
            path: dir.to_path_buf(),
            source,
        })?;
        let store = Store::open(dir, cache_bytes)?;
        let state = State::restore(settings, store.snapshot()?, now)?;
        Ok((store, state))
    }

    /// How many jobs the model counts (every state, every queue).
    pub fn job_count(&self) -> u64 {
        self.stats
            .by_queue
            .values()
            .map(|counts| counts.iter().sum::<u64>())
            .sum()
    }

    /// Seeds the jitter source, for reproducible tests.
    pub fn seed_jitter(&mut self, seed: u64) {
        self.rng = rand::rngs::StdRng::seed_from_u64(seed);
    }

    /// The settings the model was built with (to rebuild it after a store failure).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The bytes of the records of every unfinished job: about what finishing
    /// them will write again, per transition.
    pub fn live_bytes(&self) -> u64 {
        self.jobs.bytes
    }

    /// The last session generation handed out.
    pub fn last_generation(&self) -> u64 {
        self.workers.last_generation()
    }

    /// Hands out session generations after `last` only: a model rebuilt in the
    /// same process must not reuse the numbers of streams still closing.
    pub fn continue_generations_after(&mut self, last: u64) {
        self.workers.continue_after(last);
    }

    /// Takes what has been staged since the last call.
    pub fn take_round(&mut self) -> Round {
        std::mem::take(&mut self.round)
    }

    /// Stages an effect to run after the round's writes are durable.
    pub fn after_commit(&mut self, effect: Effect) {
        self.round.effects.push(effect);
    }

    /// When the earliest timer (or deletion) is due.
    pub fn next_due(&self) -> Option<SystemTime> {
        match (self.next_timer(), self.next_deletion()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the earliest timer is due.
    pub fn next_timer(&self) -> Option<SystemTime> {
        self.due.first().map(|(t, _)| *t)
    }

    /// When the earliest deletion of a finished job is due.
    pub fn next_deletion(&self) -> Option<SystemTime> {
        self.sweep.next_due()
    }

    /// Stores a job after a change: counts, record write, watchers; a finished
    /// job leaves the model.
    fn save(&mut self, live: Live, old: JobState) {
        let new = live.rec.state();
        self.stats.moved(&live.rec.job.queue, old, new);
        let encoded = live.rec.encode();
        self.round
            .writes
            .put_encoded_job(live.rec.id(), encoded.clone());
        if !live.rec.job.schedule.is_empty() && new != old {
            self.schedule_job_changed(&live.rec.job);
        }
        let id = live.rec.id();
        if is_terminal(new) {
            // Every terminal transition sets end_time (`finish`); the
            // creation time only stands in for a record that somehow lacks it.
            let created = live
                .rec
                .job
                .create_time
                .and_then(|t| SystemTime::try_from(t).ok());
            self.note_finished(id, &live.rec.job, created.unwrap_or(SystemTime::UNIX_EPOCH));
            if let Some(watchers) = self.watchers.remove(&id) {
                let job = live.rec.job.clone();
                self.after_commit(Box::new(move |r| {
                    if r.is_ok() {
                        for w in watchers {
                            let _ = w.send(job.clone());
                        }
                    }
                }));
            }
        } else {
            if let Some(watchers) = self.watchers.get_mut(&id) {
                watchers.retain(|w| !w.is_closed());
                let senders = watchers.clone();
                let job = live.rec.job.clone();
                self.after_commit(Box::new(move |r| {
                    if r.is_ok() {
                        for w in senders {
                            let _ = w.send(job.clone());
                        }
                    }
                }));
            }
            self.jobs.insert_encoded(id, encoded, live.ready);
        }
    }

    /// Sends a `Cancel` notice for a running job to its worker's session, if open.
    fn send_cancel(&mut self, id: JobId, lease: &Lease, reason: &str, stop_by: SystemTime) {
        let Some(tx) = self
            .workers
            .map
            .get(&lease.worker_id)
            .and_then(|w| w.session.as_ref())
            .map(|s| s.tx.clone())
        else {
            return; // told again when the worker reconnects and resumes the lease
        };
        let msg = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Cancel(proto::Cancel {
                job_id: id.to_string(),
                lease_id: lease.id.to_string(),
                reason: reason.to_string(),
                stop_by: ts(stop_by),
            })),
        };
        self.after_commit(Box::new(move |r| {
            if r.is_ok() {
                let _ = tx.send(msg);
            }
        }));
    }

    /// Ends a running attempt here because its worker did not report in time:
    /// the lease is fenced (a late completion is rejected).
    fn end_unreported(
        &mut self,
        id: JobId,
        lease: LeaseId,
        now: SystemTime,
        outcome: &str,
        why: &str,
    ) -> Option<Live> {
        let live = self.jobs.get(&id)?;
        if live.rec.state() != JobState::Running
            || live.rec.lease.as_ref().map(|l| l.id) != Some(lease)
        {
            return None;
        }
        let mut live = self.jobs.remove(&id).expect("checked above");
        if let Some(w) = live
            .rec
            .lease
            .as_ref()
            .and_then(|l| self.workers.map.get_mut(&l.worker_id))
        {
            w.leases.remove(&id);
        }
        tracing::warn!(job = %id, lease = %lease, "{why}");
        end_attempt(&mut live, now, outcome, why);
        live.rec.lease = None;
        live.rec.job.error = why.to_string();
        self.dispatch_needed = true;
        Some(live)
    }

    /// The shutdown grace of a live job (its own, or the default).
    fn grace_of(&self, id: JobId) -> Duration {
        self.jobs
            .get(&id)
            .map(|l| l.grace(self.settings.default_shutdown_grace))
            .unwrap_or(self.settings.default_shutdown_grace)
    }

    fn enqueue(&mut self, live: &mut Live, now: SystemTime) {
        let job = &mut live.rec.job;
        job.state = JobState::Queued as i32;
        let slot = Slot {
            queue: job.queue.clone(),
            kind: job.kind.clone(),
            priority: job.priority,
            since: now,
        };
        self.ready.insert(live.rec.id(), &slot);
        live.ready = Some(slot);
        self.dispatch_needed = true;
    }

    fn unready(&mut self, live: &mut Live) {
        if let Some(slot) = live.ready.take() {
            self.ready.remove(live.rec.id(), &slot);
        }
    }

    fn schedule_at(&mut self, live: &mut Live, at: SystemTime) {
        live.rec.job.state = JobState::Scheduled as i32;
        live.rec.job.run_time = ts(at);
        self.due.insert((at, Due::Run(live.rec.id())));
    }

    fn arm_expiry(&mut self, live: &Live) {
        if let Some(at) = live.expire_time() {
            self.due.insert((at, Due::Expire(live.rec.id())));
        }
    }

    fn finish(&mut self, live: &mut Live, state: JobState, now: SystemTime) {
        self.unready(live);
        live.rec.lease = None;
        live.rec.job.state = state as i32;
        live.rec.job.end_time = ts(now);
    }

    /// After an attempt failed (or its lease was lost): retry with backoff, or
    /// fail for good.
    fn after_failed_attempt(&mut self, live: &mut Live, now: SystemTime, permanent: bool) {
        live.rec.lease = None;
        let job = &live.rec.job;
        if job.cancel_requested {
            self.finish(live, JobState::Cancelled, now);
        } else if permanent || job.attempt >= job.max_attempts {
            self.finish(live, JobState::Failed, now);
        } else {
            let policy = job.retry.unwrap_or_default();
            let delay = retry_delay(&policy, job.attempt, self.rng.gen::<f64>());
            if delay.is_zero() {
                self.enqueue(live, now);
            } else {
                self.schedule_at(live, now + delay);
            }
        }
    }

    /// The job, taken out of the model to change it, if `lease` is still its lease.
    fn take_if_leased(&mut self, job: JobId, lease: LeaseId) -> Option<Live> {
        let live = self.jobs.remove(&job)?;
        if live.rec.lease.as_ref().map(|l| l.id) == Some(lease) {
            Some(live)
        } else {
            self.jobs.insert(job, live);
            None
        }
    }

    /// A lease ended without a completion: the attempt counts as failed.
    fn lose_lease(&mut self, job: JobId, lease: LeaseId, now: SystemTime, why: &str) {
        let Some(mut live) = self.take_if_leased(job, lease) else {
            return;
        };
        tracing::warn!(job = %job, lease = %lease, "{why}");
        let old = live.rec.state();
        end_attempt(&mut live, now, "lease_expired", why);
        live.rec.job.error = why.to_string();
        self.after_failed_attempt(&mut live, now, false);
        self.save(live, old);
        self.dispatch_needed = true;
    }
}

impl State {
    /// A lease rebuilt at start-up that its worker came back without: the previous
    /// coordinator process died before the `Assign` reached the worker, so the attempt never
    /// ran. It ends `interrupted` and costs no attempt; the job is queued again at once. (A
    /// worker process that died together with the coordinator also comes back without its
    /// leases; its job gets that one attempt back too. Lease timeouts and worker restarts
    /// without a coordinator restart still cost attempts, so a job that kills its worker
    /// cannot loop forever.)
    fn requeue_undelivered(&mut self, job: JobId, lease: LeaseId, now: SystemTime, why: &str) {
        let Some(mut live) = self.take_if_leased(job, lease) else {
            return;
        };
        tracing::warn!(job = %job, lease = %lease, "{why}");
        let old = live.rec.state();
        end_attempt(&mut live, now, "interrupted", why);
        self.requeue_interrupted(&mut live, now);
        self.save(live, old);
        self.dispatch_needed = true;
    }

    /// After an attempt that ended `interrupted`: it does not count; the job runs again at
    /// once (or ends `CANCELLED`, if a cancel was asked for).
    fn requeue_interrupted(&mut self, live: &mut Live, now: SystemTime) {
        live.rec.lease = None;
        live.rec.job.attempt = live.rec.job.attempt.saturating_sub(1);
        if live.rec.job.cancel_requested {
            self.finish(live, JobState::Cancelled, now);
        } else {
            self.enqueue(live, now);
        }
    }
}

impl Live {
    /// The job's shutdown grace, or `default`.
    fn grace(&self, default: Duration) -> Duration {
        self.rec
            .job
            .shutdown_grace
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(default)
    }

    fn run_time(&self) -> Option<SystemTime> {
        self.rec
            .job
            .run_time
            .and_then(|t| SystemTime::try_from(t).ok())
    }

    fn expire_time(&self) -> Option<SystemTime> {
        self.rec
            .job
            .expire_time
            .and_then(|t| SystemTime::try_from(t).ok())
    }
}

fn end_attempt(live: &mut Live, now: SystemTime, outcome: &str, error: &str) {
    if let Some(a) = live.rec.job.attempts.last_mut() {
        a.end_time = ts(now);
        a.outcome = outcome.to_string();
        a.error = error.to_string();
    }
}
