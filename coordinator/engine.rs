//! The engine: one task that owns every change, and one thread that makes the
//! changes durable (group commit).
//!
//! Requests become `Command`s on a channel. The engine task takes every
//! command waiting, lets the [`State`] decide them, fires due timers, deletes
//! at most one chunk of finished jobs whose retention has passed (and only
//! once the previous chunk is durable), dispatches ready jobs, stages the
//! resulting record writes in the store as one atomic batch, and hands the
//! round to the sync thread. The sync thread gathers every round that arrived
//! while it was busy, makes them durable with one commit of the store's
//! write-ahead log (one write, one `fdatasync`), and only then runs their
//! effects (replies, `Assign` messages, watch updates). So a `SubmitJobs` of
//! 1,000 jobs costs one sync, concurrent callers share one, and nobody is told
//! of a change before it is on disk. A third thread then writes the committed
//! batches to sled ([`Store::settle`]), off the engine's and the commit's
//! paths.
//!
//! New work (submits, retries, new schedules, triggers) is first admitted by
//! the [`DiskGuard`]: unless the disk keeps room to finish the accepted work
//! plus `min_free_disk`, it is refused with `RESOURCE_EXHAUSTED`, while
//! everything that finishes accepted work goes on.
//!
//! If the store fails anyway (a write or a sync: a full disk, an I/O error;
//! or no commit completing for [`COMMIT_STALL`] while writes wait for one),
//! nothing of the failed rounds is acknowledged: every waiting caller gets
//! `UNAVAILABLE`, every session and watch stream ends, and the engine recovers
//! in the same process ([`crate::coordinator::recovery`]): it answers every call
//! with `UNAVAILABLE` naming the cause, and once the disk has room it reopens
//! the store and rebuilds the model from it, as a restart would. Workers
//! reconnect and resume their leases. Each opening of the store is an *epoch*;
//! a read begun in an epoch that failed fails too, rather than return what may
//! not be durable. If sled cannot close the failed store, the engine stops
//! ([`Health::Stuck`]) and so does the coordinator, for a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::coordinator::clock::Clock;
use crate::coordinator::disk::{self, DiskGuard};
use crate::coordinator::error::Error;
use crate::coordinator::ids::JobId;
use crate::coordinator::recovery;
use crate::coordinator::schedule::spec::Spec;
use crate::coordinator::state::{Effect, Round, State};
use crate::coordinator::store::{Store, StoreError};
use crate::proto::{self, CoordinatorMessage, Hello, Job, Schedule, SubmitJobResponse};

/// Most commands decided in one round, so one round's batch stays bounded.
const MAX_COMMANDS_PER_ROUND: usize = 4096;

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// Where the store lives: for the disk guard, and to reopen it after a failure.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// The sled directory.
    pub data_dir: PathBuf,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Free disk kept beyond the room for finishing accepted work; new work
    /// that would cut into it is refused (0: no check).
    pub min_free_disk: u64,
    /// How long a commit may go without completing, while writes wait for
    /// it, before the store is declared failed (a disk that stopped
    /// answering, or sled stuck inside a checkpoint): see [`COMMIT_STALL`].
    pub commit_stall: Duration,
}

/// The default [`StoreSettings::commit_stall`]. Far above any flush a working
/// disk takes, even a loaded one (tens of seconds at worst); past it the
/// store is failed like one whose write returned an error, so callers are
/// answered and, if the stuck commit never returns, the coordinator stops
/// for its supervisor to restart it (see [`Health::Stuck`]).
pub const COMMIT_STALL: Duration = Duration::from_secs(60);

/// Whether the engine serves, or is reopening its store after a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// The store is open and every call is served.
    Serving,
    /// The store failed; every call is answered `UNAVAILABLE` with this reason
    /// until it is reopened.
    Recovering(String),
    /// The store failed and sled would not close it, so it cannot be reopened
    /// in this process: the engine has stopped and the coordinator stops too
    /// (a restart reopens the store).
    Stuck(String),
}

/// A request for a change.
enum Command {
    Submit(Vec<Job>, Reply<Vec<SubmitJobResponse>>),
    Cancel(JobId, String, Reply<Job>),
    Retry(JobId, Reply<Job>),
    Hello(Hello, mpsc::UnboundedSender<CoordinatorMessage>, Reply<u64>),
    PutSchedule(Box<(Schedule, Spec)>, Reply<Schedule>),
    DeleteSchedule(String, Reply<()>),
    PauseSchedule(String, Reply<Schedule>),
    ResumeSchedule(String, Reply<Schedule>),
    TriggerSchedule(String, Reply<Job>),
    DrainWorker(String, String, Reply<proto::Worker>),
    Heartbeat(String, u64),
    Complete(String, u64, proto::Complete),
    Draining(String, u64),
    Disconnected(String, u64),
}

/// The model and the store of the current epoch, replaced together.
struct Model {
    /// The decisions.
    state: State,
    /// The store; `None` while recovering (the failed one is closed so that
    /// it can be opened again).
    store: Option<Arc<Store>>,
    /// Cancelled when this epoch's store fails.
    epoch: CancellationToken,
}

