//! The command runner: a [`Handler`] that runs a configured program per job.
//!
//! The payload goes to the child's stdin (which is then closed); `ROTA_JOB_ID`,
//! `ROTA_JOB_KIND`, `ROTA_ATTEMPT` and `ROTA_DEADLINE` go into its environment.
//! Exit 0 is success with stdout (capped) as the result; a non-zero exit or
//! death by signal is a retryable failure carrying the tail of stderr.
//!
//! The child leads its own process group. If the task is aborted (its future
//! dropped), the whole group gets SIGKILL; when the child exits, whatever it
//! left running in its group is killed too, so its pipes close and the task
//! ends. tokio reaps the child in every case, including after a drop.
//!
//! Notices: when the task gets its [`Notice`](super::Notice), the group gets
//! the kind's [`StopSignal`] (default SIGTERM); at the notice's `stop_by` it
//! gets SIGKILL and the child is reaped before the task returns. A child that
//! died from the stop signal, or was killed at `stop_by`, ends the task with a
//! [`TaskError::stopped`] error, so the notice decides what is reported.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio::sync::watch;
use tokio::time::sleep_until;
use tracing::{debug, info, warn};

use super::task::{instant_at, Handler, Notice, TaskContext, TaskError};

/// Default cap on a command's stdout result: 1 MiB.
pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;
/// How much of stderr's end goes into a failure's error message.
pub const STDERR_TAIL: usize = 4 * 1024;

/// Errors building a [`CommandHandler`] or parsing a [`StopSignal`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The command line has no program.
    #[error("command is empty: give at least the program to run")]
    EmptyCommand,
    /// A stop signal that is unknown, out of range, or cannot be caught.
    #[error("invalid stop signal {signal:?}: {reason}")]
    StopSignal {
        signal: String,
        reason: &'static str,
    },
}

/// The signal a command's process group gets as its notice: SIGTERM by
/// default. Written as a name with or without the `SIG` prefix (`"SIGTERM"`,
/// `"INT"`, `"usr1"`) or a number. SIGKILL and SIGSTOP are refused: they
/// cannot be caught, so the task would get no grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "StopSignalRepr")]
pub struct StopSignal(libc::c_int);

/// Signal names accepted by [`StopSignal`]'s parser (without `SIG`).
const SIGNAL_NAMES: &[(&str, libc::c_int)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ABRT", libc::SIGABRT),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("WINCH", libc::SIGWINCH),
];

/// Highest signal number accepted (Linux's SIGRTMAX).
const MAX_SIGNAL: libc::c_int = 64;

impl StopSignal {
    /// SIGTERM, the default.
    pub const TERM: Self = Self(libc::SIGTERM);

    /// The signal with this number, if it can serve as a stop signal.
    pub fn from_raw(signal: i32) -> Result<Self, CommandError> {
        let bad = |reason| CommandError::StopSignal {
            signal: signal.to_string(),
            reason,
        };
        match signal {
            libc::SIGKILL => Err(bad(
                "SIGKILL cannot be caught, so the task would get no grace (the worker sends it itself at the stop-by time)",
            )),
            libc::SIGSTOP => Err(bad("SIGSTOP cannot be caught and stops nothing")),
            1..=MAX_SIGNAL => Ok(Self(signal)),
            _ => Err(bad("signal numbers go from 1 to 64")),
        }
    }

    /// The signal number.
    pub fn as_raw(self) -> i32 {
        self.0
    }
}

impl Default for StopSignal {
    fn default() -> Self {
        Self::TERM
    }
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match SIGNAL_NAMES.iter().find(|(_, n)| *n == self.0) {
            Some((name, _)) => write!(f, "SIG{name}"),
            None => write!(f, "signal {}", self.0),
        }
    }
}

impl std::str::FromStr for StopSignal {
    type Err = CommandError;

