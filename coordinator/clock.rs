//! The one time source of the coordinator.
//!
//! Everything that reads wall-clock time (job timestamps, run times, backoff,
//! lease expiry) asks a [`Clock`] (see `Coordinator::open_with_clock`). The
//! decisions themselves take `now` as an argument, so their tests pass explicit
//! instants instead of sleeping.

use std::time::SystemTime;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}
