//! Checks a schedule as a client (or the config file) wrote it, before
//! anything is stored: every problem names its field.

use crate::coordinator::error::Error;
use crate::coordinator::schedule::spec::Spec;
use crate::coordinator::validate::{self, MAX_NAME_LEN};
use crate::proto::{MisfirePolicy, OverlapPolicy, Schedule};

/// Validates `schedule` (field prefix `field`, e.g. `schedule` or
/// `schedules[2]`), normalizes its job template and clears output fields.
pub fn new_schedule(
    field: &str,
    mut schedule: Schedule,
    max_payload: usize,
) -> Result<(Schedule, Spec), Error> {
    let f = |name: &str| format!("{field}.{name}");
    if schedule.name.is_empty() {
        return Err(Error::invalid(
            &f("name"),
            "is required and must not be empty",
        ));
    }
    if schedule.name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            &f("name"),
            format!(
                "is {} bytes; the limit is {MAX_NAME_LEN} bytes",
                schedule.name.len()
            ),
        ));
    }
    if schedule.name.chars().any(char::is_control) {
        return Err(Error::invalid(
            &f("name"),
            "must not contain control characters",
        ));
    }
    let job = schedule.job.take().ok_or_else(|| {
        Error::invalid(
            &f("job"),
            "is required: the template of each run's job (kind at least)",
        )
    })?;
    if !job.idempotency_key.is_empty() {
        return Err(Error::invalid(
            &f("job.idempotency_key"),
            "must be empty: every fire creates a new job",
        ));
    }
    let mut job = validate::new_job(&f("job"), job, max_payload)?;
    if job.run_time.is_some() || job.expire_time.is_some() {
        return Err(Error::invalid(
            &f("job"),
            "run_time and expire_time cannot be set on a template: runs start when they fire",
        ));
    }
    job.labels
        .remove(crate::coordinator::state::FIRE_TIME_LABEL);
    schedule.job = Some(job);
    let spec = Spec::parse(&f("spec"), schedule.spec.as_ref())?;
    OverlapPolicy::try_from(schedule.overlap).map_err(|_| {
        Error::invalid(
            &f("overlap"),
            format!("{} is not an OverlapPolicy", schedule.overlap),
        )
    })?;
    MisfirePolicy::try_from(schedule.misfire).map_err(|_| {
        Error::invalid(
            &f("misfire"),
            format!("{} is not a MisfirePolicy", schedule.misfire),
        )
    })?;
    validate::duration(&f("catchup_window"), &schedule.catchup_window)?;
    schedule.next_run_time = None;
    schedule.last_run_time = None;
    schedule.last_job_id.clear();
    schedule.last_job_state = 0;
    schedule.create_time = None;
    schedule.update_time = None;
    Ok((schedule, spec))
}
