//! The worker SDK: connect to a coordinator, take leased jobs, run them with
//! registered handlers, report the outcomes.
//!
//! ```no_run
//! use rota::worker::{TaskContext, TaskError, Worker};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let worker = Worker::builder("http://127.0.0.1:50051")
//!     .handler("echo", |ctx: TaskContext| async move {
//!         ctx.report_progress("echoing");
//!         Ok::<_, TaskError>(ctx.job().payload.clone())
//!     })
//!     .build()?;
//! worker.run(async { tokio::signal::ctrl_c().await.ok(); }).await;
//! # Ok(()) }
//! ```
//!
//! - [`Worker`] / [`WorkerBuilder`]: identity, queues, slots, labels, handlers.
//! - [`Handler`], [`TaskContext`], [`TaskError`]: what a handler is, sees and returns.
//! - [`Notice`], [`NoticeKind`]: a task is told to stop (cancelled, worker
//!   shutting down, timed out) by a stop-by time, through
//!   [`TaskContext::notice`]; what still runs at that time is aborted.
//! - [`ShutdownHandle`]: drain (take nothing new, give running tasks their
//!   notice) and stop now.
//! - [`CommandHandler`]: runs a program per job; [`WorkerConfig`] builds a
//!   worker of command handlers from the `rota-worker` config file.
//!
//! The session protocol itself lives in `session` (the I/O driver) and `ledger`
//! (the pure bookkeeping of leases it drives).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

mod backoff;
mod command;
mod config;
mod ledger;
mod session;
mod task;

pub use backoff::Backoff;
pub use command::{CommandError, CommandHandler, StopSignal, DEFAULT_MAX_OUTPUT, STDERR_TAIL};
pub use config::{ByteSize, ConfigError, KindConfig, WorkerConfig};
pub use task::{Handler, Notice, NoticeKind, TaskContext, TaskError};

/// How long a drain waits for acks once its last task ended (default).
pub const DEFAULT_DRAIN_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors building a [`Worker`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The coordinator URL does not parse as an endpoint.
    #[error("invalid coordinator url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// No handler was registered: the coordinator would read an empty kind
    /// list as "any kind".
    #[error("no handlers registered: add at least one with .handler(kind, handler)")]
    NoHandlers,
    /// A handler was registered for the empty kind.
    #[error("handler kind must not be empty")]
    EmptyKind,
    /// `slots(0)`.
    #[error("slots must be at least 1")]
    ZeroSlots,
    /// `queues(vec![])`.
    #[error("queues must name at least one queue")]
    NoQueues,
    /// The token cannot be sent as gRPC metadata.
    #[error("token must be printable ASCII without spaces")]
    InvalidToken,
    /// The TLS settings cannot be used.
    #[error("tls: {0}")]
    Tls(String),
}

/// Registered handlers by job kind.
pub(crate) type Handlers = BTreeMap<String, Arc<dyn Handler>>;

