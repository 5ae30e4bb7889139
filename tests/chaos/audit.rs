//! The audit: pure checks over what a chaos run left behind — the jobs as the coordinator
//! stores them at the end, the run log written by the jobs themselves, what the clients were
//! acknowledged, and when things were killed. (The listings taken during the run are the
//! [`crate::monitor`]'s.)
//!
//! Each check names the job and what is wrong; the unit tests at the end feed it broken
//! evidence to show that each one can fail.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use rota::proto::{Attempt, Job, JobState};

use crate::runlog::{Run, FLAKY_SUCCEEDS_AT};

/// The label a schedule puts on the jobs it creates: the fire time they are for.
pub const FIRE_TIME_LABEL: &str = "rota.fire_time";

/// How far a run's own clock readings may stray outside its attempt's recorded window
/// (the coordinator and the commands read the same system clock; this only absorbs the
/// rounding of `date`).
const CLOCK_SLACK: Duration = Duration::from_millis(20);

/// How soon after a worker's death the coordinator has seen its stream end (the kernel
/// closes the dead process's sockets at once); until then it may still lease it jobs.
const DEATH_NOTICED_WITHIN: Duration = Duration::from_secs(2);

/// What a chaos job does, from the first word of its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Succeeds.
    Ok,
    /// Fails (retryably) before attempt [`FLAKY_SUCCEEDS_AT`], then succeeds.
    Flaky,
    /// Always fails, retryably.
    Fail,
    /// Fails permanently (SDK jobs only: the command runner has no permanent failure).
    Perm,
}

impl Mode {
    pub fn word(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Flaky => "flaky",
            Mode::Fail => "fail",
            Mode::Perm => "perm",
        }
    }

    fn parse(word: &str) -> Option<Mode> {
        [Mode::Ok, Mode::Flaky, Mode::Fail, Mode::Perm]
            .into_iter()
            .find(|m| m.word() == word)
    }

    /// Whether a run of this mode succeeds on `attempt`.
    pub fn succeeds_on(self, attempt: u32) -> bool {
        match self {
            Mode::Ok => true,
            Mode::Flaky => attempt >= FLAKY_SUCCEEDS_AT,
            Mode::Fail | Mode::Perm => false,
        }
    }
}

/// A chaos job's payload: `MODE SECONDS\n`.
pub fn payload(mode: Mode, secs: f64) -> Vec<u8> {
    format!("{} {secs:.3}\n", mode.word()).into_bytes()
}

/// The mode and run time a payload asks for.
pub fn parse_payload(payload: &[u8]) -> Option<(Mode, Duration)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut words = text.split_whitespace();
    let mode = Mode::parse(words.next()?)?;
    let secs: f64 = words.next()?.parse().ok()?;
    Some((mode, Duration::from_secs_f64(secs)))
}

/// A process killed with SIGKILL during the run.
#[derive(Clone, Debug)]
pub enum Crash {
    /// The coordinator: killed at `down`, serving again at `up`.
    Coordinator { down: SystemTime, up: SystemTime },
    /// A `rota-worker` with this id, dead (killed and reaped) at `at`.
    Worker { id: String, at: SystemTime },
}

/// What the audit knows besides the jobs.
pub struct Evidence<'a> {
    /// Every idempotency key a client was acknowledged, with the job id it got.
    pub acked: &'a BTreeMap<String, String>,
    /// Every run the jobs logged.
    pub runs: &'a [Run],
    /// Every kill.
    pub crashes: &'a [Crash],
    /// The coordinator's lease timeout.
    pub lease_timeout: Duration,
    /// The schedule under test, its interval, and the fewest fires it must have made.
    pub schedule: Option<(&'a str, Duration, usize)>,
}

