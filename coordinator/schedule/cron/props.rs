//! Property tests of the crontab translator: no input makes it panic, errors
//! name the expression or the zone, and for generated valid crontabs the fire
//! times agree with a brute-force walk of the clock, one minute (or second)
//! at a time, over a bounded window, in UTC and in zones with DST changes.
//!
//! The brute force shares nothing with the translator: the generator keeps
//! each field's value set as it builds the text, and the walk applies the
//! documented rules directly (classic day-of-month/day-of-week either-rule
//! when both are restricted; a local time skipped by a DST jump fires at the
//! first instant after it; a repeated local time fires at its first
//! occurrence).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Datelike, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use proptest::prelude::*;

use super::CronSchedule;
use crate::coordinator::error::Error;
use crate::coordinator::schedule::spec::Spec;
use crate::proto::{schedule_spec, CronSpec, ScheduleSpec};

/// One comma-separated item of a field.
#[derive(Clone, Debug)]
enum Item {
    /// `*` or `*/step`.
    Star(Option<u32>),
    /// `v` or `v/step` (from v to the end).
    One(u32, Option<u32>),
    /// `a-b` or `a-b/step`.
    Range(u32, u32, Option<u32>),
}

/// A field's bounds and names, for generating it.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    min: u32,
    max: u32,
    /// Names for `first_name..`, used for some numbers.
    names: &'static [&'static str],
    first_name: u32,
}

const SECOND: Bounds = Bounds {
    min: 0,
    max: 59,
    names: &[],
    first_name: 0,
};
const MINUTE: Bounds = SECOND;
const HOUR: Bounds = Bounds {
    min: 0,
    max: 23,
    names: &[],
    first_name: 0,
};
const DOM: Bounds = Bounds {
    min: 1,
    max: 31,
    names: &[],
    first_name: 0,
};
const MONTH: Bounds = Bounds {
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
    first_name: 1,
};
const DOW: Bounds = Bounds {
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    first_name: 0,
};

/// A generated field: its text and the values it stands for.
#[derive(Clone, Debug)]
struct Field {
    text: String,
    values: BTreeSet<u32>,
    /// The field is a plain `*`.
    star: bool,
}

fn step() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![3 => Just(None), 2 => (1u32..=70).prop_map(Some)]
}

fn item(b: Bounds) -> impl Strategy<Value = Item> {
    prop_oneof![
        1 => step().prop_map(Item::Star),
        3 => (b.min..=b.max, step()).prop_map(|(v, s)| Item::One(v, s)),
        2 => (b.min..=b.max)
            .prop_flat_map(move |a| (Just(a), a..=b.max, step()))
            .prop_map(|(a, z, s)| Item::Range(a, z, s)),
    ]
}

fn field(b: Bounds) -> impl Strategy<Value = Field> {
    // A plain `*` often, so that the day rule's both sides get exercised.
    let items = prop_oneof![
        1 => Just(vec![Item::Star(None)]),
        3 => prop::collection::vec(item(b), 1..4),
    ];
    (items, prop::collection::vec(any::<bool>(), 8)).prop_map(move |(items, named)| {
        let number = |v: u32, i: usize| -> String {
            let name = v
                .checked_sub(b.first_name)
                .and_then(|k| b.names.get(k as usize));
            match name {
                Some(n) if named[i % named.len()] => {
                    if i.is_multiple_of(2) {
                        n.to_string()
                    } else {
                        n.to_ascii_uppercase()
                    }
                }
                _ => v.to_string(),
            }
        };
        let mut values = BTreeSet::new();
        let mut parts = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let with_step = |s: Option<u32>| s.map(|s| format!("/{s}")).unwrap_or_default();
            let (lo, hi, s, text) = match *item {
                Item::Star(s) => (b.min, b.max, s, format!("*{}", with_step(s))),
                Item::One(v, None) => (v, v, None, number(v, i)),
                Item::One(v, Some(s)) => (v, b.max, Some(s), format!("{}/{s}", number(v, i))),
                Item::Range(a, z, s) => (
                    a,
                    z,
                    s,
                    format!("{}-{}{}", number(a, i), number(z, i + 1), with_step(s)),
                ),
            };
            values.extend((lo..=hi).step_by(s.unwrap_or(1) as usize));
            parts.push(text);
        }
        let text = parts.join(",");
        Field {
            star: text == "*",
            text,
            values,
        }
    })
}

/// A generated 5-field crontab, or 6 with seconds first.
#[derive(Clone, Debug)]
struct Crontab {
    second: Option<Field>,
    minute: Field,
    hour: Field,
    dom: Field,
    month: Field,
    dow: Field,
}

impl Crontab {
    fn text(&self) -> String {
        let mut fields = Vec::new();
        if let Some(s) = &self.second {
            fields.push(s.text.as_str());
        }
        fields.extend([
            self.minute.text.as_str(),
            self.hour.text.as_str(),
            self.dom.text.as_str(),
            self.month.text.as_str(),
            self.dow.text.as_str(),
        ]);
        fields.join(" ")
    }

