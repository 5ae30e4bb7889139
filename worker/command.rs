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

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tracing::{debug, warn};

use super::task::{Handler, TaskContext, TaskError};

/// Default cap on a command's stdout result: 1 MiB.
pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;
/// How much of stderr's end goes into a failure's error message.
pub const STDERR_TAIL: usize = 4 * 1024;

/// Errors building a [`CommandHandler`].
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command line has no program.
    #[error("command is empty: give at least the program to run")]
    EmptyCommand,
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
        let exited = async {
            let status = child.wait().await;
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
        if status.success() {
            Ok(stdout)
        } else {
            Err(TaskError::retryable(failure_message(status, &stderr)))
        }
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

    /// Kills the group now (idempotent; a group that is gone is fine).
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) with a negative pid signals the process group; it
            // touches no memory of ours.
            let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
            if rc == 0 {
                debug!(pgid, "killed command process group");
            }
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
    use crate::worker::task::ProgressSlot;

    fn ctx(payload: &[u8]) -> TaskContext {
        let job = proto::Job {
            id: "job-1".into(),
            kind: "test".into(),
            payload: payload.to_vec(),
            attempt: 2,
            ..Default::default()
        };
        TaskContext::new(job, "lease-1".into(), None, None, ProgressSlot::default())
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
}