/// The figures of a run, for the report.
#[derive(Debug, Default)]
pub struct Figures {
    pub jobs: usize,
    pub by_mode: BTreeMap<String, usize>,
    pub by_state: BTreeMap<String, usize>,
    pub attempts: usize,
    /// Runs the jobs logged.
    pub runs: usize,
    /// Runs whose outcome the coordinator accepted.
    pub accepted_runs: usize,
    /// Runs whose lease was lost to a kill: they ended but their result was fenced off...
    pub fenced_finished: usize,
    /// ...or they were killed before they ended.
    pub fenced_killed: usize,
    /// Attempts whose lease was lost to a kill before any run began.
    pub lost_before_run: usize,
    /// Of the lost leases, those ended because the worker came back without them.
    pub lost_on_reconnect: usize,
    /// Leases granted just before a coordinator crash that never reached their worker:
    /// ended `interrupted`, not counted.
    pub undelivered: usize,
    pub schedule_fires: usize,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} jobs {:?}, final states {:?}; {} attempts; {} runs: {} accepted, {} fenced after \
             finishing, {} killed mid-run; {} leases lost before a run began; {} leases ended on \
             reconnect; {} undelivered leases re-run uncounted; {} schedule fires",
            self.jobs,
            self.by_mode,
            self.by_state,
            self.attempts,
            self.runs,
            self.accepted_runs,
            self.fenced_finished,
            self.fenced_killed,
            self.lost_before_run,
            self.lost_on_reconnect,
            self.undelivered,
            self.schedule_fires,
        )
    }
}

fn time(ts: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    ts.and_then(|t| SystemTime::try_from(t).ok())
}

pub fn is_terminal(s: JobState) -> bool {
    matches!(
        s,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Expired
    )
}

/// `number:outcome` of each attempt, for messages.
pub fn outcomes(attempts: &[Attempt]) -> Vec<String> {
    attempts
        .iter()
        .map(|a| format!("{}:{}", a.number, a.outcome))
        .collect()
}

/// Runs every check; returns the figures, or every violation found.
pub fn audit(jobs: &[Job], ev: &Evidence<'_>) -> Result<Figures, Vec<String>> {
    let mut v = Vec::new();
    let mut fig = Figures {
        jobs: jobs.len(),
        ..Default::default()
    };
    let by_id: HashMap<&str, &Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    check_acknowledged(jobs, &by_id, ev, &mut v);
    let runs = index_runs(ev.runs, &by_id, &mut v);
    fig.runs = ev.runs.len();
    for job in jobs {
        *fig.by_state
            .entry(format!("{:?}", job.state()))
            .or_default() += 1;
        let Some((mode, _)) = parse_payload(&job.payload) else {
            v.push(format!(
                "job {}: payload {:?} is not a chaos payload",
                job.id, job.payload
            ));
            continue;
        };
        *fig.by_mode
            .entry(format!("{}/{}", job.kind, mode.word()))
            .or_default() += 1;
        fig.attempts += job.attempts.len();
        check_job(job, mode, &runs, ev, &mut fig, &mut v);
    }
    if let Some((name, every, min_fires)) = ev.schedule {
        fig.schedule_fires = check_schedule(jobs, name, every, min_fires, &mut v);
    }
    if v.is_empty() {
        Ok(fig)
    } else {
        Err(v)
    }
}

/// Every acknowledged job exists, with the key it was submitted with; each key made one job;
/// every job is either acknowledged to a client or made by the schedule.
fn check_acknowledged(
    jobs: &[Job],
    by_id: &HashMap<&str, &Job>,
    ev: &Evidence<'_>,
    v: &mut Vec<String>,
) {
    for (key, id) in ev.acked {
        match by_id.get(id.as_str()) {
            None => v.push(format!("acknowledged job {id} (key {key}) is lost")),
            Some(j) if &j.idempotency_key != key => v.push(format!(
                "acknowledged job {id} has key {:?}, not {key:?}",
                j.idempotency_key
            )),
            Some(_) => {}
        }
    }
    let mut per_key: HashMap<&str, Vec<&str>> = HashMap::new();
    for j in jobs {
        if j.idempotency_key.is_empty() {
            let scheduled = ev.schedule.is_some_and(|(name, _, _)| j.schedule == name);
            if !scheduled {
                v.push(format!(
                    "job {} has no idempotency key and no schedule: nobody submitted it",
                    j.id
                ));
            }
            continue;
        }
        per_key.entry(&j.idempotency_key).or_default().push(&j.id);
        if !ev.acked.contains_key(&j.idempotency_key) {
            v.push(format!(
                "job {} (key {}) was never acknowledged to its client",
                j.id, j.idempotency_key
            ));
        }
    }
    for (key, ids) in per_key {
        if ids.len() > 1 {
            v.push(format!(
                "idempotency key {key} made {} jobs: {ids:?}",
                ids.len()
            ));
        }
    }
}

