//! Property tests of request validation: no input makes it panic, every
//! refusal is `INVALID_ARGUMENT` naming a field, and jobs are accepted exactly
//! when each of their fields is within its rules. Each generated field is
//! valid or invalid by construction, so the expectation comes from the
//! generator, not from the code under test.

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use super::*;
use crate::coordinator::schedule::check::new_schedule;
use crate::coordinator::service::session::check_hello;
use crate::proto::{Hello, LeaseRef, Schedule};

/// The property tests' config: `cases` cases from a fixed seed (so CI runs
/// the same cases every time; set `PROPTEST_RNG_SEED` to explore others), and
/// no regression files written into the source tree.
pub(crate) fn config(cases: u32) -> Config {
    let defaults = Config::default();
    Config {
        cases,
        rng_seed: match defaults.rng_seed {
            RngSeed::Random => RngSeed::Fixed(0x726f_7461),
            fixed => fixed,
        },
        failure_persistence: None,
        ..defaults
    }
}

/// The payload limit in these tests.
const MAX_PAYLOAD: usize = 64;

/// A generated value and, if it breaks a rule, the field an error must name.
type Case<T> = (T, Option<&'static str>);

fn ok<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Case<T>> {
    s.prop_map(|v| (v, None)).boxed()
}

fn bad<T: std::fmt::Debug + Clone + 'static>(
    field: &'static str,
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Case<T>> {
    s.prop_map(move |v| (v, Some(field))).boxed()
}

/// A name: 1 to 256 bytes without control characters.
fn good_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z][a-z0-9._-]{0,20}", "[^\\p{Cc}]{1,64}", "x{256}"]
        .prop_filter("at most 256 bytes", |s| {
            !s.is_empty() && s.len() <= MAX_NAME_LEN
        })
}

fn bad_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "x{257}",
        "[a-z]{257,300}",
        "[a-z]{0,5}[\\x00-\\x1f\\x7f][a-z]{0,5}",
    ]
}

fn kind() -> BoxedStrategy<Case<String>> {
    prop_oneof![
        4 => ok(good_name()),
        1 => bad("kind", Just(String::new())),
        1 => bad("kind", bad_name()),
    ]
    .boxed()
}

fn queue() -> BoxedStrategy<Case<String>> {
    prop_oneof![
        1 => ok(Just(String::new())),
        3 => ok(good_name()),
        1 => bad("queue", bad_name()),
    ]
    .boxed()
}

fn payload() -> BoxedStrategy<Case<Vec<u8>>> {
    prop_oneof![
        4 => ok(prop::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD)),
        1 => ok(Just(vec![0; MAX_PAYLOAD])),
        1 => bad("payload", Just(vec![0; MAX_PAYLOAD + 1])),
        1 => bad("payload", prop::collection::vec(any::<u8>(), MAX_PAYLOAD + 1..200)),
    ]
    .boxed()
}

fn in_range_seconds() -> BoxedStrategy<i64> {
    prop_oneof![
        Just(MIN_TIMESTAMP_SECONDS),
        Just(MAX_TIMESTAMP_SECONDS),
        MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS,
    ]
    .boxed()
}

fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos }
}

/// `run_time` and `expire_time` together (expire must be after run).
fn times() -> BoxedStrategy<
    Case<(
        Option<prost_types::Timestamp>,
        Option<prost_types::Timestamp>,
    )>,
