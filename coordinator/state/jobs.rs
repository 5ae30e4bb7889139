//! Job commands: submit, cancel, retry, read and watch.

use std::time::SystemTime;

use super::*;

impl State {
    /// Accepts validated jobs; a job whose idempotency key is known returns the
    /// first job instead.
    pub fn submit(
        &mut self,
        jobs: Vec<Job>,
        now: SystemTime,
        store: &Store,
    ) -> Result<Vec<SubmitJobResponse>, Error> {
        // First every read that can fail, so that an error stages nothing.
        let mut known = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let existing = match self.idempotency.get(&job.idempotency_key) {
                Some(&id) if !job.idempotency_key.is_empty() => Some(self.get_job(id, store)?),
                _ => None,
            };
            known.push(existing);
        }
        let mut results = Vec::with_capacity(jobs.len());
        for (job, existing) in jobs.into_iter().zip(known) {
            // A key first seen earlier in this batch is known now too.
            let existing = match existing {
                Some(job) => Some(job),
                None => match self.idempotency.get(&job.idempotency_key) {
                    Some(id) if !job.idempotency_key.is_empty() => {
                        self.jobs.get(id).map(|l| l.rec.job.clone())
                    }
                    _ => None,
                },
            };
            results.push(match existing {
                Some(first) => SubmitJobResponse {
                    job: Some(first),
                    deduplicated: true,
                },
                None => SubmitJobResponse {
                    job: Some(self.create_job(job, now)),
                    deduplicated: false,
                },
            });
        }
        Ok(results)
    }

    /// Stores a new job (validated, not a duplicate) and returns it.
    pub(super) fn create_job(&mut self, mut job: Job, now: SystemTime) -> Job {
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
        let job = live.rec.job.clone();
        self.save(live, JobState::Unspecified);
        job
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
            let first = !live.rec.job.cancel_requested;
            live.rec.job.cancel_requested = true;
            live.rec.job.error = why;
            if first {
                if let Some(lease) = live.rec.lease.clone() {
                    let stop_by = now + live.grace(self.settings.default_shutdown_grace);
                    self.send_cancel(id, &lease, reason, stop_by);
                    // Backstop: a worker silent past stop_by is given one lease
                    // timeout more, then the job ends here and the lease is fenced.
                    self.due.insert((
                        stop_by + self.settings.lease_timeout,
                        Due::CancelDeadline(id, lease.id),
                    ));
                }
            }
        } else {
            live.rec.job.error = why;
            self.finish(&mut live, JobState::Cancelled, now);
        }
        let job = live.rec.job.clone();
        self.save(live, old);
        Ok(job)
    }

    /// Why `id` cannot be retried (NOT_FOUND, or FAILED_PRECONDITION naming its
    /// state), or its stored record. Changes nothing.
    pub fn retryable(&self, id: JobId, store: &Store) -> Result<JobRecord, Error> {
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
        Ok(rec)
    }

    /// Runs a FAILED, CANCELLED or EXPIRED job again, with fresh attempts.
    pub fn retry(&mut self, id: JobId, now: SystemTime, store: &Store) -> Result<Job, Error> {
        let rec = self.retryable(id, store)?;
        let old = rec.state();
        self.forget_finished(&rec);
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

    /// A job that has not finished, from the model.
    pub fn live_job(&self, id: JobId) -> Option<Job> {
        self.jobs.get(&id).map(|l| l.rec.job.clone())
    }

    /// One job, live or finished.
    pub fn get_job(&self, id: JobId, store: &Store) -> Result<Job, Error> {
        match self.live_job(id) {
            Some(job) => Ok(job),
            None => finished_job(id, store),
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
        let watchers = self.watchers.entry(id).or_default();
        // Streams closed since the job last changed go now, not at its next change.
        watchers.retain(|w| !w.is_closed());
        watchers.push(tx);
        Ok((job, Some(rx)))
    }
}

/// A job that is no longer in the model, from the store.
pub fn finished_job(id: JobId, store: &Store) -> Result<Job, Error> {
    match store.get_job(id)? {
        Some(rec) => Ok(rec.job),
        None => Err(Error::NotFound(format!("job {id} not found"))),
    }
}