/// What the session needs to know about this worker; fixed once built.
#[derive(Debug)]
pub(crate) struct Settings {
    /// Where the coordinator listens.
    pub(crate) endpoint: Endpoint,
    /// Stable across reconnects, so the coordinator recognises us.
    pub(crate) worker_id: String,
    /// Reported in `Hello` for operators.
    pub(crate) hostname: String,
    pub(crate) queues: Vec<String>,
    pub(crate) slots: u32,
    pub(crate) labels: HashMap<String, String>,
    /// How long a drain waits for acks once its last task ended.
    pub(crate) drain_ack_timeout: Duration,
    /// The longest shutdown grace this worker can honour, sent in `Hello`;
    /// `None`: no limit.
    pub(crate) max_shutdown_grace: Option<Duration>,
    /// `authorization` metadata sent with the session (`Bearer <token>`).
    pub(crate) authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// Configures a [`Worker`]; see [`Worker::builder`].
#[must_use]
pub struct WorkerBuilder {
    url: String,
    worker_id: Option<String>,
    queues: Vec<String>,
    slots: Option<u32>,
    labels: HashMap<String, String>,
    handlers: Handlers,
    drain_ack_timeout: Duration,
    max_shutdown_grace: Option<Duration>,
    token: Option<String>,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl WorkerBuilder {
    /// The bearer token (role `worker` or `admin`) the coordinator requires,
    /// sent as `authorization: Bearer <token>`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Connects over TLS with this configuration (the CA that signed the
    /// coordinator's certificate and, for mTLS, this worker's identity). The
    /// URL should then be `https://`.
    pub fn tls(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Names this worker (default `hostname-pid`). Keep it stable across restarts
    /// of the same worker.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Queues to take jobs from (default `["default"]`).
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// How many jobs may run at once (default: the number of CPUs).
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = Some(slots);
        self
    }

    /// Adds a label shown in `ListWorkers`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Registers the handler for jobs of `kind` (replacing an earlier one).
    pub fn handler(mut self, kind: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// How long a drain waits for the coordinator to acknowledge results once
    /// the last task has ended (default [`DEFAULT_DRAIN_ACK_TIMEOUT`]).
    pub fn drain_ack_timeout(mut self, timeout: Duration) -> Self {
        self.drain_ack_timeout = timeout;
        self
    }

    /// The longest shutdown grace this worker can honour (default: no limit).
    /// Sent in `Hello`: the coordinator leases it no job whose
    /// `shutdown_grace` is longer, so a process supervisor that waits this
    /// long between SIGTERM and SIGKILL always lets a drain finish.
    pub fn max_shutdown_grace(mut self, grace: Duration) -> Self {
        self.max_shutdown_grace = Some(grace);
        self
    }

    /// Checks the settings and builds the worker. Nothing connects yet.
    pub fn build(self) -> Result<Worker, BuildError> {
        let endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| BuildError::InvalidUrl {
                url: self.url.clone(),
                reason: error_chain(&e),
            })?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let endpoint = match self.tls {
            Some(tls) => endpoint
                .tls_config(tls)
                .map_err(|e| BuildError::Tls(error_chain(&e)))?,
            None => endpoint,
        };
        let authorization = self
            .token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .ok()
                    .filter(|_| !t.is_empty() && !t.contains(char::is_whitespace))
                    .ok_or(BuildError::InvalidToken)
            })
            .transpose()?;
        if self.handlers.is_empty() {
            return Err(BuildError::NoHandlers);
        }
        if self.handlers.contains_key("") {
            return Err(BuildError::EmptyKind);
        }
        if self.queues.is_empty() {
            return Err(BuildError::NoQueues);
        }
        let slots = match self.slots {
            Some(0) => return Err(BuildError::ZeroSlots),
            Some(n) => n,
            None => default_slots(),
        };
        let hostname = hostname();
        let worker_id = self
            .worker_id
            .unwrap_or_else(|| format!("{hostname}-{}", std::process::id()));
        Ok(Worker {
            settings: Arc::new(Settings {
                endpoint,
                worker_id,
                hostname,
                queues: self.queues,
                slots,
                labels: self.labels,
                drain_ack_timeout: self.drain_ack_timeout,
                max_shutdown_grace: self.max_shutdown_grace,
                authorization,
            }),
            handlers: Arc::new(self.handlers),
        })
    }
}

/// A configured worker; [`Worker::run`] connects and works until shut down.
pub struct Worker {
    settings: Arc<Settings>,
    handlers: Arc<Handlers>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("settings", &self.settings)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Worker {
    /// Starts configuring a worker for the coordinator at `coordinator_url`
    /// (e.g. `http://127.0.0.1:50051`).
    pub fn builder(coordinator_url: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            url: coordinator_url.into(),
            worker_id: None,
            queues: vec!["default".to_owned()],
            slots: None,
            labels: HashMap::new(),
            handlers: BTreeMap::new(),
            drain_ack_timeout: DEFAULT_DRAIN_ACK_TIMEOUT,
            max_shutdown_grace: None,
            token: None,
            tls: None,
        }
    }

    /// This worker's id, as sent in `Hello`.
    pub fn worker_id(&self) -> &str {
        &self.settings.worker_id
    }

