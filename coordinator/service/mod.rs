//! The gRPC services: thin adapters from requests to the [`Engine`](crate::coordinator::engine::Engine).

pub mod admin;
pub mod guard;
pub mod jobs;
pub mod message_size;
pub mod schedules;
pub mod session;

use crate::coordinator::error::Error;
use crate::coordinator::ids::JobId;

/// Parses a job id from request field `field`.
pub(crate) fn job_id(field: &str, s: &str) -> Result<JobId, Error> {
    use crate::coordinator::validate::MAX_ID_LEN;
    if s.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes; a job id is a UUID (the limit is {MAX_ID_LEN} bytes)",
                s.len()
            ),
        ));
    }
    JobId::parse(s).map_err(|problem| Error::invalid(field, problem))
}

/// A list call's `page_size`: unset means the default, larger than the
/// maximum means the maximum, negative is an error.
pub(crate) fn page_size(n: i32) -> Result<usize, Error> {
    use crate::coordinator::service::jobs::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
    match n {
        n if n < 0 => Err(Error::invalid(
            "page_size",
            format!("is {n}; it must not be negative"),
        )),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}
