//! What to do when a schedule's fire time comes due: the misfire policy, the
//! catch-up window and the overlap policy, as one pure decision.

use std::time::{Duration, SystemTime};

use crate::coordinator::schedule::spec::Spec;
use crate::proto::{MisfirePolicy, OverlapPolicy};

/// A fire time no older than this is on time; older ones were missed (the
/// coordinator was down or busy, or the schedule paused).
pub const ON_TIME: Duration = Duration::from_secs(1);
/// Most runs one `RUN_ALL` catch-up creates; older missed fires beyond it are dropped.
pub const MAX_CATCH_UP_RUNS: usize = 1000;

/// A schedule's policies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policies {
    /// A run due while the previous one is unfinished.
    pub overlap: OverlapPolicy,
    /// Fire times that passed unnoticed.
    pub misfire: MisfirePolicy,
    /// Missed fires older than this are dropped.
    pub catchup_window: Option<Duration>,
}

/// The outcome of a due fire time.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    /// The fire times to create a run for, oldest first.
    pub runs: Vec<SystemTime>,
    /// Keep one run waiting until the unfinished one ends (`BUFFER_ONE`).
    pub buffer: bool,
    /// Whether some due fire times were dropped (window, misfire or overlap).
    pub dropped: bool,
    /// The next fire time to wait for; `None` while an END-anchored schedule
    /// waits for a run to end, or when a cron expression never matches again.
    pub next: Option<SystemTime>,
}