> {
    let stamp = (in_range_seconds(), 0..1_000_000_000i32)
        .prop_map(|(s, n)| ts(s, n))
        .boxed();
    let out_of_range = prop_oneof![
        Just(ts(MAX_TIMESTAMP_SECONDS + 1, 0)),
        Just(ts(MIN_TIMESTAMP_SECONDS - 1, 999_999_999)),
        (MAX_TIMESTAMP_SECONDS + 1..=i64::MAX).prop_map(|s| ts(s, 0)),
        (i64::MIN..MIN_TIMESTAMP_SECONDS).prop_map(|s| ts(s, 0)),
        (
            in_range_seconds(),
            prop_oneof![i32::MIN..0, 1_000_000_000..=i32::MAX]
        )
            .prop_map(|(s, n)| ts(s, n)),
    ]
    .boxed();
    prop_oneof![
        2 => ok(Just((None, None))),
        2 => ok((prop::option::of(stamp.clone()), Just(None))),
        2 => ok((Just(None), stamp.clone().prop_map(Some))),
        2 => ok((in_range_seconds(), 1..1_000_000i64).prop_filter_map("in range", |(s, d)| {
            let e = s.checked_add(d).filter(|e| *e <= MAX_TIMESTAMP_SECONDS)?;
            Some((Some(ts(s, 0)), Some(ts(e, 0))))
        })),
        1 => bad("expire_time", (in_range_seconds(), 0..1_000_000i64).prop_filter_map("in range", |(s, d)| {
            let e = s.checked_sub(d).filter(|e| *e >= MIN_TIMESTAMP_SECONDS)?;
            Some((Some(ts(s, 0)), Some(ts(e, 0))))
        })),
        1 => bad("run_time", out_of_range.clone().prop_map(|t| (Some(t), None))),
        1 => bad("expire_time", out_of_range.prop_map(|t| (None, Some(t)))),
    ]
    .boxed()
}

fn max_attempts() -> BoxedStrategy<Case<u32>> {
    prop_oneof![
        4 => ok(prop_oneof![Just(MAX_ATTEMPTS_LIMIT), 0..=MAX_ATTEMPTS_LIMIT]),
        1 => bad("max_attempts", prop_oneof![Just(MAX_ATTEMPTS_LIMIT + 1), MAX_ATTEMPTS_LIMIT + 1..=u32::MAX]),
    ]
    .boxed()
}

fn dur(seconds: i64, nanos: i32) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos }
}

fn good_duration() -> BoxedStrategy<prost_types::Duration> {
    prop_oneof![
        Just(dur(MAX_DURATION.as_secs() as i64, 0)),
        (0..=MAX_DURATION.as_secs() as i64 - 1, 0..1_000_000_000i32).prop_map(|(s, n)| dur(s, n)),
    ]
    .boxed()
}

fn bad_duration() -> impl Strategy<Value = prost_types::Duration> {
    prop_oneof![
        Just(dur(MAX_DURATION.as_secs() as i64, 1)),
        Just(dur(-1, 0)),
        (i64::MIN..0, any::<i32>()).prop_map(|(s, n)| dur(s, n)),
        (0..1000i64, i32::MIN..0).prop_map(|(s, n)| dur(s, n)),
        (0..1000i64, 1_000_000_000..=i32::MAX).prop_map(|(s, n)| dur(s, n)),
        (
            MAX_DURATION.as_secs() as i64 + 1..=i64::MAX,
            0..1_000_000_000i32
        )
            .prop_map(|(s, n)| dur(s, n)),
    ]
}

fn retry() -> BoxedStrategy<Case<Option<RetryPolicy>>> {
    let multiplier = prop_oneof![Just(0.0), 1.0..=100.0f64].boxed();
    let bad_multiplier = prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        -1e9..1.0f64,
        100.000_001..1e12f64,
    ]
    .prop_filter("not the unset 0", |m| *m != 0.0);
    let ordered = (good_duration(), good_duration())
        .prop_map(|(a, b)| {
            let key = |d: &prost_types::Duration| (d.seconds, d.nanos);
            if key(&a) <= key(&b) {
                (a, b)
            } else {
                (b, a)
            }
        })
        .boxed();
    prop_oneof![
        2 => ok(Just(None)),
        3 => ok((ordered.clone(), multiplier.clone()).prop_map(|((i, m), x)| Some(RetryPolicy {
            initial_backoff: Some(i),
            max_backoff: Some(m),
            multiplier: x,
        }))),
        1 => bad("retry.initial_backoff", (bad_duration(), multiplier.clone()).prop_map(|(i, x)| Some(RetryPolicy {
            initial_backoff: Some(i),
            max_backoff: None,
            multiplier: x,
        }))),
        1 => bad("retry.max_backoff", ordered.clone().prop_filter("distinct", |(a, b)| a != b).prop_map(|(lo, hi)| Some(RetryPolicy {
            initial_backoff: Some(hi),
            max_backoff: Some(lo),
            multiplier: 2.0,
        }))),
        1 => bad("retry.multiplier", (ordered, bad_multiplier).prop_map(|((i, m), x)| Some(RetryPolicy {
            initial_backoff: Some(i),
            max_backoff: Some(m),
            multiplier: x,
        }))),
    ]
    .boxed()
}

