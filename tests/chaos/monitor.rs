//! The monitor: every listing of the jobs taken during a run, checked against the earlier
//! ones, so that what a reader was once shown is never taken back — not even by a crash.

use std::collections::{BTreeSet, HashMap};

use rota::proto::Job;

use crate::audit::{is_terminal, outcomes};

/// Watches every snapshot of the job list taken during a run and checks that what a reader
/// was once shown is never taken back: no job disappears, a finished job never changes
/// again (so no second completion was accepted for it, and it reached one terminal state),
/// the attempt count never goes down, and an ended attempt is never rewritten.
#[derive(Default)]
pub struct Monitor {
    seen: HashMap<String, Job>,
    /// Jobs already reported missing (each is reported once).
    missing: BTreeSet<String>,
    pub snapshots: usize,
    pub violations: Vec<String>,
}

impl Monitor {
    /// Checks one complete listing of every job against the earlier ones. Listings must be
    /// handed over in the order they were read (one reader at a time).
    pub fn observe(&mut self, jobs: &[Job], label: &str) {
        self.snapshots += 1;
        let listed: BTreeSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        for id in self.seen.keys() {
            if !listed.contains(id.as_str()) && self.missing.insert(id.clone()) {
                self.violations.push(format!(
                    "job {id} was listed before but is missing from snapshot {label}"
                ));
            }
        }
        for job in jobs {
            if let Some(before) = self.seen.get(&job.id) {
                if let Some(v) = changed_illegally(before, job) {
                    self.violations
                        .push(format!("job {} in snapshot {label}: {v}", job.id));
                }
            }
            self.seen.insert(job.id.clone(), job.clone());
        }
    }
}

/// Why `after` cannot follow `before`, if it cannot.
fn changed_illegally(before: &Job, after: &Job) -> Option<String> {
    if is_terminal(before.state()) {
        return (before != after).then(|| {
            format!(
                "changed after it finished: was {:?} with attempts {:?}, now {:?} with attempts {:?}",
                before.state(),
                outcomes(&before.attempts),
                after.state(),
                outcomes(&after.attempts)
            )
        });
    }
    // Only an attempt in progress that ends `interrupted` gives its number back.
    let gave_back = before.attempts.last().is_some_and(|a| a.outcome.is_empty())
        && after
            .attempts
            .get(before.attempts.len().wrapping_sub(1))
            .is_some_and(|a| a.outcome == "interrupted");
    if after.attempt + u32::from(gave_back) < before.attempt {
        return Some(format!(
            "attempt went back from {} to {}: was {:?} {:?}, now {:?} {:?}",
            before.attempt,
            after.attempt,
            before.state(),
            outcomes(&before.attempts),
            after.state(),
            outcomes(&after.attempts)
        ));
    }
    if after.attempts.len() < before.attempts.len() {
        return Some(format!(
            "attempts shrank from {} to {}",
            before.attempts.len(),
            after.attempts.len()
        ));
    }
    for (a, b) in before.attempts.iter().zip(&after.attempts) {
        if !a.outcome.is_empty() && a != b {
            return Some(format!(
                "ended attempt {} was rewritten: {a:?} became {b:?}",
                a.number
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    //! The monitor, fed listings with one thing taken back, reports it.

    use super::*;
    use crate::audit::tests::{at, good};
    use rota::proto::JobState;

    #[test]
    fn an_attempt_gives_its_number_back_only_by_ending_interrupted() {
        let (jobs, _, _, _) = good();
        let mut running = jobs[0].clone();
        running.state = JobState::Running as i32;
        running.attempts[2].outcome.clear();
        let mut requeued = running.clone();
        requeued.state = JobState::Queued as i32;
        requeued.attempt = 2;
        requeued.attempts[2].outcome = "interrupted".into();
        let mut m = Monitor::default();
        m.observe(std::slice::from_ref(&running), "1");
        m.observe(std::slice::from_ref(&requeued), "2");
        assert!(m.violations.is_empty(), "{:?}", m.violations);

        let mut m = Monitor::default();
        requeued.attempts[2].outcome = "lease_expired".into();
        m.observe(std::slice::from_ref(&running), "1");
        m.observe(std::slice::from_ref(&requeued), "2");
        assert!(
            m.violations[0].contains("attempt went back"),
            "{:?}",
            m.violations
        );
    }

    #[test]
    fn the_monitor_reports_what_was_taken_back() {
        let (jobs, _, _, _) = good();
        let mut m = Monitor::default();
        m.observe(&jobs, "1");
        m.observe(&jobs, "2");
        assert!(m.violations.is_empty(), "{:?}", m.violations);

        let mut changed = jobs.clone();
        changed[0].attempts[2].end_time = Some(at(2900).into());
        m.observe(&changed, "3");
        assert!(
            m.violations[0].contains("changed after it finished"),
            "{:?}",
            m.violations
        );

        let mut m = Monitor::default();
        let mut running = jobs.clone();
        running[0].state = JobState::Running as i32;
        m.observe(&running, "1");
        let mut back = running.clone();
        back[0].attempt = 2;
        m.observe(&back, "2");
        assert!(
            m.violations[0].contains("attempt went back"),
            "{:?}",
            m.violations
        );
        let mut rewritten = running.clone();
        rewritten[0].attempts[0].outcome = "succeeded".into();
        m.observe(&rewritten, "3");
        assert!(
            m.violations[1].contains("was rewritten"),
            "{:?}",
            m.violations
        );
        m.observe(&running[1..], "4");
        assert!(m.violations[2].contains("is missing"), "{:?}", m.violations);
    }
}
