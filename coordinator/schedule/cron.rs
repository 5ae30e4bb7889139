//! Crontab expressions with their standard meaning, in any IANA time zone.
//!
//! Accepted: 5 fields (`m h dom mon dow`), 6 fields with seconds first, and the
//! macros `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily`
//! (`@midnight`) and `@hourly`. Fields take numbers, names (`jan`, `mon`),
//! ranges, lists and steps (`*/15`, `1-5/2`, `10/20`); weekdays run 0–7 with 0
//! and 7 both Sunday. When day-of-month and day-of-week are both restricted
//! (neither is a plain `*`; `*/2` restricts), a day matching either fires — the classic cron
//! rule.
//!
//! Each field is parsed here, so errors name the field and the bad value; the
//! `cron` crate then walks the matching local times directly (never minute by
//! minute). Fire times are computed on the local wall clock and then placed on
//! the time line: a local time skipped by a DST jump fires once, at the first
//! instant after the gap; a local time repeated by a DST fall-back fires once,
//! at its first occurrence.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::SystemTime;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// Why an expression or zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// The expression does not parse; the message says where.
    #[error("{expression:?}: {problem}")]
    Expression {
        /// The expression as given.
        expression: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The zone is not an IANA time zone name.
    #[error("unknown time zone {0:?} (use an IANA name like \"Europe/Berlin\" or \"UTC\")")]
    TimeZone(String),
}

/// One crontab field's rules.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// The value of `names[0]`.
    first_name: u32,
}

const SECOND: Field = Field {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
    first_name: 0,
};
const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    first_name: 0,
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    first_name: 0,
};
const DAY_OF_MONTH: Field = Field {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
    first_name: 0,
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
    first_name: 1,
};
const DAY_OF_WEEK: Field = Field {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    first_name: 0,
};

/// A parsed field: its values, and whether it was a plain `*` (unrestricted).
struct Parsed {
    values: BTreeSet<u32>,
    star: bool,
}

impl Field {
    fn value(&self, s: &str) -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(self.first_name + i as u32);
        }
        let v: u32 = s.parse().map_err(|_| {
            if self.names.is_empty() {
                format!("{} {s:?} is not a number", self.name)
            } else {
                format!(
                    "{} {s:?} is not a number or a name like {:?}",
                    self.name, self.names[0]
                )
            }
        })?;
        if v < self.min || v > self.max {
            return Err(format!(
                "{} {v} is out of range {}-{}",
                self.name, self.min, self.max
            ));
        }
        Ok(v)
    }

    fn parse(&self, text: &str) -> Result<Parsed, String> {
        let mut values = BTreeSet::new();
        for item in text.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        format!("{} step {s:?} is not a positive number", self.name)
                    })?;
                    (r, Some(step))
                }
                None => (item, None),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!("{} range {range:?} runs backwards", self.name));
                }
                (a, b)
            } else if range.is_empty() {
                return Err(format!("{} has an empty item in {text:?}", self.name));
            } else {
                let a = self.value(range)?;
                // `a/n` means from a to the end, every n.
                (a, if step.is_some() { self.max } else { a })
            };
            values.extend((lo..=hi).step_by(step.unwrap_or(1) as usize));
        }
        Ok(Parsed {
            values,
            star: text == "*",
        })
    }
}

/// Renders values for the `cron` crate: `*` when every value is present.
fn render(values: &BTreeSet<u32>, min: u32, max: u32) -> String {
    if values.len() as u32 == max - min + 1 {
        return "*".into();
    }
    values
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A crontab schedule in a time zone.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    /// One schedule, or two whose union is the classic day rule.
    parts: Vec<cron::Schedule>,
    /// The zone whose wall clock the fields describe.
    tz: Tz,
}

fn expand_macro(expression: &str) -> Option<&'static str> {
    Some(match expression.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => return None,
    })
}

/// Parses an IANA zone name; empty means UTC.
pub fn parse_time_zone(name: &str) -> Result<Tz, CronError> {
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(name).map_err(|_| CronError::TimeZone(name.to_string()))
}

