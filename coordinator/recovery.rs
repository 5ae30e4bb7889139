//! Reopening the store after it failed, in the same process.
//!
//! sled 0.34 keeps a global error once a write has failed (`ENOSPC`, `EIO`):
//! every later write fails until the database is closed and opened again.
//! Opening it again recovers what was made durable (sled reads its log up to
//! the last complete write); what was not acknowledged was never promised.
//! The model is rebuilt from it exactly as at start-up ([`State::restore`]):
//! RUNNING jobs keep their leases for one lease timeout, so workers that
//! reconnect resume them and report their results once.
//!
//! First the failed store is closed ([`close_store`]), which sled allows only
//! once every handle to it is gone. sled 0.34 can get stuck there: when the
//! write of a large record's own file (a "blob") fails, the log buffer it had
//! claimed is never released, and every later flush — including the one sled
//! runs when the database is dropped — waits for it forever. So the close runs
//! on a thread of its own and is given [`CLOSE_TIMEOUT`]; if it does not finish
//! the store cannot be reopened in this process (sled still holds its lock),
//! and the coordinator stops for its supervisor to restart it.
//!
//! A reopen waits until the disk has `min_free_disk` free again: reopening
//! into a full disk would only fail again. Attempts back off from
//! [`FIRST_RETRY`] to [`MAX_RETRY`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::coordinator::disk::{self, human};
use crate::coordinator::state::{Settings, State};
use crate::coordinator::store::{Store, StoreError};

/// The wait before the first reopen attempt.
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(5);
/// How long the failed store's sync thread, and then closing the store, may
/// take before sled counts as stuck.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the store was not reopened (yet).
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The disk still has less than `min_free_disk` free.
    #[error("disk full: {free} free on the disk of {dir}; the store is reopened once {need} (min_free_disk) is free", free = human(*available), need = human(*min_free), dir = dir.display())]
    NoRoom {
        /// The data directory.
        dir: PathBuf,
        /// Bytes free.
        available: u64,
        /// The `min_free_disk` setting.
        min_free: u64,
    },
    /// The free space cannot be read.
    #[error("cannot read the free space of {dir}: {source}", dir = dir.display())]
    Probe {
        /// The data directory.
        dir: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// sled would not open or read the store.
    #[error("cannot reopen the store in {dir}: {source}", dir = dir.display())]
    Open {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The blocking task that opens the store panicked.
    #[error("the reopening task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The wait after an attempt that waited `delay`.
pub fn next_retry(delay: Duration) -> Duration {
    (delay * 2).clamp(FIRST_RETRY, MAX_RETRY)
}

/// Closes a failed store once nobody else holds it, on a thread of its own.
/// `true` if it closed within [`CLOSE_TIMEOUT`]; `false` if it is still held
/// or sled is stuck closing it (the thread is then left behind).
pub async fn close_store(store: Option<Arc<Store>>) -> bool {
    let Some(store) = store else {
        return true;
    };
    let (closed, done) = tokio::sync::oneshot::channel::<()>();
    let deadline = std::time::Instant::now() + CLOSE_TIMEOUT;
    let spawned = std::thread::Builder::new()
        .name("rota-close".into())
        .spawn(move || {
            // Scans of the store (ListJobs) hold it for a moment.
            let mut store = store;
            loop {
                match Arc::try_unwrap(store) {
                    Ok(only) => break drop(only),
                    Err(shared) if std::time::Instant::now() < deadline => {
                        store = shared;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return,
                }
            }
            let _ = closed.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot spawn a thread to close the store");
        return false;
    }
    matches!(
        tokio::time::timeout(CLOSE_TIMEOUT + Duration::from_secs(1), done).await,
        Ok(Ok(()))
    )
}

/// Checks that the disk of `dir` has room, reopens the store in it and
/// rebuilds the model from it. Every handle to the failed store must be gone
/// (sled locks its directory); until then this fails and is tried again.
pub async fn reopen(
    dir: &Path,
    cache_bytes: u64,
    min_free: u64,
    settings: Settings,
    now: SystemTime,
) -> Result<(Store, State), RecoveryError> {
    let available = disk::available(dir).map_err(|source| RecoveryError::Probe {
        dir: dir.to_path_buf(),
        source,
    })?;
    if available < min_free {
        return Err(RecoveryError::NoRoom {
            dir: dir.to_path_buf(),
            available,
            min_free,
        });
    }
    let path = dir.to_path_buf();
    let opened =
        tokio::task::spawn_blocking(move || State::load(&path, cache_bytes, settings, now)).await?;
    let (store, state) = opened.map_err(|source| RecoveryError::Open {
        dir: dir.to_path_buf(),
        source,
    })?;
    let jobs = state.job_count();
    tracing::info!(jobs, dir = %dir.display(), "store reopened; model rebuilt");
    Ok((store, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            lease_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            default_shutdown_grace: Duration::from_secs(30),
            retention: Default::default(),
        }
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        let mut d = FIRST_RETRY;
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_retry(d);
            seen.push(d);
        }
        assert_eq!(seen[1], Duration::from_millis(200));
        assert_eq!(seen[5], Duration::from_millis(3200));
        assert!(seen[6..].iter().all(|d| *d == MAX_RETRY), "{seen:?}");
    }

    #[tokio::test]
    async fn waits_for_room_then_reopens_what_was_durable() {
        let dir = tempfile::tempdir().unwrap();
        let rec = crate::coordinator::record::JobRecord {
            job: crate::proto::Job {
                id: crate::coordinator::ids::JobId::generate().to_string(),
                kind: "k".into(),
                state: crate::proto::JobState::Queued as i32,
                ..Default::default()
            },
            lease: None,
        };
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let mut w = crate::coordinator::store::Writes::default();
            w.put_job(&rec);
            store.apply(w).unwrap();
            store.sync().unwrap();
        }
        let now = SystemTime::now();
        let err = reopen(dir.path(), 1 << 20, u64::MAX, settings(), now)
            .await
            .err()
            .expect("no disk has u64::MAX bytes free");
        assert!(matches!(err, RecoveryError::NoRoom { .. }), "{err}");
        assert!(err.to_string().starts_with("disk full: "), "{err}");
        // sled lets go of the directory shortly after the drop.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (store, state) = loop {
            match reopen(dir.path(), 1 << 20, 0, settings(), now).await {
                Ok(opened) => break opened,
                Err(RecoveryError::Open { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(store.get_job(rec.id()).unwrap(), Some(rec.clone()));
        assert!(state.live_job(rec.id()).is_some(), "the QUEUED job is live");
    }
}
