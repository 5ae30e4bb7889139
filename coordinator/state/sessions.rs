//! Worker sessions: hello (with lease resumption), heartbeats, completions, draining, disconnects.

use std::time::SystemTime;

use super::*;

impl State {
    /// A worker opened a session: sends its `Welcome` (before anything else on
    /// the stream) and returns the session's generation. Leases it held but did
    /// not name end now.
    pub fn hello(
        &mut self,
        hello: Hello,
        tx: UnboundedSender<CoordinatorMessage>,
        now: SystemTime,
    ) -> u64 {
        let generation = self.workers.next_generation();
        let previous = self.workers.map.remove(&hello.worker_id);
        if previous.as_ref().is_some_and(|p| p.session.is_some()) {
            tracing::warn!(worker = %hello.worker_id, "a second session replaces the worker's open one");
        }
        let had_timer = previous.is_some();
        let (mut old_leases, unconfirmed) = previous
            .map(|p| (p.leases, p.unconfirmed))
            .unwrap_or_default();
        let mut entry = WorkerEntry {
            worker_id: hello.worker_id.clone(),
            hostname: hello.hostname,
            queues: if hello.queues.is_empty() {
                vec![crate::coordinator::validate::DEFAULT_QUEUE.to_string()]
            } else {
                hello.queues
            },
            kinds: hello.kinds,
            slots: hello.slots,
            session: Some(SessionHandle {
                generation,
                tx: tx.clone(),
            }),
            leases: Default::default(),
            unconfirmed: Default::default(),
            connect_time: Some(now),
            last_seen: now,
            draining: false,
            max_grace: hello
                .max_shutdown_grace
                .and_then(|d| Duration::try_from(d).ok()),
        };
        let (mut resumed, mut rejected) = (Vec::new(), Vec::new());
        for held in hello.held {
            let kept = JobId::parse(&held.job_id).ok().and_then(|job| {
                let lease = LeaseId::parse(&held.lease_id)?;
                // A lease named twice is resumed, not also rejected.
                let named_before = entry.leases.get(&job) == Some(&lease);
                (named_before || old_leases.get(&job) == Some(&lease)).then_some((job, lease))
            });
            match kept {
                Some((job, lease)) => {
                    old_leases.remove(&job);
                    if entry.leases.insert(job, lease).is_none() {
                        resumed.push(held);
                    }
                }
                None => {
                    tracing::warn!(
                        worker = %hello.worker_id,
                        job = %held.job_id,
                        lease = %held.lease_id,
                        "held lease rejected: the job is no longer leased to this worker"
                    );
                    rejected.push(held)
                }
            }
        }
        let worker_id = entry.worker_id.clone();
        let welcome = Welcome {
            session_id: format!("{worker_id}/{generation}"),
            heartbeat_interval: prost_types::Duration::try_from(self.settings.heartbeat_interval)
                .ok(),
            lease_timeout: prost_types::Duration::try_from(self.settings.lease_timeout).ok(),
            resumed,
            rejected,
        };
        let welcome = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Welcome(welcome)),
        };
        self.after_commit(Box::new(move |r| {
            if r.is_ok() {
                let _ = tx.send(welcome);
            }
        }));
        let kept: Vec<(JobId, LeaseId)> = entry.leases.iter().map(|(j, l)| (*j, *l)).collect();
        self.workers.map.insert(worker_id.clone(), entry);
        // A cancel that happened while the worker was away is told now.
        for (job, lease) in kept {
            let Some(live) = self.jobs.get(&job) else {
                continue;
            };
            if live.rec.job.cancel_requested {
                let stop_by = now + live.grace(self.settings.default_shutdown_grace);
                let lease = Lease {
                    id: lease,
                    worker_id: worker_id.clone(),
                };
                self.send_cancel(job, &lease, "cancelled while the worker was away", stop_by);
            }
        }
        if !had_timer {
            self.due.insert((
                now + self.settings.lease_timeout,
                Due::Worker(worker_id.clone()),
            ));
        }
        for (job, lease) in old_leases {
            if unconfirmed.contains(&job) {
                let why = format!(
                    "worker {worker_id} came back without this lease, granted just before the \
                     coordinator restarted: its Assign was lost, so the attempt does not count"
                );
                self.requeue_undelivered(job, lease, now, &why);
            } else {
                self.lose_lease(
                    job,
                    lease,
                    now,
                    &format!("worker {worker_id} reconnected without this lease"),
                );
            }
        }
        self.dispatch_needed = true;
        generation
    }

    /// The sender of `worker_id`'s session `generation`, if it is still current.
    pub fn session_sender(
        &self,
        worker_id: &str,
        generation: u64,
    ) -> Option<UnboundedSender<CoordinatorMessage>> {
        self.workers
            .map
            .get(worker_id)
            .and_then(|w| w.session.as_ref())
            .filter(|s| s.generation == generation)
            .map(|s| s.tx.clone())
    }

    /// Drops every session sender and watcher, which ends their streams; used at
    /// shutdown. Leases stay as stored, for the workers to resume after restart.
    pub fn close_streams(&mut self) {
        for w in self.workers.map.values_mut() {
            w.session = None;
        }
        self.watchers.clear();
    }

    /// The worker is alive.
    pub fn heartbeat(&mut self, worker_id: &str, generation: u64, now: SystemTime) {
        if let Some(w) = self.workers.current_mut(worker_id, generation) {
            w.last_seen = now;
        }
    }

    /// The worker takes nothing new; it is answered with a `Shutdown` that
    /// gives each of its tasks its stop-by time.
    pub fn draining(&mut self, worker_id: &str, generation: u64, now: SystemTime) {
        if let Some(w) = self.workers.current_mut(worker_id, generation) {
            w.last_seen = now;
            self.shut_down_worker(worker_id, "worker draining", now);
        }
    }

    /// `DrainWorker`: the same notice, started here.
    pub fn drain_worker(
        &mut self,
        worker_id: &str,
        reason: &str,
        now: SystemTime,
    ) -> Result<proto::Worker, Error> {
        let w = self
            .workers
            .map
            .get(worker_id)
            .ok_or_else(|| Error::NotFound(format!("worker {worker_id:?} not found")))?;
        if w.session.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "worker {worker_id:?} is not connected; it cannot be told to drain"
            )));
        }
        let reason = if reason.is_empty() {
            "drained by an operator"
        } else {
            reason
        };
        self.shut_down_worker(worker_id, reason, now);
        Ok(self
            .list_workers()
            .into_iter()
            .find(|w| w.worker_id == worker_id)
            .expect("the worker exists"))
    }

    /// Marks a worker draining and sends it `Shutdown` with each task's
    /// stop-by time (`now + shutdown_grace`).
    fn shut_down_worker(&mut self, worker_id: &str, reason: &str, now: SystemTime) {
        let Some(w) = self.workers.map.get_mut(worker_id) else {
            return;
        };
        w.draining = true;
        let leases: Vec<(JobId, LeaseId)> = w.leases.iter().map(|(j, l)| (*j, *l)).collect();
        let tx = w.session.as_ref().map(|s| s.tx.clone());
        let tasks = leases
            .into_iter()
            .map(|(job, lease)| proto::TaskDeadline {
                job_id: job.to_string(),
                lease_id: lease.to_string(),
                stop_by: ts(now + self.grace_of(job)),
            })
            .collect();
        tracing::info!(worker = %worker_id, reason, "worker told to shut down");
        if let Some(tx) = tx {
            let msg = CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Shutdown(proto::Shutdown {
                    reason: reason.to_string(),
                    tasks,
                })),
            };
            self.after_commit(Box::new(move |r| {
                if r.is_ok() {
                    let _ = tx.send(msg);
                }
            }));
        }
    }

    /// The worker's stream ended. Its leases stay until its lease timeout.
    pub fn disconnected(&mut self, worker_id: &str, generation: u64) {
        if let Some(w) = self.workers.current_mut(worker_id, generation) {
            w.session = None;
            if w.leases.is_empty() {
                self.workers.map.remove(worker_id);
            }
        }
    }

    /// A worker reports a task's end; the `CompleteAck` goes back on its
    /// session once the outcome is durable. Stale leases change nothing.
    pub fn complete(
        &mut self,
        worker_id: &str,
        generation: u64,
        done: proto::Complete,
        now: SystemTime,
    ) -> CompleteAck {
        let ack = self.decide_complete(worker_id, generation, done, now);
        if let Some(tx) = self.session_sender(worker_id, generation) {
            let msg = CoordinatorMessage {
                msg: Some(coordinator_message::Msg::CompleteAck(ack.clone())),
            };
            self.after_commit(Box::new(move |r| {
                if r.is_ok() {
                    let _ = tx.send(msg);
                }
            }));
        }
        ack
    }

    fn decide_complete(
        &mut self,
        worker_id: &str,
        generation: u64,
        done: proto::Complete,
        now: SystemTime,
    ) -> CompleteAck {
        let mut ack = CompleteAck {
            job_id: done.job_id.clone(),
            lease_id: done.lease_id.clone(),
            accepted: false,
            reason: String::new(),
        };
        let Some(w) = self.workers.current_mut(worker_id, generation) else {
            ack.reason = "this session has been replaced by a newer one".into();
            return ack;
        };
        w.last_seen = now;
        let held = JobId::parse(&done.job_id).ok().and_then(|job| {
            let lease = LeaseId::parse(&done.lease_id)?;
            (w.leases.get(&job) == Some(&lease)).then_some(job)
        });
        let Some(job_id) = held else {
            tracing::warn!(
                worker = %worker_id,
                job = %done.job_id,
                lease = %done.lease_id,
                "completion rejected: stale lease"
            );
            ack.reason = format!(
                "stale lease: lease {:?} of job {:?} is not held by worker {worker_id}",
                done.lease_id, done.job_id
            );
            return ack;
        };
        let Some(outcome) = done.outcome else {
            ack.reason = "complete has no outcome".into();
            return ack;
        };
        w.leases.remove(&job_id);
        self.dispatch_needed = true;
        let Some(mut live) = self.jobs.remove(&job_id) else {
            ack.reason = "job is no longer running".into();
            return ack;
        };
        let old = live.rec.state();
        match outcome {
            complete::Outcome::Success(s) => {
                end_attempt(&mut live, now, "succeeded", "");
                live.rec.job.result = s.result;
                live.rec.job.error.clear();
                self.finish(&mut live, JobState::Succeeded, now);
            }
            complete::Outcome::Failure(f) => {
                end_attempt(&mut live, now, "failed", &f.error);
                live.rec.job.error = f.error;
                self.after_failed_attempt(&mut live, now, f.permanent);
            }
            complete::Outcome::Cancelled(c) => {
                end_attempt(&mut live, now, "cancelled", &c.reason);
                if !c.reason.is_empty() {
                    live.rec.job.error = format!("cancelled: {}", c.reason);
                }
                self.finish(&mut live, JobState::Cancelled, now);
            }
            complete::Outcome::Interrupted(i) => {
                end_attempt(&mut live, now, "interrupted", &i.reason);
                self.requeue_interrupted(&mut live, now);
            }
        }
        self.save(live, old);
        ack.accepted = true;
        ack
    }
}
