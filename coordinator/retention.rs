//! Retention: how long finished jobs are kept, and the index of when each
//! finished job is due for deletion.
//!
//! A job that reaches a terminal state (SUCCEEDED, FAILED, CANCELLED, EXPIRED)
//! is kept for its state's [`Keep`] period after its `end_time`, then deleted
//! with its idempotency-key record. The [`SweepIndex`] orders finished jobs by
//! that due time, so the engine finds the next deletion with a look at the
//! first entry (no scan) and deletes due jobs in bounded chunks
//! (`state::sweep`). Everything here is pure: no I/O, no clock.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::coordinator::ids::JobId;
use crate::proto::JobState;

/// How long finished jobs are kept when nothing else is configured: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest retention accepted: deletion due times are whole seconds.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);
/// The word that keeps finished jobs for ever.
pub const FOREVER: &str = "forever";

/// A retention value that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    /// Neither a duration nor `forever`.
    #[error("{value:?} is neither a duration like 12h, 7d or 30m nor `forever` ({why})")]
    Malformed {
        /// The text given.
        value: String,
        /// What the duration parser said.
        why: String,
    },
    /// A duration under [`MIN_RETENTION`] (including zero).
    #[error("{value:?} is shorter than the minimum of 1s; write `forever` to keep finished jobs for ever")]
    TooShort {
        /// The text given.
        value: String,
    },
}

/// How long a finished job is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Deleted this long after it finished.
    For(Duration),
    /// Never deleted.
    Forever,
}

impl Keep {
    /// Parses `forever` or a duration of at least [`MIN_RETENTION`].
    pub fn parse(s: &str) -> Result<Keep, RetentionError> {
        let t = s.trim();
        if t.eq_ignore_ascii_case(FOREVER) {
            return Ok(Keep::Forever);
        }
        let d = humantime::parse_duration(t).map_err(|e| RetentionError::Malformed {
            value: s.to_string(),
            why: e.to_string(),
        })?;
        if d < MIN_RETENTION {
            return Err(RetentionError::TooShort {
                value: s.to_string(),
            });
        }
        Ok(Keep::For(d))
    }
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keep::For(d) => write!(f, "{}", humantime::format_duration(*d)),
            Keep::Forever => f.write_str(FOREVER),
        }
    }
}

/// The retention of each terminal state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// SUCCEEDED jobs.
    pub succeeded: Keep,
    /// FAILED jobs.
    pub failed: Keep,
    /// CANCELLED jobs.
    pub cancelled: Keep,
    /// EXPIRED jobs.
    pub expired: Keep,
}

impl Default for Retention {
    fn default() -> Self {
        Retention::uniform(Keep::For(DEFAULT_RETENTION))
    }
}

impl Retention {
    /// The same retention for every terminal state.
    pub fn uniform(keep: Keep) -> Retention {
        Retention {
            succeeded: keep,
            failed: keep,
            cancelled: keep,
            expired: keep,
        }
    }

    /// The retention of `state`; `None` for a state that is not terminal.
    pub fn of(&self, state: JobState) -> Option<Keep> {
        match state {
            JobState::Succeeded => Some(self.succeeded),
            JobState::Failed => Some(self.failed),
            JobState::Cancelled => Some(self.cancelled),
            JobState::Expired => Some(self.expired),
            JobState::Unspecified | JobState::Scheduled | JobState::Queued | JobState::Running => {
                None
            }
        }
    }

    /// When a job that reached `state` at `end` is due for deletion; `None`
    /// when it is kept for ever (or is not finished). A due time past what
    /// the clock can represent counts as for ever.
    pub fn due(&self, state: JobState, end: SystemTime) -> Option<SystemTime> {
        match self.of(state)? {
            Keep::For(d) => end.checked_add(d),
            Keep::Forever => None,
        }
    }
}

/// Finished jobs by deletion due time, in buckets of one second (a due time
/// is rounded up to the next whole second, so a job is never deleted early and
/// at most a second late). Jobs finishing together share a bucket, so an entry
/// costs about one id (16 bytes) when many jobs finish each second.
#[derive(Debug, Default)]
pub struct SweepIndex {
    /// Ids by due second (seconds since the Unix epoch).
    buckets: BTreeMap<u64, Vec<JobId>>,
    /// How many ids the buckets hold.
    len: usize,
}

/// The bucket of a due time: its second, rounded up.
fn bucket(at: SystemTime) -> u64 {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    since.as_secs() + u64::from(since.subsec_nanos() > 0)
}

impl SweepIndex {
    /// Adds a job due for deletion at `at`.
    pub fn insert(&mut self, at: SystemTime, id: JobId) {
        self.buckets.entry(bucket(at)).or_default().push(id);
        self.len += 1;
    }

    /// Removes a job added with due time `at`; whether it was there.
    pub fn remove(&mut self, at: SystemTime, id: JobId) -> bool {
        let key = bucket(at);
        let Some(ids) = self.buckets.get_mut(&key) else {
            return false;
        };
        let Some(i) = ids.iter().position(|x| *x == id) else {
            return false;
        };
        ids.swap_remove(i);
        if ids.is_empty() {
            self.buckets.remove(&key);
        }
        self.len -= 1;
        true
    }