/// What the engine task and the request handlers share.
struct Shared {
    /// The model and store; locked briefly, never across an `.await`.
    model: Mutex<Model>,
    /// The time source.
    clock: Arc<dyn Clock>,
    /// The number of the last round whose writes were applied to sled, or are
    /// being applied: it is set before the writes are visible to a reader.
    applied: AtomicU64,
    /// The number of the last round whose writes are durable. Reads wait for
    /// it to pass what they saw, so nobody is told of a change before it is
    /// on disk.
    durable: watch::Sender<u64>,
    /// Notified when a round with writes goes to the sync thread: wakes the
    /// commit watchdog ([`watch_commits`]).
    committing: tokio::sync::Notify,
    /// Serving or recovering, and why.
    health: watch::Sender<Health>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the store failed (or why it is not reopened yet).
    fn why(&self) -> String {
        match &*self.health.borrow() {
            Health::Recovering(why) | Health::Stuck(why) => why.clone(),
            Health::Serving => "the store failed".into(),
        }
    }

    /// The error for a call that meets a failed store.
    fn failure(&self) -> Error {
        Error::Unavailable(format!(
            "the store failed and is being reopened: {}",
            self.why()
        ))
    }

    /// Marks the epoch failed: callers waiting on it get `why`. The epoch is
    /// cancelled before the health changes, so a caller that sees the
    /// failure and then sends a command is refused: the engine decides no
    /// round after the cancel.
    fn fail_epoch(&self, epoch: &CancellationToken, why: &str) {
        epoch.cancel();
        self.health
            .send_replace(Health::Recovering(why.to_string()));
    }
}

/// The opening of the store a read began in: the read is good only if this
/// epoch's writes up to it became durable.
#[derive(Clone)]
pub struct Epoch(CancellationToken);

/// A cloneable handle to the engine.
#[derive(Clone)]
pub struct Engine {
    /// Shared with the engine task.
    shared: Arc<Shared>,
    /// Commands for the engine task.
    tx: mpsc::UnboundedSender<Command>,
}

/// Owns the engine's task and thread until shutdown.
pub struct EngineTask {
    /// The engine task (it joins the sync thread before it ends).
    join: tokio::task::JoinHandle<()>,
}

impl EngineTask {
    /// Waits until the engine has stopped and its last writes are durable.
    pub async fn wait(self) {
        if let Err(e) = self.join.await {
            tracing::error!(error = %e, "engine task failed");
        }
    }
}

fn unavailable() -> Error {
    Error::Unavailable("the coordinator is shutting down".into())
}

/// Why a failed store failed, for callers and the log.
fn failure_reason(e: &StoreError) -> String {
    if e.is_disk_full() {
        format!("disk full: {e}")
    } else {
        e.to_string()
    }
}