fn timeout() -> BoxedStrategy<Case<Option<prost_types::Duration>>> {
    prop_oneof![
        2 => ok(Just(None)),
        3 => ok(good_duration().prop_filter("positive", |d| d.seconds > 0 || d.nanos > 0).prop_map(Some)),
        1 => bad("timeout", Just(Some(dur(0, 0)))),
        1 => bad("timeout", bad_duration().prop_map(Some)),
    ]
    .boxed()
}

fn grace() -> BoxedStrategy<Case<Option<prost_types::Duration>>> {
    prop_oneof![
        2 => ok(Just(None)),
        3 => ok(good_duration().prop_map(Some)),
        1 => bad("shutdown_grace", bad_duration().prop_map(Some)),
    ]
    .boxed()
}

fn idempotency_key() -> BoxedStrategy<Case<String>> {
    prop_oneof![
        4 => ok(prop_oneof!["", "[a-z0-9-]{1,40}", "k{1024}"]),
        1 => bad("idempotency_key", "k{1025,1100}"),
    ]
    .boxed()
}

fn labels() -> BoxedStrategy<Case<HashMap<String, String>>> {
    let key = "[a-z.]{1,12}";
    prop_oneof![
        4 => ok(prop::collection::hash_map(key, ".{0,20}", 0..=8)),
        1 => ok(prop::collection::hash_map("[a-z]{1,12}", Just("v".repeat(MAX_LABEL_LEN)), 1..3)),
        1 => bad("labels", prop::collection::hash_map("[a-z0-9]{4,12}", "[a-z]{0,3}", MAX_LABELS + 1..MAX_LABELS + 10)),
        1 => bad("labels", Just(HashMap::from([(String::new(), "v".to_string())]))),
        1 => bad("labels", Just(HashMap::from([("k".repeat(MAX_LABEL_LEN + 1), String::new())]))),
        1 => bad("labels", Just(HashMap::from([("k".to_string(), "v".repeat(MAX_LABEL_LEN + 1))]))),
    ]
    .boxed()
}

/// A job whose fields are each valid or invalid by construction, and the
/// fields that are invalid.
fn job() -> impl Strategy<Value = (Job, Vec<&'static str>)> {
    (
        (kind(), queue(), payload(), times(), max_attempts()),
        (retry(), timeout(), grace(), idempotency_key(), labels()),
        any::<i32>(),
    )
        .prop_map(|((k, q, p, t, a), (r, to, g, i, l), priority)| {
            let invalid: Vec<&'static str> = [k.1, q.1, p.1, t.1, a.1, r.1, to.1, g.1, i.1, l.1]
                .into_iter()
                .flatten()
                .collect();
            let job = Job {
                kind: k.0,
                queue: q.0,
                payload: p.0,
                run_time: t.0 .0,
                expire_time: t.0 .1,
                max_attempts: a.0,
                retry: r.0,
                timeout: to.0,
                shutdown_grace: g.0,
                idempotency_key: i.0,
                labels: l.0,
                priority,
                // Output-only fields a client might forge.
                id: "forged".into(),
                state: JobState::Succeeded as i32,
                attempt: 7,
                ..Default::default()
            };
            (job, invalid)
        })
}

/// Any job at all: arbitrary strings, bytes, numbers.
fn arbitrary_job() -> impl Strategy<Value = Job> {
    let d = prop::option::of((any::<i64>(), any::<i32>()).prop_map(|(s, n)| dur(s, n)));
    let t = prop::option::of((any::<i64>(), any::<i32>()).prop_map(|(s, n)| ts(s, n)));
    (
        (
            any::<String>(),
            any::<String>(),
            prop::collection::vec(any::<u8>(), 0..100),
            t.clone(),
            t,
        ),
        (
            any::<u32>(),
            prop::option::of((d.clone(), d.clone(), any::<f64>())),
            d.clone(),
            d,
        ),
        (
            any::<String>(),
            prop::collection::hash_map(any::<String>(), any::<String>(), 0..4),
        ),
    )
        .prop_map(
            |(
                (kind, queue, payload, run_time, expire_time),
                (max_attempts, retry, timeout, shutdown_grace),
                (idempotency_key, labels),
            )| Job {
                kind,
                queue,
                payload,
                run_time,
                expire_time,
                max_attempts,
                retry: retry.map(|(initial_backoff, max_backoff, multiplier)| RetryPolicy {
                    initial_backoff,
                    max_backoff,
                    multiplier,
                }),
                timeout,
                shutdown_grace,
                idempotency_key,
                labels,
                ..Default::default()
            },
        )
}

