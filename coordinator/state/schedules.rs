//! Schedules: their commands, their fires, and how their runs' state changes
//! flow back into them (overlap bookkeeping, END-anchored next runs, buffered
//! runs, `last_job_state`).
//!
//! A fire writes its new job and the schedule's advanced `next_run_time` in the
//! same round, so they reach the store in one atomic batch: a crash can neither
//! lose a fire nor repeat one.

use std::time::SystemTime;

use super::*;
use crate::coordinator::schedule::policy;
use crate::coordinator::schedule::record::ScheduleEntry;
use crate::coordinator::schedule::spec::Spec;
use crate::proto::Schedule;

/// The label that records which fire time created a job.
pub const FIRE_TIME_LABEL: &str = "rota.fire_time";

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("schedule {name:?} not found"))
}

/// The fields a client sets, for comparing a declared schedule with a stored one.
fn definition(
    s: &Schedule,
) -> (
    Option<&Job>,
    Option<&proto::ScheduleSpec>,
    i32,
    i32,
    Option<prost_types::Duration>,
    bool,
) {
    (
        s.job.as_ref(),
        s.spec.as_ref(),
        s.overlap,
        s.misfire,
        s.catchup_window,
        s.paused,
    )
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

impl State {
    /// Creates a schedule or replaces its definition (its run history stays).
    /// `schedule` is validated (its job template normalized); `spec` is its parsed spec.
    pub fn put_schedule(
        &mut self,
        mut schedule: Schedule,
        spec: Spec,
        now: SystemTime,
        declared: bool,
    ) -> Result<Schedule, Error> {
        let first = spec.first_run(now);
        if first.is_none() && !spec.end_anchored() {
            return Err(Error::invalid(
                "schedule.spec.cron.expression",
                "never fires (no matching date after now)",
            ));
        }
        let previous = self.schedules.remove(&schedule.name);
        let (active, buffered) = match &previous {
            Some(p) => {
                schedule.create_time = p.schedule.create_time;
                schedule.last_run_time = p.schedule.last_run_time;
                schedule.last_job_id = p.schedule.last_job_id.clone();
                schedule.last_job_state = p.schedule.last_job_state;
                (p.active.clone(), p.buffered)
            }
            None => {
                schedule.create_time = ts(now);
                (Default::default(), false)
            }
        };
        schedule.update_time = ts(now);
        let waiting_for_end = spec.end_anchored() && !active.is_empty();
        schedule.next_run_time = if waiting_for_end {
            None
        } else {
            first.and_then(ts)
        };
        let entry = ScheduleEntry {
            schedule,
            spec,
            active,
            buffered,
            declared,
        };
        let out = entry.schedule.clone();
        self.arm_schedule(&entry);
        self.store_schedule(entry);
        Ok(out)
    }

    /// Creates or updates a schedule declared in the config file; one whose
    /// definition is unchanged keeps its state (and its due fire).
    pub fn declare_schedule(
        &mut self,
        schedule: Schedule,
        spec: Spec,
        now: SystemTime,
    ) -> Result<(), Error> {
        if let Some(existing) = self.schedules.get(&schedule.name) {
            if definition(&existing.schedule) == definition(&schedule) {
                if !existing.declared {
                    let mut e = existing.clone();
                    e.declared = true;
                    self.store_schedule(e);
                }
                return Ok(());
            }
        }
        tracing::info!(schedule = %schedule.name, "declared schedule created or updated");
        self.put_schedule(schedule, spec, now, true).map(|_| ())
    }

    /// One schedule.
    pub fn get_schedule(&self, name: &str) -> Result<Schedule, Error> {
        self.schedules
            .get(name)
            .map(|e| e.schedule.clone())
            .ok_or_else(|| not_found(name))
    }

    /// Schedules by name after `after`, at most `size`; and the next page's token.
    pub fn list_schedules(&self, after: &str, size: usize) -> (Vec<Schedule>, String) {
        use std::ops::Bound::{Excluded, Unbounded};
        let start = if after.is_empty() {
            Unbounded
        } else {
            Excluded(after.to_string())
        };
        let mut page: Vec<Schedule> = self
            .schedules
            .range((start, Unbounded))
            .take(size + 1)
            .map(|(_, e)| e.schedule.clone())
            .collect();
        let next = if page.len() > size {
            page.truncate(size);
            page.last().map(|s| s.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        (page, next)
    }

    /// A schedule's spec and next run, for previews.
    pub fn schedule_spec(&self, name: &str) -> Result<(Spec, Option<SystemTime>), Error> {
        let e = self.schedules.get(name).ok_or_else(|| not_found(name))?;
        let next = e
            .schedule
            .next_run_time
            .and_then(|t| SystemTime::try_from(t).ok());
        Ok((e.spec.clone(), next))
    }

    /// Deletes a schedule; its jobs stay.
    pub fn delete_schedule(&mut self, name: &str) -> Result<(), Error> {
        self.schedules.remove(name).ok_or_else(|| not_found(name))?;
        self.round.writes.delete_schedule(name);
        Ok(())
    }

    /// Stops a schedule from firing.
    pub fn pause_schedule(&mut self, name: &str, now: SystemTime) -> Result<Schedule, Error> {
        let mut e = self.schedules.remove(name).ok_or_else(|| not_found(name))?;
        e.schedule.paused = true;
        e.schedule.update_time = ts(now);
        let out = e.schedule.clone();
        self.store_schedule(e);
        Ok(out)
    }

    /// Resumes a schedule; fires missed while paused come due at once and follow
    /// the misfire policy.
    pub fn resume_schedule(&mut self, name: &str, now: SystemTime) -> Result<Schedule, Error> {
        let mut e = self.schedules.remove(name).ok_or_else(|| not_found(name))?;
        e.schedule.paused = false;
        e.schedule.update_time = ts(now);
        if e.buffered && e.active.is_empty() {
            e.buffered = false;
            self.create_run(&mut e, now, now);
        }
        let out = e.schedule.clone();
        self.arm_schedule(&e);
        self.store_schedule(e);
        Ok(out)
    }

    /// Creates one run now, outside the spec.
    pub fn trigger_schedule(&mut self, name: &str, now: SystemTime) -> Result<Job, Error> {
        let mut e = self.schedules.remove(name).ok_or_else(|| not_found(name))?;
        let job = self.create_run(&mut e, now, now);
        if e.spec.end_anchored() {
            e.schedule.next_run_time = None;
        }
        self.store_schedule(e);
        Ok(job)
    }

    /// The schedule's due time came: decide per its policies, create the runs,
    /// advance `next_run_time`.
    pub(super) fn fire_schedule(&mut self, name: &str, now: SystemTime) {
        let Some(e) = self.schedules.get(name) else {
            return;
        };
        let due = e
            .schedule
            .next_run_time
            .and_then(|t| SystemTime::try_from(t).ok());
        let Some(due) = due.filter(|t| *t <= now && !e.schedule.paused) else {
            return;
        };
        let mut e = self.schedules.remove(name).expect("checked above");
        let decision = policy::decide(&e.spec, &e.policies(), due, now, !e.active.is_empty());
        if decision.dropped {
            tracing::info!(schedule = %name, due = %rfc3339(due), runs = decision.runs.len(), "missed fire times dropped per policy");
        }
        for fire in &decision.runs {
            self.create_run(&mut e, *fire, now);
        }
        e.buffered |= decision.buffer;
        e.schedule.next_run_time = decision.next.and_then(ts);
        self.arm_schedule(&e);
        self.store_schedule(e);
    }

    /// A job created by a schedule changed state.
    pub(super) fn schedule_job_changed(&mut self, job: &Job) {
        let Some(mut e) = self.schedules.remove(&job.schedule) else {
            return;
        };
        let mut changed = false;
        if e.schedule.last_job_id == job.id && e.schedule.last_job_state != job.state {
            e.schedule.last_job_state = job.state;
            changed = true;
        }
        let finished =
            is_terminal(job.state()) && JobId::parse(&job.id).is_ok_and(|id| e.active.remove(&id));
        if finished && e.active.is_empty() {
            changed = true;
            let end = job
                .end_time
                .and_then(|t| SystemTime::try_from(t).ok())
                .unwrap_or_else(SystemTime::now);
            if e.buffered && !e.schedule.paused {
                e.buffered = false;
                self.create_run(&mut e, end, end);
            } else if let Some(next) = e.spec.after_end(end) {
                e.schedule.next_run_time = ts(next);
                self.arm_schedule(&e);
            }
        } else if finished {
            changed = true;
        }
        if changed {
            self.round.writes.put_schedule(&e);
        }
        self.schedules.insert(e.schedule.name.clone(), e);
    }

    /// Creates a run of `e` for fire time `fire`. The entry is out of the map
    /// while this runs, so the new job's own state change does not recurse.
    fn create_run(&mut self, e: &mut ScheduleEntry, fire: SystemTime, now: SystemTime) -> Job {
        let mut job = e.schedule.job.clone().unwrap_or_default();
        job.schedule = e.schedule.name.clone();
        job.labels
            .insert(FIRE_TIME_LABEL.to_string(), rfc3339(fire));
        let job = self.create_job(job, now);
        if let Ok(id) = JobId::parse(&job.id) {
            e.active.insert(id);
        }
        e.schedule.last_run_time = ts(now);
        e.schedule.last_job_id = job.id.clone();
        e.schedule.last_job_state = job.state;
        tracing::debug!(schedule = %e.schedule.name, job = %job.id, fire = %rfc3339(fire), "schedule fired");
        job
    }

    /// Sets the timer for the entry's next run, unless it is paused.
    pub(super) fn arm_schedule(&mut self, e: &ScheduleEntry) {
        if e.schedule.paused {
            return;
        }
        if let Some(t) = e
            .schedule
            .next_run_time
            .and_then(|t| SystemTime::try_from(t).ok())
        {
            self.due.insert((t, Due::Schedule(e.schedule.name.clone())));
        }
    }

    /// Writes the entry and puts it (back) in the model.
    fn store_schedule(&mut self, e: ScheduleEntry) {
        self.round.writes.put_schedule(&e);
        self.schedules.insert(e.schedule.name.clone(), e);
    }
}
