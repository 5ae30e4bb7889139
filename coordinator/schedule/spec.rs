//! A schedule's spec, checked and ready to compute fire times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::coordinator::error::Error;
use crate::coordinator::schedule::cron::CronSchedule;
use crate::coordinator::validate::duration;
use crate::proto::{schedule_spec, IntervalAnchor, ScheduleSpec};

/// Where an interval is measured from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    /// Fixed rate on a grid.
    Start,
    /// Fixed delay after the previous run ended.
    End,
}

/// An interval spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    /// The period; positive.
    pub every: Duration,
    /// START: the grid's shift. END: the first run's delay (default `every`).
    pub offset: Option<Duration>,
    /// Rate or delay.
    pub anchor: Anchor,
}

impl Interval {
    /// The START grid point `steps` after the last one at or before `t`.
    fn grid_point(&self, t: SystemTime, steps: i128) -> SystemTime {
        let period = self.every.as_nanos() as i128;
        let shift = self.offset.unwrap_or_default().as_nanos() as i128 % period;
        let k = (nanos(t) - shift).div_euclid(period) + steps;
        from_nanos(shift + k * period)
    }
}

/// A checked spec.
#[derive(Clone, Debug)]
pub enum Spec {
    /// A crontab expression in a zone.
    Cron(CronSchedule),
    /// A fixed rate or fixed delay.
    Interval(Interval),
}

fn nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn from_nanos(n: i128) -> SystemTime {
    if n >= 0 {
        UNIX_EPOCH + Duration::new((n / 1_000_000_000) as u64, (n % 1_000_000_000) as u32)
    } else {
        let n = -n;
        UNIX_EPOCH - Duration::new((n / 1_000_000_000) as u64, (n % 1_000_000_000) as u32)
    }
}

