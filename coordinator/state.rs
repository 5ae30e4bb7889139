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

use rand::{Rng, SeedableRng};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use crate::coordinator::backoff::retry_delay;
use crate::coordinator::error::Error;
use crate::coordinator::ids::{JobId, LeaseId};
use crate::coordinator::ready::{ReadyIndex, Slot};
use crate::coordinator::record::{JobRecord, Lease};
use crate::coordinator::store::{Snapshot, Store, Writes};
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
}

/// A job that has not reached a terminal state.
struct Live {
    /// The job and its lease, as stored.
    rec: JobRecord,
    /// Where it sits in the ready index while QUEUED.
    ready: Option<Slot>,
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
    jobs: HashMap<JobId, Live>,
    /// Every idempotency key seen, and its job.
    idempotency: HashMap<String, JobId>,
    /// QUEUED jobs in dispatch order.
    ready: ReadyIndex,
    /// Timers, earliest first.
    due: BTreeSet<(SystemTime, Due)>,
    /// Connected and recently connected workers.
    workers: Workers,
    /// Counts for `GetQueueStats`.
    stats: Stats,
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
    pub fn restore(settings: Settings, snapshot: Snapshot, now: SystemTime) -> State {
        let mut state = State {
            settings,
            jobs: HashMap::new(),
            idempotency: snapshot.idempotency.into_iter().collect(),
            ready: ReadyIndex::default(),
            due: BTreeSet::new(),
            workers: Workers::default(),
            stats: Stats::default(),
            watchers: HashMap::new(),
            round: Round::default(),
            dispatch_needed: true,
            rng: rand::rngs::StdRng::from_entropy(),
        };
        for rec in snapshot.jobs {
            let s = rec.state();
            state.stats.moved(&rec.job.queue, JobState::Unspecified, s);
            if is_terminal(s) {
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
        state
    }

    /// Seeds the jitter source, for reproducible tests.
    pub fn seed_jitter(&mut self, seed: u64) {
        self.rng = rand::rngs::StdRng::seed_from_u64(seed);
    }

    /// Takes what has been staged since the last call.
    pub fn take_round(&mut self) -> Round {
        std::mem::take(&mut self.round)
    }

    /// Stages an effect to run after the round's writes are durable.
    pub fn after_commit(&mut self, effect: Effect) {
        self.round.effects.push(effect);
    }

    /// When the earliest timer is due.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.due.first().map(|(t, _)| *t)
    }

    // ----- job commands -------------------------------------------------------

    /// Accepts validated jobs; a job whose idempotency key is known returns the
    /// first job instead.
    pub fn submit(
        &mut self,
        jobs: Vec<Job>,
        now: SystemTime,
        store: &Store,
    ) -> Result<Vec<SubmitJobResponse>, Error> {
        let mut results = Vec::with_capacity(jobs.len());
        for mut job in jobs {
            if !job.idempotency_key.is_empty() {
                if let Some(&existing) = self.idempotency.get(&job.idempotency_key) {
                    results.push(SubmitJobResponse {
                        job: Some(self.get_job(existing, store)?),
                        deduplicated: true,
                    });
                    continue;
                }
            }
            let id = JobId::generate();
            job.id = id.to_string();
            job.create_time = ts(now);
            if !job.idempotency_key.is_empty() {
                self.idempotency.insert(job.idempotency_key.clone(), id);
                self.round.writes.put_idempotency(&job.idempotency_key, id);
            }
            let mut live = Live {
                rec: JobRecord { job, lease: None },
                ready: None,
            };
            self.arm_expiry(&live);
            match live.run_time().filter(|t| *t > now) {
                Some(at) => self.schedule_at(&mut live, at),
                None => self.enqueue(&mut live, now),
            }
            results.push(SubmitJobResponse {
                job: Some(live.rec.job.clone()),
                deduplicated: false,
            });
            self.save(live, JobState::Unspecified);
        }
        Ok(results)
    }

    /// Cancels a job: at once unless it runs; a running one is marked.
    pub fn cancel(
        &mut self,
        id: JobId,
        reason: &str,
        now: SystemTime,
        store: &Store,
    ) -> Result<Job, Error> {
        let Some(mut live) = self.jobs.remove(&id) else {
            let job = self.get_job(id, store)?;
            return Err(Error::FailedPrecondition(format!(
                "job {id} is already {}; only SCHEDULED, QUEUED or RUNNING jobs can be cancelled",
                state_name(job.state())
            )));
        };
        let old = live.rec.state();
        let why = if reason.is_empty() {
            "cancelled".to_string()
        } else {
            format!("cancelled: {reason}")
        };
        if old == JobState::Running {
            live.rec.job.cancel_requested = true;
            live.rec.job.error = why;
        } else {
            live.rec.job.error = why;
            self.finish(&mut live, JobState::Cancelled, now);
        }
        let job = live.rec.job.clone();
        self.save(live, old);
        Ok(job)
    }

    /// Runs a FAILED, CANCELLED or EXPIRED job again, with fresh attempts.
    pub fn retry(&mut self, id: JobId, now: SystemTime, store: &Store) -> Result<Job, Error> {
        if let Some(live) = self.jobs.get(&id) {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is {}; only FAILED, CANCELLED or EXPIRED jobs can be retried",
                state_name(live.rec.state())
            )));
        }
        let rec = store
            .get_job(id)?
            .ok_or_else(|| Error::NotFound(format!("job {id} not found")))?;
        let old = rec.state();
        if !matches!(
            old,
            JobState::Failed | JobState::Cancelled | JobState::Expired
        ) {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is {}; only FAILED, CANCELLED or EXPIRED jobs can be retried",
                state_name(old)
            )));
        }
        let mut live = Live { rec, ready: None };
        let job = &mut live.rec.job;
        job.attempt = 0;
        job.error.clear();
        job.result.clear();
        job.cancel_requested = false;
        job.start_time = None;
        job.end_time = None;
        job.run_time = None;
        if live.expire_time().is_some_and(|t| t <= now) {
            live.rec.job.expire_time = None;
        }
        self.arm_expiry(&live);
        self.enqueue(&mut live, now);
        let job = live.rec.job.clone();
        self.save(live, old);
        Ok(job)
    }

    /// One job, live or finished.
    pub fn get_job(&self, id: JobId, store: &Store) -> Result<Job, Error> {
        if let Some(live) = self.jobs.get(&id) {
            return Ok(live.rec.job.clone());
        }
        match store.get_job(id)? {
            Some(rec) => Ok(rec.job),
            None => Err(Error::NotFound(format!("job {id} not found"))),
        }
    }

    /// The job now, and a stream of its later changes (`None` when it is finished).
    pub fn watch(
        &mut self,
        id: JobId,
        store: &Store,
    ) -> Result<(Job, Option<UnboundedReceiver<Job>>), Error> {
        let job = self.get_job(id, store)?;
        if is_terminal(job.state()) {
            return Ok((job, None));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.entry(id).or_default().push(tx);
        Ok((job, Some(rx)))
    }

    // ----- worker sessions ----------------------------------------------------

    /// A worker opened a session: sends its `Welcome` (before anything else on
    /// the stream) and returns the session's generation. Leases it held but did
    /// not name end now.
    pub fn hello(
        &mut self,
        hello: Hello,
        tx: UnboundedSender<CoordinatorMessage>,
        now: SystemTime,
    ) -> u64 {
        let generation = self.workers.next_generation();
        let previous = self.workers.map.remove(&hello.worker_id);
        if previous.as_ref().is_some_and(|p| p.session.is_some()) {
            tracing::warn!(worker = %hello.worker_id, "a second session replaces the worker's open one");
        }
        let had_timer = previous.is_some();
        let mut old_leases = previous.map(|p| p.leases).unwrap_or_default();
        let mut entry = WorkerEntry {
            worker_id: hello.worker_id.clone(),
            hostname: hello.hostname,
            queues: if hello.queues.is_empty() {
                vec![crate::coordinator::validate::DEFAULT_QUEUE.to_string()]
            } else {
                hello.queues
            },
            kinds: hello.kinds,
            slots: hello.slots,
            session: Some(SessionHandle {
                generation,
                tx: tx.clone(),
            }),
            leases: Default::default(),
            connect_time: Some(now),
            last_seen: now,
            draining: false,
        };
        let (mut resumed, mut rejected) = (Vec::new(), Vec::new());
        for held in hello.held {
            let kept = JobId::parse(&held.job_id).ok().and_then(|job| {
                let lease = LeaseId::parse(&held.lease_id)?;
                (old_leases.get(&job) == Some(&lease)).then_some((job, lease))
            });
            match kept {
                Some((job, lease)) => {
                    old_leases.remove(&job);
                    entry.leases.insert(job, lease);
                    resumed.push(held);
                }
                None => rejected.push(held),
            }
        }
        let worker_id = entry.worker_id.clone();
        let welcome = Welcome {
            session_id: format!("{worker_id}/{generation}"),
            heartbeat_interval: prost_types::Duration::try_from(self.settings.heartbeat_interval)
                .ok(),
            lease_timeout: prost_types::Duration::try_from(self.settings.lease_timeout).ok(),
            resumed,
            rejected,
        };
        let welcome = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Welcome(welcome)),
        };
        self.after_commit(Box::new(move |r| {
            if r.is_ok() {
                let _ = tx.send(welcome);
            }
        }));
        self.workers.map.insert(worker_id.clone(), entry);
        if !had_timer {
            self.due.insert((
                now + self.settings.lease_timeout,
                Due::Worker(worker_id.clone()),
            ));
        }
        for (job, lease) in old_leases {
            self.lose_lease(
                job,
                lease,
                now,
                &format!("worker {worker_id} reconnected without this lease"),
            );
        }
        self.dispatch_needed = true;
        generation
    }

    /// The sender of `worker_id`'s session `generation`, if it is still current.
    pub fn session_sender(
        &self,
        worker_id: &str,
        generation: u64,
    ) -> Option<UnboundedSender<CoordinatorMessage>> {
        self.workers
            .map
            .get(worker_id)
            .and_then(|w| w.session.as_ref())
            .filter(|s| s.generation == generation)
            .map(|s| s.tx.clone())
    }

    /// Drops every session sender and watcher, which ends their streams; used at
    /// shutdown. Leases stay as stored, for the workers to resume after restart.
    pub fn close_streams(&mut self) {
        for w in self.workers.map.values_mut() {
            w.session = None;
        }
        self.watchers.clear();
    }

    /// The worker is alive.
    pub fn heartbeat(&mut self, worker_id: &str, generation: u64, now: SystemTime) {
        if let Some(w) = self.workers.current_mut(worker_id, generation) {
            w.last_seen = now;
        }
    }

    /// The worker takes nothing new.
    pub fn draining(&mut self, worker_id: &str, generation: u64, now: SystemTime) {
        if let Some(w) = self.workers.current_mut(worker_id, generation) {
            w.last_seen = now;
            w.draining = true;
        }
    }

    /// The worker's stream ended. Its leases stay until its lease timeout.
    pub fn disconnected(&mut self, worker_id: &str, generation: u64) {
        if let Some(w) = self.workers.current_mut(worker_id, generation) {
            w.session = None;
            if w.leases.is_empty() {
                self.workers.map.remove(worker_id);
            }
        }
    }

    /// A worker reports a task's end. Stale leases change nothing.
    pub fn complete(
        &mut self,
        worker_id: &str,
        generation: u64,
        done: proto::Complete,
        now: SystemTime,
    ) -> CompleteAck {
        let mut ack = CompleteAck {
            job_id: done.job_id.clone(),
            lease_id: done.lease_id.clone(),
            accepted: false,
            reason: String::new(),
        };
        let Some(w) = self.workers.current_mut(worker_id, generation) else {
            ack.reason = "this session has been replaced by a newer one".into();
            return ack;
        };
        w.last_seen = now;
        let held = JobId::parse(&done.job_id).ok().and_then(|job| {
            let lease = LeaseId::parse(&done.lease_id)?;
            (w.leases.get(&job) == Some(&lease)).then_some(job)
        });
        let Some(job_id) = held else {
            ack.reason = format!(
                "stale lease: lease {:?} of job {:?} is not held by worker {worker_id}",
                done.lease_id, done.job_id
            );
            return ack;
        };
        let Some(outcome) = done.outcome else {
            ack.reason = "complete has no outcome".into();
            return ack;
        };
        w.leases.remove(&job_id);
        self.dispatch_needed = true;
        let Some(mut live) = self.jobs.remove(&job_id) else {
            ack.reason = "job is no longer running".into();
            return ack;
        };
        let old = live.rec.state();
        match outcome {
            complete::Outcome::Success(s) => {
                end_attempt(&mut live, now, "succeeded", "");
                live.rec.job.result = s.result;
                live.rec.job.error.clear();
                self.finish(&mut live, JobState::Succeeded, now);
            }
            complete::Outcome::Failure(f) => {
                end_attempt(&mut live, now, "failed", &f.error);
                live.rec.job.error = f.error;
                self.after_failed_attempt(&mut live, now, f.permanent);
            }
            complete::Outcome::Cancelled(c) => {
                end_attempt(&mut live, now, "cancelled", &c.reason);
                if !c.reason.is_empty() {
                    live.rec.job.error = format!("cancelled: {}", c.reason);
                }
                self.finish(&mut live, JobState::Cancelled, now);
            }
            complete::Outcome::Interrupted(i) => {
                end_attempt(&mut live, now, "interrupted", &i.reason);
                live.rec.lease = None;
                live.rec.job.attempt = live.rec.job.attempt.saturating_sub(1);
                if live.rec.job.cancel_requested {
                    self.finish(&mut live, JobState::Cancelled, now);
                } else {
                    self.enqueue(&mut live, now);
                }
            }
        }
        self.save(live, old);
        ack.accepted = true;
        ack
    }

    // ----- time and dispatch --------------------------------------------------

    /// Handles every timer due at or before `now`.
    pub fn fire_due(&mut self, now: SystemTime) {
        while let Some((at, _)) = self.due.first() {
            if *at > now {
                break;
            }
            let Some((_, due)) = self.due.pop_first() else {
                break;
            };
            match due {
                Due::Run(id) => self.fire_run(id, now),
                Due::Expire(id) => self.fire_expire(id, now),
                Due::Worker(w) => self.fire_worker(w, now),
            }
        }
    }

    fn fire_run(&mut self, id: JobId, now: SystemTime) {
        let Some(live) = self.jobs.get(&id) else {
            return;
        };
        if live.rec.state() != JobState::Scheduled || live.run_time().is_some_and(|t| t > now) {
            return;
        }
        let mut live = self.jobs.remove(&id).expect("checked above");
        self.enqueue(&mut live, now);
        self.save(live, JobState::Scheduled);
    }

    fn fire_expire(&mut self, id: JobId, now: SystemTime) {
        let Some(live) = self.jobs.get(&id) else {
            return;
        };
        let old = live.rec.state();
        if !matches!(old, JobState::Scheduled | JobState::Queued)
            || live.expire_time().is_none_or(|t| t > now)
        {
            return;
        }
        let mut live = self.jobs.remove(&id).expect("checked above");
        live.rec.job.error = "expire_time passed before the job started".into();
        self.finish(&mut live, JobState::Expired, now);
        self.save(live, old);
    }

    fn fire_worker(&mut self, worker_id: String, now: SystemTime) {
        let Some(w) = self.workers.map.get(&worker_id) else {
            return;
        };
        let deadline = w.last_seen + self.settings.lease_timeout;
        if deadline > now {
            self.due.insert((deadline, Due::Worker(worker_id)));
            return;
        }
        let w = self.workers.map.remove(&worker_id).expect("checked above");
        tracing::warn!(worker = %worker_id, leases = w.leases.len(), "worker lost: no word within the lease timeout");
        let why = format!(
            "lease expired: worker {worker_id} was not heard from for {:?}",
            self.settings.lease_timeout
        );
        for (job, lease) in w.leases {
            self.lose_lease(job, lease, now, &why);
        }
        // Dropping `w` drops its session sender, which ends a hung stream.
    }

    /// Leases ready jobs to workers with free slots, round-robin across workers.
    pub fn dispatch(&mut self, now: SystemTime) {
        if !self.dispatch_needed {
            return;
        }
        self.dispatch_needed = false;
        let mut candidates: Vec<String> = self
            .workers
            .map
            .values()
            .filter(|w| w.free_slots() > 0)
            .map(|w| w.worker_id.clone())
            .collect();
        if candidates.is_empty() {
            return;
        }
        candidates.sort_unstable();
        self.workers.rotation = self.workers.rotation.wrapping_add(1);
        let shift = self.workers.rotation % candidates.len();
        candidates.rotate_left(shift);
        loop {
            let mut progress = false;
            for worker_id in &candidates {
                let Some(w) = self.workers.map.get(worker_id) else {
                    continue;
                };
                if w.free_slots() == 0 {
                    continue;
                }
                if let Some(job) = self.ready.best_for(&w.queues, &w.kinds) {
                    self.lease(job, worker_id, now);
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
    }

    fn lease(&mut self, id: JobId, worker_id: &str, now: SystemTime) {
        let mut live = self.jobs.remove(&id).expect("ready jobs are live");
        let old = live.rec.state();
        self.unready(&mut live);
        if live.expire_time().is_some_and(|t| t <= now) {
            live.rec.job.error = "expire_time passed before the job started".into();
            self.finish(&mut live, JobState::Expired, now);
            self.save(live, old);
            return;
        }
        let lease_id = LeaseId::generate();
        let w = self
            .workers
            .map
            .get_mut(worker_id)
            .expect("a candidate worker");
        w.leases.insert(id, lease_id);
        let tx = w.session.as_ref().map(|s| s.tx.clone());
        let job = &mut live.rec.job;
        job.attempt += 1;
        job.state = JobState::Running as i32;
        job.start_time = ts(now);
        job.attempts.push(Attempt {
            number: job.attempt,
            worker_id: worker_id.to_string(),
            start_time: ts(now),
            ..Default::default()
        });
        live.rec.lease = Some(Lease {
            id: lease_id,
            worker_id: worker_id.to_string(),
        });
        let timeout = job.timeout.and_then(|d| Duration::try_from(d).ok());
        let grace = job
            .shutdown_grace
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(self.settings.default_shutdown_grace);
        let assign = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Assign(Assign {
                job: Some(job.clone()),
                lease_id: lease_id.to_string(),
                deadline: timeout.and_then(|t| ts(now + t)),
                shutdown_grace: prost_types::Duration::try_from(grace).ok(),
            })),
        };
        if let Some(tx) = tx {
            self.after_commit(Box::new(move |r| {
                if r.is_ok() {
                    // A closed stream is noticed by its session task; the lease
                    // then lives until the worker returns or times out.
                    let _ = tx.send(assign);
                }
            }));
        }
        self.save(live, old);
    }

    // ----- reads for the admin service ---------------------------------------

    /// The known workers.
    pub fn list_workers(&self) -> Vec<proto::Worker> {
        let mut workers: Vec<_> = self
            .workers
            .map
            .values()
            .map(|w| proto::Worker {
                worker_id: w.worker_id.clone(),
                hostname: w.hostname.clone(),
                queues: w.queues.clone(),
                kinds: w.kinds.clone(),
                slots: w.slots,
                running: w
                    .leases
                    .iter()
                    .map(|(j, l)| LeaseRef {
                        job_id: j.to_string(),
                        lease_id: l.to_string(),
                    })
                    .collect(),
                connect_time: w.connect_time.and_then(ts),
                last_heartbeat_time: ts(w.last_seen),
                draining: w.draining,
            })
            .collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        workers
    }

    /// Counts per state for one queue (or every queue when `queue` is empty).
    pub fn queue_stats(&self, queue: &str, now: SystemTime) -> Vec<QueueStat> {
        let mut names: Vec<&String> = self
            .stats
            .by_queue
            .keys()
            .filter(|q| queue.is_empty() || q.as_str() == queue)
            .collect();
        names.sort();
        let mut out: Vec<QueueStat> = names
            .into_iter()
            .map(|q| {
                let c = &self.stats.by_queue[q];
                QueueStat {
                    queue: q.clone(),
                    scheduled: c[JobState::Scheduled as usize],
                    queued: c[JobState::Queued as usize],
                    running: c[JobState::Running as usize],
                    succeeded: c[JobState::Succeeded as usize],
                    failed: c[JobState::Failed as usize],
                    cancelled: c[JobState::Cancelled as usize],
                    expired: c[JobState::Expired as usize],
                    oldest_queued_age: self.ready.oldest(q).and_then(|t| {
                        prost_types::Duration::try_from(now.duration_since(t).unwrap_or_default())
                            .ok()
                    }),
                }
            })
            .collect();
        if out.is_empty() && !queue.is_empty() {
            out.push(QueueStat {
                queue: queue.to_string(),
                ..Default::default()
            });
        }
        out
    }

    // ----- transitions --------------------------------------------------------

    /// Stores a job after a change: counts, record write, watchers; a finished
    /// job leaves the model.
    fn save(&mut self, live: Live, old: JobState) {
        let new = live.rec.state();
        self.stats.moved(&live.rec.job.queue, old, new);
        self.round.writes.put_job(&live.rec);
        let id = live.rec.id();
        if is_terminal(new) {
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
            self.jobs.insert(id, live);
        }
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

    /// A lease ended without a completion: the attempt counts as failed.
    fn lose_lease(&mut self, job: JobId, lease: LeaseId, now: SystemTime, why: &str) {
        let Some(mut live) = self.jobs.remove(&job) else {
            return;
        };
        if live.rec.lease.as_ref().map(|l| l.id) != Some(lease) {
            self.jobs.insert(job, live);
            return;
        }
        tracing::warn!(job = %job, lease = %lease, "{why}");
        let old = live.rec.state();
        end_attempt(&mut live, now, "lease_expired", why);
        live.rec.job.error = why.to_string();
        self.after_failed_attempt(&mut live, now, false);
        self.save(live, old);
        self.dispatch_needed = true;
    }
}

impl Live {
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