    /// Whether a local wall-clock time matches, by the documented rules.
    fn matches(&self, t: &NaiveDateTime) -> bool {
        let second_ok = match &self.second {
            Some(s) => s.values.contains(&t.second()),
            None => t.second() == 0,
        };
        let weekday = t.weekday().num_days_from_sunday();
        let dow =
            self.dow.values.contains(&weekday) || (weekday == 0 && self.dow.values.contains(&7));
        let dom = self.dom.values.contains(&t.day());
        let day_ok = if self.dom.star || self.dow.star {
            dom && dow
        } else {
            dom || dow
        };
        second_ok
            && self.minute.values.contains(&t.minute())
            && self.hour.values.contains(&t.hour())
            && self.month.values.contains(&t.month())
            && day_ok
    }
}

fn crontab(seconds: bool) -> impl Strategy<Value = Crontab> {
    let second = if seconds {
        field(SECOND).prop_map(Some).boxed()
    } else {
        Just(None).boxed()
    };
    (
        second,
        field(MINUTE),
        field(HOUR),
        field(DOM),
        field(MONTH),
        field(DOW),
    )
        .prop_map(|(second, minute, hour, dom, month, dow)| Crontab {
            second,
            minute,
            hour,
            dom,
            month,
            dow,
        })
}

/// Zones with DST changes of one hour, half an hour (Lord Howe), odd offsets
/// (Kathmandu, Chatham), southern-hemisphere rules, and none.
const ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "America/Santiago",
    "Europe/London",
];

/// The hours (as Unix seconds) in `year` at which `tz`'s UTC offset changes.
fn transitions(tz: Tz, year: i32) -> Vec<i64> {
    use chrono::Offset;
    let first = Utc
        .with_ymd_and_hms(year, 1, 1, 0, 0, 0)
        .unwrap()
        .timestamp();
    let offset = |s: i64| {
        tz.offset_from_utc_datetime(&DateTime::from_timestamp(s, 0).unwrap().naive_utc())
            .fix()
    };
    (0..366 * 24)
        .map(|h| first + h * 3600)
        .filter(|s| offset(*s) != offset(*s - 3600))
        .collect()
}

/// A zone and a start instant: mostly up to three days before one of the
/// zone's DST changes, so that a window of a few days crosses it.
fn zone_and_start() -> impl Strategy<Value = (&'static str, SystemTime)> {
    (
        prop::sample::select(ZONES),
        2024i32..2031,
        any::<prop::sample::Index>(),
        0i64..72 * 3600,
        any::<bool>(),
    )
        .prop_map(|(zone, year, pick, back, near)| {
            let tz: Tz = zone.parse().unwrap();
            let changes = transitions(tz, year);
            let year_start = Utc
                .with_ymd_and_hms(year, 1, 1, 0, 0, 0)
                .unwrap()
                .timestamp();
            let at = if near && !changes.is_empty() {
                changes[pick.index(changes.len())] - back
            } else {
                year_start + (pick.index(365 * 24 * 60) as i64) * 60
            };
            (zone, UNIX_EPOCH + Duration::from_secs(at as u64))
        })
}

/// A transition-biased start for the seconds test: within three hours before a change.
fn zone_and_close_start() -> impl Strategy<Value = (&'static str, SystemTime)> {
    (zone_and_start(), 0u64..3 * 3600).prop_map(|((zone, t), shift)| {
        let tz: Tz = zone.parse().unwrap();
        let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let year = DateTime::from_timestamp(secs, 0).unwrap().year();
        // The next change after `t`, minus up to three hours; else `t` itself.
        let next = transitions(tz, year).into_iter().find(|c| *c >= secs);
        match next {
            Some(c) => (
                zone,
                UNIX_EPOCH + Duration::from_secs((c - shift as i64).max(0) as u64),
            ),
            None => (zone, t),
        }
    })
}

/// Brute force: every fire in `(after, end]`, walking the time line in
/// `step`s (a minute, or a second for 6-field crontabs). A fire is an
/// instant at which the local wall clock first reaches or passes a matching
/// local time; the walk starts a day and a half early so that "first" knows
/// the repeated hours before `after`.
fn brute_force(
    c: &Crontab,
    tz: Tz,
    after: SystemTime,
    end: SystemTime,
    step: i64,
) -> Vec<SystemTime> {
    let to_secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (after, end) = (to_secs(after), to_secs(end));
    let first = (after - 36 * 3600).div_euclid(step) * step;
    let local = |s: i64| {
        Utc.timestamp_opt(s, 0)
            .unwrap()
            .with_timezone(&tz)
            .naive_local()
    };
    let mut high = local(first);
    let mut fires = Vec::new();
    let mut s = first + step;
    while s <= end {
        let now = local(s);
        if now > high {
            // Every local time in (high, now], in steps: usually just `now`.
            let mut t = high + chrono::Duration::seconds(step);
            let mut hit = false;
            while t <= now {
                if c.matches(&t) {
                    hit = true;
                    break;
                }
                t += chrono::Duration::seconds(step);
            }
            if hit && s > after {
                fires.push(UNIX_EPOCH + Duration::from_secs(s as u64));
            }
            high = now;
        }
        s += step;
    }
    fires
}

