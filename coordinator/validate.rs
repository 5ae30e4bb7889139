//! Checks a submitted job and fills in its defaults, before anything is stored.
//!
//! Every problem is an `INVALID_ARGUMENT` whose message names the field and, for
//! limits, the limit. Output-only fields sent by a client are cleared, not trusted.

use std::time::{Duration, SystemTime};

use crate::coordinator::error::Error;
use crate::proto::{Job, JobState, RetryPolicy};

/// Default queue name.
pub const DEFAULT_QUEUE: &str = "default";
/// Default `max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Largest `max_attempts` accepted.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;
/// Default first retry delay.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Default retry delay cap.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Default backoff multiplier.
pub const DEFAULT_MULTIPLIER: f64 = 2.0;
/// Longest queue, kind or idempotency key, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 1024;
/// Most labels on a job.
pub const MAX_LABELS: usize = 64;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_LEN: usize = 1024;
/// Longest free-text field (a cancel or drain reason, a worker's error), in bytes.
pub const MAX_TEXT_LEN: usize = 8192;
/// Longest cron expression, in bytes.
pub const MAX_CRON_LEN: usize = 1024;
/// Longest job id (a UUID is 36 characters; braces and URN forms are longer).
pub const MAX_ID_LEN: usize = 64;
/// Earliest timestamp accepted: 0001-01-01T00:00:00Z, protobuf's own bound.
pub const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// Latest timestamp accepted: 9999-12-31T23:59:59Z, protobuf's own bound.
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// At most the first 64 characters of a client's value, for error messages:
/// an error must never echo a megabyte back.
pub fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}...", &value[..cut]),
        None => format!("{value:?}"),
    }
}

/// Checks a free-text field's length.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes; the limit is {max} bytes", value.len()),
        ));
    }
    Ok(())
}

/// Checks a label map: at most [`MAX_LABELS`] entries, keys 1 to
/// [`MAX_LABEL_LEN`] bytes, values at most [`MAX_LABEL_LEN`] bytes.
pub fn labels(
    field: &str,
    labels: &std::collections::HashMap<String, String>,
) -> Result<(), Error> {
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid(
            field,
            format!("has {} entries; the limit is {MAX_LABELS}", labels.len()),
        ));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
            return Err(Error::invalid(
                field,
                format!(
                    "label {} ({} bytes, value {} bytes): keys must be 1 to {MAX_LABEL_LEN} bytes and values at most {MAX_LABEL_LEN} bytes",
                    shown(k),
                    k.len(),
                    v.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Longest duration accepted anywhere (timeouts, graces, backoffs, intervals):
/// about ten years, far from where instant arithmetic could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Reads an optional protobuf duration, rejecting negative, malformed or
/// absurdly long ones.
pub fn duration(field: &str, d: &Option<prost_types::Duration>) -> Result<Option<Duration>, Error> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Error::invalid(
            field,
            format!("must not be negative (got {}s {}ns)", d.seconds, d.nanos),
        ));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(Error::invalid(
            field,
            format!("nanos {} is out of range", d.nanos),
        ));
    }
    let d = Duration::new(d.seconds as u64, d.nanos as u32);
    if d > MAX_DURATION {
        return Err(Error::invalid(
            field,
            format!(
                "is {}s; the limit is {}s (10 years)",
                d.as_secs(),
                MAX_DURATION.as_secs()
            ),
        ));
    }
    Ok(Some(d))
}

/// Reads an optional protobuf timestamp.
pub fn timestamp(
    field: &str,
    t: &Option<prost_types::Timestamp>,
) -> Result<Option<SystemTime>, Error> {
    let Some(t) = t else { return Ok(None) };
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&t.seconds)
        || !(0..1_000_000_000).contains(&t.nanos)
    {
        return Err(Error::invalid(
            field,
            format!(
                "{}s {}ns is out of range: timestamps run from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z",
                t.seconds, t.nanos
            ),
        ));
    }
    SystemTime::try_from(*t)
        .map(Some)
        .map_err(|e| Error::invalid(field, format!("is not a valid timestamp ({e})")))
}