impl Spec {
    /// Checks a spec from the wire; `field` prefixes error messages.
    pub fn parse(field: &str, spec: Option<&ScheduleSpec>) -> Result<Spec, Error> {
        let kind = spec.and_then(|s| s.kind.as_ref()).ok_or_else(|| {
            Error::invalid(
                field,
                "is required: set cron {expression, timezone} or interval {every, anchor, offset}",
            )
        })?;
        match kind {
            schedule_spec::Kind::Cron(c) => {
                use crate::coordinator::validate::{self, MAX_CRON_LEN};
                validate::text(
                    &format!("{field}.cron.expression"),
                    &c.expression,
                    MAX_CRON_LEN,
                )?;
                validate::name(&format!("{field}.cron.timezone"), &c.timezone)?;
                let parsed =
                    CronSchedule::parse(&c.expression, &c.timezone).map_err(|e| match e {
                        crate::coordinator::schedule::cron::CronError::TimeZone(_) => {
                            Error::invalid(&format!("{field}.cron.timezone"), e)
                        }
                        _ => Error::invalid(&format!("{field}.cron.expression"), e),
                    })?;
                Ok(Spec::Cron(parsed))
            }
            schedule_spec::Kind::Interval(i) => {
                let every = duration(&format!("{field}.interval.every"), &i.every)?
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        Error::invalid(
                            &format!("{field}.interval.every"),
                            "is required and must be positive",
                        )
                    })?;
                if every < Duration::from_millis(1) {
                    return Err(Error::invalid(
                        &format!("{field}.interval.every"),
                        "must be at least 1ms",
                    ));
                }
                let offset = duration(&format!("{field}.interval.offset"), &i.offset)?;
                let anchor = match IntervalAnchor::try_from(i.anchor) {
                    Ok(IntervalAnchor::Unspecified | IntervalAnchor::Start) => Anchor::Start,
                    Ok(IntervalAnchor::End) => Anchor::End,
                    Err(_) => {
                        return Err(Error::invalid(
                            &format!("{field}.interval.anchor"),
                            format!("{} is not an IntervalAnchor", i.anchor),
                        ))
                    }
                };
                Ok(Spec::Interval(Interval {
                    every,
                    offset,
                    anchor,
                }))
            }
        }
    }

    /// Whether runs are due a fixed delay after the previous run ended.
    pub fn end_anchored(&self) -> bool {
        matches!(
            self,
            Spec::Interval(Interval {
                anchor: Anchor::End,
                ..
            })
        )
    }

    /// The first fire time strictly after `t` (`None` for END-anchored
    /// intervals, whose times depend on when runs end, and for cron
    /// expressions that never match again).
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        match self {
            Spec::Cron(c) => c.next_after(t),
            Spec::Interval(Interval {
                anchor: Anchor::End,
                ..
            }) => None,
            Spec::Interval(i) => Some(i.grid_point(t, 1)),
        }
    }

    /// The last fire time at or before `t` (`None` for END-anchored intervals).
    pub fn last_at_or_before(&self, t: SystemTime) -> Option<SystemTime> {
        match self {
            Spec::Cron(c) => c.last_at_or_before(t),
            Spec::Interval(Interval {
                anchor: Anchor::End,
                ..
            }) => None,
            Spec::Interval(i) => Some(i.grid_point(t, 0)),
        }
    }

    /// When the first run is due for a schedule created (or changed) at `now`.
    pub fn first_run(&self, now: SystemTime) -> Option<SystemTime> {
        match self {
            Spec::Interval(Interval {
                anchor: Anchor::End,
                every,
                offset,
            }) => Some(now + offset.unwrap_or(*every)),
            _ => self.next_after(now),
        }
    }

    /// For END-anchored intervals: when the run after one that ended at `end` is due.
    pub fn after_end(&self, end: SystemTime) -> Option<SystemTime> {
        match self {
            Spec::Interval(Interval {
                anchor: Anchor::End,
                every,
                ..
            }) => Some(end + *every),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CronSpec, IntervalSpec};

    fn interval(every_ms: u64, offset_ms: Option<u64>, anchor: IntervalAnchor) -> ScheduleSpec {
        ScheduleSpec {
            kind: Some(schedule_spec::Kind::Interval(IntervalSpec {
                every: prost_types::Duration::try_from(Duration::from_millis(every_ms)).ok(),
                anchor: anchor as i32,
                offset: offset_ms
                    .and_then(|o| prost_types::Duration::try_from(Duration::from_millis(o)).ok()),
            })),
        }
    }

    fn secs(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn start_anchored_intervals_fire_on_the_shifted_grid() {
        let s = Spec::parse(
            "spec",
            Some(&interval(10_000, Some(3_000), IntervalAnchor::Start)),
        )
        .unwrap();
        assert_eq!(s.next_after(secs(100)), Some(secs(103)));
        assert_eq!(s.next_after(secs(103)), Some(secs(113)), "strictly after");
        assert_eq!(s.next_after(secs(104)), Some(secs(113)));
        assert_eq!(s.first_run(secs(100)), Some(secs(103)));
        assert_eq!(s.last_at_or_before(secs(112)), Some(secs(103)));
        assert_eq!(s.last_at_or_before(secs(113)), Some(secs(113)));
        assert!(!s.end_anchored());
    }

    #[test]
    fn end_anchored_intervals_follow_the_previous_end() {
        let s = Spec::parse("spec", Some(&interval(10_000, None, IntervalAnchor::End))).unwrap();
        assert!(s.end_anchored());
        assert_eq!(s.next_after(secs(100)), None);
        assert_eq!(s.first_run(secs(100)), Some(secs(110)));
        assert_eq!(s.after_end(secs(123)), Some(secs(133)));
        let s = Spec::parse(
            "spec",
            Some(&interval(10_000, Some(0), IntervalAnchor::End)),
        )
        .unwrap();
        assert_eq!(
            s.first_run(secs(100)),
            Some(secs(100)),
            "offset 0: run at once"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let msg = |spec: Option<&ScheduleSpec>| match Spec::parse("schedule.spec", spec) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        };
        assert!(msg(None).starts_with("schedule.spec: is required"));
        assert!(msg(Some(&interval(0, None, IntervalAnchor::Start)))
            .starts_with("schedule.spec.interval.every"));
        let cron = |e: &str, tz: &str| ScheduleSpec {
            kind: Some(schedule_spec::Kind::Cron(CronSpec {
                expression: e.into(),
                timezone: tz.into(),
            })),
        };
        let m = msg(Some(&cron("61 * * * *", "")));
        assert!(
            m.starts_with("schedule.spec.cron.expression: \"61 * * * *\": minute 61"),
            "{m}"
        );
        let m = msg(Some(&cron("* * * * *", "Nowhere/City")));
        assert!(
            m.starts_with("schedule.spec.cron.timezone: unknown time zone \"Nowhere/City\""),
            "{m}"
        );
    }
}