impl Engine {
    /// Starts the engine over a model rebuilt from `store`. It stops when
    /// `shutdown` is cancelled, after making its last round durable.
    pub fn start(
        state: State,
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        settings: StoreSettings,
        shutdown: CancellationToken,
    ) -> (Engine, EngineTask) {
        let shared = Arc::new(Shared {
            model: Mutex::new(Model {
                state,
                store: Some(store),
                epoch: CancellationToken::new(),
            }),
            clock,
            applied: Default::default(),
            durable: watch::Sender::new(0),
            committing: tokio::sync::Notify::new(),
            health: watch::Sender::new(Health::Serving),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let join = tokio::spawn(run(shared.clone(), rx, shutdown, settings));
        (Engine { shared, tx }, EngineTask { join })
    }

    /// Serving or recovering; changes as the store fails and is reopened.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    /// Whether the store has failed and is not reopened yet.
    pub fn recovering_now(&self) -> bool {
        *self.shared.health.borrow() != Health::Serving
    }

    /// Resolves if the store failed and cannot be reopened in this process:
    /// the engine has stopped, and the coordinator should stop too.
    pub async fn stuck(&self) {
        let mut health = self.shared.health.subscribe();
        // The sender lives as long as `self`.
        let _ = health.wait_for(|h| matches!(h, Health::Stuck(_))).await;
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| unavailable())?;
        rx.await.map_err(|_| unavailable())?
    }

    fn tell(&self, cmd: Command) {
        // Fails only when the engine has stopped, and then nobody is listening.
        let _ = self.tx.send(cmd);
    }

    /// Submits validated jobs; answers once they are durable.
    pub async fn submit(&self, jobs: Vec<Job>) -> Result<Vec<SubmitJobResponse>, Error> {
        self.call(|r| Command::Submit(jobs, r)).await
    }

    /// Cancels a job.
    pub async fn cancel(&self, id: JobId, reason: String) -> Result<Job, Error> {
        self.call(|r| Command::Cancel(id, reason, r)).await
    }

    /// Retries a finished job.
    pub async fn retry(&self, id: JobId) -> Result<Job, Error> {
        self.call(|r| Command::Retry(id, r)).await
    }

    /// Registers a worker session and sends it its `Welcome`; returns the
    /// session's generation.
    pub async fn hello(
        &self,
        hello: Hello,
        tx: mpsc::UnboundedSender<CoordinatorMessage>,
    ) -> Result<u64, Error> {
        self.call(|r| Command::Hello(hello, tx, r)).await
    }

    /// Creates or replaces a validated schedule.
    pub async fn put_schedule(&self, schedule: Schedule, spec: Spec) -> Result<Schedule, Error> {
        self.call(|r| Command::PutSchedule(Box::new((schedule, spec)), r))
            .await
    }

    /// Deletes a schedule.
    pub async fn delete_schedule(&self, name: String) -> Result<(), Error> {
        self.call(|r| Command::DeleteSchedule(name, r)).await
    }

    /// Pauses a schedule.
    pub async fn pause_schedule(&self, name: String) -> Result<Schedule, Error> {
        self.call(|r| Command::PauseSchedule(name, r)).await
    }

    /// Resumes a schedule.
    pub async fn resume_schedule(&self, name: String) -> Result<Schedule, Error> {
        self.call(|r| Command::ResumeSchedule(name, r)).await
    }

    /// Creates a run of a schedule now.
    pub async fn trigger_schedule(&self, name: String) -> Result<Job, Error> {
        self.call(|r| Command::TriggerSchedule(name, r)).await
    }

    /// Tells a worker to drain.
    pub async fn drain_worker(
        &self,
        worker_id: String,
        reason: String,
    ) -> Result<proto::Worker, Error> {
        self.call(|r| Command::DrainWorker(worker_id, reason, r))
            .await
    }

    /// One schedule.
    pub async fn get_schedule(&self, name: &str) -> Result<Schedule, Error> {
        self.read(|s| s.get_schedule(name)).await?
    }

    /// A page of schedules and the next page's token.
    pub async fn list_schedules(
        &self,
        after: &str,
        size: usize,
    ) -> Result<(Vec<Schedule>, String), Error> {
        self.read(|s| s.list_schedules(after, size)).await
    }

    /// A stored schedule's spec and next run time.
    pub async fn schedule_spec(&self, name: &str) -> Result<(Spec, Option<SystemTime>), Error> {
        self.read(|s| s.schedule_spec(name)).await?
    }

    /// Reads the model, and answers once what was read is durable.
    async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, Error> {
        let (value, epoch) = {
            let model = self.shared.lock();
            (f(&model.state), Epoch(model.epoch.clone()))
        };
        self.durable(&epoch).await?;
        Ok(value)
    }

    /// Waits until every write applied so far (in the current epoch) is durable.
    pub async fn durable_now(&self) -> Result<(), Error> {
        let epoch = Epoch(self.shared.lock().epoch.clone());
        self.durable(&epoch).await
    }

    /// Waits until every write applied so far in `epoch` is durable. Reads
    /// call it after reading, so that what they return has reached the disk;
    /// it fails if the epoch's store failed.
    pub async fn durable(&self, epoch: &Epoch) -> Result<(), Error> {
        let applied = self.shared.applied.load(Ordering::SeqCst);
        let mut durable = self.shared.durable.subscribe();
        let reached = tokio::select! {
            biased;
            _ = epoch.0.cancelled() => false,
            r = durable.wait_for(|d| *d >= applied) => r.is_ok(),
        };
        if epoch.0.is_cancelled() {
            return Err(self.shared.failure());
        }
        if !reached {
            return Err(unavailable());
        }
        Ok(())
    }

    /// The current time, from the engine's clock.
    pub fn now(&self) -> SystemTime {
        self.shared.clock.now()
    }

    /// Records a heartbeat.
    pub fn heartbeat(&self, worker_id: String, generation: u64) {
        self.tell(Command::Heartbeat(worker_id, generation));
    }

    /// Hands over a completion; the `CompleteAck` goes out on the session.
    pub fn complete(&self, worker_id: String, generation: u64, done: proto::Complete) {
        self.tell(Command::Complete(worker_id, generation, done));
    }

    /// Marks a worker as draining.
    pub fn draining(&self, worker_id: String, generation: u64) {
        self.tell(Command::Draining(worker_id, generation));
    }

    /// Notes that a session's stream ended.
    pub fn disconnected(&self, worker_id: String, generation: u64) {
        self.tell(Command::Disconnected(worker_id, generation));
    }

    /// One job. The store is read without the lock: a job leaves the model
    /// only after its final record was applied to sled, under the lock.
    pub async fn get_job(&self, id: JobId) -> Result<Job, Error> {
        let (live, store, epoch) = {
            let model = self.shared.lock();
            let live = model.state.live_job(id);
            (live, model.store.clone(), Epoch(model.epoch.clone()))
        };
        let job = match live {
            Some(job) => job,
            None => {
                let store = store.ok_or_else(|| self.shared.failure())?;
                crate::coordinator::state::finished_job(id, &store)?
            }
        };
        self.durable(&epoch).await?;
        Ok(job)
    }

    /// The job now and a stream of its changes.
    pub async fn watch(
        &self,
        id: JobId,
    ) -> Result<(Job, Option<mpsc::UnboundedReceiver<Job>>), Error> {
        let (watched, epoch) = {
            let mut model = self.shared.lock();
            let model = &mut *model;
            let store = model.store.clone().ok_or_else(|| self.shared.failure())?;
            (model.state.watch(id, &store)?, Epoch(model.epoch.clone()))
        };
        self.durable(&epoch).await?;
        Ok(watched)
    }

    /// The known workers.
    pub async fn list_workers(&self) -> Result<Vec<proto::Worker>, Error> {
        self.read(|s| s.list_workers()).await
    }

    /// Queue statistics.
    pub async fn queue_stats(&self, queue: &str) -> Result<Vec<proto::QueueStat>, Error> {
        let now = self.shared.clock.now();
        self.read(|s| s.queue_stats(queue, now)).await
    }

    /// The store, for scans off the engine's task, and its epoch: pass it to
    /// [`Engine::durable`] after the scan.
    pub fn store_handle(&self) -> Result<(Arc<Store>, Epoch), Error> {
        let model = self.shared.lock();
        let store = model.store.clone().ok_or_else(|| self.shared.failure())?;
        Ok((store, Epoch(model.epoch.clone())))
    }
}

/// Replies once the round is durable (or with `UNAVAILABLE` if it cannot be).
fn reply_after<T: Send + 'static>(state: &mut State, reply: Reply<T>, value: Result<T, Error>) {
    state.after_commit(Box::new(move |committed| {
        let _ = reply.send(match committed {
            Ok(()) => value,
            Err(why) => Err(Error::Unavailable(format!(
                "the change could not be made durable: {why}"
            ))),
        });
    }));
}