fn refusal(r: Result<impl std::fmt::Debug, Error>) -> Result<String, TestCaseError> {
    match r {
        Err(Error::InvalidArgument(m)) => Ok(m),
        other => Err(TestCaseError::fail(format!(
            "expected INVALID_ARGUMENT, got {other:?}"
        ))),
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn jobs_are_accepted_exactly_when_every_field_is_valid((job, invalid) in job()) {
        let submitted = job.clone();
        match new_job("jobs[3]", job, MAX_PAYLOAD) {
            Ok(j) => {
                prop_assert!(invalid.is_empty(), "accepted with invalid {invalid:?}: {submitted:?}");
                // Defaults filled, output fields cleared, the rest kept.
                prop_assert!(!j.queue.is_empty() && j.max_attempts >= 1 && j.retry.is_some());
                prop_assert!(j.id.is_empty() && j.attempt == 0 && j.state == 0);
                prop_assert_eq!(&j.kind, &submitted.kind);
                prop_assert_eq!(&j.payload, &submitted.payload);
                prop_assert_eq!(&j.labels, &submitted.labels);
            }
            Err(e) => {
                let m = refusal(Err::<(), _>(e))?;
                prop_assert!(!invalid.is_empty(), "refused a valid job ({m}): {submitted:?}");
                let named = invalid.iter().any(|f| m.starts_with(&format!("jobs[3].{f}: ")));
                prop_assert!(named, "{m:?} names none of {invalid:?}");
            }
        }
    }

    #[test]
    fn arbitrary_jobs_never_panic_and_refusals_name_a_job_field(job in arbitrary_job()) {
        if let Err(e) = new_job("job", job, MAX_PAYLOAD) {
            let m = refusal(Err::<(), _>(e))?;
            prop_assert!(m.starts_with("job."), "{m}");
            prop_assert!(m.len() < 2048, "an error echoes too much: {} bytes", m.len());
        }
    }

    #[test]
    fn arbitrary_schedules_never_panic_and_refusals_name_a_schedule_field(
        name in any::<String>(),
        job in prop::option::of(arbitrary_job()),
        expression in any::<String>(),
        timezone in any::<String>(),
        overlap in any::<i32>(),
        misfire in any::<i32>(),
    ) {
        let schedule = Schedule {
            name,
            job,
            spec: Some(crate::proto::ScheduleSpec {
                kind: Some(crate::proto::schedule_spec::Kind::Cron(crate::proto::CronSpec { expression, timezone })),
            }),
            overlap,
            misfire,
            ..Default::default()
        };
        if let Err(e) = new_schedule("schedule", schedule, MAX_PAYLOAD) {
            let m = refusal(Err::<(), _>(e))?;
            prop_assert!(m.starts_with("schedule."), "{m}");
            prop_assert!(m.len() < 2048, "an error echoes too much: {} bytes", m.len());
        }
    }

    #[test]
    fn arbitrary_hellos_never_panic_and_refusals_name_a_hello_field(
        worker_id in any::<String>(),
        hostname in any::<String>(),
        queues in prop::collection::vec(any::<String>(), 0..3),
        kinds in prop::collection::vec(any::<String>(), 0..3),
        slots in any::<u32>(),
        labels in prop::collection::hash_map(any::<String>(), any::<String>(), 0..3),
        held in prop::collection::vec((any::<String>(), any::<String>()), 0..3),
        grace in prop::option::of((any::<i64>(), any::<i32>())),
    ) {
        let hello = Hello {
            worker_id,
            hostname,
            queues,
            kinds,
            slots,
            labels,
            held: held.into_iter().map(|(job_id, lease_id)| LeaseRef { job_id, lease_id }).collect(),
            max_shutdown_grace: grace.map(|(s, n)| dur(s, n)),
        };
        if let Err(e) = check_hello(&hello) {
            let m = refusal(Err::<(), _>(e))?;
            prop_assert!(m.starts_with("hello."), "{m}");
        }
    }
}
