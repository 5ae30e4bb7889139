//! Read-only views for the admin service.

use std::time::SystemTime;

use super::*;

impl State {
    /// The known workers.
    pub fn list_workers(&self) -> Vec<proto::Worker> {
        let mut workers: Vec<_> = self
            .workers
            .map
            .values()
            .map(|w| proto::Worker {
                worker_id: w.worker_id.clone(),
                hostname: w.hostname.clone(),
                queues: w.queues.clone(),
                kinds: w.kinds.clone(),
                slots: w.slots,
                running: w
                    .leases
                    .iter()
                    .map(|(j, l)| LeaseRef {
                        job_id: j.to_string(),
                        lease_id: l.to_string(),
                    })
                    .collect(),
                connect_time: w.connect_time.and_then(ts),
                last_heartbeat_time: ts(w.last_seen),
                draining: w.draining,
            })
            .collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        workers
    }

    /// Counts per state for one queue (or every queue when `queue` is empty).
    pub fn queue_stats(&self, queue: &str, now: SystemTime) -> Vec<QueueStat> {
        let mut names: Vec<&String> = self
            .stats
            .by_queue
            .keys()
            .filter(|q| queue.is_empty() || q.as_str() == queue)
            .collect();
        names.sort();
        let mut out: Vec<QueueStat> = names
            .into_iter()
            .map(|q| {
                let c = &self.stats.by_queue[q];
                QueueStat {
                    queue: q.clone(),
                    scheduled: c[JobState::Scheduled as usize],
                    queued: c[JobState::Queued as usize],
                    running: c[JobState::Running as usize],
                    succeeded: c[JobState::Succeeded as usize],
                    failed: c[JobState::Failed as usize],
                    cancelled: c[JobState::Cancelled as usize],
                    expired: c[JobState::Expired as usize],
                    oldest_queued_age: self.ready.oldest(q).and_then(|t| {
                        prost_types::Duration::try_from(now.duration_since(t).unwrap_or_default())
                            .ok()
                    }),
                }
            })
            .collect();
        if out.is_empty() && !queue.is_empty() {
            out.push(QueueStat {
                queue: queue.to_string(),
                ..Default::default()
            });
        }
        out
    }
}
