//! The engine: one task that owns every change, and one thread that makes the
//! changes durable (group commit).
//!
//! Requests become [`Command`]s on a channel. The engine task takes every
//! command waiting, lets the [`State`] decide them, fires due timers, deletes
//! at most one chunk of finished jobs whose retention has passed (and only
//! once the previous chunk is durable), dispatches ready jobs, applies the resulting record writes to sled as one atomic batch,
//! and hands the round to the sync thread. The sync thread gathers every round
//! that arrived while it was busy, makes them durable with one flush and one
//! fsync, and only then runs their effects (replies, `Assign` messages, watch
//! updates). So a `SubmitJobs` of 1,000 jobs costs one sync, concurrent callers
//! share one, and nobody is told of a change before it is on disk.
//!
//! If the store fails, the coordinator cannot promise anything any more: every
//! waiting caller gets `UNAVAILABLE`, the engine stops, and [`Engine::failed`]
//! resolves so that the server shuts down (a supervisor restarts it from the
//! durable state).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::coordinator::clock::Clock;
use crate::coordinator::error::Error;
use crate::coordinator::ids::JobId;
use crate::coordinator::schedule::spec::Spec;
use crate::coordinator::state::{Effect, Round, State};
use crate::coordinator::store::Store;
use crate::proto::{self, CoordinatorMessage, Hello, Job, Schedule, SubmitJobResponse};

/// Most commands decided in one round, so one round's batch stays bounded.
const MAX_COMMANDS_PER_ROUND: usize = 4096;

type Reply<T> = oneshot::Sender<Result<T, Error>>;

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

/// What the engine task and the request handlers share.
struct Shared {
    /// The model; locked briefly, never across an `.await`.
    state: Mutex<State>,
    /// The store, for reads of finished jobs and for the writes.
    store: Arc<Store>,
    /// The time source.
    clock: Arc<dyn Clock>,
    /// Cancelled when the store failed.
    failed: CancellationToken,
    /// The number of the last round whose writes were applied to sled, or are
    /// being applied: it is set before the writes are visible to a reader.
    applied: std::sync::atomic::AtomicU64,
    /// The number of the last round whose writes are durable. Reads wait for
    /// it to pass what they saw, so nobody is told of a change before it is
    /// on disk.
    durable: tokio::sync::watch::Sender<u64>,
}

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