/// The runs by (job, attempt); a second run of one attempt, or a run of an attempt the
/// coordinator never leased (or leased to another worker), is a violation.
fn index_runs<'r>(
    runs: &'r [Run],
    by_id: &HashMap<&str, &Job>,
    v: &mut Vec<String>,
) -> HashMap<(&'r str, u32), &'r Run> {
    let mut index: HashMap<(&str, u32), &Run> = HashMap::new();
    for run in runs {
        if let Some(first) = index.insert((run.job.as_str(), run.attempt), run) {
            v.push(format!(
                "job {} attempt {} ran twice: {first:?} and {run:?}",
                run.job, run.attempt
            ));
        }
        let leased = by_id.get(run.job.as_str()).and_then(|j| {
            j.attempts
                .iter()
                .find(|a| a.number == run.attempt && counts(a))
                .map(|a| a.worker_id.as_str())
        });
        match leased {
            None => v.push(format!(
                "job {} ran as attempt {} on {}, an attempt the coordinator has no record of",
                run.job, run.attempt, run.worker
            )),
            Some(w) if w != run.worker => v.push(format!(
                "job {} attempt {} ran on {} but was leased to {w}",
                run.job, run.attempt, run.worker
            )),
            Some(_) => {}
        }
    }
    index
}

/// One job: its counted attempts are numbered 1..=attempt within max_attempts; each ended
/// with an outcome its run (or a kill) explains; an uncounted (`interrupted`) one was lost
/// with a coordinator crash and is followed by its re-run under the same number; and its
/// final state is the one its attempts lead to.
fn check_job(
    job: &Job,
    mode: Mode,
    runs: &HashMap<(&str, u32), &Run>,
    ev: &Evidence<'_>,
    fig: &mut Figures,
    v: &mut Vec<String>,
) {
    let id = &job.id;
    if !is_terminal(job.state()) {
        v.push(format!("job {id} never finished: {:?}", job.state()));
        return;
    }
    let counted: Vec<&Attempt> = job.attempts.iter().filter(|a| counts(a)).collect();
    let n = counted.len();
    if n == 0 || n != job.attempt as usize || job.attempt > job.max_attempts {
        v.push(format!(
            "job {id}: attempt {} with {n} counted attempts recorded ({:?}), max_attempts {}",
            job.attempt,
            outcomes(&job.attempts),
            job.max_attempts
        ));
        return;
    }
    for (i, a) in job.attempts.iter().enumerate() {
        if a.outcome != "interrupted" {
            continue;
        }
        fig.undelivered += 1;
        if job.attempts.get(i + 1).map(|b| b.number) != Some(a.number) {
            v.push(format!(
                "job {id}: interrupted attempt {} was not run again under its number",
                a.number
            ));
        }
        if let Some(why) = unexplained_loss(a, ev, false) {
            v.push(format!(
                "job {id}: attempt {} was interrupted {why}",
                a.number
            ));
        }
    }
    for (i, a) in counted.iter().enumerate() {
        let last = i + 1 == n;
        if a.number as usize != i + 1 {
            v.push(format!(
                "job {id}: attempt #{} is numbered {}",
                i + 1,
                a.number
            ));
        }
        match a.outcome.as_str() {
            "succeeded" | "failed" => {
                fig.accepted_runs += 1;
                check_accepted_run(job, a, mode, runs.get(&(id.as_str(), a.number)), v);
                let permanent = a.outcome == "failed" && mode == Mode::Perm;
                if !last && (a.outcome == "succeeded" || permanent) {
                    v.push(format!(
                        "job {id}: attempt {} ended {} yet attempt {} followed",
                        a.number,
                        a.outcome,
                        a.number + 1
                    ));
                }
            }
            "lease_expired" => {
                match runs.get(&(id.as_str(), a.number)) {
                    None => fig.lost_before_run += 1,
                    Some(r) if r.end.is_some() => fig.fenced_finished += 1,
                    Some(_) => fig.fenced_killed += 1,
                }
                if a.error.contains("reconnected without this lease") {
                    fig.lost_on_reconnect += 1;
                }
                if let Some(why) = unexplained_loss(a, ev, true) {
                    v.push(format!(
                        "job {id}: attempt {} lost its lease {why}",
                        a.number
                    ));
                }
            }
            other => v.push(format!(
                "job {id}: attempt {} ended {other:?}, which nothing in this run causes",
                a.number
            )),
        }
    }
    let last = counted[n - 1];
    let used_up = job.attempt == job.max_attempts;
    let expected = match last.outcome.as_str() {
        "succeeded" => Some(JobState::Succeeded),
        "failed" if mode == Mode::Perm || used_up => Some(JobState::Failed),
        "lease_expired" if used_up => Some(JobState::Failed),
        _ => None,
    };
    if expected != Some(job.state()) {
        v.push(format!(
            "job {id} is {:?} but its attempts {:?} (max {}) lead to {expected:?}",
            job.state(),
            outcomes(&job.attempts),
            job.max_attempts
        ));
    }
}

/// Whether an attempt counts against max_attempts (an `interrupted` one does not).
fn counts(a: &Attempt) -> bool {
    a.outcome != "interrupted"
}

/// An attempt whose outcome the coordinator accepted: exactly one run made it, the run's own
/// outcome is that outcome and the one its mode gives on that attempt, and the run lies
/// inside the attempt's lease (started after the lease was granted, ended before the
/// outcome was recorded), so the outcome cannot be a stale run's.
fn check_accepted_run(job: &Job, a: &Attempt, mode: Mode, run: Option<&&Run>, v: &mut Vec<String>) {
    let id = &job.id;
    let Some(run) = run else {
        v.push(format!(
            "job {id}: attempt {} is recorded {} but never ran",
            a.number, a.outcome
        ));
        return;
    };
    let Some((end, ok)) = run.end else {
        v.push(format!(
            "job {id}: attempt {} is recorded {} but its run never finished",
            a.number, a.outcome
        ));
        return;
    };
    if ok != (a.outcome == "succeeded") || ok != mode.succeeds_on(a.number) {
        v.push(format!(
            "job {id} ({}): attempt {} is recorded {} but its run ended {}",
            mode.word(),
            a.number,
            a.outcome,
            if ok { "ok" } else { "fail" }
        ));
    }
    match (time(&a.start_time), time(&a.end_time)) {
        (Some(leased), Some(recorded)) => {
            if run.start + CLOCK_SLACK < leased || end > recorded + CLOCK_SLACK {
                v.push(format!(
                    "job {id}: attempt {}'s run [{:?}, {:?}] is not inside its lease [{:?}, {:?}]",
                    a.number, run.start, end, leased, recorded
                ));
            }
        }
        _ => v.push(format!(
            "job {id}: attempt {} has no start or end time",
            a.number
        )),
    }
}

/// Why a lost lease is not explained by a kill, if it is not. A worker's kill explains the
/// loss (`by_worker`) of a lease it held (or was granted just after its death, before the
/// coordinator saw its stream end). A coordinator crash explains the loss of a lease granted
/// before it and lost within one lease timeout (plus slack for a loaded machine) of the
/// restart.
fn unexplained_loss(a: &Attempt, ev: &Evidence<'_>, by_worker: bool) -> Option<String> {
    let (Some(start), Some(end)) = (time(&a.start_time), time(&a.end_time)) else {
        return Some("and has no start or end time".into());
    };
    let slack = Duration::from_secs(3);
    let explained = ev.crashes.iter().any(|c| match c {
        Crash::Worker { id, at } => {
            by_worker && *id == a.worker_id && start <= *at + DEATH_NOTICED_WITHIN && *at <= end
        }
        Crash::Coordinator { down, up } => {
            start <= *down && *up <= end && end <= *up + ev.lease_timeout + slack
        }
    });
    (!explained).then(|| {
        format!(
            "({:?}, worker {}, leased {start:?}, ended {end:?}) with no kill to explain it",
            a.error, a.worker_id
        )
    })
}

/// The schedule fired once per due time: no fire time twice, none skipped between the first
/// and the last (it is RUN_ALL with ALLOW overlap, so every grid time must run), no job made
/// before its fire time, and at least `min_fires` of them. Returns the number of fires.
fn check_schedule(
    jobs: &[Job],
    name: &str,
    every: Duration,
    min_fires: usize,
    v: &mut Vec<String>,
) -> usize {
    let mut fires: BTreeMap<SystemTime, Vec<&str>> = BTreeMap::new();
    for j in jobs.iter().filter(|j| j.schedule == name) {
        let Some(label) = j.labels.get(FIRE_TIME_LABEL) else {
            v.push(format!(
                "schedule job {} has no {FIRE_TIME_LABEL} label",
                j.id
            ));
            continue;
        };
        let Ok(fire) = humantime::parse_rfc3339(label) else {
            v.push(format!(
                "schedule job {}: fire time {label:?} unreadable",
                j.id
            ));
            continue;
        };
        if time(&j.create_time).is_none_or(|c| c < fire) {
            v.push(format!(
                "schedule job {} was created before its fire time {label}",
                j.id
            ));
        }
        fires.entry(fire).or_default().push(&j.id);
    }
    for (t, ids) in &fires {
        if ids.len() > 1 {
            v.push(format!(
                "schedule {name} fired {} times for due time {}: {ids:?}",
                ids.len(),
                humantime::format_rfc3339_nanos(*t)
            ));
        }
    }
    let times: Vec<SystemTime> = fires.keys().copied().collect();
    for pair in times.windows(2) {
        if pair[1].duration_since(pair[0]).ok() != Some(every) {
            v.push(format!(
                "schedule {name} skipped due times between {} and {}",
                humantime::format_rfc3339_nanos(pair[0]),
                humantime::format_rfc3339_nanos(pair[1])
            ));
        }
    }
    if times.len() < min_fires {
        v.push(format!(
            "schedule {name} fired {} times; at least {min_fires} were due",
            times.len()
        ));
    }
    times.len()
}

#[cfg(test)]
pub mod tests {
    //! Each check, fed evidence with one thing wrong, reports it.

    use super::*;
    use std::time::UNIX_EPOCH;

    pub fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    fn attempt(number: u32, worker: &str, from: u64, to: u64, outcome: &str) -> Attempt {
        Attempt {
            number,
            worker_id: worker.into(),
            start_time: Some(at(from).into()),
            end_time: Some(at(to).into()),
            outcome: outcome.into(),
            error: String::new(),
        }
    }

    fn run(job: &str, attempt: u32, worker: &str, from: u64, to: Option<(u64, bool)>) -> Run {
        Run {
            job: job.into(),
            attempt,
            worker: worker.into(),
            pid: 7,
            start: at(from),
            end: to.map(|(t, ok)| (at(t), ok)),
        }
    }

    /// A flaky job: attempt 1 fails, attempt 2's lease is lost to a worker kill mid-run,
    /// attempt 3 succeeds; and a schedule job.
    pub fn good() -> (Vec<Job>, Vec<Run>, BTreeMap<String, String>, Vec<Crash>) {
        let flaky = Job {
            id: "j1".into(),
            kind: "cmd".into(),
            payload: payload(Mode::Flaky, 0.1),
            idempotency_key: "k1".into(),
            state: JobState::Succeeded as i32,
            attempt: 3,
            max_attempts: 5,
            attempts: vec![
                attempt(1, "w1", 0, 200, "failed"),
                attempt(2, "w2", 300, 2500, "lease_expired"),
                attempt(3, "w1", 2600, 2800, "succeeded"),
            ],
            ..Default::default()
        };
        let fired = Job {
            id: "j2".into(),
            kind: "cmd".into(),
            payload: payload(Mode::Ok, 0.05),
            schedule: "tick".into(),
            labels: [(
                FIRE_TIME_LABEL.to_string(),
                "2023-11-14T22:13:20Z".to_string(),
            )]
            .into(),
            create_time: Some(at(0).into()),
            state: JobState::Succeeded as i32,
            attempt: 1,
            max_attempts: 3,
            attempts: vec![attempt(1, "w1", 10, 90, "succeeded")],
            ..Default::default()
        };
        let runs = vec![
            run("j1", 1, "w1", 5, Some((150, false))),
            run("j1", 2, "w2", 310, None),
            run("j1", 3, "w1", 2610, Some((2750, true))),
            run("j2", 1, "w1", 15, Some((80, true))),
        ];
        let acked = [("k1".to_string(), "j1".to_string())].into();
        let crashes = vec![Crash::Worker {
            id: "w2".into(),
            at: at(400),
        }];
        (vec![flaky, fired], runs, acked, crashes)
    }

    fn check(
        jobs: &[Job],
        runs: &[Run],
        acked: &BTreeMap<String, String>,
        crashes: &[Crash],
    ) -> Result<Figures, Vec<String>> {
        audit(
            jobs,
            &Evidence {
                acked,
                runs,
                crashes,
                lease_timeout: Duration::from_secs(2),
                schedule: Some(("tick", Duration::from_secs(1), 1)),
            },
        )
    }

    /// The audit of `good()` after `spoil`, which must fail naming `expect`.
    fn fails(
        expect: &str,
        spoil: impl FnOnce(&mut Vec<Job>, &mut Vec<Run>, &mut BTreeMap<String, String>, &mut Vec<Crash>),
    ) {
        let (mut jobs, mut runs, mut acked, mut crashes) = good();
        spoil(&mut jobs, &mut runs, &mut acked, &mut crashes);
        match check(&jobs, &runs, &acked, &crashes) {
            Ok(f) => panic!("audit passed ({f}) but should report {expect:?}"),
            Err(v) => assert!(
                v.iter().any(|m| m.contains(expect)),
                "expected {expect:?} among {v:#?}"
            ),
        }
    }

    #[test]
    fn consistent_evidence_passes_with_its_figures() {
        let (jobs, runs, acked, crashes) = good();
        let f = check(&jobs, &runs, &acked, &crashes).unwrap();
        assert_eq!(
            (f.runs, f.accepted_runs, f.fenced_killed, f.schedule_fires),
            (4, 3, 1, 1)
        );
    }

    #[test]
    fn a_lost_acknowledged_job_is_reported() {
        fails("is lost", |_, _, acked, _| {
            acked.insert("k9".into(), "j9".into());
        });
    }

    #[test]
    fn a_key_that_made_two_jobs_is_reported() {
        fails("made 2 jobs", |jobs, _, _, _| {
            let mut twin = jobs[0].clone();
            twin.id = "j3".into();
            jobs.push(twin);
        });
    }

    #[test]
    fn an_unfinished_job_is_reported() {
        fails("never finished", |jobs, _, _, _| {
            jobs[0].state = JobState::Running as i32;
        });
    }

    #[test]
    fn an_attempt_run_twice_is_reported() {
        fails("ran twice", |_, runs, _, _| {
            runs.push(run("j1", 3, "w1", 2620, Some((2700, true))));
        });
    }

    #[test]
    fn a_run_nobody_leased_is_reported() {
        fails("no record of", |_, runs, _, _| {
            runs.push(run("j1", 4, "w1", 2900, Some((3000, true))));
        });
    }

    #[test]
    fn more_attempts_than_allowed_are_reported() {
        fails("max_attempts 2", |jobs, _, _, _| jobs[0].max_attempts = 2);
    }

    #[test]
    fn an_outcome_that_is_not_its_runs_is_reported() {
        // A stale completion (attempt 1's failure) accepted for attempt 3.
        fails("but its run ended ok", |jobs, _, _, _| {
            jobs[0].attempts[2].outcome = "failed".into();
            jobs[0].state = JobState::Failed as i32;
        });
    }

    #[test]
    fn an_outcome_recorded_before_its_run_ended_is_reported() {
        fails("not inside its lease", |_, runs, _, _| {
            runs[2].end = Some((at(2900), true));
        });
    }

    #[test]
    fn a_lease_loss_no_kill_explains_is_reported() {
        fails("no kill to explain it", |_, _, _, crashes| crashes.clear());
    }

    #[test]
    fn a_retry_after_success_is_reported() {
        fails("yet attempt 2 followed", |jobs, runs, _, _| {
            jobs[0].payload = payload(Mode::Ok, 0.1);
            jobs[0].attempts[0].outcome = "succeeded".into();
            runs[0].end = Some((at(150), true));
        });
    }

    #[test]
    fn a_final_state_its_attempts_do_not_lead_to_is_reported() {
        fails("lead to", |jobs, _, _, _| {
            jobs[0].state = JobState::Failed as i32
        });
    }

    #[test]
    fn a_schedule_firing_twice_for_one_due_time_is_reported() {
        fails("fired 2 times", |jobs, runs, _, _| {
            let mut again = jobs[1].clone();
            again.id = "j4".into();
            runs.push(run("j4", 1, "w1", 15, Some((80, true))));
            jobs.push(again);
        });
    }

    #[test]
    fn a_skipped_due_time_is_reported() {
        fails("skipped due times", |jobs, runs, _, _| {
            let mut later = jobs[1].clone();
            later.id = "j4".into();
            later
                .labels
                .insert(FIRE_TIME_LABEL.into(), "2023-11-14T22:13:22Z".into());
            later.create_time = Some(at(3000).into());
            runs.push(run("j4", 1, "w1", 15, Some((80, true))));
            jobs.push(later);
        });
    }

    /// `good()`'s flaky job with an Assign lost in a coordinator crash before attempt 3.
    fn with_undelivered(jobs: &mut [Job], crashes: &mut Vec<Crash>) {
        let lost = attempt(3, "w2", 2550, 2580, "interrupted");
        jobs[0].attempts.insert(2, lost);
        crashes.push(Crash::Coordinator {
            down: at(2560),
            up: at(2570),
        });
    }

    #[test]
    fn an_uncounted_attempt_lost_with_the_coordinator_passes() {
        let (mut jobs, runs, acked, mut crashes) = good();
        with_undelivered(&mut jobs, &mut crashes);
        let f = check(&jobs, &runs, &acked, &crashes).unwrap();
        assert_eq!((f.undelivered, f.accepted_runs), (1, 3));
    }

    #[test]
    fn an_uncounted_attempt_without_a_coordinator_crash_is_reported() {
        fails("was interrupted", |jobs, _, _, crashes| {
            with_undelivered(jobs, crashes);
            crashes.pop();
        });
    }

    #[test]
    fn an_uncounted_attempt_not_run_again_is_reported() {
        fails("not run again", |jobs, _, _, crashes| {
            with_undelivered(jobs, crashes);
            jobs[0].attempts[2].number = 2;
        });
    }
}
