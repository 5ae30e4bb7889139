//! The crontab translator on arbitrary text, zones and instants. The input is
//! split at its first two NUL bytes into an expression, a zone name and an
//! instant (8 bytes, clamped to protobuf's timestamp range, which is what
//! validation lets through). Parsing must never panic, errors must name the
//! expression or the zone, and a parsed schedule's next fire is after the
//! instant and its last fire at or before it.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use rota::coordinator::error::Error;
use rota::coordinator::schedule::spec::Spec;
use rota::proto::{schedule_spec, CronSpec, ScheduleSpec};

const MIN: i64 = -62_135_596_800;
const MAX: i64 = 253_402_300_799;

fn instant(bytes: &[u8]) -> SystemTime {
    let mut raw = [0u8; 8];
    for (i, b) in bytes.iter().take(8).enumerate() {
        raw[i] = *b;
    }
    let s = MIN + (i64::from_le_bytes(raw).rem_euclid(MAX - MIN + 1));
    if s >= 0 {
        UNIX_EPOCH + Duration::from_secs(s as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let expression = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let timezone = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let at = instant(parts.next().unwrap_or_default());
    let spec = ScheduleSpec {
        kind: Some(schedule_spec::Kind::Cron(CronSpec {
            expression,
            timezone,
        })),
    };
    match Spec::parse("spec", Some(&spec)) {
        Ok(s) => {
            if let Some(next) = s.next_after(at) {
                assert!(next > at);
            }
            if let Some(last) = s.last_at_or_before(at) {
                assert!(last <= at);
            }
        }
        Err(Error::InvalidArgument(m)) => assert!(
            m.starts_with("spec.cron.expression: ") || m.starts_with("spec.cron.timezone: "),
            "{m}"
        ),
        Err(other) => panic!("not INVALID_ARGUMENT: {other:?}"),
    }
});