/// Record bytes a submit would write, for the disk guard.
fn submit_bytes(jobs: &[Job]) -> u64 {
    jobs.iter()
        .map(|j| j.encoded_len() as u64 + disk::RECORD_OVERHEAD)
        .sum()
}

/// Decides one command. New work must first fit on the disk.
fn decide(state: &mut State, cmd: Command, now: SystemTime, store: &Store, guard: &mut DiskGuard) {
    match cmd {
        Command::Submit(jobs, r) => {
            let v = match guard.admit(submit_bytes(&jobs), state.live_bytes()) {
                Ok(()) => state.submit(jobs, now, store),
                Err(full) => return drop(r.send(Err(full.into()))),
            };
            reply_after(state, r, v);
        }
        Command::Cancel(id, reason, r) => {
            let v = state.cancel(id, &reason, now, store);
            reply_after(state, r, v);
        }
        Command::Retry(id, r) => {
            // A job that is missing or not finished is told so even on a full disk.
            if let Err(e) = state.retryable(id, store) {
                return drop(r.send(Err(e)));
            }
            let v = match guard.admit(disk::RECORD_OVERHEAD, state.live_bytes()) {
                Ok(()) => state.retry(id, now, store),
                Err(full) => return drop(r.send(Err(full.into()))),
            };
            reply_after(state, r, v);
        }
        Command::Hello(hello, tx, r) => {
            let v = state.hello(hello, tx, now);
            reply_after(state, r, Ok(v));
        }
        Command::PutSchedule(put, r) => {
            let (schedule, spec) = *put;
            let bytes = schedule.encoded_len() as u64 + disk::RECORD_OVERHEAD;
            let v = match guard.admit(bytes, state.live_bytes()) {
                Ok(()) => state.put_schedule(schedule, spec, now, false),
                Err(full) => return drop(r.send(Err(full.into()))),
            };
            reply_after(state, r, v);
        }
        Command::DeleteSchedule(name, r) => {
            let v = state.delete_schedule(&name);
            reply_after(state, r, v);
        }
        Command::PauseSchedule(name, r) => {
            let v = state.pause_schedule(&name, now);
            reply_after(state, r, v);
        }
        Command::ResumeSchedule(name, r) => {
            let v = state.resume_schedule(&name, now);
            reply_after(state, r, v);
        }
        Command::TriggerSchedule(name, r) => {
            let v = match guard.admit(2 * disk::RECORD_OVERHEAD, state.live_bytes()) {
                Ok(()) => state.trigger_schedule(&name, now),
                Err(full) => return drop(r.send(Err(full.into()))),
            };
            reply_after(state, r, v);
        }
        Command::DrainWorker(w, reason, r) => {
            let v = state.drain_worker(&w, &reason, now);
            reply_after(state, r, v);
        }
        Command::Heartbeat(w, g) => state.heartbeat(&w, g, now),
        Command::Complete(w, g, done) => {
            state.complete(&w, g, done, now);
        }
        Command::Draining(w, g) => state.draining(&w, g, now),
        Command::Disconnected(w, g) => state.disconnected(&w, g),
    }
}

/// The engine task: serves epoch after epoch, recovering between them, until
/// shutdown, or until a failed store cannot be closed (see [`Health::Stuck`]).
async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    shutdown: CancellationToken,
    settings: StoreSettings,
) {
    let mut rounds = 0u64;
    loop {
        // A fresh guard per epoch: the disk has changed while the store was closed.
        let mut guard = DiskGuard::new(&settings.data_dir, settings.min_free_disk);
        let end = serve(
            &shared,
            &mut rx,
            &shutdown,
            &mut guard,
            &mut rounds,
            settings.commit_stall,
        )
        .await;
        if !end.failed {
            // A clean stop: the sync thread makes the last writes durable.
            let _ = end.synced.await;
            return;
        }
        if !recover(&shared, &mut rx, &shutdown, &settings, rounds, end.synced).await {
            return;
        }
    }
}

/// How an epoch ended.
struct EpochEnd {
    /// Its store failed (rather than a shutdown).
    failed: bool,
    /// Resolves (with an error) when the epoch's sync thread has finished.
    synced: oneshot::Receiver<()>,
}

