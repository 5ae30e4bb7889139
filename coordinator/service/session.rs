//! `rota.v1.WorkerService.Session`: one bidirectional stream per worker.
//!
//! The first message must be `Hello`. The handler registers the session with
//! the engine (which sends `Welcome` and, later, `Assign`s on the outbound
//! channel), then a task reads the worker's messages until the stream ends and
//! reports the disconnect. The outbound stream ends when the engine drops the
//! session's sender: on a newer session for the same worker, a lost worker, or
//! shutdown.
//!
//! Limits: at most `max_workers` workers have a session open at once (the
//! next is refused with `RESOURCE_EXHAUSTED`; a worker's new session takes
//! over its old one's place, so a reconnect is never refused for a stream
//! the lost connection left half-open); a `Hello` with a field over its limit
//! is refused with `INVALID_ARGUMENT` naming it; a session that floods or
//! sends garbage is ended by its [`SessionGuard`] with a status that says why.
//! A completion's result over `--max-payload` is recorded as a failed attempt
//! that says so, and an error or reason over [`MAX_TEXT_LEN`] is cut to it:
//! a report must still end its task.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::coordinator::config::Limits;
use crate::coordinator::engine::Engine;
use crate::coordinator::error::Error;
use crate::coordinator::service::guard::{GuardSettings, SessionGuard};
use crate::coordinator::service::message_size;
use crate::coordinator::validate::{self, MAX_ID_LEN, MAX_TEXT_LEN};
use crate::proto::coordinator_message::Msg as OutMsg;
use crate::proto::worker_message::Msg;
use crate::proto::worker_service_server::WorkerService;
use crate::proto::{complete, CoordinatorMessage, Hello, WorkerMessage};

/// How long a new stream may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Most slots one worker may declare.
pub const MAX_SLOTS: u32 = 10_000;
/// Most queues or kinds one worker may name.
pub const MAX_NAMES: usize = 1000;

/// The `max_workers` permits held, by worker id (see [`Sessions`]).
#[derive(Clone, Default)]
struct Seats(Arc<Mutex<SeatMap>>);

#[derive(Default)]
struct SeatMap {
    /// Each worker id's permit and the number of the session holding it.
    held: std::collections::HashMap<String, (u64, tokio::sync::OwnedSemaphorePermit)>,
    /// The number of the next session.
    next: u64,
}

/// A session's claim on its worker's permit: given back when the session
/// ends, unless a newer session of the same worker has taken it over.
struct Seat {
    seats: Seats,
    worker_id: String,
    session: u64,
}

impl Seats {
    /// The permit for a session of `worker_id`: its older session's, or a
    /// new one from `open`; `None` when `max_workers` others hold them all.
    fn take(&self, worker_id: &str, open: &Arc<Semaphore>) -> Option<Seat> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let permit = match map.held.remove(worker_id) {
            Some((_, permit)) => permit,
            None => open.clone().try_acquire_owned().ok()?,
        };
        map.next += 1;
        let session = map.next;
        map.held.insert(worker_id.to_string(), (session, permit));
        Some(Seat {
            seats: self.clone(),
            worker_id: worker_id.to_string(),
            session,
        })
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut map = self.seats.0.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .held
            .get(&self.worker_id)
            .is_some_and(|(session, _)| *session == self.session)
        {
            map.held.remove(&self.worker_id);
        }
    }
}

/// The worker service.
pub struct Sessions {
    /// Where sessions are registered and messages go.
    engine: Engine,
    /// One permit per worker with an open session; none left means
    /// `max_workers` are open.
    open: Arc<Semaphore>,
    /// The permit of each worker id, and which of its sessions holds it: a
    /// reconnect takes over its old session's permit, so a stream left
    /// half-open by a lost connection does not count twice.
    seats: Seats,
    /// The number of permits, for messages.
    max_workers: usize,
    /// When a session is cut off.
    guard: GuardSettings,
    /// Largest result a completion may carry.
    max_payload: usize,
}

impl Sessions {
    /// A service over `engine`, with the default limits.
    pub fn new(engine: Engine) -> Self {
        let config = crate::coordinator::Config::default();
        Sessions {
            engine,
            open: Arc::new(Semaphore::new(0)),
            seats: Seats::default(),
            max_workers: 0,
            guard: GuardSettings {
                flood_rate: 0,
                flood_burst: 0,
                bad_messages: 0,
                heartbeat_interval: config.heartbeat_interval,
            },
            max_payload: config.max_payload,
        }
        .with_limits(
            &config.limits,
            config.heartbeat_interval,
            config.max_payload,
        )
    }