impl Engine {
    /// Starts the engine over a model rebuilt from `store`. It stops when
    /// `shutdown` is cancelled, after making its last round durable.
    pub fn start(
        state: State,
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> (Engine, EngineTask) {
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            store,
            clock,
            failed: CancellationToken::new(),
            applied: Default::default(),
            durable: tokio::sync::watch::Sender::new(0),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let join = tokio::spawn(run(shared.clone(), rx, shutdown));
        (Engine { shared, tx }, EngineTask { join })
    }

    /// Resolves when the store has failed and the engine has stopped.
    pub async fn failed(&self) {
        self.shared.failed.cancelled().await
    }

    /// Whether the store has failed.
    pub fn failed_now(&self) -> bool {
        self.shared.failed.is_cancelled()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
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
        let value = f(&self.lock());
        self.durable_now().await?;
        Ok(value)
    }

    /// Waits until every write applied so far is durable. Reads call it after
    /// reading, so that what they return has reached the disk.
    pub async fn durable_now(&self) -> Result<(), Error> {
        let applied = self
            .shared
            .applied
            .load(std::sync::atomic::Ordering::SeqCst);
        let mut durable = self.shared.durable.subscribe();
        tokio::select! {
            r = durable.wait_for(|d| *d >= applied) => r.map(|_| ()).map_err(|_| unavailable()),
            _ = self.shared.failed.cancelled() => Err(Error::Unavailable("the store failed".into())),
        }
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
        let live = self.lock().live_job(id);
        let job = match live {
            Some(job) => job,
            None => crate::coordinator::state::finished_job(id, &self.shared.store)?,
        };
        self.durable_now().await?;
        Ok(job)
    }

    /// The job now and a stream of its changes.
    pub async fn watch(
        &self,
        id: JobId,
    ) -> Result<(Job, Option<mpsc::UnboundedReceiver<Job>>), Error> {
        let watched = self.lock().watch(id, &self.shared.store)?;
        self.durable_now().await?;
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

    /// The store, for scans off the engine's task.
    pub fn store_handle(&self) -> Arc<Store> {
        self.shared.store.clone()
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

fn decide(state: &mut State, cmd: Command, now: SystemTime, store: &Store) {
    match cmd {
        Command::Submit(jobs, r) => {
            let v = state.submit(jobs, now, store);
            reply_after(state, r, v);
        }
        Command::Cancel(id, reason, r) => {
            let v = state.cancel(id, &reason, now, store);
            reply_after(state, r, v);
        }
        Command::Retry(id, r) => {
            let v = state.retry(id, now, store);
            reply_after(state, r, v);
        }
        Command::Hello(hello, tx, r) => {
            let v = state.hello(hello, tx, now);
            reply_after(state, r, Ok(v));
        }
        Command::PutSchedule(put, r) => {
            let (schedule, spec) = *put;
            let v = state.put_schedule(schedule, spec, now, false);
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
            let v = state.trigger_schedule(&name, now);
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

/// The engine task.
async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    shutdown: CancellationToken,
) {
    let (sync_tx, sync_rx) = std::sync::mpsc::channel::<Round>();
    let store = shared.store.clone();
    let failed = shared.failed.clone();
    let durable = shared.durable.clone();
    let syncer = std::thread::Builder::new()
        .name("rota-sync".into())
        .spawn(move || sync_loop(&store, sync_rx, &failed, &durable))
        .expect("spawning the sync thread");
    let mut commands = Vec::with_capacity(64);
    let mut round_number = 0u64;
    let mut durable_rx = shared.durable.subscribe();
    // The round of the last deletions. The next chunk waits until it is
    // durable, so a sync (which the replies of its rounds wait for) never
    // carries more than one chunk of deletions.
    let mut sweep_round = 0u64;
    loop {
        let now = shared.clock.now();
        let sweep_open = *durable_rx.borrow_and_update() >= sweep_round;
        let next = {
            let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
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
            _ = shared.failed.cancelled() => break,
            n = rx.recv_many(&mut commands, MAX_COMMANDS_PER_ROUND) => {
                if n == 0 { break; }
            }
            r = durable_rx.changed(), if !sweep_open => {
                if r.is_err() { break; }
            }
            _ = tokio::time::sleep(sleep.unwrap_or(Duration::from_secs(3600))), if sleep.is_some() => {}
        }
        let now = shared.clock.now();
        let round = {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            for cmd in commands.drain(..) {
                decide(&mut state, cmd, now, &shared.store);
            }
            state.fire_due(now);
            // At most one chunk of deletions per round, and only once the
            // previous chunk is durable: a backlog never holds dispatch up.
            let swept = if *shared.durable.borrow() >= sweep_round {
                state.sweep(now, &shared.store)
            } else {
                0
            };
            state.dispatch(now);
            let mut round = state.take_round();
            // Applied under the lock, so readers never see the model ahead of sled.
            let writes = std::mem::take(&mut round.writes);
            round.dirty = !writes.is_empty();
            if round.dirty {
                round_number += 1;
                round.number = round_number;
            }
            if swept > 0 {
                sweep_round = round_number;
            }
            // Published before the writes reach sled: ListJobs scans sled without the lock,
            // and a scan that sees any of these writes must then wait for this round's sync.
            shared
                .applied
                .store(round_number, std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = shared.store.apply(writes) {
                tracing::error!(error = %e, "store write failed; stopping");
                fail_round(round, &e.to_string());
                shared.failed.cancel();
                break;
            }
            round
        };
        if round.effects.is_empty() && !round.dirty {
            continue;
        }
        if sync_tx.send(round).is_err() {
            break;
        }
    }
    // End every session and watch stream (their leases stay stored), answer
    // what is still waiting, then let the sync thread finish.
    shared
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .close_streams();
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        refuse(cmd);
    }
    drop(sync_tx);
    let _ = tokio::task::spawn_blocking(move || syncer.join()).await;
}

fn refuse(cmd: Command) {
    match cmd {
        Command::Submit(_, r) => drop(r.send(Err(unavailable()))),
        Command::Cancel(_, _, r) => drop(r.send(Err(unavailable()))),
        Command::Retry(_, r) => drop(r.send(Err(unavailable()))),
        Command::Hello(_, _, r) => drop(r.send(Err(unavailable()))),
        Command::PutSchedule(_, r) => drop(r.send(Err(unavailable()))),
        Command::DeleteSchedule(_, r) => drop(r.send(Err(unavailable()))),
        Command::PauseSchedule(_, r) | Command::ResumeSchedule(_, r) => {
            drop(r.send(Err(unavailable())))
        }
        Command::TriggerSchedule(_, r) => drop(r.send(Err(unavailable()))),
        Command::DrainWorker(_, _, r) => drop(r.send(Err(unavailable()))),
        _ => {}
    }
}

fn fail_round(round: Round, why: &str) {
    for effect in round.effects {
        effect(Err(why));
    }
}

/// The sync thread: one flush and fsync for every round that queued up while
/// the last one ran, then their effects, in order.
fn sync_loop(
    store: &Store,
    rx: std::sync::mpsc::Receiver<Round>,
    failed: &CancellationToken,
    durable: &tokio::sync::watch::Sender<u64>,
) {
    let mut pending: Vec<Round> = Vec::new();
    while let Ok(first) = rx.recv() {
        pending.push(first);
        pending.extend(rx.try_iter());
        let dirty = pending.iter().any(|r| r.dirty);
        let outcome = if dirty { store.sync() } else { Ok(()) };
        match outcome {
            Ok(()) => {
                let newest = pending.iter().map(|r| r.number).max().unwrap_or(0);
                for round in pending.drain(..) {
                    run_effects(round.effects, Ok(()));
                }
                durable.send_if_modified(|d| {
                    let advanced = newest > *d;
                    *d = (*d).max(newest);
                    advanced
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "store sync failed; stopping");
                let why = e.to_string();
                for round in pending.drain(..) {
                    run_effects(round.effects, Err(&why));
                }
                failed.cancel();
                for round in rx.iter() {
                    run_effects(round.effects, Err(&why));
                }
                return;
            }
        }
    }
    if let Err(e) = store.sync() {
        tracing::error!(error = %e, "final store sync failed");
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

    fn start(dir: &std::path::Path) -> (Engine, EngineTask, CancellationToken) {
        let store = Arc::new(Store::open(dir, 1 << 20).unwrap());
        let settings = Settings {
            lease_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            default_shutdown_grace: Duration::from_secs(30),
            retention: Default::default(),
        };
        let state = State::restore(settings, store.snapshot().unwrap(), SystemTime::now());
        let stop = CancellationToken::new();
        let (engine, task) = Engine::start(state, store, Arc::new(SystemClock), stop.clone());
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

    #[tokio::test]
    async fn a_batch_of_a_thousand_jobs_costs_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, task, stop) = start(dir.path());
        let before = engine.store_handle().sync_count();
        let results = engine.submit((0..1000).map(job).collect()).await.unwrap();
        assert_eq!(results.len(), 1000);
        assert_eq!(engine.store_handle().sync_count() - before, 1);
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
        let state = State::restore(settings, store.snapshot().unwrap(), SystemTime::now());
        assert_eq!(state.sweep_pending(), n);
        let stop = CancellationToken::new();
        let (engine, task) =
            Engine::start(state, store.clone(), Arc::new(SystemClock), stop.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.scan_jobs(None).next().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the backlog was not swept within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
        assert_eq!(snap.jobs.len(), 1, "the deletions were durable");
        assert_eq!(snap.idempotency.len(), 1);
    }

    #[tokio::test]
    async fn concurrent_submits_share_syncs_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, task, stop) = start(dir.path());
        let before = engine.store_handle().sync_count();
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
        let syncs = engine.store_handle().sync_count() - before;
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