    fn from_str(s: &str) -> Result<Self, CommandError> {
        let text = s.trim();
        if let Ok(n) = text.parse::<i32>() {
            return Self::from_raw(n).map_err(|e| match e {
                CommandError::StopSignal { reason, .. } => CommandError::StopSignal {
                    signal: s.to_owned(),
                    reason,
                },
                other => other,
            });
        }
        let upper = text.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        let Some(&(_, n)) = SIGNAL_NAMES.iter().find(|(known, _)| *known == name) else {
            return Err(CommandError::StopSignal {
                signal: s.to_owned(),
                reason:
                    "not a signal name like SIGTERM, TERM, INT, QUIT, HUP, USR1, USR2 or a number",
            });
        };
        Self::from_raw(n).map_err(|e| match e {
            CommandError::StopSignal { reason, .. } => CommandError::StopSignal {
                signal: s.to_owned(),
                reason,
            },
            other => other,
        })
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopSignalRepr {
    Int(i64),
    Text(String),
}

impl TryFrom<StopSignalRepr> for StopSignal {
    type Error = CommandError;

    fn try_from(repr: StopSignalRepr) -> Result<Self, CommandError> {
        match repr {
            StopSignalRepr::Int(n) => match i32::try_from(n) {
                Ok(n) => Self::from_raw(n),
                Err(_) => Err(CommandError::StopSignal {
                    signal: n.to_string(),
                    reason: "signal numbers go from 1 to 64",
                }),
            },
            StopSignalRepr::Text(s) => s.parse(),
        }
    }
}

/// Runs one program per job; see the module docs for the contract.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    spec: Arc<CommandSpec>,
}

#[derive(Debug, Clone)]
struct CommandSpec {
    /// Program and arguments; never empty.
    argv: Vec<String>,
    /// Extra environment for the child, on top of the worker's own.
    env: BTreeMap<String, String>,
    /// Working directory; `None`: the worker's.
    cwd: Option<PathBuf>,
    /// Cap on stdout kept as the result; the rest is read and dropped.
    max_output: usize,
    /// Sent to the process group when the task gets its notice.
    stop_signal: StopSignal,
}

impl CommandHandler {
    /// A runner for `argv` (program first).
    pub fn new<I, S>(argv: I) -> Result<Self, CommandError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let argv: Vec<String> = argv.into_iter().map(Into::into).collect();
        if argv.first().is_none_or(|p| p.is_empty()) {
            return Err(CommandError::EmptyCommand);
        }
        Ok(Self {
            spec: Arc::new(CommandSpec {
                argv,
                env: BTreeMap::new(),
                cwd: None,
                max_output: DEFAULT_MAX_OUTPUT,
                stop_signal: StopSignal::TERM,
            }),
        })
    }

    fn spec_mut(&mut self) -> &mut CommandSpec {
        Arc::make_mut(&mut self.spec)
    }

    /// Adds an environment variable for the child.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec_mut().env.insert(key.into(), value.into());
        self
    }

    /// Runs the child in `dir`.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spec_mut().cwd = Some(dir.into());
        self
    }

    /// Caps the stdout kept as the result (default [`DEFAULT_MAX_OUTPUT`]).
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.spec_mut().max_output = bytes;
        self
    }

    /// The signal the process group gets as the task's notice (default SIGTERM).
    pub fn stop_signal(mut self, signal: StopSignal) -> Self {
        self.spec_mut().stop_signal = signal;
        self
    }

    async fn run(spec: Arc<CommandSpec>, ctx: TaskContext) -> Result<Vec<u8>, TaskError> {
        let job = ctx.job();
        let program = &spec.argv[0];
        let deadline = ctx
            .deadline()
            .map(|t| humantime::format_rfc3339(t).to_string())
            .unwrap_or_default();
        let mut cmd = Command::new(program);
        cmd.args(&spec.argv[1..])
            .envs(&spec.env)
            .env("ROTA_JOB_ID", &job.id)
            .env("ROTA_JOB_KIND", &job.kind)
            .env("ROTA_ATTEMPT", job.attempt.to_string())
            .env("ROTA_DEADLINE", deadline)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| TaskError::retryable(format!("cannot run {program}: {e}")))?;
        // From here on, dropping this future (an abort) kills the whole group.
        let mut group = GroupGuard::new(child.id());
        debug!(job = %job.id, pid = ?child.id(), program = %program, "command started");

        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let payload = job.payload.as_slice();
        let mut stopper = Stopper::default();
        let exited = async {
            let status = tokio::select! {
                status = child.wait() => status,
                never = stopper.enforce(ctx.notices(), &group, spec.stop_signal, &job.id) => {
                    match never {}
                }
            };
            // The leader is gone; stragglers it left in its group would keep
            // the pipes open, so they go too.
            group.kill();
            status
        };
        let (status, (stdout, truncated), stderr, ()) = tokio::join!(
            exited,
            read_capped(stdout, spec.max_output),
            read_tail(stderr, STDERR_TAIL),
            feed_stdin(stdin, payload),
        );
        group.disarm();
        let status =
            status.map_err(|e| TaskError::retryable(format!("waiting for {program}: {e}")))?;
        if truncated {
            warn!(
                job = %job.id,
                max_output = spec.max_output,
                "command output truncated to max_output"
            );
        }
        let message = || failure_message(status, &stderr);
        if status.success() {
            Ok(stdout)
        } else if stopper.killed {
            Err(TaskError::stopped(format!(
                "killed at its stop-by time ({})",
                message()
            )))
        } else if stopper.signalled && status.signal() == Some(spec.stop_signal.as_raw()) {
            Err(TaskError::stopped(message()))
        } else {
            Err(TaskError::retryable(message()))
        }
    }
}