/// Serves one epoch: decides rounds and hands them to a sync thread until
/// shutdown or a store failure. Either way every session and watch stream ends
/// (leases stay stored) and every caller waiting for the engine is answered.
async fn serve(
    shared: &Arc<Shared>,
    rx: &mut mpsc::UnboundedReceiver<Command>,
    shutdown: &CancellationToken,
    guard: &mut DiskGuard,
    round_number: &mut u64,
    stall: Duration,
) -> EpochEnd {
    let (store, epoch) = {
        let model = shared.lock();
        let store = model.store.clone().expect("an epoch starts with its store");
        (store, model.epoch.clone())
    };
    let (sync_tx, sync_rx) = std::sync::mpsc::channel::<Round>();
    let (settle_tx, settle_rx) = std::sync::mpsc::channel::<()>();
    // Dropped when both the sync and the settle thread have ended: how their
    // end is awaited without a blocking join (after some failures sled never
    // returns from a flush).
    let (finished, synced) = oneshot::channel::<()>();
    let finished = Arc::new(finished);
    {
        let (shared, store, epoch) = (shared.clone(), store.clone(), epoch.clone());
        let finished = finished.clone();
        std::thread::Builder::new()
            .name("rota-sync".into())
            .spawn(move || {
                let _finished = finished;
                sync_loop(&shared, &store, &epoch, sync_rx, settle_tx)
            })
            .expect("spawning the sync thread");
    }
    {
        let (shared, store, epoch) = (shared.clone(), store.clone(), epoch.clone());
        std::thread::Builder::new()
            .name("rota-settle".into())
            .spawn(move || {
                let _finished = finished;
                settle_loop(&shared, &store, &epoch, settle_rx)
            })
            .expect("spawning the settle thread");
    }
    tokio::spawn(watch_commits(
        shared.clone(),
        epoch.clone(),
        shutdown.clone(),
        stall,
    ));
    let mut commands = Vec::with_capacity(64);
    let mut durable_rx = shared.durable.subscribe();
    // The round of the last deletions. The next chunk waits until it is
    // durable, so a sync (which the replies of its rounds wait for) never
    // carries more than one chunk of deletions.
    let mut sweep_round = 0u64;
    loop {
        let now = shared.clock.now();
        let sweep_open = *durable_rx.borrow_and_update() >= sweep_round;
        let next = {
            let model = shared.lock();
            let state = &model.state;
            let deletion = if sweep_open {
                state.next_deletion()
            } else {
                None
            };
            match (state.next_timer(), deletion) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        let sleep = next.map(|t| t.duration_since(now).unwrap_or(Duration::ZERO));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = epoch.cancelled() => break,
            n = rx.recv_many(&mut commands, MAX_COMMANDS_PER_ROUND) => {
                if n == 0 { break; }
            }
            r = durable_rx.changed(), if !sweep_open => {
                if r.is_err() { break; }
            }
            _ = tokio::time::sleep(sleep.unwrap_or(Duration::from_secs(3600))), if sleep.is_some() => {}
        }
        let now = shared.clock.now();
        guard.refresh(Instant::now());
        let round = {
            let mut model = shared.lock();
            let state = &mut model.state;
            for cmd in commands.drain(..) {
                decide(state, cmd, now, &store, guard);
            }
            state.fire_due(now);
            // At most one chunk of deletions per round, and only once the
            // previous chunk is durable: a backlog never holds dispatch up.
            let swept = if *shared.durable.borrow() >= sweep_round {
                state.sweep(now, &store)
            } else {
                0
            };
            state.dispatch(now);
            let mut round = state.take_round();
            // Applied under the lock, so readers never see the model ahead of sled.
            let writes = std::mem::take(&mut round.writes);
            let bytes = writes.bytes();
            round.dirty = !writes.is_empty();
            if round.dirty {
                *round_number += 1;
                round.number = *round_number;
            }
            if swept > 0 {
                sweep_round = *round_number;
            }
            // Published before the writes reach sled: ListJobs scans sled without the lock,
            // and a scan that sees any of these writes must then wait for this round's sync.
            shared.applied.store(*round_number, Ordering::SeqCst);
            if let Err(e) = store.apply(writes) {
                let why = failure_reason(&e);
                tracing::error!(error = %e, "store write failed; reopening the store");
                shared.fail_epoch(&epoch, &why);
                fail_round(round, &why);
                break;
            }
            guard.wrote(bytes);
            round
        };
        if round.effects.is_empty() && !round.dirty {
            continue;
        }
        let dirty = round.dirty;
        if sync_tx.send(round).is_err() {
            break;
        }
        if dirty {
            shared.committing.notify_one();
        }
    }
    let failed = epoch.is_cancelled();
    // End every session and watch stream (their leases stay stored) and answer
    // what is still waiting; the sync thread finishes on its own.
    shared.lock().state.close_streams();
    if !failed {
        rx.close();
    }
    while let Ok(cmd) = rx.try_recv() {
        refuse(cmd, || {
            if failed {
                shared.failure()
            } else {
                unavailable()
            }
        });
    }
    EpochEnd { failed, synced }
}

/// Runs `work` while answering every command with the store's failure.
/// `None` if the engine is shut down (or all its handles are gone) first.
async fn refusing<F: std::future::Future>(
    shared: &Shared,
    rx: &mut mpsc::UnboundedReceiver<Command>,
    shutdown: &CancellationToken,
    work: F,
) -> Option<F::Output> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            out = &mut work => return Some(out),
            cmd = rx.recv() => match cmd {
                Some(cmd) => refuse(cmd, || shared.failure()),
                None => return None,
            },
        }
    }
}