    /// When the earliest deletion is due.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.buckets
            .first_key_value()
            .map(|(s, _)| UNIX_EPOCH + Duration::from_secs(*s))
    }

    /// Takes up to `max` jobs due at or before `now`, each once (earliest
    /// buckets first).
    pub fn take_due(&mut self, now: SystemTime, max: usize) -> Vec<JobId> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(mut entry) = self.buckets.first_entry() else {
                break;
            };
            if UNIX_EPOCH + Duration::from_secs(*entry.key()) > now {
                break;
            }
            let ids = entry.get_mut();
            let n = ids.len().min(max - out.len());
            out.extend(ids.drain(ids.len() - n..));
            if ids.is_empty() {
                entry.remove();
            }
        }
        self.len -= out.len();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// How many jobs are waiting for deletion.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no job is waiting for deletion.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs_f64(secs)
    }

    #[test]
    fn parses_durations_and_forever_and_refuses_the_rest() {
        assert_eq!(Keep::parse("7d"), Ok(Keep::For(DEFAULT_RETENTION)));
        assert_eq!(Keep::parse(" 1s "), Ok(Keep::For(Duration::from_secs(1))));
        assert_eq!(
            Keep::parse("1h 30m"),
            Ok(Keep::For(Duration::from_secs(5400)))
        );
        assert_eq!(Keep::parse("forever"), Ok(Keep::Forever));
        assert_eq!(Keep::parse("Forever"), Ok(Keep::Forever));
        let short = Keep::parse("0s").unwrap_err();
        assert!(matches!(short, RetentionError::TooShort { .. }));
        assert!(short.to_string().contains("forever"), "{short}");
        assert!(matches!(
            Keep::parse("500ms"),
            Err(RetentionError::TooShort { .. })
        ));
        let bad = Keep::parse("never").unwrap_err();
        assert!(matches!(bad, RetentionError::Malformed { .. }));
        assert!(bad.to_string().contains("\"never\""), "{bad}");
        assert_eq!(Keep::For(DEFAULT_RETENTION).to_string(), "7days");
        assert_eq!(Keep::Forever.to_string(), "forever");
    }

    #[test]
    fn each_terminal_state_has_its_own_due_time() {
        let r = Retention {
            succeeded: Keep::For(Duration::from_secs(10)),
            failed: Keep::For(Duration::from_secs(100)),
            cancelled: Keep::Forever,
            expired: Keep::For(Duration::from_secs(1)),
        };
        assert_eq!(r.due(JobState::Succeeded, t(5.0)), Some(t(15.0)));
        assert_eq!(r.due(JobState::Failed, t(5.0)), Some(t(105.0)));
        assert_eq!(r.due(JobState::Cancelled, t(5.0)), None);
        assert_eq!(r.due(JobState::Expired, t(5.0)), Some(t(6.0)));
        for live in [
            JobState::Scheduled,
            JobState::Queued,
            JobState::Running,
            JobState::Unspecified,
        ] {
            assert_eq!(r.due(live, t(5.0)), None, "{live:?} is never deleted");
        }
        // A due time past what SystemTime holds is for ever, not a panic.
        let huge = Retention::uniform(Keep::For(Duration::MAX));
        assert_eq!(huge.due(JobState::Succeeded, t(5.0)), None);
        assert_eq!(
            Retention::default().due(JobState::Failed, t(0.0)),
            Some(t(7.0 * 24.0 * 3600.0))
        );
    }

    #[test]
    fn due_times_round_up_to_the_second_and_come_out_in_order() {
        let mut idx = SweepIndex::default();
        let (a, b, c) = (JobId::generate(), JobId::generate(), JobId::generate());
        idx.insert(t(20.0), c);
        idx.insert(t(10.2), a);
        idx.insert(t(10.9), b);
        assert_eq!(idx.len(), 3);
        // 10.2 and 10.9 share the bucket of second 11: never early.
        assert_eq!(idx.next_due(), Some(t(11.0)));
        assert!(idx.take_due(t(10.95), 100).is_empty());
        let mut first = idx.take_due(t(11.0), 100);
        first.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(first, want);
        assert_eq!(idx.next_due(), Some(t(20.0)));
        assert_eq!(idx.take_due(t(25.0), 100), vec![c]);
        assert!(idx.is_empty() && idx.next_due().is_none());
    }

    #[test]
    fn take_due_is_bounded_and_resumes_where_it_stopped() {
        let mut idx = SweepIndex::default();
        let ids: Vec<JobId> = (0..10).map(|_| JobId::generate()).collect();
        for (i, id) in ids.iter().enumerate() {
            // Two buckets of five.
            idx.insert(t(1.0 + (i / 5) as f64), *id);
        }
        let mut seen = Vec::new();
        for want in [4, 4, 2, 0] {
            let chunk = idx.take_due(t(100.0), 4);
            assert_eq!(chunk.len(), want);
            seen.extend(chunk);
        }
        seen.sort();
        let mut all = ids.clone();
        all.sort();
        assert_eq!(seen, all, "every job taken exactly once");
        assert!(idx.is_empty());
    }

    #[test]
    fn remove_takes_out_one_entry_and_duplicates_come_out_once() {
        let mut idx = SweepIndex::default();
        let (a, b) = (JobId::generate(), JobId::generate());
        idx.insert(t(5.0), a);
        idx.insert(t(5.0), b);
        assert!(idx.remove(t(4.5), a), "same bucket as 5.0");
        assert!(!idx.remove(t(5.0), a), "already removed");
        assert!(!idx.remove(t(9.0), b), "not in that bucket");
        assert_eq!(idx.len(), 1);
        idx.insert(t(5.0), b);
        assert_eq!(idx.take_due(t(6.0), 10), vec![b]);
        assert!(idx.is_empty());
    }
}
