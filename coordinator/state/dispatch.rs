//! Timers and dispatch: due run times, expiries and lease deadlines; handing ready jobs to free slots.

use std::time::{Duration, SystemTime};

use super::*;

/// The runs a job record keeps in `Job.attempts`: the newest this many. Runs
/// that end `interrupted` (a worker stopping) do not use up `max_attempts`,
/// so without a bound a job on workers that keep restarting would grow its
/// record, and every write and read of it, forever. `Job.attempt` still
/// counts the attempts used.
pub const MAX_ATTEMPT_HISTORY: usize = 100;

impl State {
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
                Due::Schedule(name) => self.fire_schedule(&name, now),
                Due::CancelDeadline(id, lease) => {
                    let why = "cancelled; the worker did not report by the stop-by time";
                    if let Some(mut live) = self.end_unreported(id, lease, now, "cancelled", why) {
                        self.finish(&mut live, JobState::Cancelled, now);
                        self.save(live, JobState::Running);
                    }
                }
                Due::TimeoutDeadline(id, lease) => {
                    let timeout = self
                        .jobs
                        .get(&id)
                        .and_then(|l| l.rec.job.timeout)
                        .and_then(|d| Duration::try_from(d).ok())
                        .unwrap_or_default();
                    let why = format!(
                        "timed out after {}; the worker did not report",
                        humantime::format_duration(timeout)
                    );
                    if let Some(mut live) = self.end_unreported(id, lease, now, "timed_out", &why) {
                        self.after_failed_attempt(&mut live, now, false);
                        self.save(live, JobState::Running);
                    }
                }
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
        // One job per worker per pass, round-robin; a worker that got nothing
        // (full, or no ready job it can run) leaves the list.
        while !candidates.is_empty() {
            let mut i = 0;
            while i < candidates.len() {
                let pick = self.workers.map.get(&candidates[i]).and_then(|w| {
                    if w.free_slots() == 0 {
                        return None;
                    }
                    let (jobs, default) = (&self.jobs, self.settings.default_shutdown_grace);
                    let fits = |id: JobId| match w.max_grace {
                        None => true,
                        Some(max) => jobs.get(&id).is_some_and(|l| l.grace(default) <= max),
                    };
                    self.ready.best_for(&w.queues, &w.kinds, fits)
                });
                match pick {
                    Some(job) => {
                        let worker_id = candidates[i].clone();
                        self.lease(job, &worker_id, now);
                        i += 1;
                    }
                    None => {
                        candidates.remove(i);
                    }
                }
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
        if job.attempts.len() >= MAX_ATTEMPT_HISTORY {
            let over = job.attempts.len() + 1 - MAX_ATTEMPT_HISTORY;
            job.attempts.drain(..over);
        }
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
        if let Some(t) = timeout {
            self.due.insert((
                now + t + grace + self.settings.lease_timeout,
                Due::TimeoutDeadline(id, lease_id),
            ));
        }
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
}