    /// Applies the coordinator's limits.
    pub fn with_limits(
        mut self,
        limits: &Limits,
        heartbeat_interval: Duration,
        max_payload: usize,
    ) -> Self {
        self.open = Arc::new(Semaphore::new(limits.max_workers));
        self.max_workers = limits.max_workers;
        self.guard = GuardSettings {
            flood_rate: limits.worker_flood_rate,
            flood_burst: limits.worker_flood_burst,
            bad_messages: limits.worker_bad_messages,
            heartbeat_interval,
        };
        self.max_payload = max_payload;
        self
    }
}

/// Checks a `Hello`: every field within its limit.
pub fn check_hello(h: &Hello) -> Result<(), Error> {
    if h.worker_id.is_empty() {
        return Err(Error::invalid(
            "hello.worker_id",
            "is required and must not be empty",
        ));
    }
    validate::name("hello.worker_id", &h.worker_id)?;
    validate::name("hello.hostname", &h.hostname)?;
    if h.slots == 0 || h.slots > MAX_SLOTS {
        return Err(Error::invalid(
            "hello.slots",
            format!("is {}; it must be between 1 and {MAX_SLOTS}", h.slots),
        ));
    }
    for (field, names) in [("hello.queues", &h.queues), ("hello.kinds", &h.kinds)] {
        if names.len() > MAX_NAMES {
            return Err(Error::invalid(
                field,
                format!("has {} entries; the limit is {MAX_NAMES}", names.len()),
            ));
        }
        for (i, name) in names.iter().enumerate() {
            let field = format!("{field}[{i}]");
            if name.is_empty() {
                return Err(Error::invalid(&field, "must not be empty"));
            }
            validate::name(&field, name)?;
        }
    }
    validate::labels("hello.labels", &h.labels)?;
    if h.held.len() > MAX_SLOTS as usize {
        return Err(Error::invalid(
            "hello.held",
            format!("has {} leases; the limit is {MAX_SLOTS}", h.held.len()),
        ));
    }
    for (i, held) in h.held.iter().enumerate() {
        validate::text(&format!("hello.held[{i}].job_id"), &held.job_id, MAX_ID_LEN)?;
        validate::text(
            &format!("hello.held[{i}].lease_id"),
            &held.lease_id,
            MAX_ID_LEN,
        )?;
    }
    validate::duration("hello.max_shutdown_grace", &h.max_shutdown_grace)?;
    Ok(())
}

/// Cuts `text` to at most `max` bytes (on a character boundary), saying so.
fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let note = format!(" [cut from {} bytes to the {max}-byte limit]", text.len());
    let mut end = max.saturating_sub(note.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&note);
}

/// Makes a completion fit the limits (see the module docs). `Err` names what
/// makes it garbage: ids no lease can have.
fn fit_complete(c: &mut crate::proto::Complete, max_payload: usize) -> Result<(), String> {
    if c.job_id.len() > MAX_ID_LEN || c.lease_id.len() > MAX_ID_LEN {
        return Err(format!(
            "a complete whose job_id ({} bytes) or lease_id ({} bytes) is over {MAX_ID_LEN} bytes",
            c.job_id.len(),
            c.lease_id.len()
        ));
    }
    match &mut c.outcome {
        Some(complete::Outcome::Success(s)) if s.result.len() > max_payload => {
            let error = format!(
                "complete.success.result: is {} bytes; the limit is {max_payload} bytes (--max-payload)",
                s.result.len()
            );
            c.outcome = Some(complete::Outcome::Failure(crate::proto::Failure {
                error,
                permanent: false,
            }));
        }
        Some(complete::Outcome::Failure(f)) => cut(&mut f.error, MAX_TEXT_LEN),
        Some(complete::Outcome::Cancelled(x)) => cut(&mut x.reason, MAX_TEXT_LEN),
        Some(complete::Outcome::Interrupted(x)) => cut(&mut x.reason, MAX_TEXT_LEN),
        _ => {}
    }
    Ok(())
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

/// What the outbound stream needs between items.
struct Outbound {
    /// Messages from the engine; ends when the engine drops the session.
    rx: mpsc::UnboundedReceiver<CoordinatorMessage>,
    /// The reader's reason for cutting the session off.
    cut: oneshot::Receiver<Status>,
    /// The session's guard, which also counts refused completions.
    guard: Arc<Mutex<SessionGuard>>,
    /// Cancelled when this stream ends, so that the reader stops too.
    ended: CancellationToken,
    /// Set once the stream has yielded its last item.
    done: bool,
}

impl Outbound {
    async fn next(&mut self) -> Option<Result<CoordinatorMessage, Status>> {
        if self.done {
            return None;
        }
        let item = tokio::select! {
            biased;
            status = &mut self.cut => status.ok().map(Err),
            msg = self.rx.recv() => msg.map(|m| self.check(m)),
        };
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
            self.ended.cancel();
        }
        item
    }

    /// Counts a refused completion; too many end the session.
    fn check(&mut self, msg: CoordinatorMessage) -> Result<CoordinatorMessage, Status> {
        if let Some(OutMsg::CompleteAck(ack)) = &msg.msg {
            if !ack.accepted {
                let what = format!(
                    "a complete the coordinator refused ({})",
                    validate::shown(&ack.reason)
                );
                let verdict = self
                    .guard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .bad(what, Instant::now());
                if let Err(e) = verdict {
                    tracing::warn!(error = %e, "worker cut off");
                    return Err(e.into());
                }
            }
        }
        Ok(msg)
    }
}

