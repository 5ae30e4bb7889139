//! The run log: every run of a chaos job appends a `start` line when it begins and an `end`
//! line just before it exits, written by the job itself (a shell command under `rota-worker`,
//! or a Rust handler under the SDK). It is the evidence of what actually ran, independent of
//! what the coordinator recorded.
//!
//! ```text
//! start JOB_ID ATTEMPT WORKER_ID PID UNIX_SECONDS
//! end   JOB_ID ATTEMPT WORKER_ID PID UNIX_SECONDS ok|fail
//! ```
//!
//! Also here: the guard that kills, by pid, run commands orphaned by a `kill -9` of their
//! worker, so that none outlives the test.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One run of one attempt of a job, as the job itself logged it.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub job: String,
    pub attempt: u32,
    pub worker: String,
    pub pid: u32,
    pub start: SystemTime,
    /// When it finished and whether it succeeded; `None` for a run killed before its end.
    pub end: Option<(SystemTime, bool)>,
}

/// The shell script of the `cmd` kind. The payload on stdin is `MODE SECONDS`: it logs its
/// start, sleeps, decides its outcome from the mode and `ROTA_ATTEMPT` (`flaky` fails on
/// attempts 1 and 2), logs its end and exits with that outcome. `WORKER` comes from the
/// kind's `env` in the worker config.
pub fn command_script(log: &Path) -> String {
    let log = log.display();
    format!(
        r#"read -r mode secs
echo "start $ROTA_JOB_ID $ROTA_ATTEMPT $WORKER $$ $(date +%s.%N)" >> '{log}'
sleep "$secs"
case "$mode" in
  ok) out=ok ;;
  flaky) if [ "$ROTA_ATTEMPT" -lt {FLAKY_SUCCEEDS_AT} ]; then out=fail; else out=ok; fi ;;
  *) out=fail ;;
esac
echo "end $ROTA_JOB_ID $ROTA_ATTEMPT $WORKER $$ $(date +%s.%N) $out" >> '{log}'
if [ "$out" = ok ]; then echo done; exit 0; fi
echo "chaos-$mode-failure" >&2
exit 1"#
    )
}

/// The first attempt on which a `flaky` job succeeds.
pub const FLAKY_SUCCEEDS_AT: u32 = 3;

/// Appends one line in one `write`, so that concurrent writers never interleave.
pub fn append(log: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open run log {}: {e}", log.display()));
    f.write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| panic!("append to run log {}: {e}", log.display()));
}

/// `SystemTime` as `date +%s.%N` prints it.
pub fn unix_seconds(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).expect("after the epoch");
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let (secs, nanos) = s.split_once('.')?;
    let nanos = format!("{nanos:0<9}");
    Some(UNIX_EPOCH + Duration::new(secs.parse().ok()?, nanos[..9].parse().ok()?))
}

/// Every run in the log. Panics on a line it cannot read: the log is written only by the
/// chaos jobs, so a malformed line means the evidence itself is broken.
pub fn read(log: &Path) -> Vec<Run> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => panic!("read run log {}: {e}", log.display()),
    };
    parse(&text)
}

/// Parses run-log text; `end` lines are matched to their `start` by job, attempt, worker
/// and pid.
pub fn parse(text: &str) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut open: HashMap<(String, u32, String, u32), usize> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || -> ! { panic!("malformed run-log line: {line:?}") };
        let (attempt, pid) = match (f.get(2), f.get(4)) {
            (Some(a), Some(p)) => (
                a.parse::<u32>().unwrap_or_else(|_| bad()),
                p.parse::<u32>().unwrap_or_else(|_| bad()),
            ),
            _ => bad(),
        };
        let time = f
            .get(5)
            .and_then(|t| parse_time(t))
            .unwrap_or_else(|| bad());
        let key = (f[1].to_string(), attempt, f[3].to_string(), pid);
        match (f[0], f.len()) {
            ("start", 6) => {
                open.insert(key.clone(), runs.len());
                runs.push(Run {
                    job: key.0,
                    attempt,
                    worker: key.2,
                    pid,
                    start: time,
                    end: None,
                });
            }
            ("end", 7) => {
                let ok = match f[6] {
                    "ok" => true,
                    "fail" => false,
                    _ => bad(),
                };
                let i = open
                    .remove(&key)
                    .unwrap_or_else(|| panic!("run-log end without its start: {line:?}"));
                runs[i].end = Some((time, ok));
            }
            _ => bad(),
        }
    }
    runs
}

/// Kills (SIGKILL, by process group) every command in the run log that is still alive when
/// dropped: a `kill -9` of `rota-worker` leaves its commands running. A pid is only
/// signalled if its command line names this run log, so a reused pid is never hit.
pub struct OrphanGuard {
    pub log: PathBuf,
}

impl OrphanGuard {
    /// Kills the orphans now; returns how many were alive.
    pub fn kill_orphans(&self) -> usize {
        let marker = self.log.display().to_string();
        let mut killed = 0;
        for run in read(&self.log) {
            if run.pid == std::process::id() || run.end.is_some() {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", run.pid)).unwrap_or_default();
            if !String::from_utf8_lossy(&cmdline).contains(&marker) {
                continue;
            }
            // SAFETY: kill(2) has no memory-safety preconditions; the pid (a process group
            // leader: the worker starts each command in its own group) runs our script.
            unsafe {
                libc::kill(-(run.pid as libc::pid_t), libc::SIGKILL);
                libc::kill(run.pid as libc::pid_t, libc::SIGKILL);
            }
            killed += 1;
        }
        killed
    }
}

impl Drop for OrphanGuard {
    fn drop(&mut self) {
        self.kill_orphans();
    }
}

#[test]
fn run_log_lines_pair_up_by_job_attempt_worker_and_pid() {
    let text = "start j1 1 w1 10 1700000000.5\n\
                start j2 1 w2 11 1700000000.25\n\
                end j1 1 w1 10 1700000001.000000001 ok\n\
                start j2 2 w1 12 1700000003.0\n\
                end j2 2 w1 12 1700000004.0 fail\n";
    let runs = parse(text);
    assert_eq!(runs.len(), 3);
    assert_eq!(
        runs[0].end,
        Some((UNIX_EPOCH + Duration::new(1_700_000_001, 1), true))
    );
    assert_eq!(
        runs[0].start,
        UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000)
    );
    assert_eq!(runs[1].end, None, "killed before its end");
    assert_eq!(runs[2].end.map(|(_, ok)| ok), Some(false));
    let t = UNIX_EPOCH + Duration::new(5, 42);
    assert_eq!(parse_time(&unix_seconds(t)), Some(t));
}
