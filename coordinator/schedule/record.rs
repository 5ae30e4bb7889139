//! A schedule as the coordinator keeps it: the public [`Schedule`] plus its
//! bookkeeping (unfinished runs, a buffered run, whether the config declared it).

use std::collections::BTreeSet;

use prost::Message;

use crate::coordinator::ids::JobId;
use crate::coordinator::record::RecordError;
use crate::coordinator::schedule::policy::Policies;
use crate::coordinator::schedule::spec::Spec;
use crate::proto::{MisfirePolicy, OverlapPolicy, Schedule};

/// The stored form.
#[derive(Clone, PartialEq, Message)]
struct StoredSchedule {
    #[prost(message, optional, tag = "1")]
    schedule: Option<Schedule>,
    #[prost(string, repeated, tag = "2")]
    active: Vec<String>,
    #[prost(bool, tag = "3")]
    buffered: bool,
    #[prost(bool, tag = "4")]
    declared: bool,
}

/// A schedule with its parsed spec and bookkeeping.
#[derive(Clone, Debug)]
pub struct ScheduleEntry {
    /// As clients see it; output fields kept current.
    pub schedule: Schedule,
    /// The parsed spec.
    pub spec: Spec,
    /// Its runs that have not finished.
    pub active: BTreeSet<JobId>,
    /// A run waits for the unfinished one (`BUFFER_ONE`).
    pub buffered: bool,
    /// Declared in the coordinator's config file.
    pub declared: bool,
}

impl ScheduleEntry {
    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.schedule.name
    }

    /// Its policies, defaults filled in.
    pub fn policies(&self) -> Policies {
        let overlap = match self.schedule.overlap() {
            OverlapPolicy::Unspecified => OverlapPolicy::Skip,
            o => o,
        };
        let misfire = match self.schedule.misfire() {
            MisfirePolicy::Unspecified => MisfirePolicy::RunOnce,
            m => m,
        };
        Policies {
            overlap,
            misfire,
            catchup_window: self
                .schedule
                .catchup_window
                .and_then(|d| std::time::Duration::try_from(d).ok())
                .filter(|d| !d.is_zero()),
        }
    }

    /// Encodes the entry for the store.
    pub fn encode(&self) -> Vec<u8> {
        StoredSchedule {
            schedule: Some(self.schedule.clone()),
            active: self.active.iter().map(|id| id.to_string()).collect(),
            buffered: self.buffered,
            declared: self.declared,
        }
        .encode_to_vec()
    }

    /// Decodes a stored entry; the spec is parsed again.
    pub fn decode(bytes: &[u8]) -> Result<ScheduleEntry, RecordError> {
        let stored = StoredSchedule::decode(bytes)?;
        let schedule = stored
            .schedule
            .ok_or_else(|| RecordError::Corrupt("schedule record without a schedule".into()))?;
        let spec = Spec::parse("spec", schedule.spec.as_ref())
            .map_err(|e| RecordError::Corrupt(format!("schedule {:?}: {e}", schedule.name)))?;
        let active = stored
            .active
            .iter()
            .map(|s| JobId::parse(s).map_err(RecordError::Corrupt))
            .collect::<Result<_, _>>()?;
        Ok(ScheduleEntry {
            schedule,
            spec,
            active,
            buffered: stored.buffered,
            declared: stored.declared,
        })
    }
}