/// The translator's fires in `(after, end]`, by chaining `next_after`.
fn translated(s: &CronSchedule, after: SystemTime, end: SystemTime) -> Vec<SystemTime> {
    let mut fires = Vec::new();
    let mut t = after;
    while let Some(next) = s.next_after(t) {
        if next > end {
            break;
        }
        assert!(next > t, "next_after({t:?}) = {next:?} is not after it");
        fires.push(next);
        t = next;
    }
    fires
}

fn show(times: &[SystemTime]) -> Vec<String> {
    times
        .iter()
        .map(|t| {
            DateTime::<Utc>::from(*t)
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        })
        .collect()
}

fn spec(expression: &str, timezone: &str) -> ScheduleSpec {
    ScheduleSpec {
        kind: Some(schedule_spec::Kind::Cron(CronSpec {
            expression: expression.into(),
            timezone: timezone.into(),
        })),
    }
}

/// Any timestamp protobuf allows (what validation lets through).
fn any_instant() -> impl Strategy<Value = SystemTime> {
    (-62_135_596_800i64..=253_402_300_799).prop_map(|s| {
        if s >= 0 {
            UNIX_EPOCH + Duration::from_secs(s as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
        }
    })
}

proptest! {
    #![proptest_config(crate::coordinator::validate::props::config(96))]

    #[test]
    fn five_field_fire_times_agree_with_a_minute_by_minute_walk(
        c in crontab(false),
        (zone, after) in zone_and_start(),
    ) {
        let tz: Tz = zone.parse().unwrap();
        let text = c.text();
        let s = CronSchedule::parse(&text, zone)
            .map_err(|e| TestCaseError::fail(format!("{text:?} refused: {e}")))?;
        let end = after + Duration::from_secs(4 * 24 * 3600);
        let expected = brute_force(&c, tz, after, end, 60);
        let got = translated(&s, after, end);
        prop_assert_eq!(show(&got), show(&expected), "{:?} in {}", text, zone);
    }

    #[test]
    fn six_field_fire_times_agree_with_a_second_by_second_walk(
        c in crontab(true),
        (zone, after) in zone_and_close_start(),
    ) {
        let tz: Tz = zone.parse().unwrap();
        let text = c.text();
        let s = CronSchedule::parse(&text, zone)
            .map_err(|e| TestCaseError::fail(format!("{text:?} refused: {e}")))?;
        let end = after + Duration::from_secs(3 * 3600);
        let expected = brute_force(&c, tz, after, end, 1);
        let got = translated(&s, after, end);
        prop_assert_eq!(show(&got), show(&expected), "{:?} in {}", text, zone);
    }

    #[test]
    fn the_last_fire_at_or_before_agrees_with_the_walk(
        c in crontab(false),
        (zone, at) in zone_and_start(),
    ) {
        let tz: Tz = zone.parse().unwrap();
        let s = CronSchedule::parse(&c.text(), zone).unwrap();
        let from = at - Duration::from_secs(3 * 24 * 3600);
        let expected = brute_force(&c, tz, from, at, 60).last().copied();
        let got = s.last_at_or_before(at);
        match expected {
            // A fire within the window: it is the last one.
            Some(e) => prop_assert_eq!(show(&got.into_iter().collect::<Vec<_>>()), show(&[e])),
            // None in the window: any answer is older than it.
            None => prop_assert!(got.is_none_or(|g| g <= from), "{:?}: {:?}", c.text(), got.map(|g| show(&[g]))),
        }
    }

    #[test]
    fn arbitrary_text_never_panics_and_errors_name_the_field(
        expression in prop_oneof![
            any::<String>(),
            "[0-9*/,\\- @a-zA-Z]{0,40}",
            "([0-9*/,\\-]{1,6} ){4,6}",
        ],
        timezone in prop_oneof![
            Just(String::new()),
            prop::sample::select(ZONES).prop_map(String::from),
            any::<String>(),
        ],
        after in any_instant(),
    ) {
        match Spec::parse("spec", Some(&spec(&expression, &timezone))) {
            Ok(s) => {
                // Any instant validation lets through: no panic either way.
                let next = s.next_after(after);
                if let Some(n) = next {
                    prop_assert!(n > after);
                }
                if let Some(l) = s.last_at_or_before(after) {
                    prop_assert!(l <= after);
                }
            }
            Err(Error::InvalidArgument(m)) => prop_assert!(
                m.starts_with("spec.cron.expression: ") || m.starts_with("spec.cron.timezone: "),
                "{m}"
            ),
            Err(other) => prop_assert!(false, "not INVALID_ARGUMENT: {other:?}"),
        }
    }

    #[test]
    fn generated_crontabs_never_panic_at_any_instant(
        c in crontab(false),
        zone in prop::sample::select(ZONES),
        after in any_instant(),
    ) {
        let s = CronSchedule::parse(&c.text(), zone).unwrap();
        if let Some(n) = s.next_after(after) {
            prop_assert!(n > after);
        }
        if let Some(l) = s.last_at_or_before(after) {
            prop_assert!(l <= after);
        }
    }
}