/// Delivers a task's notice to its process group, and remembers what it did.
#[derive(Debug, Default)]
struct Stopper {
    /// The stop signal was sent.
    signalled: bool,
    /// SIGKILL was sent at `stop_by`.
    killed: bool,
}

impl Stopper {
    /// Waits for the notice, sends the stop signal, then SIGKILL at the
    /// notice's `stop_by` (following a later notice that moves it earlier).
    /// Never completes: the caller races it against the child's exit.
    async fn enforce(
        &mut self,
        mut notices: watch::Receiver<Option<Notice>>,
        group: &GroupGuard,
        signal: StopSignal,
        job_id: &str,
    ) -> Infallible {
        let first = notices
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|n| n.clone());
        let Some(mut notice) = first else {
            return std::future::pending().await;
        };
        self.signalled = group.signal(signal.as_raw());
        info!(
            job = %job_id,
            signal = %signal,
            notice = ?notice.kind,
            stop_by = %humantime::format_rfc3339_millis(notice.stop_by),
            "stop signal sent to the command"
        );
        let mut open = true;
        loop {
            let changed = tokio::select! {
                () = sleep_until(instant_at(notice.stop_by)) => break,
                changed = notices.changed(), if open => changed.is_ok(),
            };
            open = changed;
            if let Some(later) = notices.borrow_and_update().clone() {
                notice = later;
            }
        }
        warn!(job = %job_id, "command still running at its stop-by time, killing its process group");
        group.kill();
        self.killed = true;
        std::future::pending().await
    }
}

impl Handler for CommandHandler {
    fn call(&self, ctx: TaskContext) -> BoxFuture<'static, Result<Vec<u8>, TaskError>> {
        Box::pin(Self::run(Arc::clone(&self.spec), ctx))
    }
}

/// SIGKILLs the child's process group when dropped while armed.
struct GroupGuard {
    /// The group id (the child's pid, as it leads its own group).
    pgid: Option<libc::pid_t>,
}

impl GroupGuard {
    fn new(pid: Option<u32>) -> Self {
        Self {
            pgid: pid.and_then(|p| libc::pid_t::try_from(p).ok()),
        }
    }

    /// Sends `signal` to the group; false if there is no group (any more).
    fn signal(&self, signal: libc::c_int) -> bool {
        let Some(pgid) = self.pgid else { return false };
        // SAFETY: kill(2) with a negative pid signals the process group; it
        // touches no memory of ours.
        unsafe { libc::kill(-pgid, signal) == 0 }
    }

    /// Kills the group now (idempotent; a group that is gone is fine).
    fn kill(&self) {
        if self.signal(libc::SIGKILL) {
            debug!(pgid = ?self.pgid, "killed command process group");
        }
    }

    /// The task ended normally and the group was already cleaned up: do not
    /// signal a pgid that may be reused later.
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes the payload to the child's stdin and closes it. A child that does not
/// read its stdin (EPIPE) is not an error.
async fn feed_stdin(stdin: Option<ChildStdin>, payload: &[u8]) {
    let Some(mut stdin) = stdin else { return };
    if let Err(e) = stdin.write_all(payload).await {
        debug!(error = %e, "command did not take its whole stdin");
    }
    // Dropping closes the pipe, so the child sees EOF.
}

/// Reads everything, keeping the first `cap` bytes; returns whether more came.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let Some(mut pipe) = pipe else {
        return (kept, truncated);
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
            Err(e) => {
                warn!(error = %e, "reading command output failed");
                break;
            }
        }
    }
    (kept, truncated)
}

