//! `rota.v1.JobService`: submit, read, list, cancel, retry and watch jobs.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::coordinator::engine::Engine;
use crate::coordinator::error::Error;
use crate::coordinator::ids::JobId;
use crate::coordinator::service::{job_id, page_size};
use crate::coordinator::state::is_terminal;
use crate::coordinator::store::Store;
use crate::coordinator::validate;
use crate::proto::job_service_server::JobService;
use crate::proto::{
    CancelJobRequest, GetJobRequest, Job, JobState, ListJobsRequest, ListJobsResponse,
    RetryJobRequest, SubmitJobRequest, SubmitJobResponse, SubmitJobsRequest, SubmitJobsResponse,
    WatchJobRequest,
};

/// Most jobs in one `SubmitJobs`.
pub const MAX_BATCH: usize = 10_000;
/// `page_size` when unset.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest `page_size`; larger requests are served this many.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Most records one `ListJobs` page examines before it returns what it found.
const MAX_EXAMINED_PER_PAGE: usize = 100_000;

/// The job service.
pub struct Jobs {
    /// The engine every change goes through.
    engine: Engine,
    /// Largest payload accepted.
    max_payload: usize,
    /// Largest response message: a `ListJobs` page stops before it.
    max_message_size: usize,
}

impl Jobs {
    /// A service over `engine`.
    pub fn new(engine: Engine, max_payload: usize) -> Self {
        Jobs {
            engine,
            max_payload,
            max_message_size: crate::coordinator::config::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// Caps `ListJobs` pages to fit in `bytes` (the server's message limit).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }
}

/// Bytes of a response message kept free for everything but its jobs.
const PAGE_HEADROOM: usize = 64 << 10;

/// The bytes a message's repeated field spends on one element of `len` bytes:
/// a tag, a length prefix, the element.
pub(crate) fn element_size(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

/// The filters of a `ListJobs` call.
struct Filter {
    queue: String,
    state: JobState,
    kind: String,
    schedule: String,
}

impl Filter {
    fn matches(&self, job: &Job) -> bool {
        (self.queue.is_empty() || job.queue == self.queue)
            && (self.state == JobState::Unspecified || job.state() == self.state)
            && (self.kind.is_empty() || job.kind == self.kind)
            && (self.schedule.is_empty() || job.schedule == self.schedule)
    }
}

/// Scans one page of jobs in creation order: at most `size` jobs, and no more
/// than fit in `budget` bytes (a page always holds at least one job).
fn list_page(
    store: &Store,
    filter: &Filter,
    after: Option<JobId>,
    size: usize,
    budget: usize,
) -> Result<ListJobsResponse, Error> {
    use prost::Message;
    let mut jobs = Vec::new();
    let mut last = None;
    let mut examined = 0;
    let mut bytes = 0;
    let mut full = false;
    for rec in store.scan_jobs(after) {
        let rec = rec?;
        let id = rec.id();
        if filter.matches(&rec.job) {
            let len = element_size(rec.job.encoded_len());
            if !jobs.is_empty() && bytes + len > budget {
                // This job starts the next page.
                full = true;
                break;
            }
            bytes += len;
            jobs.push(rec.job);
        }
        examined += 1;
        last = Some(id);
        if jobs.len() == size {
            full = true;
            break;
        }
        if examined == MAX_EXAMINED_PER_PAGE {
            break;
        }
    }
    // A full page (or a page cut short by the scan bound) may have more after it.
    let more = full || examined == MAX_EXAMINED_PER_PAGE;
    let next_page_token = match (more, last) {
        (true, Some(id)) if store.scan_jobs(Some(id)).next().is_some() => id.to_string(),
        _ => String::new(),
    };
    Ok(ListJobsResponse {
        jobs,
        next_page_token,
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<Job, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Jobs {
    #[tracing::instrument(skip_all)]
    async fn submit_job(
        &self,
        req: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let job = req
            .into_inner()
            .job
            .ok_or_else(|| Error::invalid("job", "is required"))?;
        let job = validate::new_job("job", job, self.max_payload)?;
        let mut results = self.engine.submit(vec![job]).await?;
        let result = results
            .pop()
            .ok_or_else(|| Status::internal("no result for the submitted job"))?;
        Ok(Response::new(result))
    }

    #[tracing::instrument(skip_all)]
    async fn submit_jobs(
        &self,
        req: Request<SubmitJobsRequest>,
    ) -> Result<Response<SubmitJobsResponse>, Status> {
        let jobs = req.into_inner().jobs;
        if jobs.len() > MAX_BATCH {
            return Err(Error::invalid(
                "jobs",
                format!("has {} jobs; the limit is {MAX_BATCH}", jobs.len()),
            )
            .into());
        }
        let jobs = jobs
            .into_iter()
            .enumerate()
            .map(|(i, j)| validate::new_job(&format!("jobs[{i}]"), j, self.max_payload))
            .collect::<Result<Vec<_>, _>>()?;
        if jobs.is_empty() {
            return Ok(Response::new(SubmitJobsResponse::default()));
        }
        let mut results = self.engine.submit(jobs).await?;
        // The caller has the payloads; echoing them could make the answer
        // larger than any message limit allows.
        for r in &mut results {
            if let Some(job) = &mut r.job {
                job.payload.clear();
            }
        }
        Ok(Response::new(SubmitJobsResponse { results }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = job_id("id", &req.into_inner().id)?;
        Ok(Response::new(self.engine.get_job(id).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn list_jobs(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let req = req.into_inner();
        let size = page_size(req.page_size)?;
        let state = JobState::try_from(req.state)
            .map_err(|_| Error::invalid("state", format!("{} is not a JobState", req.state)))?;
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(JobId::parse(&req.page_token).map_err(|_| {
                Error::invalid(
                    "page_token",
                    "is not a token from a previous ListJobsResponse",
                )
            })?)
        };
        validate::name("queue", &req.queue)?;
        validate::name("kind", &req.kind)?;
        validate::name("schedule", &req.schedule)?;
        let filter = Filter {
            queue: req.queue,
            state,
            kind: req.kind,
            schedule: req.schedule,
        };
        let (store, epoch): (Arc<Store>, _) = self.engine.store_handle()?;
        let budget = self.max_message_size.saturating_sub(PAGE_HEADROOM);
        let page =
            tokio::task::spawn_blocking(move || list_page(&store, &filter, after, size, budget))
                .await
                .map_err(|e| Status::internal(format!("list task failed: {e}")))??;
        // What the scan saw may include writes not yet on disk.
        self.engine.durable(&epoch).await?;
        Ok(Response::new(page))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_job(&self, req: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let req = req.into_inner();
        let id = job_id("id", &req.id)?;
        validate::text("reason", &req.reason, validate::MAX_TEXT_LEN)?;
        Ok(Response::new(self.engine.cancel(id, req.reason).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn retry_job(&self, req: Request<RetryJobRequest>) -> Result<Response<Job>, Status> {
        let id = job_id("id", &req.into_inner().id)?;
        Ok(Response::new(self.engine.retry(id).await?))
    }

    type WatchJobStream = WatchStream;

    #[tracing::instrument(skip_all)]
    async fn watch_job(
        &self,
        req: Request<WatchJobRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = job_id("id", &req.into_inner().id)?;
        let (job, changes) = self.engine.watch(id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = job.clone();
            if tx.send(Ok(job)).await.is_err() {
                return;
            }
            let Some(mut changes) = changes else { return };
            loop {
                // A client that goes away ends this task at once, not at the
                // job's next change.
                let job = tokio::select! {
                    job = changes.recv() => match job {
                        Some(job) => job,
                        None => return,
                    },
                    _ = tx.closed() => return,
                };
                if job == last {
                    continue;
                }
                let done = is_terminal(job.state());
                last = job.clone();
                if tx.send(Ok(job)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
