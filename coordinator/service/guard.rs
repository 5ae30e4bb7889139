//! What a worker session may send, and when it is cut off.
//!
//! Two token buckets per session, decided here without I/O (time is passed
//! in):
//! - chatter: heartbeats and drain messages. A worker sends one heartbeat per
//!   heartbeat interval; a session may send `flood_rate` per interval on
//!   average and `flood_burst` at once. Completions are not counted here:
//!   each needs a lease, so a flood of them is a flood of bad messages.
//! - bad messages: completions the coordinator refused (a lease the worker
//!   does not hold, a replaced session, no outcome), a second `Hello`, an
//!   empty message. A worker that lost its leases (a lease timeout, a
//!   restart) may legitimately report each of its slots once, so the burst is
//!   `bad_messages` plus the session's slots; one more is allowed each second.
//!
//! An empty bucket ends the session with the [`GuardError`], whose message
//! names what was sent, the limit and its setting. The session's leases are
//! then handled like those of any dropped stream.

use std::time::{Duration, Instant};

/// The thresholds, from the coordinator's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardSettings {
    /// Heartbeats and drain messages per heartbeat interval, on average.
    pub flood_rate: u32,
    /// How many of those may come at once.
    pub flood_burst: u32,
    /// Bad messages allowed at once, on top of the session's slots.
    pub bad_messages: u32,
    /// The heartbeat interval the workers are told.
    pub heartbeat_interval: Duration,
}

/// Why a session was cut off.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// Heartbeats or drain messages came faster than allowed.
    #[error(
        "worker {worker_id}: {what} faster than {rate} per heartbeat interval ({interval:?}) \
         with bursts of {burst} (--worker-flood-rate, --worker-flood-burst); session ended"
    )]
    Flood {
        /// The worker.
        worker_id: String,
        /// What it sent too often.
        what: &'static str,
        /// The allowed rate.
        rate: u32,
        /// The heartbeat interval the rate is per.
        interval: Duration,
        /// The allowed burst.
        burst: u32,
    },
    /// Too many messages the protocol does not allow.
    #[error(
        "worker {worker_id}: more than {limit} messages the protocol does not allow \
         (--worker-bad-messages {bad_messages} plus its {slots} slots; one more each second); \
         the last: {last}; session ended"
    )]
    Garbage {
        /// The worker.
        worker_id: String,
        /// The burst allowed.
        limit: u32,
        /// The setting's part of it.
        bad_messages: u32,
        /// The session's slots, the rest of it.
        slots: u32,
        /// What the last bad message was.
        last: String,
    },
}

impl From<GuardError> for tonic::Status {
    fn from(e: GuardError) -> Self {
        match e {
            GuardError::Flood { .. } => tonic::Status::resource_exhausted(e.to_string()),
            GuardError::Garbage { .. } => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

/// A token bucket: `capacity` at once, refilled at `per_second`.
#[derive(Clone, Debug)]
struct Bucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_second: f64, now: Instant) -> Self {
        Bucket {
            capacity,
            per_second,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes one token; `false` when there is none.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One session's buckets.
#[derive(Clone, Debug)]
pub struct SessionGuard {
    /// The session's worker, for messages.
    worker_id: String,
    /// The thresholds.
    settings: GuardSettings,
    /// The session's slots (part of the bad-message burst).
    slots: u32,
    /// Heartbeats and drain messages.
    chatter: Bucket,
    /// Bad messages.
    bad: Bucket,
}

impl SessionGuard {
    /// A guard for a session that just said hello with `slots`.
    pub fn new(worker_id: &str, slots: u32, settings: GuardSettings, now: Instant) -> Self {
        let interval = settings.heartbeat_interval.as_secs_f64().max(1e-3);
        SessionGuard {
            worker_id: worker_id.to_string(),
            settings,
            slots,
            chatter: Bucket::new(
                settings.flood_burst as f64,
                settings.flood_rate as f64 / interval,
                now,
            ),
            bad: Bucket::new(settings.bad_messages as f64 + slots as f64, 1.0, now),
        }
    }

    /// A heartbeat or drain message (`what`) arrived.
    pub fn chatter(&mut self, what: &'static str, now: Instant) -> Result<(), GuardError> {
        if self.chatter.take(now) {
            return Ok(());
        }
        Err(GuardError::Flood {
            worker_id: self.worker_id.clone(),
            what,
            rate: self.settings.flood_rate,
            interval: self.settings.heartbeat_interval,
            burst: self.settings.flood_burst,
        })
    }

    /// A message the protocol does not allow arrived, or a completion was refused.
    pub fn bad(&mut self, what: impl Into<String>, now: Instant) -> Result<(), GuardError> {
        if self.bad.take(now) {
            return Ok(());
        }
        Err(GuardError::Garbage {
            worker_id: self.worker_id.clone(),
            limit: self.settings.bad_messages.saturating_add(self.slots),
            bad_messages: self.settings.bad_messages,
            slots: self.slots,
            last: what.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> GuardSettings {
        GuardSettings {
            flood_rate: 10,
            flood_burst: 20,
            bad_messages: 5,
            heartbeat_interval: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_worker_heartbeating_at_its_interval_is_never_cut_off() {
        let start = Instant::now();
        let mut g = SessionGuard::new("w", 4, settings(), start);
        for i in 0..10_000u64 {
            g.chatter("heartbeats", start + Duration::from_secs(i))
                .expect("one heartbeat per interval is fine");
        }
    }

    #[test]
    fn a_flood_is_cut_off_after_the_burst_and_the_rate_refills() {
        let start = Instant::now();
        let mut g = SessionGuard::new("w", 4, settings(), start);
        for _ in 0..20 {
            g.chatter("heartbeats", start).unwrap();
        }
        let e = g.chatter("heartbeats", start).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("heartbeats faster than 10 per heartbeat interval")
                && text.contains("bursts of 20")
                && text.contains("--worker-flood-rate"),
            "{text}"
        );
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::ResourceExhausted
        );
        // 10 per 1s interval: 100 ms later one more is allowed, not two.
        let later = start + Duration::from_millis(100);
        g.chatter("heartbeats", later).unwrap();
        assert!(g.chatter("heartbeats", later).is_err());
    }

    #[test]
    fn bad_messages_are_allowed_up_to_the_setting_plus_slots() {
        let start = Instant::now();
        let mut g = SessionGuard::new("w", 4, settings(), start);
        for i in 0..9 {
            g.bad(format!("stale lease {i}"), start).unwrap();
        }
        let e = g.bad("stale lease 9", start).unwrap_err();
        assert_eq!(
            e,
            GuardError::Garbage {
                worker_id: "w".into(),
                limit: 9,
                bad_messages: 5,
                slots: 4,
                last: "stale lease 9".into()
            }
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
        // One more each second.
        g.bad("x", start + Duration::from_secs(1)).unwrap();
        assert!(g.bad("y", start + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut g = SessionGuard::new("w", 0, settings(), start);
        for _ in 0..5 {
            g.bad("x", start).unwrap();
        }
        assert!(g.bad("x", start - Duration::from_secs(5)).is_err());
        assert!(g.bad("x", start).is_err());
    }
}
