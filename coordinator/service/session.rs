//! `rota.v1.WorkerService.Session`: one bidirectional stream per worker.
//!
//! The first message must be `Hello`. The handler registers the session with
//! the engine (which sends `Welcome` and, later, `Assign`s on the outbound
//! channel), then a task reads the worker's messages until the stream ends and
//! reports the disconnect. The outbound stream ends when the engine drops the
//! session's sender: on a newer session for the same worker, a lost worker, or
//! shutdown.

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::coordinator::engine::Engine;
use crate::coordinator::error::Error;
use crate::coordinator::validate::MAX_NAME_LEN;
use crate::proto::worker_message::Msg;
use crate::proto::worker_service_server::WorkerService;
use crate::proto::{CoordinatorMessage, Hello, WorkerMessage};

/// How long a new stream may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Most slots one worker may declare.
pub const MAX_SLOTS: u32 = 10_000;

/// The worker service.
pub struct Sessions {
    /// Where sessions are registered and messages go.
    engine: Engine,
}

impl Sessions {
    /// A service over `engine`.
    pub fn new(engine: Engine) -> Self {
        Sessions { engine }
    }
}

fn check_hello(h: &Hello) -> Result<(), Error> {
    if h.worker_id.is_empty() {
        return Err(Error::invalid(
            "hello.worker_id",
            "is required and must not be empty",
        ));
    }
    if h.worker_id.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            "hello.worker_id",
            format!("the limit is {MAX_NAME_LEN} bytes"),
        ));
    }
    if h.slots == 0 || h.slots > MAX_SLOTS {
        return Err(Error::invalid(
            "hello.slots",
            format!("is {}; it must be between 1 and {MAX_SLOTS}", h.slots),
        ));
    }
    if h.queues
        .iter()
        .chain(&h.kinds)
        .any(|s| s.is_empty() || s.len() > MAX_NAME_LEN)
    {
        return Err(Error::invalid(
            "hello.queues/kinds",
            format!("names must be 1 to {MAX_NAME_LEN} bytes"),
        ));
    }
    Ok(())
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

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
            .map_err(|_| Status::deadline_exceeded("no hello within 30s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(Msg::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be hello",
                ))
            }
        };
        check_hello(&hello)?;
        let worker_id = hello.worker_id.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Registration and the reader run in their own task, so that a call
        // dropped while waiting for the engine still reports its disconnect.
        let (registered_tx, registered) = tokio::sync::oneshot::channel();
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let generation = match engine.hello(hello, tx).await {
                Ok(g) => g,
                Err(e) => {
                    let _ = registered_tx.send(Err(e));
                    return;
                }
            };
            let _ = registered_tx.send(Ok(()));
            tracing::info!(worker = %worker_id, generation, "worker connected");
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(worker = %worker_id, error = %e, "session stream error");
                        break;
                    }
                };
                match msg.msg {
                    Some(Msg::Heartbeat(_)) => engine.heartbeat(worker_id.clone(), generation),
                    Some(Msg::Complete(c)) => engine.complete(worker_id.clone(), generation, c),
                    Some(Msg::Draining(_)) => engine.draining(worker_id.clone(), generation),
                    Some(Msg::Hello(_)) | None => {
                        tracing::warn!(worker = %worker_id, "unexpected message on an open session; ignored");
                    }
                }
            }
            tracing::info!(worker = %worker_id, generation, "worker stream ended");
            engine.disconnected(worker_id, generation);
        });
        match registered.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(Status::unavailable("the coordinator is shutting down")),
        }
        Ok(Response::new(Box::pin(
            UnboundedReceiverStream::new(rx).map(Ok),
        )))
    }
}
