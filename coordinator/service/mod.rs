//! The gRPC services: thin adapters from requests to the [`Engine`](crate::coordinator::engine::Engine).

pub mod admin;
pub mod jobs;
pub mod schedules;
pub mod session;

use crate::coordinator::error::Error;
use crate::coordinator::ids::JobId;

/// Parses a job id from request field `field`.
pub(crate) fn job_id(field: &str, s: &str) -> Result<JobId, Error> {
    JobId::parse(s).map_err(|problem| Error::invalid(field, problem))
}
