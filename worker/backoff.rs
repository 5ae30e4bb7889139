//! Reconnect delays: exponential backoff with jitter.
//!
//! Pure logic: the caller owns the timer and passes the random source, so the
//! sequence is testable without sleeping.

use std::time::Duration;

use rand::Rng;

/// First reconnect delay (before jitter).
pub const INITIAL: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const CAP: Duration = Duration::from_secs(5);

/// Exponential backoff: the n-th delay is drawn uniformly from
/// `[base/2, base]` where `base = min(CAP, INITIAL * 2^n)` ("equal jitter"), so
/// workers that lost the coordinator together do not all return at once.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Failures since the last [`Backoff::reset`].
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A fresh backoff; the next delay is around `INITIAL`.
    pub fn new() -> Self {
        Self { failures: 0 }
    }

    /// Forgets past failures (after a successful Welcome).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The un-jittered delay for the current failure count.
    pub fn base(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(16)).unwrap_or(u32::MAX);
        INITIAL.saturating_mul(factor).min(CAP)
    }

    /// The delay before the next attempt, drawn from `rng`; counts one failure.
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let base = self.base();
        self.failures = self.failures.saturating_add(1);
        let half = base / 2;
        let jitter_ms = rng.gen_range(0..=u64::try_from(half.as_millis()).unwrap_or(u64::MAX));
        half + Duration::from_millis(jitter_ms)
    }

    /// The delay before the next attempt, using the thread's random source.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::thread_rng())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn delays_grow_within_bounds_and_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new();
        let mut expected_base = INITIAL;
        for _ in 0..20 {
            let base = backoff.base();
            assert_eq!(base, expected_base);
            let delay = backoff.next_delay_with(&mut rng);
            assert!(delay >= base / 2, "{delay:?} below half of {base:?}");
            assert!(delay <= base, "{delay:?} above {base:?}");
            assert!(delay <= CAP);
            expected_base = (expected_base * 2).min(CAP);
        }
        assert_eq!(backoff.base(), CAP);
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new();
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.base(), INITIAL);
        assert!(backoff.next_delay() <= INITIAL);
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut backoff = Backoff { failures: u32::MAX };
        assert_eq!(backoff.base(), CAP);
        assert!(backoff.next_delay() <= CAP);
    }
}
