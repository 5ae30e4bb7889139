//! `rota.v1.ScheduleService`: create, read, control and preview schedules.

use std::time::SystemTime;

use tonic::{Request, Response, Status};

use crate::coordinator::engine::Engine;
use crate::coordinator::error::Error;
use crate::coordinator::schedule::check::new_schedule;
use crate::coordinator::schedule::spec::Spec;
use crate::coordinator::service::page_size;
use crate::coordinator::validate;
use crate::proto::preview_schedule_request::Source;
use crate::proto::schedule_service_server::ScheduleService;
use crate::proto::{
    DeleteScheduleRequest, GetScheduleRequest, Job, ListSchedulesRequest, ListSchedulesResponse,
    PauseScheduleRequest, PreviewScheduleRequest, PreviewScheduleResponse, PutScheduleRequest,
    ResumeScheduleRequest, Schedule, TriggerScheduleRequest,
};

/// Default `PreviewSchedule.count`.
pub const DEFAULT_PREVIEW: u32 = 10;
/// Largest `PreviewSchedule.count`.
pub const MAX_PREVIEW: u32 = 1000;

/// The schedule service.
pub struct Schedules {
    /// Where schedules live.
    engine: Engine,
    /// Largest payload of a job template.
    max_payload: usize,
    /// Largest response message: a `ListSchedules` page stops before it.
    max_message_size: usize,
}

impl Schedules {
    /// A service over `engine`.
    pub fn new(engine: Engine, max_payload: usize) -> Self {
        Schedules {
            engine,
            max_payload,
            max_message_size: crate::coordinator::config::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// Caps `ListSchedules` pages to fit in `bytes` (the server's message limit).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }
}

/// Cuts a page of schedules to what fits in `budget` bytes (at least one);
/// a cut page's token is the last name it kept.
fn fit_page(page: &mut Vec<Schedule>, next_page_token: &mut String, budget: usize) {
    use prost::Message;
    let mut bytes = 0;
    let keep = page
        .iter()
        .position(|s| {
            bytes += crate::coordinator::service::jobs::element_size(s.encoded_len());
            bytes > budget
        })
        .map(|i| i.max(1));
    if let Some(keep) = keep.filter(|k| *k < page.len()) {
        page.truncate(keep);
        *next_page_token = page.last().map(|s| s.name.clone()).unwrap_or_default();
    }
}

fn name(field: &str, name: String) -> Result<String, Error> {
    if name.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    validate::name(field, &name)?;
    Ok(name)
}

/// Up to `count` fire times of `spec` after `after`. An END-anchored interval
/// has only its next run known (`next`, or one period after `after`).
pub fn preview(
    spec: &Spec,
    next: Option<SystemTime>,
    after: SystemTime,
    count: u32,
) -> Vec<SystemTime> {
    if spec.end_anchored() {
        return next.or_else(|| spec.first_run(after)).into_iter().collect();
    }
    let mut times = Vec::with_capacity(count as usize);
    let mut t = after;
    while times.len() < count as usize {
        match spec.next_after(t) {
            Some(next) => {
                times.push(next);
                t = next;
            }
            None => break,
        }
    }
    times
}

#[tonic::async_trait]
impl ScheduleService for Schedules {
    #[tracing::instrument(skip_all)]
    async fn put_schedule(
        &self,
        req: Request<PutScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let schedule = req
            .into_inner()
            .schedule
            .ok_or_else(|| Error::invalid("schedule", "is required"))?;
        let (schedule, spec) = new_schedule("schedule", schedule, self.max_payload)?;
        Ok(Response::new(
            self.engine.put_schedule(schedule, spec).await?,
        ))
    }

    #[tracing::instrument(skip_all)]
    async fn get_schedule(
        &self,
        req: Request<GetScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let name = name("name", req.into_inner().name)?;
        Ok(Response::new(self.engine.get_schedule(&name).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn list_schedules(
        &self,
        req: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        let req = req.into_inner();
        let size = page_size(req.page_size)?;
        // A token is the last schedule name of the previous page.
        validate::text("page_token", &req.page_token, validate::MAX_NAME_LEN)?;
        let (mut schedules, mut next_page_token) =
            self.engine.list_schedules(&req.page_token, size).await?;
        fit_page(
            &mut schedules,
            &mut next_page_token,
            self.max_message_size.saturating_sub(64 << 10),
        );
        Ok(Response::new(ListSchedulesResponse {
            schedules,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_schedule(
        &self,
        req: Request<DeleteScheduleRequest>,
    ) -> Result<Response<()>, Status> {
        let name = name("name", req.into_inner().name)?;
        self.engine.delete_schedule(name).await?;
        Ok(Response::new(()))
    }

    #[tracing::instrument(skip_all)]
    async fn pause_schedule(
        &self,
        req: Request<PauseScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let name = name("name", req.into_inner().name)?;
        Ok(Response::new(self.engine.pause_schedule(name).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn resume_schedule(
        &self,
        req: Request<ResumeScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let name = name("name", req.into_inner().name)?;
        Ok(Response::new(self.engine.resume_schedule(name).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn trigger_schedule(
        &self,
        req: Request<TriggerScheduleRequest>,
    ) -> Result<Response<Job>, Status> {
        let name = name("name", req.into_inner().name)?;
        Ok(Response::new(self.engine.trigger_schedule(name).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn preview_schedule(
        &self,
        req: Request<PreviewScheduleRequest>,
    ) -> Result<Response<PreviewScheduleResponse>, Status> {
        let req = req.into_inner();
        let count = match req.count {
            0 => DEFAULT_PREVIEW,
            n if n > MAX_PREVIEW => {
                return Err(
                    Error::invalid("count", format!("is {n}; the limit is {MAX_PREVIEW}")).into(),
                )
            }
            n => n,
        };
        let after = validate::timestamp("after", &req.after)?.unwrap_or_else(|| self.engine.now());
        let (spec, next) = match req.source {
            Some(Source::Name(n)) => self.engine.schedule_spec(&name("name", n)?).await?,
            Some(Source::Spec(s)) => (Spec::parse("spec", Some(&s))?, None),
            None => {
                return Err(Error::invalid("source", "set name (a stored schedule) or spec").into())
            }
        };
        let times = preview(&spec, next, after, count)
            .into_iter()
            .map(Into::into)
            .collect();
        Ok(Response::new(PreviewScheduleResponse { times }))
    }
}
