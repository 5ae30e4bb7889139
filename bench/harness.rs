//! Starting and stopping the processes a benchmark measures: a coordinator
//! on a fresh data directory, and worker processes. Everything is killed by
//! PID when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rota::proto::admin_service_client::AdminServiceClient;
use rota::proto::job_service_client::JobServiceClient;
use rota::proto::ListWorkersRequest;
use tonic::transport::Channel;

/// Largest message either way (batches of 1,000 jobs with their results).
const MAX_MESSAGE: usize = 256 << 20;

/// A binary built next to this one.
pub fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to rota-bench; build with `cargo build --release`",
            path.display()
        );
    }
    Ok(path)
}

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "rota-bench-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kill(child: &mut Child, signal: libc::c_int) {
    // SAFETY: kill(2) with a pid we own.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// A running coordinator.
pub struct Coordinator {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    listen: String,
}

impl Coordinator {
    /// Starts `rota-coordinator` on `data_dir` and waits for it to serve.
    pub fn start(data_dir: &Path, listen: &str) -> Result<Coordinator> {
        Self::start_with_args(data_dir, listen, &[])
    }

    /// [`Coordinator::start`] with extra flags.
    ///
    /// `ROTA_BENCH_COORDINATOR_PREFIX`, if set, is a command (split at
    /// spaces) that runs the coordinator, for profiling it inside a workload
    /// (`valgrind --tool=callgrind`). It must run it in the same process: a
    /// SIGTERM to that process stops the coordinator, and the figures that
    /// read the process (peak RSS) read it.
    pub fn start_with_args(data_dir: &Path, listen: &str, args: &[&str]) -> Result<Coordinator> {
        let binary = sibling("rota-coordinator")?;
        let prefix = std::env::var("ROTA_BENCH_COORDINATOR_PREFIX").unwrap_or_default();
        let mut words = prefix.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let mut child = command
            .args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting rota-coordinator")?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            kill(&mut child, libc::SIGKILL);
            bail!("rota-coordinator did not start: {line:?}");
        };
        Ok(Coordinator {
            url: format!("http://{addr}"),
            listen: addr.to_string(),
            child,
            data_dir: data_dir.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its address, to restart on the same one.
    pub fn listen(&self) -> &str {
        &self.listen
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) -> Result<()> {
        kill(&mut self.child, libc::SIGTERM);
        self.child.wait()?;
        Ok(())
    }

    /// Peak resident memory (VmHWM), in bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmHWM")?;
        Ok(kib * 1024)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill(&mut self.child, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Worker processes, killed on drop.
pub struct Workers(Vec<Child>);

/// The tokio runtime of an SDK worker process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerRuntime {
    /// One thread: the handler, the session and the connection never wake another thread. What a
    /// process whose handlers are short or I/O-bound is best served by; the default here.
    #[default]
    CurrentThread,
    /// `#[tokio::main]`'s default: a worker thread per core.
    MultiThread,
}

impl WorkerRuntime {
    /// Its `--runtime` value.
    pub fn arg(self) -> &'static str {
        match self {
            WorkerRuntime::CurrentThread => "current-thread",
            WorkerRuntime::MultiThread => "multi-thread",
        }
    }
}

impl Workers {
    /// `n` SDK worker processes (this binary's `worker` subcommand), each with `slots`.
    pub fn sdk(url: &str, n: usize, slots: u32, runtime: WorkerRuntime) -> Result<Workers> {
        let me = std::env::current_exe()?;
        let mut children = Vec::new();
        for i in 0..n {
            children.push(
                Command::new(&me)
                    .args([
                        "worker",
                        "--coordinator",
                        url,
                        "--slots",
                        &slots.to_string(),
                        "--runtime",
                        runtime.arg(),
                        "--id",
                    ])
                    .arg(format!("sdk-{i}"))
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()?,
            );
        }
        Ok(Workers(children))
    }

    /// `n` `rota-worker` processes running `true` for kind `noop`.
    pub fn command(url: &str, n: usize, slots: u32, dir: &Path) -> Result<Workers> {
        let mut children = Vec::new();
        for i in 0..n {
            let config = dir.join(format!("worker-{i}.toml"));
            std::fs::write(
                &config,
                format!("worker_id = \"cmd-{i}\"\nslots = {slots}\n[kinds.noop]\ncommand = [\"true\"]\n"),
            )?;
            children.push(
                Command::new(sibling("rota-worker")?)
                    .args(["--coordinator", url, "--config"])
                    .arg(&config)
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()?,
            );
        }
        Ok(Workers(children))
    }

    /// Waits until the coordinator lists `n` workers.
    pub async fn wait_connected(url: &str, n: usize) -> Result<()> {
        let mut admin = AdminServiceClient::new(channel(url).await?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let workers = admin
                .list_workers(ListWorkersRequest {})
                .await?
                .into_inner()
                .workers;
            if workers.iter().filter(|w| w.connect_time.is_some()).count() >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {} of {n} workers connected", workers.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            kill(c, libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// A channel to the coordinator.
pub async fn channel(url: &str) -> Result<Channel> {
    Ok(Channel::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// A job client with large message limits.
pub async fn jobs(url: &str) -> Result<JobServiceClient<Channel>> {
    Ok(JobServiceClient::new(channel(url).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Total size of the files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