/// Waits out a store failure, answering every call with `UNAVAILABLE`: closes
/// the failed store, then reopens it once the disk has room. Returns `false`
/// if shut down first, or if the failed store cannot be closed (sled is stuck;
/// the health turns [`Health::Stuck`] and the coordinator stops, for its
/// supervisor to restart it).
async fn recover(
    shared: &Arc<Shared>,
    rx: &mut mpsc::UnboundedReceiver<Command>,
    shutdown: &CancellationToken,
    settings: &StoreSettings,
    rounds: u64,
    synced: oneshot::Receiver<()>,
) -> bool {
    let (failed_store, failure, state_settings, last_generation) = {
        let mut model = shared.lock();
        let state = &model.state;
        let kept = (state.settings().clone(), state.last_generation());
        (model.store.take(), shared.why(), kept.0, kept.1)
    };
    // sled lets go of its files once the last handle is closed.
    let closing = async {
        let synced = tokio::time::timeout(recovery::CLOSE_TIMEOUT, synced).await;
        synced.is_ok() && recovery::close_store(failed_store).await
    };
    match refusing(shared, rx, shutdown, closing).await {
        None => return false,
        Some(true) => {}
        Some(false) => {
            let why = format!(
                "{failure}; the failed store did not close within {:?} (sled is stuck), so it cannot be reopened in this process: restart the coordinator",
                recovery::CLOSE_TIMEOUT
            );
            tracing::error!(error = %why, "stopping");
            shared.health.send_replace(Health::Stuck(why));
            return false;
        }
    }
    let mut delay = recovery::FIRST_RETRY;
    loop {
        let wait = tokio::time::sleep(delay);
        if refusing(shared, rx, shutdown, wait).await.is_none() {
            return false;
        }
        let reopen = recovery::reopen(
            &settings.data_dir,
            settings.cache_bytes,
            settings.min_free_disk,
            state_settings.clone(),
            shared.clock.now(),
        );
        let Some(reopened) = refusing(shared, rx, shutdown, reopen).await else {
            return false;
        };
        match reopened {
            Ok((store, mut state)) => {
                state.continue_generations_after(last_generation);
                let mut model = shared.lock();
                *model = Model {
                    state,
                    store: Some(Arc::new(store)),
                    epoch: CancellationToken::new(),
                };
                // Nothing of the new epoch waits to be made durable.
                shared.applied.store(rounds, Ordering::SeqCst);
                shared.durable.send_modify(|d| *d = (*d).max(rounds));
                shared.health.send_replace(Health::Serving);
                drop(model);
                tracing::info!("serving again after the store failure");
                return true;
            }
            Err(e) => {
                delay = recovery::next_retry(delay);
                tracing::warn!(error = %e, retry_in = ?delay, "store not reopened yet");
                shared
                    .health
                    .send_replace(Health::Recovering(format!("{failure}; {e}")));
            }
        }
    }
}

/// Answers a command that will not be decided; tells are dropped.
fn refuse(cmd: Command, error: impl Fn() -> Error) {
    match cmd {
        Command::Submit(_, r) => drop(r.send(Err(error()))),
        Command::Cancel(_, _, r) => drop(r.send(Err(error()))),
        Command::Retry(_, r) => drop(r.send(Err(error()))),
        Command::Hello(_, _, r) => drop(r.send(Err(error()))),
        Command::PutSchedule(_, r) => drop(r.send(Err(error()))),
        Command::DeleteSchedule(_, r) => drop(r.send(Err(error()))),
        Command::PauseSchedule(_, r) | Command::ResumeSchedule(_, r) => drop(r.send(Err(error()))),
        Command::TriggerSchedule(_, r) => drop(r.send(Err(error()))),
        Command::DrainWorker(_, _, r) => drop(r.send(Err(error()))),
        Command::Heartbeat(..)
        | Command::Complete(..)
        | Command::Draining(..)
        | Command::Disconnected(..) => {}
    }
}

fn fail_round(round: Round, why: &str) {
    for effect in round.effects {
        effect(Err(why));
    }
}

/// Fails the epoch when no commit has completed for a whole `stall` while
/// writes waited for one: the sync thread is stuck (in `fdatasync`, or behind
/// a checkpoint stuck in sled), and without this every caller would wait for
/// it forever. Costs the engine one atomic operation per round (a `Notify`
/// permit) and this task one wake per `stall` while writes come in. Ends with
/// the epoch or at shutdown.
async fn watch_commits(
    shared: Arc<Shared>,
    epoch: CancellationToken,
    shutdown: CancellationToken,
    stall: Duration,
) {
    let pending = || *shared.durable.borrow() < shared.applied.load(Ordering::SeqCst);
    loop {
        // Wait for a write that is not durable yet.
        while !pending() {
            tokio::select! {
                _ = epoch.cancelled() => return,
                _ = shutdown.cancelled() => return,
                _ = shared.committing.notified() => {}
            }
        }
        let durable = *shared.durable.borrow();
        tokio::select! {
            _ = epoch.cancelled() => return,
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(stall) => {}
        }
        if pending() && *shared.durable.borrow() == durable {
            let why = format!(
                "no commit of the write-ahead log completed in {stall:?} while writes waited for one: the disk (or sled, in a checkpoint) stopped answering"
            );
            tracing::error!(error = %why, "failing the store");
            shared.fail_epoch(&epoch, &why);
            return;
        }
    }
}

/// The sync thread: one commit of the write-ahead log for every round that queued up while
/// the last one ran, then their effects, in order; then a nudge to the settle thread.
fn sync_loop(
    shared: &Shared,
    store: &Store,
    epoch: &CancellationToken,
    rx: std::sync::mpsc::Receiver<Round>,
    settle: std::sync::mpsc::Sender<()>,
) {
    let mut pending: Vec<Round> = Vec::new();
    while let Ok(first) = rx.recv() {
        pending.push(first);
        pending.extend(rx.try_iter());
        let dirty = pending.iter().any(|r| r.dirty);
        let outcome = if epoch.is_cancelled() {
            // A later write failed first: sled refuses everything now.
            Err(shared.why())
        } else if dirty {
            store.sync().map_err(|e| {
                let why = failure_reason(&e);
                tracing::error!(error = %e, "store sync failed; reopening the store");
                shared.fail_epoch(epoch, &why);
                why
            })
        } else {
            Ok(())
        };
        match outcome {
            Ok(()) => {
                let newest = pending.iter().map(|r| r.number).max().unwrap_or(0);
                for round in pending.drain(..) {
                    run_effects(round.effects, Ok(()));
                }
                if dirty {
                    // Gone only if the settle thread failed the epoch.
                    let _ = settle.send(());
                }
                shared.durable.send_if_modified(|d| {
                    let advanced = newest > *d;
                    *d = (*d).max(newest);
                    advanced
                });
            }
            Err(why) => {
                for round in pending.drain(..) {
                    run_effects(round.effects, Err(&why));
                }
                for round in rx.iter() {
                    run_effects(round.effects, Err(&why));
                }
                return;
            }
        }
    }
    if !epoch.is_cancelled() {
        // A clean stop leaves nothing in the write-ahead log to replay.
        if let Err(e) = store.sync().and_then(|()| store.checkpoint()) {
            tracing::error!(error = %e, "final store sync failed");
        }
    }
}