/// Decides what the fire time `due` (and any after it up to `now`) brings.
/// `active` says whether a run of this schedule is unfinished.
pub fn decide(
    spec: &Spec,
    p: &Policies,
    due: SystemTime,
    now: SystemTime,
    active: bool,
) -> Decision {
    let window_start = p.catchup_window.and_then(|w| now.checked_sub(w));
    // The first fire time that may still run.
    let start = match window_start {
        Some(ws) if due < ws => ws,
        _ => due,
    };
    let mut dropped = start > due;
    let mut runs: Vec<SystemTime> = if spec.end_anchored() {
        if dropped {
            Vec::new()
        } else {
            vec![due]
        }
    } else {
        match p.misfire {
            MisfirePolicy::RunAll => {
                // Oldest first, bounded: never an unbounded walk over a long outage.
                let mut fires = Vec::new();
                let mut next = if start > due {
                    spec.next_after(start - Duration::from_nanos(1))
                } else {
                    Some(due)
                };
                while let Some(t) = next.filter(|t| *t <= now) {
                    if fires.len() == MAX_CATCH_UP_RUNS {
                        dropped = true;
                        break;
                    }
                    fires.push(t);
                    next = spec.next_after(t);
                }
                fires
            }
            misfire => {
                // Only the newest due fire time matters: found directly.
                let latest = spec.last_at_or_before(now).filter(|t| *t >= start);
                let newer_than_due = latest.is_some_and(|t| t > due);
                let run = match misfire {
                    MisfirePolicy::Skip => {
                        latest.filter(|t| now.duration_since(*t).unwrap_or_default() <= ON_TIME)
                    }
                    _ => latest,
                };
                dropped |= newer_than_due || run.is_none();
                run.into_iter().collect()
            }
        }
    };
    if spec.end_anchored()
        && p.misfire == MisfirePolicy::Skip
        && runs
            .iter()
            .any(|t| now.duration_since(*t).unwrap_or_default() > ON_TIME)
    {
        runs.clear();
        dropped = true;
    }
    let mut buffer = false;
    match p.overlap {
        OverlapPolicy::Allow => {}
        OverlapPolicy::BufferOne => {
            if active && !runs.is_empty() {
                buffer = true;
                dropped |= runs.len() > 1;
                runs.clear();
            } else if runs.len() > 1 {
                buffer = true;
                dropped |= runs.len() > 2;
                runs.truncate(1);
            }
        }
        OverlapPolicy::Skip | OverlapPolicy::Unspecified => {
            if active {
                dropped |= !runs.is_empty();
                runs.clear();
            } else if runs.len() > 1 {
                dropped = true;
                runs.truncate(1);
            }
        }
    }
    let next = if spec.end_anchored() {
        if runs.is_empty() && !active && !buffer {
            spec.after_end(now)
        } else {
            None
        }
    } else {
        spec.next_after(now)
    };
    Decision {
        runs,
        buffer,
        dropped,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{schedule_spec, IntervalAnchor, IntervalSpec, ScheduleSpec};
    use std::time::UNIX_EPOCH;

    fn every(secs: u64, anchor: IntervalAnchor) -> Spec {
        let spec = ScheduleSpec {
            kind: Some(schedule_spec::Kind::Interval(IntervalSpec {
                every: Some(prost_types::Duration {
                    seconds: secs as i64,
                    nanos: 0,
                }),
                anchor: anchor as i32,
                offset: None,
            })),
        };
        Spec::parse("spec", Some(&spec)).unwrap()
    }

    fn t(secs: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs_f64(secs)
    }

    fn policies(overlap: OverlapPolicy, misfire: MisfirePolicy, window: Option<u64>) -> Policies {
        Policies {
            overlap,
            misfire,
            catchup_window: window.map(Duration::from_secs),
        }
    }

    fn runs(d: &Decision) -> Vec<SystemTime> {
        d.runs.clone()
    }

    #[test]
    fn an_on_time_fire_runs_once_and_waits_for_the_next() {
        let spec = every(10, IntervalAnchor::Start);
        for misfire in [
            MisfirePolicy::RunOnce,
            MisfirePolicy::RunAll,
            MisfirePolicy::Skip,
        ] {
            let d = decide(
                &spec,
                &policies(OverlapPolicy::Skip, misfire, None),
                t(100.0),
                t(100.2),
                false,
            );
            assert_eq!(runs(&d), vec![t(100.0)], "{misfire:?}");
            assert_eq!(d.next, Some(t(110.0)));
            assert!(!d.dropped && !d.buffer);
        }
    }

    #[test]
    fn misfire_policies_after_downtime() {
        // Due at 100; back at 135: 100, 110, 120 and 130 were missed.
        let spec = every(10, IntervalAnchor::Start);
        let at = |misfire| {
            decide(
                &spec,
                &policies(OverlapPolicy::Allow, misfire, None),
                t(100.0),
                t(135.0),
                false,
            )
        };
        let once = at(MisfirePolicy::RunOnce);
        assert_eq!(runs(&once), vec![t(130.0)]);
        assert!(once.dropped);
        assert_eq!(once.next, Some(t(140.0)));
        assert_eq!(
            runs(&at(MisfirePolicy::RunAll)),
            vec![t(100.0), t(110.0), t(120.0), t(130.0)]
        );
        let skip = at(MisfirePolicy::Skip);
        assert!(skip.runs.is_empty() && skip.dropped);
        assert_eq!(skip.next, Some(t(140.0)));
        // SKIP still runs a fire that is on time.
        let d = decide(
            &spec,
            &policies(OverlapPolicy::Allow, MisfirePolicy::Skip, None),
            t(100.0),
            t(130.5),
            false,
        );
        assert_eq!(runs(&d), vec![t(130.0)]);
    }

    #[test]
    fn the_catchup_window_drops_older_fires() {
        let spec = every(10, IntervalAnchor::Start);
        let p = policies(OverlapPolicy::Allow, MisfirePolicy::RunAll, Some(12));
        let d = decide(&spec, &p, t(100.0), t(135.0), false);
        assert_eq!(runs(&d), vec![t(130.0)]);
        assert!(d.dropped);
        let p = policies(OverlapPolicy::Allow, MisfirePolicy::RunOnce, Some(3));
        let d = decide(&spec, &p, t(100.0), t(135.0), false);
        assert!(
            d.runs.is_empty(),
            "even the newest missed fire is outside the window"
        );
        assert_eq!(d.next, Some(t(140.0)));
    }

    #[test]
    fn overlap_policies_with_a_run_unfinished() {
        let spec = every(10, IntervalAnchor::Start);
        let at = |overlap| {
            decide(
                &spec,
                &policies(overlap, MisfirePolicy::RunOnce, None),
                t(100.0),
                t(100.0),
                true,
            )
        };
        let skip = at(OverlapPolicy::Skip);
        assert!(skip.runs.is_empty() && !skip.buffer && skip.dropped);
        let buffered = at(OverlapPolicy::BufferOne);
        assert!(buffered.runs.is_empty() && buffered.buffer);
        assert_eq!(runs(&at(OverlapPolicy::Allow)), vec![t(100.0)]);
        // Catching up several fires: SKIP starts one, BUFFER_ONE one plus one waiting.
        let catch_up = |overlap| {
            decide(
                &spec,
                &policies(overlap, MisfirePolicy::RunAll, None),
                t(100.0),
                t(125.0),
                false,
            )
        };
        assert_eq!(runs(&catch_up(OverlapPolicy::Skip)), vec![t(100.0)]);
        let b = catch_up(OverlapPolicy::BufferOne);
        assert_eq!((runs(&b), b.buffer), (vec![t(100.0)], true));
        assert_eq!(catch_up(OverlapPolicy::Allow).runs.len(), 3);
    }

    #[test]
    fn end_anchored_schedules_wait_for_the_run_to_end() {
        let spec = every(10, IntervalAnchor::End);
        let p = policies(OverlapPolicy::Skip, MisfirePolicy::RunOnce, None);
        let d = decide(&spec, &p, t(100.0), t(100.0), false);
        assert_eq!((runs(&d), d.next), (vec![t(100.0)], None));
        // Missed with SKIP: no run, the next is one period from now.
        let p = policies(OverlapPolicy::Skip, MisfirePolicy::Skip, None);
        let d = decide(&spec, &p, t(100.0), t(200.0), false);
        assert_eq!((d.runs.is_empty(), d.next), (true, Some(t(210.0))));
    }
}