impl CronSchedule {
    /// Parses `expression` for the zone named `timezone` (empty: UTC).
    pub fn parse(expression: &str, timezone: &str) -> Result<CronSchedule, CronError> {
        let tz = parse_time_zone(timezone)?;
        let fail = |problem: String| CronError::Expression {
            expression: expression.to_string(),
            problem,
        };
        let text = expression.trim();
        let text = if text.starts_with('@') {
            expand_macro(text).ok_or_else(|| {
                fail("unknown macro (use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly)".into())
            })?
        } else {
            text
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        let (second, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(fail(format!(
                    "has {n} fields; expected 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
                )))
            }
        };
        let second = SECOND.parse(second).map_err(&fail)?;
        let minute = MINUTE.parse(rest[0]).map_err(&fail)?;
        let hour = HOUR.parse(rest[1]).map_err(&fail)?;
        let dom = DAY_OF_MONTH.parse(rest[2]).map_err(&fail)?;
        let month = MONTH.parse(rest[3]).map_err(&fail)?;
        let mut dow = DAY_OF_WEEK.parse(rest[4]).map_err(&fail)?;
        if dow.values.remove(&7) {
            dow.values.insert(0);
        }
        let head = format!(
            "{} {} {}",
            render(&second.values, 0, 59),
            render(&minute.values, 0, 59),
            render(&hour.values, 0, 23)
        );
        let month_text = render(&month.values, 1, 12);
        // The cron crate numbers weekdays 1-7 from Sunday; names avoid the question.
        let dow_text = if dow.values.len() == 7 {
            "*".to_string()
        } else {
            dow.values
                .iter()
                .map(|d| DAY_OF_WEEK.names[*d as usize].to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join(",")
        };
        let dom_text = render(&dom.values, 1, 31);
        let specs = if !dom.star && !dow.star {
            vec![
                format!("{head} {dom_text} {month_text} *"),
                format!("{head} * {month_text} {dow_text}"),
            ]
        } else {
            vec![format!("{head} {dom_text} {month_text} {dow_text}")]
        };
        let parts = specs
            .iter()
            .map(|s| cron::Schedule::from_str(s).map_err(|e| fail(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CronSchedule { parts, tz })
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        let after: DateTime<Utc> = t.into();
        let local = after.with_timezone(&self.tz).naive_local();
        // Local wall-clock times, walked as if they were UTC (the crate's zone
        // handling is not ours to rely on).
        let wall = Utc.from_utc_datetime(&local);
        let mut iters: Vec<_> = self
            .parts
            .iter()
            .map(|p| p.after(&wall).peekable())
            .collect();
        loop {
            let (i, next) = iters
                .iter_mut()
                .enumerate()
                .filter_map(|(i, it)| it.peek().map(|n| (i, *n)))
                .min_by_key(|(_, n)| *n)?;
            iters[i].next();
            let instant = self.place(next.naive_utc());
            // In a repeated hour, wall times after `t`'s can map to instants
            // before it (their first occurrence): those already passed.
            if instant > after {
                return Some(instant.into());
            }
        }
    }

    /// The last fire time at or before `t`.
    pub fn last_at_or_before(&self, t: SystemTime) -> Option<SystemTime> {
        let at: DateTime<Utc> = t.into();
        let local = at.with_timezone(&self.tz).naive_local();
        // Fire times are whole seconds: the latest before the next second is at or before `t`.
        let wall = Utc.from_utc_datetime(&local).with_nanosecond(0)? + chrono::Duration::seconds(1);
        self.parts
            .iter()
            .filter_map(|p| p.after(&wall).next_back())
            .map(|prev| self.place(prev.naive_utc()))
            .filter(|placed| *placed <= at)
            .max()
            .map(Into::into)
    }

    /// Puts a local wall-clock time on the time line.
    fn place(&self, local: NaiveDateTime) -> DateTime<Utc> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            LocalResult::None => {
                // Skipped by a DST jump: the first instant whose wall clock is
                // past `local` is the end of the gap. Zone offsets stay within
                // ±26 hours, so the answer is in this window.
                // Transitions fall on whole seconds, so the search is exact.
                let wall = local.and_utc().timestamp();
                let (mut lo, mut hi) = (wall - 26 * 3600, wall + 26 * 3600);
                let past = |s: i64| {
                    Utc.timestamp_opt(s, 0)
                        .single()
                        .is_some_and(|t| t.with_timezone(&self.tz).naive_local() >= local)
                };
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if past(mid) {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                Utc.timestamp_opt(hi, 0)
                    .single()
                    .unwrap_or_else(|| Utc.from_utc_datetime(&local))
            }
        }
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&Utc)
            .into()
    }

    fn fmt(t: SystemTime) -> String {
        DateTime::<Utc>::from(t)
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    }

    fn times(expr: &str, tz: &str, after: &str, n: usize) -> Vec<String> {
        let s = CronSchedule::parse(expr, tz).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let mut t = at(after);
        (0..n)
            .map(|_| {
                t = s.next_after(t).expect("a next time");
                fmt(t)
            })
            .collect()
    }

    /// Expected times from an independent implementation (Python's croniter,
    /// which has the classic day-of-month/day-of-week rule and Sunday as 0 or 7;
    /// its 6-field form puts seconds last, so those were translated), after
    /// 2026-01-01T00:00:00Z in UTC.
    #[test]
    fn fire_times_match_an_independent_implementation_in_utc() {
        let table: &[(&str, &[&str])] = &[
            (
                "*/15 * * * *",
                &[
                    "2026-01-01T00:15:00Z",
                    "2026-01-01T00:30:00Z",
                    "2026-01-01T00:45:00Z",
                    "2026-01-01T01:00:00Z",
                    "2026-01-01T01:15:00Z",
                    "2026-01-01T01:30:00Z",
                ],
            ),
            (
                "0 9 * * 1-5",
                &[
                    "2026-01-01T09:00:00Z",
                    "2026-01-02T09:00:00Z",
                    "2026-01-05T09:00:00Z",
                    "2026-01-06T09:00:00Z",
                    "2026-01-07T09:00:00Z",
                    "2026-01-08T09:00:00Z",
                ],
            ),
            (
                "30 2 1 * *",
                &[
                    "2026-01-01T02:30:00Z",
                    "2026-02-01T02:30:00Z",
                    "2026-03-01T02:30:00Z",
                    "2026-04-01T02:30:00Z",
                    "2026-05-01T02:30:00Z",
                    "2026-06-01T02:30:00Z",
                ],
            ),
            (
                "0 0 * * 0",
                &[
                    "2026-01-04T00:00:00Z",
                    "2026-01-11T00:00:00Z",
                    "2026-01-18T00:00:00Z",
                    "2026-01-25T00:00:00Z",
                    "2026-02-01T00:00:00Z",
                    "2026-02-08T00:00:00Z",
                ],
            ),
            (
                "0 0 * * 7",
                &[
                    "2026-01-04T00:00:00Z",
                    "2026-01-11T00:00:00Z",
                    "2026-01-18T00:00:00Z",
                    "2026-01-25T00:00:00Z",
                    "2026-02-01T00:00:00Z",
                    "2026-02-08T00:00:00Z",
                ],
            ),
            (
                "0 12 * jan,jul mon",
                &[
                    "2026-01-05T12:00:00Z",
                    "2026-01-12T12:00:00Z",
                    "2026-01-19T12:00:00Z",
                    "2026-01-26T12:00:00Z",
                    "2026-07-06T12:00:00Z",
                    "2026-07-13T12:00:00Z",
                ],
            ),
            (
                "0 0 13 * 5",
                &[
                    "2026-01-02T00:00:00Z",
                    "2026-01-09T00:00:00Z",
                    "2026-01-13T00:00:00Z",
                    "2026-01-16T00:00:00Z",
                    "2026-01-23T00:00:00Z",
                    "2026-01-30T00:00:00Z",
                ],
            ),
            (
                "5 4 * * sun",
                &[
                    "2026-01-04T04:05:00Z",
                    "2026-01-11T04:05:00Z",
                    "2026-01-18T04:05:00Z",
                    "2026-01-25T04:05:00Z",
                    "2026-02-01T04:05:00Z",
                    "2026-02-08T04:05:00Z",
                ],
            ),
            (
                "0 0 29 2 *",
                &[
                    "2028-02-29T00:00:00Z",
                    "2032-02-29T00:00:00Z",
                    "2036-02-29T00:00:00Z",
                    "2040-02-29T00:00:00Z",
                    "2044-02-29T00:00:00Z",
                    "2048-02-29T00:00:00Z",
                ],
            ),
            (
                "0 */6 * * *",
                &[
                    "2026-01-01T06:00:00Z",
                    "2026-01-01T12:00:00Z",
                    "2026-01-01T18:00:00Z",
                    "2026-01-02T00:00:00Z",
                    "2026-01-02T06:00:00Z",
                    "2026-01-02T12:00:00Z",
                ],
            ),
            (
                "10/20 * * * *",
                &[
                    "2026-01-01T00:10:00Z",
                    "2026-01-01T00:30:00Z",
                    "2026-01-01T00:50:00Z",
                    "2026-01-01T01:10:00Z",
                    "2026-01-01T01:30:00Z",
                    "2026-01-01T01:50:00Z",
                ],
            ),
            (
                "0 0 1-7 * 1",
                &[
                    "2026-01-02T00:00:00Z",
                    "2026-01-03T00:00:00Z",
                    "2026-01-04T00:00:00Z",
                    "2026-01-05T00:00:00Z",
                    "2026-01-06T00:00:00Z",
                    "2026-01-07T00:00:00Z",
                ],
            ),
            (
                "23 0-20/2 * * *",
                &[
                    "2026-01-01T00:23:00Z",
                    "2026-01-01T02:23:00Z",
                    "2026-01-01T04:23:00Z",
                    "2026-01-01T06:23:00Z",
                    "2026-01-01T08:23:00Z",
                    "2026-01-01T10:23:00Z",
                ],
            ),
            (
                "15 10 * * mon-wed,sat",
                &[
                    "2026-01-03T10:15:00Z",
                    "2026-01-05T10:15:00Z",
                    "2026-01-06T10:15:00Z",
                    "2026-01-07T10:15:00Z",
                    "2026-01-10T10:15:00Z",
                    "2026-01-12T10:15:00Z",
                ],
            ),
            (
                "0 0 */10 * *",
                &[
                    "2026-01-11T00:00:00Z",
                    "2026-01-21T00:00:00Z",
                    "2026-01-31T00:00:00Z",
                    "2026-02-01T00:00:00Z",
                    "2026-02-11T00:00:00Z",
                    "2026-02-21T00:00:00Z",
                ],
            ),
            (
                "0 8 * * 6-7",
                &[
                    "2026-01-03T08:00:00Z",
                    "2026-01-04T08:00:00Z",
                    "2026-01-10T08:00:00Z",
                    "2026-01-11T08:00:00Z",
                    "2026-01-17T08:00:00Z",
                    "2026-01-18T08:00:00Z",
                ],
            ),
            (
                "@hourly",
                &[
                    "2026-01-01T01:00:00Z",
                    "2026-01-01T02:00:00Z",
                    "2026-01-01T03:00:00Z",
                    "2026-01-01T04:00:00Z",
                    "2026-01-01T05:00:00Z",
                    "2026-01-01T06:00:00Z",
                ],
            ),
            (
                "@daily",
                &[
                    "2026-01-02T00:00:00Z",
                    "2026-01-03T00:00:00Z",
                    "2026-01-04T00:00:00Z",
                    "2026-01-05T00:00:00Z",
                    "2026-01-06T00:00:00Z",
                    "2026-01-07T00:00:00Z",
                ],
            ),
            (
                "@weekly",
                &[
                    "2026-01-04T00:00:00Z",
                    "2026-01-11T00:00:00Z",
                    "2026-01-18T00:00:00Z",
                    "2026-01-25T00:00:00Z",
                    "2026-02-01T00:00:00Z",
                    "2026-02-08T00:00:00Z",
                ],
            ),
            (
                "@monthly",
                &[
                    "2026-02-01T00:00:00Z",
                    "2026-03-01T00:00:00Z",
                    "2026-04-01T00:00:00Z",
                    "2026-05-01T00:00:00Z",
                    "2026-06-01T00:00:00Z",
                    "2026-07-01T00:00:00Z",
                ],
            ),
            (
                "@yearly",
                &[
                    "2027-01-01T00:00:00Z",
                    "2028-01-01T00:00:00Z",
                    "2029-01-01T00:00:00Z",
                    "2030-01-01T00:00:00Z",
                    "2031-01-01T00:00:00Z",
                    "2032-01-01T00:00:00Z",
                ],
            ),
            (
                "*/10 * * * * *",
                &[
                    "2026-01-01T00:00:10Z",
                    "2026-01-01T00:00:20Z",
                    "2026-01-01T00:00:30Z",
                    "2026-01-01T00:00:40Z",
                    "2026-01-01T00:00:50Z",
                    "2026-01-01T00:01:00Z",
                ],
            ),
            (
                "30 0 12 * * 1",
                &[
                    "2026-01-05T12:00:30Z",
                    "2026-01-12T12:00:30Z",
                    "2026-01-19T12:00:30Z",
                    "2026-01-26T12:00:30Z",
                    "2026-02-02T12:00:30Z",
                    "2026-02-09T12:00:30Z",
                ],
            ),
            // A stepped `*/n` restricts its field: the classic either-day rule applies.
            (
                "0 0 */10 * mon",
                &[
                    "2026-01-05T00:00:00Z",
                    "2026-01-11T00:00:00Z",
                    "2026-01-12T00:00:00Z",
                    "2026-01-19T00:00:00Z",
                    "2026-01-21T00:00:00Z",
                    "2026-01-26T00:00:00Z",
                ],
            ),
            (
                "0 6 1,15 * */3",
                &[
                    "2026-01-01T06:00:00Z",
                    "2026-01-03T06:00:00Z",
                    "2026-01-04T06:00:00Z",
                    "2026-01-07T06:00:00Z",
                    "2026-01-10T06:00:00Z",
                    "2026-01-11T06:00:00Z",
                ],
            ),
        ];
        for (expr, expected) in table {
            assert_eq!(
                times(expr, "UTC", "2026-01-01T00:00:00Z", 6),
                *expected,
                "{expr}"
            );
        }
    }

    /// Daylight-saving changes, worked out by hand from the zones' rules:
    /// Berlin jumps 02:00 CET -> 03:00 CEST on 2026-03-29 (01:00Z) and falls back
    /// 03:00 CEST -> 02:00 CET on 2026-10-25 (01:00Z); New York jumps 02:00 EST ->
    /// 03:00 EDT on 2026-03-08 (07:00Z) and falls back 02:00 EDT -> 01:00 EST on
    /// 2026-11-01 (06:00Z).
    #[test]
    fn skipped_times_fire_after_the_gap_and_repeated_times_fire_once() {
        let cases: &[(&str, &str, &str, &[&str])] = &[
            // 02:30 does not exist on 29 March: fires at 03:00 CEST, once.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-03-28T00:00:00Z",
                &[
                    "2026-03-28T01:30:00Z",
                    "2026-03-29T01:00:00Z",
                    "2026-03-30T00:30:00Z",
                ],
            ),
            // 02:30 happens twice on 25 October: fires at the first (CEST).
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-10-24T00:00:00Z",
                &[
                    "2026-10-24T00:30:00Z",
                    "2026-10-25T00:30:00Z",
                    "2026-10-26T01:30:00Z",
                ],
            ),
            // Midnight is never skipped; its offset changes.
            (
                "0 0 * * *",
                "Europe/Berlin",
                "2026-03-28T12:00:00Z",
                &["2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z"],
            ),
            // Hourly across the fall-back: 01:00 local fires once (EDT).
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01T03:30:00Z",
                &[
                    "2026-11-01T04:00:00Z",
                    "2026-11-01T05:00:00Z",
                    "2026-11-01T07:00:00Z",
                    "2026-11-01T08:00:00Z",
                ],
            ),
            // Every 30 minutes across the jump: 02:00 and 02:30 collapse into 03:00 EDT.
            (
                "*/30 * * * *",
                "America/New_York",
                "2026-03-08T06:00:00Z",
                &[
                    "2026-03-08T06:30:00Z",
                    "2026-03-08T07:00:00Z",
                    "2026-03-08T07:30:00Z",
                    "2026-03-08T08:00:00Z",
                ],
            ),
            // Weekdays at 09:00 local: 14:00Z before the jump, 13:00Z after.
            (
                "0 9 * * mon-fri",
                "America/New_York",
                "2026-03-06T00:00:00Z",
                &[
                    "2026-03-06T14:00:00Z",
                    "2026-03-09T13:00:00Z",
                    "2026-03-10T13:00:00Z",
                ],
            ),
            // Asked from inside the second pass of the repeated hour (01:10 EST):
            // 01:20 and 01:40 already fired in the first pass.
            (
                "*/20 * * * *",
                "America/New_York",
                "2026-11-01T06:10:00Z",
                &["2026-11-01T07:00:00Z", "2026-11-01T07:20:00Z"],
            ),
            // Seconds field and a zone: 6 fields, seconds first.
            (
                "15 30 2 * * *",
                "Europe/Berlin",
                "2026-03-28T12:00:00Z",
                &["2026-03-29T01:00:00Z", "2026-03-30T00:30:15Z"],
            ),
        ];
        for (expr, tz, after, expected) in cases {
            assert_eq!(
                times(expr, tz, after, expected.len()),
                *expected,
                "{expr} in {tz} after {after}"
            );
        }
    }

    #[test]
    fn errors_name_the_expression_and_the_problem() {
        let err = |expr: &str| CronSchedule::parse(expr, "UTC").unwrap_err().to_string();
        assert!(
            err("61 * * * *").contains("minute 61 is out of range 0-59"),
            "{}",
            err("61 * * * *")
        );
        assert!(err("* * * *").contains("has 4 fields"));
        assert!(err("0 0 * * 8").contains("day-of-week 8 is out of range 0-7"));
        assert!(err("0 0 * foo *").contains("month \"foo\""));
        assert!(err("*/0 * * * *").contains("step"));
        assert!(err("5-1 * * * *").contains("backwards"));
        assert!(err("@fortnightly").contains("unknown macro"));
        assert!(
            err("61 * * * *").starts_with("\"61 * * * *\""),
            "names the expression"
        );
        let tz = CronSchedule::parse("* * * * *", "Mars/Olympus").unwrap_err();
        assert_eq!(tz, CronError::TimeZone("Mars/Olympus".into()));
    }

    #[test]
    fn last_at_or_before_walks_back() {
        let s = CronSchedule::parse("*/15 * * * *", "UTC").unwrap();
        assert_eq!(
            fmt(s.last_at_or_before(at("2026-01-01T10:20:00Z")).unwrap()),
            "2026-01-01T10:15:00Z"
        );
        assert_eq!(
            fmt(s.last_at_or_before(at("2026-01-01T10:15:00Z")).unwrap()),
            "2026-01-01T10:15:00Z"
        );
        let s = CronSchedule::parse("0 0 13 * 5", "UTC").unwrap();
        // Tuesday 2026-01-13 matches the day of month; the Friday before is the 9th.
        assert_eq!(
            fmt(s.last_at_or_before(at("2026-01-14T00:00:00Z")).unwrap()),
            "2026-01-13T00:00:00Z"
        );
        assert_eq!(
            fmt(s.last_at_or_before(at("2026-01-12T00:00:00Z")).unwrap()),
            "2026-01-09T00:00:00Z"
        );
        let s = CronSchedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            fmt(s.last_at_or_before(at("2026-03-29T05:00:00Z")).unwrap()),
            "2026-03-29T01:00:00Z"
        );
    }

    #[test]
    fn an_impossible_date_never_fires() {
        let s = CronSchedule::parse("0 0 30 2 *", "UTC").unwrap();
        assert_eq!(s.next_after(at("2026-01-01T00:00:00Z")), None);
    }
}