/// The settle thread: after each commit, writes the committed batches to sled
/// (and checkpoints when the log is full), off the engine's and the sync
/// thread's paths.
fn settle_loop(
    shared: &Shared,
    store: &Store,
    epoch: &CancellationToken,
    rx: std::sync::mpsc::Receiver<()>,
) {
    while rx.recv().is_ok() {
        // Every commit since the last settling is settled at once.
        while rx.try_recv().is_ok() {}
        if epoch.is_cancelled() {
            return;
        }
        if let Err(e) = store.settle() {
            let why = failure_reason(&e);
            tracing::error!(error = %e, "store write failed; reopening the store");
            shared.fail_epoch(epoch, &why);
            return;
        }
    }
}

fn run_effects(effects: Vec<Effect>, r: Result<(), &str>) {
    for effect in effects {
        effect(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::clock::SystemClock;
    use crate::coordinator::state::{Settings, SWEEP_CHUNK};
    use crate::proto::JobState;

    fn place(dir: &std::path::Path) -> StoreSettings {
        StoreSettings {
            data_dir: dir.to_path_buf(),
            cache_bytes: 1 << 20,
            min_free_disk: 0,
            commit_stall: COMMIT_STALL,
        }
    }

    fn start(dir: &std::path::Path) -> (Engine, EngineTask, CancellationToken) {
        start_with_min_free(dir, 0)
    }

    fn start_with_min_free(
        dir: &std::path::Path,
        min_free_disk: u64,
    ) -> (Engine, EngineTask, CancellationToken) {
        start_with(
            dir,
            StoreSettings {
                min_free_disk,
                ..place(dir)
            },
        )
    }

    fn start_with(
        dir: &std::path::Path,
        place: StoreSettings,
    ) -> (Engine, EngineTask, CancellationToken) {
        let store = Arc::new(Store::open(dir, 1 << 20).unwrap());
        let settings = Settings {
            lease_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            default_shutdown_grace: Duration::from_secs(30),
            retention: Default::default(),
        };
        let state = State::restore(settings, store.snapshot().unwrap(), SystemTime::now()).unwrap();
        let stop = CancellationToken::new();
        let (engine, task) =
            Engine::start(state, store, Arc::new(SystemClock), place, stop.clone());
        (engine, task, stop)
    }

    fn job(i: usize) -> Job {
        crate::coordinator::validate::new_job(
            "job",
            Job {
                kind: format!("k{i}"),
                ..Default::default()
            },
            1024,
        )
        .unwrap()
    }

    /// A commit that never completes (here: the log's lock held, as by a
    /// checkpoint stuck in sled's flush) fails the store after the stall
    /// bound, so callers are answered instead of waiting forever; once the
    /// commit completes after all, the store is reopened and serves again,
    /// with what that commit made durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_that_does_not_complete_fails_the_store_and_it_serves_again_once_it_does() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, task, stop) = start_with(
            dir.path(),
            StoreSettings {
                commit_stall: Duration::from_millis(300),
                ..place(dir.path())
            },
        );
        let mut health = engine.health();
        let store = engine.store_handle().unwrap().0;
        // A thread holds the log's lock until told to let go.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let store = store.clone();
            move || {
                let _held = store.hold_log_for_test();
                locked.send(()).unwrap();
                let _ = released.recv();
            }
        });
        is_locked.recv().unwrap();
        let waiting = tokio::spawn({
            let engine = engine.clone();
            async move { engine.submit(vec![job(1)]).await }
        });
        let failed = tokio::time::timeout(
            Duration::from_secs(30),
            health.wait_for(|h| matches!(h, Health::Recovering(_))),
        )
        .await
        .expect("the stalled commit fails the store")
        .unwrap()
        .clone();
        let Health::Recovering(why) = failed else {
            unreachable!()
        };
        assert!(why.contains("no commit"), "{why}");
        assert!(!waiting.is_finished(), "its commit has not completed");
        // New work is refused at once, with the reason.
        let refused = tokio::time::timeout(Duration::from_secs(10), engine.submit(vec![job(2)]))
            .await
            .expect("refused at once, not queued behind the stuck commit")
            .unwrap_err();
        assert!(refused.to_string().contains("no commit"), "{refused}");

        release.send(()).unwrap();
        holder.join().unwrap();
        drop(store);
        let submitted = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("answered once the commit completes")
            .unwrap()
            .expect("its commit did complete");
        tokio::time::timeout(
            Duration::from_secs(30),
            health.wait_for(|h| *h == Health::Serving),
        )
        .await
        .expect("the store is reopened")
        .unwrap();
        let id = JobId::parse(&submitted[0].job.as_ref().unwrap().id).unwrap();
        engine
            .get_job(id)
            .await
            .expect("the committed job is there");
        stop.cancel();
        task.wait().await;
    }

    #[tokio::test]
    async fn a_batch_of_a_thousand_jobs_costs_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, task, stop) = start(dir.path());
        let before = engine.store_handle().unwrap().0.sync_count();
        let results = engine.submit((0..1000).map(job).collect()).await.unwrap();
        assert_eq!(results.len(), 1000);
        assert_eq!(engine.store_handle().unwrap().0.sync_count() - before, 1);
        stop.cancel();
        task.wait().await;
    }

    #[tokio::test]
    async fn new_work_is_refused_below_min_free_disk_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // No disk has this much free: every new piece of work is refused.
        let (engine, task, stop) = start_with_min_free(dir.path(), u64::MAX / 16);
        let before = engine.store_handle().unwrap().0.sync_count();
        let refused = engine.submit(vec![job(1)]).await.unwrap_err();
        assert!(matches!(refused, Error::DiskFull(_)), "{refused:?}");
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().starts_with("disk full: "), "{status:?}");
        // A job that cannot be retried anyway is told why, full disk or not.
        let retry = engine.retry(JobId::generate()).await.unwrap_err();
        assert!(matches!(retry, Error::NotFound(_)), "{retry:?}");
        let trigger = engine.trigger_schedule("s".into()).await.unwrap_err();
        assert!(matches!(trigger, Error::DiskFull(_)), "{trigger:?}");
        // What is not new work is decided as usual.
        let cancel = engine.cancel(JobId::generate(), String::new()).await;
        assert!(matches!(cancel, Err(Error::NotFound(_))), "{cancel:?}");
        assert_eq!(engine.store_handle().unwrap().0.sync_count(), before);
        assert!(engine
            .store_handle()
            .unwrap()
            .0
            .snapshot()
            .unwrap()
            .jobs
            .next()
            .is_none());
        assert!(!engine.recovering_now());
        stop.cancel();
        task.wait().await;
    }

    #[tokio::test]
    async fn a_backlog_of_deletions_is_swept_in_bounded_rounds_and_survives_reopen() {
        use crate::coordinator::record::JobRecord;
        use crate::coordinator::retention::{Keep, Retention};
        use crate::coordinator::store::Writes;
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * SWEEP_CHUNK + 7;
        let ended = SystemTime::now() - Duration::from_secs(3600);
        {
            // Finished an hour ago, each with an idempotency key.
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let mut w = Writes::default();
            for i in 0..n {
                let id = JobId::generate();
                let key = format!("key-{i}");
                w.put_job(&JobRecord {
                    job: Job {
                        id: id.to_string(),
                        kind: "k".into(),
                        queue: "default".into(),
                        state: JobState::Succeeded as i32,
                        end_time: Some(ended.into()),
                        idempotency_key: key.clone(),
                        ..Default::default()
                    },
                    lease: None,
                });
                w.put_idempotency(&key, id);
            }
            store.apply(w).unwrap();
            store.sync().unwrap();
        }
        let store = Arc::new(Store::reopen_for_test(dir.path()));
        let settings = Settings {
            lease_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            default_shutdown_grace: Duration::from_secs(30),
            retention: Retention::uniform(Keep::For(Duration::from_secs(60))),
        };
        let state = State::restore(settings, store.snapshot().unwrap(), SystemTime::now()).unwrap();
        assert_eq!(state.sweep_pending(), n);
        let stop = CancellationToken::new();
        let (engine, task) = Engine::start(
            state,
            store.clone(),
            Arc::new(SystemClock),
            place(dir.path()),
            stop.clone(),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.scan_jobs(None).next().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the backlog was not swept within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The scan sees the last chunk once it is applied; its sync may still be running.
        engine.durable_now().await.unwrap();
        let rounds = engine
            .shared
            .applied
            .load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            rounds as usize >= n.div_ceil(SWEEP_CHUNK),
            "{n} deletions in {rounds} rounds: more than {SWEEP_CHUNK} per round"
        );
        let syncs = store.sync_count();
        assert!(
            syncs < (n / 10) as u64,
            "{n} deletions took {syncs} syncs: group-committed, never one per job"
        );
        assert!(
            syncs as usize >= n.div_ceil(SWEEP_CHUNK),
            "{syncs} syncs for {n} deletions: a chunk went out before the previous one was durable"
        );
        // A key of a deleted job makes a new job.
        let mut keyed = job(0);
        keyed.idempotency_key = "key-0".into();
        let r = engine.submit(vec![keyed]).await.unwrap();
        assert!(!r[0].deduplicated);
        engine.durable_now().await.unwrap();
        stop.cancel();
        task.wait().await;
        drop(engine);
        drop(store);
        let store = Store::reopen_for_test(dir.path());
        let snap = store.snapshot().unwrap();
        assert_eq!(snap.jobs.count(), 1, "the deletions were durable");
        assert_eq!(snap.idempotency.len(), 1);
    }

    #[tokio::test]
    async fn concurrent_submits_share_syncs_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, task, stop) = start(dir.path());
        let before = engine.store_handle().unwrap().0.sync_count();
        let calls: Vec<_> = (0..64)
            .map(|i| {
                let e = engine.clone();
                tokio::spawn(async move { e.submit(vec![job(i)]).await })
            })
            .collect();
        let mut ids = Vec::new();
        for c in calls {
            let r = c.await.unwrap().unwrap();
            ids.push(r[0].job.as_ref().unwrap().id.clone());
        }
        let syncs = engine.store_handle().unwrap().0.sync_count() - before;
        assert!(syncs < 64, "64 concurrent submits took {syncs} syncs");
        stop.cancel();
        task.wait().await;
        drop(engine);
        let store = Store::reopen_for_test(dir.path());
        for id in ids {
            let rec = store
                .get_job(JobId::parse(&id).unwrap())
                .unwrap()
                .expect("acknowledged job stored");
            assert_eq!(rec.state(), JobState::Queued);
        }
    }
}
