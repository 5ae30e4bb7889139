//! The errors a coordinator call can end with, and their one mapping to
//! [`tonic::Status`].

use crate::coordinator::disk::DiskError;
use crate::coordinator::store::StoreError;

/// Why a request to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message names the field and the problem.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named job (or other object) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The coordinator is shutting down or its store failed.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed to read or write.
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    /// The data directory's disk is too full for new work.
    #[error(transparent)]
    DiskFull(#[from] DiskError),
}

impl Error {
    /// An `INVALID_ARGUMENT` error about `field`.
    pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Self {
        Error::InvalidArgument(format!("{field}: {problem}"))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            Error::Unavailable(m) => tonic::Status::unavailable(m),
            Error::Store(e) => tonic::Status::unavailable(format!("store error: {e}")),
            Error::DiskFull(e) => tonic::Status::resource_exhausted(e.to_string()),
        }
    }
}
