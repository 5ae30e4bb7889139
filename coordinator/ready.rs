//! The ready queues: QUEUED jobs, per queue and kind, ordered for dispatch.
//!
//! Within a (queue, kind) set, jobs are ordered by priority (highest first), then
//! by id (UUID v7: oldest first). A worker's next job is the best head among the
//! sets of its queues and kinds, so picking one costs O(queues · kinds · log n),
//! never a scan of the queue.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use crate::coordinator::ids::JobId;

/// Dispatch order: priority descending, then id ascending.
type Rank = (Reverse<i32>, JobId);

/// One queue's ready jobs.
#[derive(Default)]
struct QueueReady {
    /// Ready jobs per kind, in dispatch order.
    by_kind: HashMap<String, BTreeSet<Rank>>,
    /// Ready jobs by the time they became ready, for the oldest one's age.
    by_age: BTreeSet<(SystemTime, JobId)>,
}

/// Where a ready job sits, as needed to find it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Its queue.
    pub queue: String,
    /// Its kind.
    pub kind: String,
    /// Its priority.
    pub priority: i32,
    /// When it became ready.
    pub since: SystemTime,
}

/// Every QUEUED job, indexed for dispatch.
#[derive(Default)]
pub struct ReadyIndex {
    /// Per queue name.
    queues: HashMap<String, QueueReady>,
}

impl ReadyIndex {
    /// Adds a ready job.
    pub fn insert(&mut self, id: JobId, slot: &Slot) {
        let q = self.queues.entry(slot.queue.clone()).or_default();
        q.by_kind
            .entry(slot.kind.clone())
            .or_default()
            .insert((Reverse(slot.priority), id));
        q.by_age.insert((slot.since, id));
    }

    /// Removes a ready job; returns whether it was there.
    pub fn remove(&mut self, id: JobId, slot: &Slot) -> bool {
        let Some(q) = self.queues.get_mut(&slot.queue) else {
            return false;
        };
        let mut removed = false;
        if let Some(set) = q.by_kind.get_mut(&slot.kind) {
            removed = set.remove(&(Reverse(slot.priority), id));
            if set.is_empty() {
                q.by_kind.remove(&slot.kind);
            }
        }
        q.by_age.remove(&(slot.since, id));
        if q.by_kind.is_empty() {
            self.queues.remove(&slot.queue);
        }
        removed
    }

    /// The best ready job for a worker of these queues and kinds (empty kinds:
    /// any kind) that `fits` it, without removing it. Each set is read from its
    /// head, so a `fits` that accepts everything costs one look per set.
    pub fn best_for(
        &self,
        queues: &[String],
        kinds: &[String],
        mut fits: impl FnMut(JobId) -> bool,
    ) -> Option<JobId> {
        let mut best: Option<Rank> = None;
        let mut consider = |set: &BTreeSet<Rank>| {
            if let Some(head) = set.iter().find(|(_, id)| fits(*id)) {
                if best.is_none_or(|b| *head < b) {
                    best = Some(*head);
                }
            }
        };
        for queue in queues {
            let Some(q) = self.queues.get(queue) else {
                continue;
            };
            if kinds.is_empty() {
                q.by_kind.values().for_each(&mut consider);
            } else {
                kinds
                    .iter()
                    .filter_map(|k| q.by_kind.get(k))
                    .for_each(&mut consider);
            }
        }
        best.map(|(_, id)| id)
    }

    /// When the oldest ready job of `queue` became ready.
    pub fn oldest(&self, queue: &str) -> Option<SystemTime> {
        self.queues
            .get(queue)
            .and_then(|q| q.by_age.first())
            .map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn slot(queue: &str, kind: &str, priority: i32, secs: u64) -> Slot {
        Slot {
            queue: queue.into(),
            kind: kind.into(),
            priority,
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    #[test]
    fn priority_then_fifo_across_queues_and_kinds() {
        let mut r = ReadyIndex::default();
        let ids: Vec<JobId> = (0..4).map(|_| JobId::generate()).collect();
        r.insert(ids[0], &slot("q", "a", 0, 1));
        r.insert(ids[1], &slot("q", "b", 5, 2));
        r.insert(ids[2], &slot("q", "a", 5, 3));
        r.insert(ids[3], &slot("other", "a", 9, 4));
        let q = vec!["q".to_string()];
        assert_eq!(
            r.best_for(&q, &[], |_| true),
            Some(ids[1]),
            "priority 5, older"
        );
        assert_eq!(r.best_for(&q, &["a".into()], |_| true), Some(ids[2]));
        assert_eq!(r.best_for(&q, &["c".into()], |_| true), None);
        assert_eq!(
            r.best_for(&["q".into(), "other".into()], &[], |_| true),
            Some(ids[3])
        );
        assert_eq!(
            r.best_for(&q, &[], |id| id != ids[1]),
            Some(ids[2]),
            "skips what does not fit"
        );
        assert!(r.remove(ids[1], &slot("q", "b", 5, 2)));
        assert!(!r.remove(ids[1], &slot("q", "b", 5, 2)));
        assert_eq!(r.best_for(&q, &[], |_| true), Some(ids[2]));
        assert_eq!(
            r.oldest("q"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
        );
        r.remove(ids[0], &slot("q", "a", 0, 1));
        r.remove(ids[2], &slot("q", "a", 5, 3));
        assert_eq!(r.oldest("q"), None);
        assert_eq!(r.best_for(&q, &[], |_| true), None);
    }
}