/// Reads everything, keeping the last `keep` bytes.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, keep: usize) -> Vec<u8> {
    let mut tail = Vec::new();
    let Some(mut pipe) = pipe else { return tail };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > keep {
                    tail.drain(..tail.len() - keep);
                }
            }
            Err(e) => {
                warn!(error = %e, "reading command stderr failed");
                break;
            }
        }
    }
    tail
}

/// `exit status 3: <stderr tail>` or `killed by signal 9: <stderr tail>`.
fn failure_message(status: ExitStatus, stderr_tail: &[u8]) -> String {
    let head = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("ended abnormally ({status})"),
    };
    let tail = String::from_utf8_lossy(stderr_tail);
    let tail = tail.trim_end();
    if tail.is_empty() {
        head
    } else {
        format!("{head}: {tail}")
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::proto;
    use crate::worker::task::{NoticeKind, NoticeSlot, ProgressSlot};

    fn ctx(payload: &[u8]) -> TaskContext {
        with_notices(payload, &NoticeSlot::default())
    }

    fn with_notices(payload: &[u8], notices: &NoticeSlot) -> TaskContext {
        let job = proto::Job {
            id: "job-1".into(),
            kind: "test".into(),
            payload: payload.to_vec(),
            attempt: 2,
            ..Default::default()
        };
        TaskContext::new(
            job,
            "lease-1".into(),
            None,
            None,
            ProgressSlot::default(),
            notices.clone(),
        )
    }

    fn shutdown_notice(stop_in: Duration) -> Notice {
        Notice {
            kind: NoticeKind::Shutdown,
            reason: "test".into(),
            stop_by: SystemTime::now() + stop_in,
        }
    }

    fn read_pid(path: &std::path::Path) -> Option<libc::pid_t> {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn sh(script: &str) -> CommandHandler {
        CommandHandler::new(["sh", "-c", script]).expect("non-empty")
    }

    #[tokio::test]
    async fn payload_in_stdout_out() {
        let handler = CommandHandler::new(["cat"]).expect("non-empty");
        let out = handler.call(ctx(b"hello rota")).await;
        assert_eq!(out, Ok(b"hello rota".to_vec()));
    }

    #[tokio::test]
    async fn environment_is_set() {
        let handler = sh(r#"printf '%s|%s|%s|%s|%s' "$ROTA_JOB_ID" "$ROTA_JOB_KIND" "$ROTA_ATTEMPT" "$ROTA_DEADLINE" "$EXTRA""#)
            .env("EXTRA", "x");
        let out = handler.call(ctx(b"")).await.expect("success");
        assert_eq!(String::from_utf8_lossy(&out), "job-1|test|2||x");

        let deadline = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let job = ctx(b"").job().clone();
        let with_deadline = TaskContext::new(
            job,
            "lease-1".into(),
            Some(deadline),
            None,
            ProgressSlot::default(),
            NoticeSlot::default(),
        );
        let out = sh(r#"printf '%s' "$ROTA_DEADLINE""#)
            .call(with_deadline)
            .await
            .expect("success");
        assert_eq!(String::from_utf8_lossy(&out), "2023-11-14T22:13:20Z");
    }

    #[tokio::test]
    async fn non_zero_exit_carries_stderr_tail() {
        let err = sh("echo boom >&2; exit 3")
            .call(ctx(b""))
            .await
            .expect_err("fails");
        assert_eq!(err.message(), "exit status 3: boom");
        assert!(!err.is_permanent());

        // Only the last 4 KiB of a long stderr are kept.
        let err = sh("head -c 10000 /dev/zero | tr '\\0' a >&2; echo END >&2; exit 1")
            .call(ctx(b""))
            .await
            .expect_err("fails");
        assert!(err.message().starts_with("exit status 1: aaa"));
        assert!(err.message().ends_with("aaaEND"));
        assert_eq!(
            err.message().len(),
            "exit status 1: ".len() + STDERR_TAIL - 1
        );
    }

    #[tokio::test]
    async fn death_by_signal_is_reported() {
        let err = sh("echo dying >&2; kill -9 $$")
            .call(ctx(b""))
            .await
            .expect_err("fails");
        assert_eq!(err.message(), "killed by signal 9: dying");
    }

    #[tokio::test]
    async fn output_is_capped_without_deadlock() {
        // 4 MiB of output and a 4 MiB payload read back: both pipes would fill up
        // if they were not served concurrently with the wait.
        let payload = vec![b'p'; 4 * 1024 * 1024];
        let out = CommandHandler::new(["cat"])
            .expect("non-empty")
            .max_output(1000)
            .call(ctx(&payload))
            .await
            .expect("success");
        assert_eq!(out, vec![b'p'; 1000]);
    }

    #[tokio::test]
    async fn missing_program_is_a_failure() {
        let err = CommandHandler::new(["/nonexistent/rota-test-program"])
            .expect("non-empty")
            .call(ctx(b""))
            .await
            .expect_err("fails");
        assert!(err
            .message()
            .starts_with("cannot run /nonexistent/rota-test-program:"));
    }

    #[test]
    fn empty_command_is_rejected() {
        assert!(matches!(
            CommandHandler::new(Vec::<String>::new()),
            Err(CommandError::EmptyCommand)
        ));
        assert!(matches!(
            CommandHandler::new([""]),
            Err(CommandError::EmptyCommand)
        ));
    }

    #[tokio::test]
    async fn cwd_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = CommandHandler::new(["pwd"])
            .expect("non-empty")
            .current_dir(dir.path())
            .call(ctx(b""))
            .await
            .expect("success");
        let printed = PathBuf::from(String::from_utf8_lossy(&out).trim());
        assert_eq!(
            printed.canonicalize().expect("exists"),
            dir.path().canonicalize().expect("exists")
        );
    }

    /// True once `pid` no longer runs (gone, or a zombie waiting for init).
    fn is_gone(pid: libc::pid_t) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return true;
        }
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    }

    async fn poll_until(what: &str, mut cond: impl FnMut() -> bool) {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(tokio::time::Instant::now() < give_up, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn abort_kills_the_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 100 & echo $! > {}; wait", pidfile.display());
        let task = tokio::spawn(sh(&script).call(ctx(b"")));

        let mut pid: Option<libc::pid_t> = None;
        poll_until("pidfile written", || {
            pid = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            pid.is_some()
        })
        .await;
        let pid = pid.expect("polled");
        assert!(!is_gone(pid), "background sleep should be running");

        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
        poll_until("background sleep killed", || is_gone(pid)).await;
    }

    #[tokio::test]
    async fn stragglers_are_killed_when_the_leader_exits() {
        // The leader exits at once but leaves a sleeper holding stdout open;
        // the task must still end, with what was printed before.
        let out = sh("echo started; sleep 100 &")
            .call(ctx(b""))
            .await
            .expect("success");
        assert_eq!(out, b"started\n");
    }

    #[tokio::test]
    async fn notice_sends_the_stop_signal_to_the_whole_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, leader, child) = (
            dir.path().join("log"),
            dir.path().join("leader"),
            dir.path().join("child"),
        );
        // Both the leader and a background child trap SIGTERM and say so.
        let script = format!(
            r#"(trap 'echo child-term >> {log}; exit 0' TERM; echo $$ > {child}.tmp; mv {child}.tmp {child}; while :; do sleep 0.05; done) &
child=$!
trap 'echo got-term >> {log}; wait $child; exit 0' TERM
echo $$ > {leader}
while :; do sleep 0.05; done"#,
            log = log.display(),
            leader = leader.display(),
            child = child.display(),
        );
        let notices = NoticeSlot::default();
        let task = tokio::spawn(sh(&script).call(with_notices(b"", &notices)));
        poll_until("both shells running", || {
            read_pid(&leader).is_some() && read_pid(&child).is_some()
        })
        .await;
        notices.post(shutdown_notice(Duration::from_secs(60)));
        let out = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("command ends soon after its notice")
            .expect("no panic");
        assert_eq!(out, Ok(Vec::new()), "trapped and exited 0");
        let log = std::fs::read_to_string(&log).expect("log written");
        assert!(log.contains("got-term"), "{log}");
        assert!(log.contains("child-term"), "{log}");
    }

    #[tokio::test]
    async fn stop_signal_is_configurable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, ready) = (dir.path().join("log"), dir.path().join("ready"));
        let script = format!(
            r#"trap 'echo term >> {log}' TERM
trap 'echo usr1 >> {log}; exit 0' USR1
echo ready > {ready}
while :; do sleep 0.05; done"#,
            log = log.display(),
            ready = ready.display(),
        );
        let notices = NoticeSlot::default();
        let handler = sh(&script).stop_signal("USR1".parse().expect("valid signal"));
        let task = tokio::spawn(handler.call(with_notices(b"", &notices)));
        poll_until("script running", || ready.exists()).await;
        notices.post(shutdown_notice(Duration::from_secs(60)));
        let out = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("ends in time")
            .expect("no panic");
        assert_eq!(out, Ok(Vec::new()));
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "usr1\n");
    }

    #[tokio::test]
    async fn death_by_the_stop_signal_is_a_stopped_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let script = format!("echo ready > {}; sleep 100; echo never", ready.display());
        let notices = NoticeSlot::default();
        let task = tokio::spawn(sh(&script).call(with_notices(b"", &notices)));
        poll_until("script running", || ready.exists()).await;
        notices.post(shutdown_notice(Duration::from_secs(60)));
        let err = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("ends in time")
            .expect("no panic")
            .expect_err("killed by SIGTERM");
        assert!(err.is_stopped(), "{err:?}");
        assert_eq!(err.message(), "killed by signal 15");
    }

    #[tokio::test]
    async fn ignoring_command_is_killed_at_stop_by_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (leader, child) = (dir.path().join("leader"), dir.path().join("child"));
        // SIGTERM is ignored by the shell and, inherited, by its children.
        let script = format!(
            r#"trap '' TERM
sleep 100 &
echo $! > {child}
echo $$ > {leader}
while :; do sleep 0.05; done"#,
            leader = leader.display(),
            child = child.display(),
        );
        let notices = NoticeSlot::default();
        let task = tokio::spawn(sh(&script).call(with_notices(b"", &notices)));
        poll_until("script running", || {
            read_pid(&leader).is_some() && read_pid(&child).is_some()
        })
        .await;
        let (leader, child) = (
            read_pid(&leader).expect("pid"),
            read_pid(&child).expect("pid"),
        );
        let notice = shutdown_notice(Duration::from_millis(300));
        notices.post(notice.clone());
        let err = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("killed in time")
            .expect("no panic")
            .expect_err("killed");
        assert!(SystemTime::now() >= notice.stop_by, "not killed early");
        assert!(err.is_stopped(), "{err:?}");
        assert!(
            err.message().starts_with("killed at its stop-by time"),
            "{err:?}"
        );
        // The leader was reaped before the call returned; its child goes too.
        assert!(is_gone(leader), "leader reaped");
        poll_until("background child killed", || is_gone(child)).await;
    }

    #[test]
    fn stop_signals_parse() {
        let raw = |s: &str| s.parse::<StopSignal>().map(StopSignal::as_raw);
        assert_eq!(raw("SIGTERM"), Ok(libc::SIGTERM));
        assert_eq!(raw("term"), Ok(libc::SIGTERM));
        assert_eq!(raw("INT"), Ok(libc::SIGINT));
        assert_eq!(raw("SigQuit"), Ok(libc::SIGQUIT));
        assert_eq!(raw("HUP"), Ok(libc::SIGHUP));
        assert_eq!(raw("USR2"), Ok(libc::SIGUSR2));
        assert_eq!(raw("15"), Ok(15));
        assert_eq!(raw("40"), Ok(40));
        for bad in [
            "KILL",
            "SIGKILL",
            "9",
            "STOP",
            "0",
            "65",
            "-1",
            "TERMINATE",
            "",
        ] {
            assert!(raw(bad).is_err(), "{bad:?} accepted");
        }
        let err = "SIGKILL".parse::<StopSignal>().expect_err("refused");
        assert!(err.to_string().contains("no grace"), "{err}");
        assert_eq!(StopSignal::default().to_string(), "SIGTERM");
        assert_eq!(
            StopSignal::from_raw(40).expect("valid").to_string(),
            "signal 40"
        );
    }
}
