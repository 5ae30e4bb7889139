//! Retention in the model: a finished job enters the sweep index when it
//! finishes (or at start-up, from the store), leaves it when `RetryJob` runs
//! it again, and is deleted, with its idempotency key, once its retention has
//! passed.
//!
//! A deletion is staged into the round like every other change: the job
//! record and its idempotency-key record are removed in the round's atomic
//! batch, made durable by the group commit (no fsync of its own). One round
//! deletes at most [`SWEEP_CHUNK`] jobs, so a backlog (after an outage, or a
//! shortened retention) never holds dispatch up: the engine decides the
//! commands waiting between chunks. Each due entry is checked against the
//! stored record before anything is deleted, so a stale entry can neither
//! delete a job that runs again nor one that finished again later.

use std::time::{Duration, SystemTime};

use super::*;
use crate::coordinator::store::StoreError;

/// Most finished jobs deleted in one engine round.
pub const SWEEP_CHUNK: usize = 256;

/// How long deletions wait after the store failed to read a record.
const RETRY_AFTER_READ_ERROR: Duration = Duration::from_secs(60);

/// A job's `end_time`.
fn end_time(job: &Job) -> Option<SystemTime> {
    job.end_time.and_then(|t| SystemTime::try_from(t).ok())
}

impl State {
    /// Enters finished job `id` into the sweep index (unless its state is
    /// kept for ever). `fallback` stands in for a missing `end_time`.
    pub(super) fn note_finished(&mut self, id: JobId, job: &Job, fallback: SystemTime) {
        let end = end_time(job).unwrap_or(fallback);
        if let Some(at) = self.settings.retention.due(job.state(), end) {
            self.sweep.insert(at, id);
        }
    }

    /// Takes a finished job out of the sweep index: it is about to run again.
    pub(super) fn forget_finished(&mut self, rec: &JobRecord) {
        if let Some(at) =
            end_time(&rec.job).and_then(|end| self.settings.retention.due(rec.state(), end))
        {
            self.sweep.remove(at, rec.id());
        }
    }

    /// How many finished jobs wait for their deletion.
    pub fn sweep_pending(&self) -> usize {
        self.sweep.len()
    }

    /// Deletes up to [`SWEEP_CHUNK`] finished jobs whose retention has passed
    /// by `now`, with their idempotency keys; returns how many. The deletions
    /// are staged into the round.
    pub fn sweep(&mut self, now: SystemTime, store: &Store) -> usize {
        let ids = self.sweep.take_due(now, SWEEP_CHUNK);
        let mut deleted = 0;
        for (i, &id) in ids.iter().enumerate() {
            match self.sweep_one(id, now, store) {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                Err(e) => {
                    let later = now + RETRY_AFTER_READ_ERROR;
                    tracing::error!(job = %id, error = %e, retry_in = ?RETRY_AFTER_READ_ERROR, "cannot read a finished job to delete it");
                    for &id in &ids[i..] {
                        self.sweep.insert(later, id);
                    }
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::debug!(deleted, pending = self.sweep.len(), "finished jobs deleted");
        }
        deleted
    }

    /// Deletes one due job if its stored record says it is still finished and
    /// due; whether it did.
    fn sweep_one(&mut self, id: JobId, now: SystemTime, store: &Store) -> Result<bool, StoreError> {
        if self.jobs.contains_key(&id) {
            return Ok(false); // running again (RetryJob)
        }
        let Some(rec) = store.get_job(id)? else {
            return Ok(false); // already deleted
        };
        let state = rec.state();
        if !is_terminal(state) {
            return Ok(false);
        }
        if let Some(end) = end_time(&rec.job) {
            match self.settings.retention.due(state, end) {
                None => return Ok(false), // kept for ever
                Some(at) if at > now => {
                    // Finished again since this entry was made: not due yet.
                    self.sweep.insert(at, id);
                    return Ok(false);
                }
                Some(_) => {}
            }
        }
        self.round.writes.delete_job(id);
        let key = &rec.job.idempotency_key;
        if !key.is_empty() && self.idempotency.get(key) == Some(&id) {
            self.idempotency.remove(key);
            self.round.writes.delete_idempotency(key);
        }
        self.stats
            .moved(&rec.job.queue, state, JobState::Unspecified);
        Ok(true)
    }
}
