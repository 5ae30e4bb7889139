//! The stored form of a job: the public [`Job`] plus the lease that only the
//! coordinator and the lease's worker may know.
//!
//! One record per job, overwritten on every transition, so a transition is one
//! plain insert.

use prost::Message;

use crate::coordinator::ids::{JobId, LeaseId};
use crate::proto::{Job, JobState};

/// Who holds a RUNNING job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The fencing token.
    pub id: LeaseId,
    /// The worker that holds it.
    pub worker_id: String,
}

/// A job as the coordinator keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// The job as clients see it.
    pub job: Job,
    /// Set while the job is RUNNING.
    pub lease: Option<Lease>,
}

/// The wire shape of a stored record (decode side; encode writes the same tags
/// without cloning the job).
#[derive(Clone, PartialEq, Message)]
struct StoredJob {
    #[prost(message, optional, tag = "1")]
    job: Option<Job>,
    #[prost(string, tag = "2")]
    lease_id: String,
    #[prost(string, tag = "3")]
    worker_id: String,
}

/// A stored record that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The bytes are not a record.
    #[error("undecodable job record: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The record has no job or a bad id.
    #[error("corrupt job record: {0}")]
    Corrupt(String),
}

impl JobRecord {
    /// The job's id (validated when the record was made or decoded).
    pub fn id(&self) -> JobId {
        JobId::parse(&self.job.id).expect("a stored job always has a valid id")
    }

    /// The job's state.
    pub fn state(&self) -> JobState {
        self.job.state()
    }

    /// Encodes the record for the store.
    pub fn encode(&self) -> Vec<u8> {
        use prost::encoding::{message, string};
        let (lease_id, worker_id) = match &self.lease {
            Some(l) => (l.id.to_string(), l.worker_id.clone()),
            None => (String::new(), String::new()),
        };
        let len = message::encoded_len(1, &self.job)
            + if lease_id.is_empty() {
                0
            } else {
                string::encoded_len(2, &lease_id) + string::encoded_len(3, &worker_id)
            };
        let mut buf = Vec::with_capacity(len);
        message::encode(1, &self.job, &mut buf);
        if !lease_id.is_empty() {
            string::encode(2, &lease_id, &mut buf);
            string::encode(3, &worker_id, &mut buf);
        }
        buf
    }

    /// Decodes a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let stored = StoredJob::decode(bytes)?;
        let job = stored
            .job
            .ok_or_else(|| RecordError::Corrupt("no job".into()))?;
        JobId::parse(&job.id).map_err(RecordError::Corrupt)?;
        let lease = if stored.lease_id.is_empty() {
            None
        } else {
            let id = LeaseId::parse(&stored.lease_id).ok_or_else(|| {
                RecordError::Corrupt(format!("bad lease id {:?}", stored.lease_id))
            })?;
            Some(Lease {
                id,
                worker_id: stored.worker_id,
            })
        };
        Ok(JobRecord { job, lease })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_and_without_lease() {
        let id = JobId::generate();
        let mut rec = JobRecord {
            job: Job {
                id: id.to_string(),
                kind: "k".into(),
                payload: vec![1, 2, 3],
                ..Default::default()
            },
            lease: None,
        };
        assert_eq!(JobRecord::decode(&rec.encode()).unwrap(), rec);
        rec.lease = Some(Lease {
            id: LeaseId::generate(),
            worker_id: "w".into(),
        });
        assert_eq!(JobRecord::decode(&rec.encode()).unwrap(), rec);
        assert!(JobRecord::decode(&[0xff, 0xff]).is_err());
    }
}