impl Drop for Outbound {
    /// The response stream is gone (the call ended or the client left): the
    /// reader stops too, and the session's permit is released.
    fn drop(&mut self) {
        self.ended.cancel();
    }
}

#[tonic::async_trait]
impl WorkerService for Sessions {
    type SessionStream = SessionStream;

    #[tracing::instrument(skip_all)]
    async fn session(
        &self,
        req: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30s"))?
            .map_err(|e| message_size::refusal(&e).unwrap_or(e))?;
        let hello = match first.and_then(|m| m.msg) {
            Some(Msg::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be hello",
                ))
            }
        };
        check_hello(&hello)?;
        let permit = self
            .seats
            .take(&hello.worker_id, &self.open)
            .ok_or_else(|| {
                tracing::warn!(worker = %hello.worker_id, max = self.max_workers, "session refused: too many workers");
                Status::resource_exhausted(format!(
                    "workers: {} sessions are open, the limit (--max-workers); \
                     try again later, or raise the limit",
                    self.max_workers
                ))
            })?;
        let worker_id = hello.worker_id.clone();
        let guard = Arc::new(Mutex::new(SessionGuard::new(
            &worker_id,
            hello.slots,
            self.guard,
            Instant::now(),
        )));
        let (tx, rx) = mpsc::unbounded_channel();
        let (cut_tx, cut) = oneshot::channel::<Status>();
        let ended = CancellationToken::new();
        // Registration and the reader run in their own task, so that a call
        // dropped while waiting for the engine still reports its disconnect.
        let (registered_tx, registered) = oneshot::channel();
        let engine = self.engine.clone();
        let max_payload = self.max_payload;
        let reader_guard = guard.clone();
        let stop = ended.clone();
        tokio::spawn(async move {
            // Held while the session is open.
            let _permit = permit;
            let generation = match engine.hello(hello, tx).await {
                Ok(g) => g,
                Err(e) => {
                    let _ = registered_tx.send(Err(e));
                    return;
                }
            };
            let _ = registered_tx.send(Ok(()));
            tracing::info!(worker = %worker_id, generation, "worker connected");
            let verdict = read(
                &mut inbound,
                &engine,
                &worker_id,
                generation,
                &reader_guard,
                &stop,
                max_payload,
            )
            .await;
            if let Err(status) = verdict {
                tracing::warn!(worker = %worker_id, generation, status = %status.message(), "worker cut off");
                let _ = cut_tx.send(status);
            }
            tracing::info!(worker = %worker_id, generation, "worker stream ended");
            engine.disconnected(worker_id, generation);
        });
        match registered.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(Status::unavailable("the coordinator is shutting down")),
        }
        let outbound = Outbound {
            rx,
            cut,
            guard,
            ended,
            done: false,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            outbound,
            |mut out| async move { out.next().await.map(|item| (item, out)) },
        ))))
    }
}