/// Checks a name (queue, kind, schedule, worker id): at most
/// [`MAX_NAME_LEN`] bytes, no control characters. Empty is the caller's call.
pub fn name(field: &str, value: &str) -> Result<(), Error> {
    if value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes; the limit is {MAX_NAME_LEN} bytes",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Validates a job as submitted and returns it with defaults filled in and
/// output-only fields cleared. `field` prefixes field names (`job`, `jobs[3]`).
pub fn new_job(field: &str, mut job: Job, max_payload: usize) -> Result<Job, Error> {
    let f = |name: &str| format!("{field}.{name}");
    if job.kind.is_empty() {
        return Err(Error::invalid(
            &f("kind"),
            "is required and must not be empty",
        ));
    }
    name(&f("kind"), &job.kind)?;
    if job.queue.is_empty() {
        job.queue = DEFAULT_QUEUE.to_string();
    }
    name(&f("queue"), &job.queue)?;
    if job.payload.len() > max_payload {
        return Err(Error::invalid(
            &f("payload"),
            format!(
                "is {} bytes; the limit is {max_payload} bytes (--max-payload)",
                job.payload.len()
            ),
        ));
    }
    let run_time = timestamp(&f("run_time"), &job.run_time)?;
    let expire_time = timestamp(&f("expire_time"), &job.expire_time)?;
    if let (Some(run), Some(expire)) = (run_time, expire_time) {
        if expire <= run {
            return Err(Error::invalid(&f("expire_time"), "must be after run_time"));
        }
    }
    if job.max_attempts == 0 {
        job.max_attempts = DEFAULT_MAX_ATTEMPTS;
    }
    if job.max_attempts > MAX_ATTEMPTS_LIMIT {
        return Err(Error::invalid(
            &f("max_attempts"),
            format!("is {}; the limit is {MAX_ATTEMPTS_LIMIT}", job.max_attempts),
        ));
    }
    job.retry = Some(retry_policy(&f("retry"), job.retry.take())?);
    if let Some(t) = duration(&f("timeout"), &job.timeout)? {
        if t.is_zero() {
            return Err(Error::invalid(
                &f("timeout"),
                "must be positive (leave it unset for no timeout)",
            ));
        }
    }
    duration(&f("shutdown_grace"), &job.shutdown_grace)?;
    if job.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(Error::invalid(
            &f("idempotency_key"),
            format!(
                "is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY_LEN} bytes",
                job.idempotency_key.len()
            ),
        ));
    }
    labels(&f("labels"), &job.labels)?;
    // Output-only fields are the coordinator's to set.
    job.id.clear();
    job.state = JobState::Unspecified as i32;
    job.attempt = 0;
    job.result.clear();
    job.error.clear();
    job.cancel_requested = false;
    job.schedule.clear();
    job.attempts.clear();
    job.create_time = None;
    job.start_time = None;
    job.end_time = None;
    Ok(job)
}

fn retry_policy(field: &str, policy: Option<RetryPolicy>) -> Result<RetryPolicy, Error> {
    let p = policy.unwrap_or_default();
    let initial = duration(&format!("{field}.initial_backoff"), &p.initial_backoff)?
        .unwrap_or(DEFAULT_INITIAL_BACKOFF);
    let max =
        duration(&format!("{field}.max_backoff"), &p.max_backoff)?.unwrap_or(DEFAULT_MAX_BACKOFF);
    if max < initial {
        return Err(Error::invalid(
            &format!("{field}.max_backoff"),
            "must not be less than initial_backoff",
        ));
    }
    let multiplier = if p.multiplier == 0.0 {
        DEFAULT_MULTIPLIER
    } else {
        p.multiplier
    };
    if !multiplier.is_finite() || !(1.0..=100.0).contains(&multiplier) {
        return Err(Error::invalid(
            &format!("{field}.multiplier"),
            format!("is {multiplier}; it must be between 1 and 100"),
        ));
    }
    Ok(RetryPolicy {
        initial_backoff: prost_types::Duration::try_from(initial).ok(),
        max_backoff: prost_types::Duration::try_from(max).ok(),
        multiplier,
    })
}

#[cfg(test)]
pub(crate) mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: &str) -> Job {
        Job {
            kind: kind.into(),
            ..Default::default()
        }
    }

    fn message(r: Result<Job, Error>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn fills_defaults_and_clears_output_fields() {
        let mut j = job("resize");
        j.id = "forged".into();
        j.state = JobState::Succeeded as i32;
        let j = new_job("job", j, 10).unwrap();
        assert_eq!(j.queue, "default");
        assert_eq!(j.max_attempts, 3);
        assert!(j.id.is_empty());
        assert_eq!(j.state(), JobState::Unspecified);
        let r = j.retry.unwrap();
        assert_eq!(r.multiplier, 2.0);
        assert_eq!(r.initial_backoff.unwrap().seconds, 1);
    }

    #[test]
    fn names_the_field_and_the_limit() {
        assert!(message(new_job("job", job(""), 10)).starts_with("job.kind:"));
        let mut j = job("k");
        j.payload = vec![0; 11];
        let m = message(new_job("jobs[2]", j, 10));
        assert!(
            m.starts_with("jobs[2].payload:") && m.contains("limit is 10 bytes"),
            "{m}"
        );
        let mut j = job("k");
        j.timeout = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert!(message(new_job("job", j, 10)).contains("job.timeout: must not be negative"));
        let mut j = job("k");
        j.shutdown_grace = Some(prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        });
        assert!(
            message(new_job("job", j, 10)).contains("job.shutdown_grace: is"),
            "huge durations are refused"
        );
        let mut j = job("k");
        j.retry = Some(RetryPolicy {
            multiplier: 0.5,
            ..Default::default()
        });
        assert!(message(new_job("job", j, 10)).contains("job.retry.multiplier"));
        let mut j = job("k");
        j.run_time = Some(prost_types::Timestamp {
            seconds: 100,
            nanos: 0,
        });
        j.expire_time = Some(prost_types::Timestamp {
            seconds: 50,
            nanos: 0,
        });
        assert!(message(new_job("job", j, 10)).contains("job.expire_time"));
    }
}