    /// The job kinds this worker handles.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    /// Runs until `shutdown` resolves, then drains: takes nothing new, gives
    /// each running task a shutdown notice (stop by now + its grace), aborts
    /// what still runs at that time, and waits for the results to be
    /// acknowledged. For a second, harder stop use [`Worker::run_with`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> RunSummary {
        let handle = ShutdownHandle::new();
        let trigger = handle.clone();
        let watch = async move {
            shutdown.await;
            trigger.drain();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            summary = self.run_with(handle) => summary,
            () = watch => unreachable!("the watch future never completes"),
        }
    }

    /// Runs until `shutdown` says to drain (then returns once drained) or to
    /// stop now (then aborts every task, reports them interrupted and returns
    /// within a few seconds). A `Shutdown` from the coordinator (it answers our
    /// drain, or an operator called `DrainWorker`) drains too, and this
    /// returns once drained.
    pub async fn run_with(self, shutdown: ShutdownHandle) -> RunSummary {
        session::Driver::new(self.settings, self.handlers)
            .run(shutdown)
            .await
    }
}

/// Tells a running worker to drain or to stop now. Cheap to clone; every
/// method is idempotent and can be called from any thread.
#[derive(Debug, Clone, Default)]
pub struct ShutdownHandle {
    /// Cancelled by the first signal: take nothing new, finish running tasks.
    drain: CancellationToken,
    /// Cancelled by the second signal: abort running tasks now.
    stop: CancellationToken,
}

impl ShutdownHandle {
    /// A handle that has signalled nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a graceful drain: take nothing new, give each running task a
    /// shutdown notice (stop by now + its grace), abort what still runs then.
    pub fn drain(&self) {
        self.drain.cancel();
    }

    /// Aborts every running task, reports them interrupted, and returns soon.
    /// Implies a drain.
    pub fn stop_now(&self) {
        self.drain.cancel();
        self.stop.cancel();
    }

    /// Whether a drain (or stop) was requested.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Whether a stop-now was requested.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    pub(crate) fn drain_token(&self) -> &CancellationToken {
        &self.drain
    }

    pub(crate) fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    /// A stop-now cut the run short (tasks were interrupted).
    pub stopped_now: bool,
    /// Results the coordinator never acknowledged (it may retry those jobs).
    pub unacknowledged: usize,
    /// Tasks still running when the worker gave up waiting for them.
    pub abandoned: usize,
}

impl RunSummary {
    /// A clean drain: every task finished and every result was acknowledged.
    pub fn is_clean(&self) -> bool {
        !self.stopped_now && self.unacknowledged == 0 && self.abandoned == 0
    }
}

/// `error: its source: its source's source...`, for logs and messages.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

fn default_slots() -> u32 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok())
        .unwrap_or(1)
}

/// This host's name, or `localhost` if the OS will not say.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for buf.len() bytes; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ok(_ctx: TaskContext) -> Result<Vec<u8>, TaskError> {
        Ok(Vec::new())
    }

    #[test]
    fn builder_defaults() {
        let worker = Worker::builder("http://127.0.0.1:1")
            .handler("b", ok)
            .handler("a", CommandHandler::new(["cat"]).expect("non-empty"))
            .build()
            .expect("valid");
        assert_eq!(worker.settings.queues, ["default"]);
        assert!(worker.settings.slots >= 1);
        assert!(worker
            .worker_id()
            .ends_with(&format!("-{}", std::process::id())));
        assert_eq!(worker.kinds().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn builder_errors() {
        let base = || Worker::builder("http://127.0.0.1:1").handler("k", ok);
        assert!(matches!(
            Worker::builder("http://127.0.0.1:1").build(),
            Err(BuildError::NoHandlers)
        ));
        assert!(matches!(
            base().slots(0).build(),
            Err(BuildError::ZeroSlots)
        ));
        assert!(matches!(
            base().queues(Vec::<String>::new()).build(),
            Err(BuildError::NoQueues)
        ));
        assert!(matches!(
            base().handler("", ok).build(),
            Err(BuildError::EmptyKind)
        ));
        assert!(matches!(
            Worker::builder("not a url").handler("k", ok).build(),
            Err(BuildError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn max_shutdown_grace_is_optional() {
        let base = || Worker::builder("http://127.0.0.1:1").handler("k", ok);
        assert_eq!(
            base().build().expect("valid").settings.max_shutdown_grace,
            None
        );
        let worker = base()
            .max_shutdown_grace(Duration::from_secs(30))
            .build()
            .expect("valid");
        assert_eq!(
            worker.settings.max_shutdown_grace,
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn stop_now_implies_drain() {
        let handle = ShutdownHandle::new();
        assert!(!handle.is_draining());
        handle.stop_now();
        assert!(handle.is_draining() && handle.is_stopping());
    }
}