/// Reads a session's messages until its stream ends (`Ok`) or it must be cut
/// off (`Err`, the status to end it with).
async fn read(
    inbound: &mut Streaming<WorkerMessage>,
    engine: &Engine,
    worker_id: &str,
    generation: u64,
    guard: &Mutex<SessionGuard>,
    stop: &CancellationToken,
    max_payload: usize,
) -> Result<(), Status> {
    let check = |verdict: Result<(), crate::coordinator::service::guard::GuardError>| {
        verdict.map_err(Status::from)
    };
    loop {
        let msg = tokio::select! {
            msg = inbound.message() => msg,
            _ = stop.cancelled() => return Ok(()),
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => {
                if let Some(refusal) = message_size::refusal(&e) {
                    return Err(refusal);
                }
                // Bytes that are not a WorkerMessage (tonic's decode errors are
                // INTERNAL) end the session with that status; a broken
                // connection (an h2 error) just ends it.
                if e.code() == tonic::Code::Internal
                    && !e.message().starts_with("h2 protocol error")
                {
                    return Err(e);
                }
                tracing::debug!(worker = %worker_id, error = %e, "session stream error");
                return Ok(());
            }
        };
        let now = Instant::now();
        let guard = || guard.lock().unwrap_or_else(|e| e.into_inner());
        match msg.msg {
            Some(Msg::Heartbeat(_)) => {
                check(guard().chatter("heartbeats", now))?;
                engine.heartbeat(worker_id.to_string(), generation);
            }
            Some(Msg::Draining(_)) => {
                check(guard().chatter("drain messages", now))?;
                engine.draining(worker_id.to_string(), generation);
            }
            Some(Msg::Complete(mut c)) => match fit_complete(&mut c, max_payload) {
                Ok(()) => engine.complete(worker_id.to_string(), generation, c),
                Err(what) => check(guard().bad(what, now))?,
            },
            Some(Msg::Hello(_)) => {
                tracing::warn!(worker = %worker_id, "a second hello on an open session; ignored");
                check(guard().bad("a second hello on an open session", now))?;
            }
            None => {
                check(guard().bad(
                    "an empty message (none of hello, heartbeat, complete, draining)",
                    now,
                ))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::LeaseRef;

    fn hello() -> Hello {
        Hello {
            worker_id: "w".into(),
            slots: 1,
            ..Default::default()
        }
    }

    fn field_of(h: Hello) -> String {
        match check_hello(&h) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn hello_fields_over_their_limits_are_named() {
        assert!(check_hello(&hello()).is_ok());
        let long = "x".repeat(257);
        let m = field_of(Hello {
            worker_id: long.clone(),
            ..hello()
        });
        assert!(
            m.starts_with("hello.worker_id: is 257 bytes; the limit is 256"),
            "{m}"
        );
        let m = field_of(Hello {
            hostname: long.clone(),
            ..hello()
        });
        assert!(m.starts_with("hello.hostname:"), "{m}");
        let m = field_of(Hello {
            queues: vec!["a".into(), long.clone()],
            ..hello()
        });
        assert!(m.starts_with("hello.queues[1]:"), "{m}");
        let m = field_of(Hello {
            kinds: vec![String::new()],
            ..hello()
        });
        assert!(m.starts_with("hello.kinds[0]: must not be empty"), "{m}");
        let m = field_of(Hello {
            kinds: vec!["k".into(); MAX_NAMES + 1],
            ..hello()
        });
        assert!(
            m.starts_with("hello.kinds: has 1001 entries; the limit is 1000"),
            "{m}"
        );
        let labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        let m = field_of(Hello { labels, ..hello() });
        assert!(
            m.starts_with("hello.labels: has 65 entries; the limit is 64"),
            "{m}"
        );
        let held = vec![LeaseRef {
            job_id: "j".repeat(65),
            lease_id: String::new(),
        }];
        let m = field_of(Hello { held, ..hello() });
        assert!(m.starts_with("hello.held[0].job_id: is 65 bytes"), "{m}");
        let m = field_of(Hello {
            max_shutdown_grace: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..hello()
        });
        assert!(
            m.starts_with("hello.max_shutdown_grace: must not be negative"),
            "{m}"
        );
        let m = field_of(Hello {
            slots: 0,
            ..hello()
        });
        assert!(m.starts_with("hello.slots: is 0"), "{m}");
    }

    #[test]
    fn an_oversized_result_becomes_a_failure_and_long_errors_are_cut() {
        let mut c = crate::proto::Complete {
            job_id: "j".into(),
            lease_id: "l".into(),
            outcome: Some(complete::Outcome::Success(crate::proto::Success {
                result: vec![0; 11],
            })),
        };
        fit_complete(&mut c, 10).unwrap();
        match &c.outcome {
            Some(complete::Outcome::Failure(f)) => {
                assert!(!f.permanent);
                assert_eq!(
                    f.error,
                    "complete.success.result: is 11 bytes; the limit is 10 bytes (--max-payload)"
                );
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        let mut c = crate::proto::Complete {
            outcome: Some(complete::Outcome::Failure(crate::proto::Failure {
                error: "é".repeat(MAX_TEXT_LEN),
                permanent: true,
            })),
            ..Default::default()
        };
        fit_complete(&mut c, 10).unwrap();
        let Some(complete::Outcome::Failure(f)) = &c.outcome else {
            unreachable!()
        };
        assert!(f.error.len() <= MAX_TEXT_LEN, "{}", f.error.len());
        assert!(f.error.ends_with(&format!(
            "[cut from {} bytes to the {MAX_TEXT_LEN}-byte limit]",
            2 * MAX_TEXT_LEN
        )));
        let mut c = crate::proto::Complete {
            job_id: "j".repeat(65),
            ..Default::default()
        };
        assert!(fit_complete(&mut c, 10)
            .unwrap_err()
            .contains("over 64 bytes"));
    }
}
