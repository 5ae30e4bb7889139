//! Retry delays: exponential backoff with jitter.

use std::time::Duration;

use crate::coordinator::validate::{
    DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF, DEFAULT_MULTIPLIER,
};
use crate::proto::RetryPolicy;

/// The delay before the retry that follows failed attempt number `attempt`
/// (1-based): `initial · multiplier^(attempt-1)`, capped at `max`, then scaled
/// into `[½, 1]` of itself by `jitter` (a number in `[0, 1)`), so that jobs that
/// failed together do not retry together.
pub fn retry_delay(policy: &RetryPolicy, attempt: u32, jitter: f64) -> Duration {
    let get = |d: &Option<prost_types::Duration>, default: Duration| {
        d.and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(default)
    };
    let initial = get(&policy.initial_backoff, DEFAULT_INITIAL_BACKOFF);
    let max = get(&policy.max_backoff, DEFAULT_MAX_BACKOFF);
    let multiplier = if policy.multiplier >= 1.0 {
        policy.multiplier
    } else {
        DEFAULT_MULTIPLIER
    };
    let exp = attempt.saturating_sub(1).min(1000) as i32;
    let base = (initial.as_secs_f64() * multiplier.powi(exp)).min(max.as_secs_f64());
    let jitter = jitter.clamp(0.0, 1.0);
    Duration::from_secs_f64(base * (0.5 + 0.5 * jitter))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial_ms: i32, max_s: i64, m: f64) -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Some(prost_types::Duration {
                seconds: 0,
                nanos: initial_ms * 1_000_000,
            }),
            max_backoff: Some(prost_types::Duration {
                seconds: max_s,
                nanos: 0,
            }),
            multiplier: m,
        }
    }

    #[test]
    fn grows_exponentially_and_caps() {
        let p = policy(100, 1, 2.0);
        assert_eq!(retry_delay(&p, 1, 1.0), Duration::from_millis(100));
        assert_eq!(retry_delay(&p, 2, 1.0), Duration::from_millis(200));
        assert_eq!(retry_delay(&p, 3, 1.0), Duration::from_millis(400));
        assert_eq!(retry_delay(&p, 10, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(&p, u32::MAX, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let p = policy(100, 1, 2.0);
        assert_eq!(retry_delay(&p, 2, 0.0), Duration::from_millis(100));
        let d = retry_delay(&p, 2, 0.5);
        assert!(d > Duration::from_millis(100) && d < Duration::from_millis(200));
    }
}
