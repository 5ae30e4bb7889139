//! `rota.v1.AdminService`: workers and queue statistics.

use tonic::{Request, Response, Status};

use crate::coordinator::engine::Engine;
use crate::coordinator::error::Error;
use crate::coordinator::validate;
use crate::proto::admin_service_server::AdminService;
use crate::proto::{
    DrainWorkerRequest, GetQueueStatsRequest, ListWorkersRequest, ListWorkersResponse, QueueStats,
    Worker,
};

/// The admin service.
pub struct Admin {
    /// Where the answers come from.
    engine: Engine,
}

impl Admin {
    /// A service over `engine`.
    pub fn new(engine: Engine) -> Self {
        Admin { engine }
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    #[tracing::instrument(skip_all)]
    async fn list_workers(
        &self,
        _req: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(ListWorkersResponse {
            workers: self.engine.list_workers().await?,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_queue_stats(
        &self,
        req: Request<GetQueueStatsRequest>,
    ) -> Result<Response<QueueStats>, Status> {
        let queue = req.into_inner().queue;
        validate::name("queue", &queue)?;
        Ok(Response::new(QueueStats {
            queues: self.engine.queue_stats(&queue).await?,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn drain_worker(
        &self,
        req: Request<DrainWorkerRequest>,
    ) -> Result<Response<Worker>, Status> {
        let req = req.into_inner();
        if req.worker_id.is_empty() {
            return Err(Error::invalid("worker_id", "is required").into());
        }
        validate::name("worker_id", &req.worker_id)?;
        validate::text("reason", &req.reason, validate::MAX_TEXT_LEN)?;
        Ok(Response::new(
            self.engine.drain_worker(req.worker_id, req.reason).await?,
        ))
    }
}
