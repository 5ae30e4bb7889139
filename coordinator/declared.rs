//! Schedules declared in the coordinator's config file (`[[schedules]]`), the
//! same fields as the API, in TOML:
//!
//! ```toml
//! [[schedules]]
//! name = "nightly-report"
//! overlap = "skip"              # skip | allow | buffer_one
//! misfire = "run_once"          # run_once | run_all | skip
//! catchup_window = "6h"
//! job = { kind = "report", queue = "default", payload = "full" }
//! spec.cron = { expression = "0 3 * * *", timezone = "Europe/Berlin" }
//!
//! [[schedules]]
//! name = "sync"
//! job = { kind = "sync" }
//! spec.interval = { every = "10m", anchor = "end" }
//! ```
//!
//! They are created at start-up, or updated when their definition changed;
//! schedules created through the API are left alone.

use std::collections::HashMap;

use serde::Deserialize;

use crate::proto::{
    schedule_spec, CronSpec, IntervalAnchor, IntervalSpec, Job, MisfirePolicy, OverlapPolicy,
    RetryPolicy, Schedule, ScheduleSpec,
};
use crate::units::parse_duration;

/// A declared schedule as written in the file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeclaredSchedule {
    name: String,
    job: DeclaredJob,
    spec: DeclaredSpec,
    overlap: Option<String>,
    misfire: Option<String>,
    catchup_window: Option<String>,
    #[serde(default)]
    paused: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DeclaredJob {
    kind: String,
    queue: Option<String>,
    /// UTF-8 text.
    payload: Option<String>,
    priority: Option<i32>,
    max_attempts: Option<u32>,
    timeout: Option<String>,
    shutdown_grace: Option<String>,
    retry: Option<DeclaredRetry>,
    #[serde(default)]
    labels: HashMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DeclaredRetry {
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
    multiplier: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DeclaredSpec {
    cron: Option<DeclaredCron>,
    interval: Option<DeclaredInterval>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DeclaredCron {
    expression: String,
    #[serde(default)]
    timezone: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DeclaredInterval {
    every: String,
    anchor: Option<String>,
    offset: Option<String>,
}

fn duration(field: &str, v: &Option<String>) -> Result<Option<prost_types::Duration>, String> {
    v.as_deref()
        .map(|s| {
            let d = parse_duration(s).map_err(|e| format!("{field}: {e}"))?;
            prost_types::Duration::try_from(d).map_err(|e| format!("{field}: {e}"))
        })
        .transpose()
}

/// Reads an enum value written as `skip`, `SKIP` or `OVERLAP_POLICY_SKIP`.
fn enum_value(
    field: &str,
    prefix: &str,
    v: &Option<String>,
    parse: impl Fn(&str) -> Option<i32>,
) -> Result<i32, String> {
    let Some(text) = v else { return Ok(0) };
    let upper = text.trim().to_ascii_uppercase();
    let full = if upper.starts_with(prefix) {
        upper
    } else {
        format!("{prefix}{upper}")
    };
    parse(&full).ok_or_else(|| format!("{field}: {text:?} is not one of the allowed values"))
}

impl DeclaredSchedule {
    /// The schedule as the API would receive it; `field` names it in errors.
    pub fn to_proto(&self, field: &str) -> Result<Schedule, String> {
        let f = |n: &str| format!("{field}.{n}");
        let j = &self.job;
        let job = Job {
            kind: j.kind.clone(),
            queue: j.queue.clone().unwrap_or_default(),
            payload: j.payload.clone().unwrap_or_default().into_bytes(),
            priority: j.priority.unwrap_or_default(),
            max_attempts: j.max_attempts.unwrap_or_default(),
            timeout: duration(&f("job.timeout"), &j.timeout)?,
            shutdown_grace: duration(&f("job.shutdown_grace"), &j.shutdown_grace)?,
            retry: j
                .retry
                .as_ref()
                .map(|r| {
                    Ok::<_, String>(RetryPolicy {
                        initial_backoff: duration(
                            &f("job.retry.initial_backoff"),
                            &r.initial_backoff,
                        )?,
                        max_backoff: duration(&f("job.retry.max_backoff"), &r.max_backoff)?,
                        multiplier: r.multiplier.unwrap_or_default(),
                    })
                })
                .transpose()?,
            labels: j.labels.clone(),
            ..Default::default()
        };
        let kind = match (&self.spec.cron, &self.spec.interval) {
            (Some(c), None) => schedule_spec::Kind::Cron(CronSpec {
                expression: c.expression.clone(),
                timezone: c.timezone.clone(),
            }),
            (None, Some(i)) => schedule_spec::Kind::Interval(IntervalSpec {
                every: duration(&f("spec.interval.every"), &Some(i.every.clone()))?,
                anchor: enum_value(
                    &f("spec.interval.anchor"),
                    "INTERVAL_ANCHOR_",
                    &i.anchor,
                    |s| IntervalAnchor::from_str_name(s).map(|v| v as i32),
                )?,
                offset: duration(&f("spec.interval.offset"), &i.offset)?,
            }),
            _ => {
                return Err(format!(
                    "{}: set exactly one of spec.cron or spec.interval",
                    f("spec")
                ))
            }
        };
        Ok(Schedule {
            name: self.name.clone(),
            job: Some(job),
            spec: Some(ScheduleSpec { kind: Some(kind) }),
            overlap: enum_value(&f("overlap"), "OVERLAP_POLICY_", &self.overlap, |s| {
                OverlapPolicy::from_str_name(s).map(|v| v as i32)
            })?,
            misfire: enum_value(&f("misfire"), "MISFIRE_POLICY_", &self.misfire, |s| {
                MisfirePolicy::from_str_name(s).map(|v| v as i32)
            })?,
            catchup_window: duration(&f("catchup_window"), &self.catchup_window)?,
            paused: self.paused,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        schedules: Vec<DeclaredSchedule>,
    }

    #[test]
    fn reads_both_spec_kinds_and_policy_names() {
        let file: File = toml::from_str(
            r#"
            [[schedules]]
            name = "nightly"
            overlap = "buffer_one"
            misfire = "MISFIRE_POLICY_RUN_ALL"
            catchup_window = "6h"
            job = { kind = "report", payload = "full", labels = { team = "a" } }
            spec.cron = { expression = "0 3 * * *", timezone = "Europe/Berlin" }

            [[schedules]]
            name = "sync"
            job = { kind = "sync" }
            spec.interval = { every = "10m", anchor = "end" }
            "#,
        )
        .unwrap();
        let nightly = file.schedules[0].to_proto("schedules[0]").unwrap();
        assert_eq!(nightly.overlap(), OverlapPolicy::BufferOne);
        assert_eq!(nightly.misfire(), MisfirePolicy::RunAll);
        assert_eq!(nightly.catchup_window.unwrap().seconds, 6 * 3600);
        assert_eq!(nightly.job.as_ref().unwrap().payload, b"full");
        let sync = file.schedules[1].to_proto("schedules[1]").unwrap();
        let Some(schedule_spec::Kind::Interval(i)) = sync.spec.unwrap().kind else {
            panic!()
        };
        assert_eq!(
            (i.every.unwrap().seconds, i.anchor),
            (600, IntervalAnchor::End as i32)
        );
    }

    #[test]
    fn errors_name_the_schedule_and_field() {
        let file: File = toml::from_str(
            "[[schedules]]\nname = \"x\"\noverlap = \"sometimes\"\njob = { kind = \"k\" }\nspec.interval = { every = \"1m\" }\n",
        )
        .unwrap();
        let err = file.schedules[0].to_proto("schedules[0]").unwrap_err();
        assert!(
            err.starts_with("schedules[0].overlap: \"sometimes\""),
            "{err}"
        );
        let err = toml::from_str::<File>(
            "[[schedules]]\nname = \"x\"\njob = { kind = \"k\" }\nspec = {}\nwhen = 1\n",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("when"), "{err}");
    }
}
