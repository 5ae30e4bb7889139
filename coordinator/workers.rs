//! The worker registry: who is connected, what each may run, which leases each
//! holds, and when each was last heard from.
//!
//! A worker outlives its stream: when a stream drops, the entry stays (with no
//! session) until its lease timeout, so a worker that reconnects in time keeps
//! its leases. Entries are also rebuilt at start-up from RUNNING jobs, which is
//! how leases survive a coordinator restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;

use tokio::sync::mpsc::UnboundedSender;

use crate::coordinator::ids::{JobId, LeaseId};
use crate::proto::CoordinatorMessage;

/// The coordinator's end of one open Session stream.
#[derive(Clone)]
pub struct SessionHandle {
    /// Tells this stream apart from the worker's earlier and later ones.
    pub generation: u64,
    /// Messages for the worker; dropping the last sender ends the stream.
    pub tx: UnboundedSender<CoordinatorMessage>,
}

/// One worker, connected or waiting to reconnect.
pub struct WorkerEntry {
    /// Its id, stable across reconnects.
    pub worker_id: String,
    /// The host it runs on, as it says.
    pub hostname: String,
    /// Queues it takes jobs from.
    pub queues: Vec<String>,
    /// Kinds it runs; empty means any kind.
    pub kinds: Vec<String>,
    /// How many jobs it may run at once.
    pub slots: u32,
    /// The open stream, if any.
    pub session: Option<SessionHandle>,
    /// Its leases, by job.
    pub leases: BTreeMap<JobId, LeaseId>,
    /// Leases rebuilt from the store at start-up that the worker has not named since: the
    /// previous coordinator process may have died before their `Assign` reached it.
    pub unconfirmed: BTreeSet<JobId>,
    /// When the current stream opened (unset for an entry rebuilt at start-up).
    pub connect_time: Option<SystemTime>,
    /// When it was last heard from; its leases end at this plus the lease timeout.
    pub last_seen: SystemTime,
    /// It asked for no new work.
    pub draining: bool,
    /// The longest shutdown grace it can honour; longer-grace jobs go elsewhere.
    pub max_grace: Option<std::time::Duration>,
}

impl WorkerEntry {
    /// An entry rebuilt at start-up for a worker that held leases.
    pub fn restored(worker_id: String, now: SystemTime) -> Self {
        WorkerEntry {
            worker_id,
            hostname: String::new(),
            queues: Vec::new(),
            kinds: Vec::new(),
            slots: 0,
            session: None,
            leases: BTreeMap::new(),
            unconfirmed: BTreeSet::new(),
            connect_time: None,
            last_seen: now,
            draining: false,
            max_grace: None,
        }
    }

    /// How many more jobs it can take now.
    pub fn free_slots(&self) -> usize {
        // A closed sender means the stream is gone and its disconnect is on
        // its way: nothing sent now would arrive.
        if self.draining || self.session.as_ref().is_none_or(|s| s.tx.is_closed()) {
            return 0;
        }
        (self.slots as usize).saturating_sub(self.leases.len())
    }
}

/// Every known worker, by id.
#[derive(Default)]
pub struct Workers {
    /// The entries.
    pub map: HashMap<String, WorkerEntry>,
    /// The next session generation to hand out.
    next_generation: u64,
    /// Rotates which worker is offered work first, for fairness.
    pub rotation: usize,
}

impl Workers {
    /// A fresh session generation.
    pub fn next_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// The last generation handed out.
    pub fn last_generation(&self) -> u64 {
        self.next_generation
    }

    /// Hands out generations after `last` only.
    pub fn continue_after(&mut self, last: u64) {
        self.next_generation = self.next_generation.max(last);
    }

    /// The entry of `worker_id` if its current session is `generation`.
    pub fn current_mut(&mut self, worker_id: &str, generation: u64) -> Option<&mut WorkerEntry> {
        self.map.get_mut(worker_id).filter(|w| {
            w.session
                .as_ref()
                .is_some_and(|s| s.generation == generation)
        })
    }
}
