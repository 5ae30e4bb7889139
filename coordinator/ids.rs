//! Newtypes for the identifiers the coordinator hands out.
//!
//! A [`JobId`] is a UUID v7, so ids sort by creation time and the store's
//! big-endian keys scan in creation order. A [`LeaseId`] is the fencing token
//! of one attempt: a completion that names any other lease id is stale.

use std::fmt;
use uuid::Uuid;

/// A job's id: a UUID v7.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A new id, greater than every id made before it in this process.
    pub fn generate() -> Self {
        JobId(Uuid::now_v7())
    }

    /// Parses the text form; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("is empty".into());
        }
        Uuid::parse_str(s)
            .map(JobId)
            .map_err(|e| format!("{s:?} is not a job id ({e})"))
    }

    /// The 16 big-endian bytes used in store keys.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The fencing token of one lease.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct LeaseId(pub Uuid);

impl LeaseId {
    /// A fresh, unguessable lease id (a v4 UUID from the thread's CSPRNG,
    /// which, unlike `Uuid::new_v4`, costs no system call per id).
    pub fn generate() -> Self {
        LeaseId(uuid::Builder::from_random_bytes(rand::random()).into_uuid())
    }

    /// Parses the text form; `None` when it is not a lease id.
    pub fn parse(s: &str) -> Option<Self> {
        Uuid::parse_str(s).ok().map(LeaseId)
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
