//! The durable store: one sled tree, records under key prefixes.
//!
//! | key | value |
//! |---|---|
//! | `j` + job id (16 bytes, big-endian) | the [`JobRecord`] |
//! | `i` + idempotency key | the job id it names (16 bytes) |
//! | `s` + schedule name | the [`ScheduleEntry`] |
//!
//! A change that touches several records is one atomic [`Writes`] batch
//! (`apply_batch`), never a multi-tree transaction. [`Store::sync`] makes every
//! applied batch durable: sled's own `flush()` only issues `sync_file_range`, so
//! it is followed by a real `fsync` of the log file. The engine calls it once
//! per group of writes (group commit).
//!
//! sled writes a log message too large for a quarter segment to its own file
//! under `blobs/`, and never fsyncs it. So `sync` also fsyncs every blob file
//! it has not synced yet, and the directory; it looks for new ones only when
//! the directory changed, so the common case costs one `stat`.
//!
//! sled 0.34 copies a leaf on every insert and hands the old copy to
//! crossbeam-epoch's global collector, which frees at most a few bags of
//! garbage each time some thread pins. A batch of a thousand inserts makes
//! garbage far faster than sled's own pins collect it, so without help the
//! old leaves pile up: one million 60-byte records written in batches of
//! 1,000 left 1,060 MiB resident, against 61 MiB when each batch is followed
//! by a couple of collection steps. [`Store::apply`] takes those steps.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::coordinator::ids::JobId;
use crate::coordinator::record::{JobRecord, RecordError};
use crate::coordinator::schedule::record::ScheduleEntry;

const JOB_PREFIX: u8 = b'j';
const IDEM_PREFIX: u8 = b'i';
const SCHEDULE_PREFIX: u8 = b's';

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// The fsync after sled's flush failed.
    #[error("fsync of {path}: {source}")]
    Sync {
        /// The file that would not sync.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A stored record cannot be read.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// An idempotency record does not hold a job id.
    #[error("corrupt idempotency record for key {0:?}")]
    CorruptIdempotency(String),
}

impl StoreError {
    /// Whether the disk (or the user's quota on it) is full.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StoreError::Sled(sled::Error::Io(e)) => e,
            StoreError::Sync { source, .. } => source,
            _ => return false,
        };
        // sled wraps the OS error in a custom one of the same kind.
        matches!(
            io.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ) || matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
    }
}

/// The sled database and the file handle used to fsync it.
pub struct Store {
    /// The database (its default tree holds every record).
    db: sled::Db,
    /// sled's log file, opened by us so that `sync` can fsync it.
    log_file: File,
    /// Its path, for error messages.
    log_path: PathBuf,
    /// How many syncs have completed: group commit keeps this far below the
    /// number of writes.
    syncs: std::sync::atomic::AtomicU64,
    /// sled's blob directory and what `sync` knows of it.
    blobs: std::sync::Mutex<Blobs>,
}

/// The blob files already made durable.
struct Blobs {
    /// `dir/blobs`.
    dir: PathBuf,
    /// The directory's modification time at the last scan.
    seen_mtime: Option<std::time::SystemTime>,
    /// Names of blob files already fsynced.
    synced: std::collections::HashSet<std::ffi::OsString>,
}

impl Blobs {
    /// Fsyncs blob files created since the last call, and the directory.
    fn sync(&mut self) -> std::io::Result<()> {
        let mtime = match std::fs::metadata(&self.dir) {
            Ok(m) => m.modified()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // Directory times are coarse: a change in the same tick as the last scan
        // keeps the same mtime, so a recently changed directory is scanned again.
        let recent = std::time::SystemTime::now()
            .duration_since(mtime)
            .map_or(true, |age| age < std::time::Duration::from_millis(100));
        if Some(mtime) == self.seen_mtime && !recent {
            return Ok(());
        }
        let mut present = std::collections::HashSet::new();
        let mut fresh = false;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced.contains(&name) {
                File::open(entry.path())?.sync_data()?;
                fresh = true;
            }
            present.insert(name);
        }
        if fresh {
            File::open(&self.dir)?.sync_all()?;
        }
        self.synced = present;
        self.seen_mtime = Some(mtime);
        Ok(())
    }
}

/// An atomic group of record writes.
#[derive(Default)]
pub struct Writes {
    /// The sled batch being built.
    batch: sled::Batch,
    /// How many records it writes.
    len: usize,
    /// The bytes of the keys and values it writes.
    bytes: u64,
}

impl Writes {
    /// Writes (or overwrites) a job record.
    pub fn put_job(&mut self, rec: &JobRecord) {
        self.put_encoded_job(rec.id(), rec.encode());
    }

    /// Writes a job record already encoded with [`JobRecord::encode`].
    pub fn put_encoded_job(&mut self, id: JobId, encoded: Vec<u8>) {
        self.bytes += (17 + encoded.len()) as u64;
        self.batch.insert(&job_key(&id)[..], encoded);
        self.len += 1;
    }

    /// Records that `key` names `id`.
    pub fn put_idempotency(&mut self, key: &str, id: JobId) {
        self.bytes += (1 + key.len() + 16) as u64;
        self.batch.insert(idem_key(key), id.as_bytes().to_vec());
        self.len += 1;
    }

    /// Deletes a job record (retention).
    pub fn delete_job(&mut self, id: JobId) {
        self.batch.remove(&job_key(&id)[..]);
        self.len += 1;
    }

    /// Deletes the record of an idempotency key (with its job).
    pub fn delete_idempotency(&mut self, key: &str) {
        self.batch.remove(idem_key(key));
        self.len += 1;
    }

    /// Writes (or overwrites) a schedule.
    pub fn put_schedule(&mut self, entry: &ScheduleEntry) {
        let value = entry.encode();
        self.bytes += (1 + entry.name().len() + value.len()) as u64;
        self.batch
            .insert(prefixed(SCHEDULE_PREFIX, entry.name()), value);
        self.len += 1;
    }

    /// Deletes a schedule.
    pub fn delete_schedule(&mut self, name: &str) {
        self.bytes += (1 + name.len()) as u64;
        self.batch.remove(prefixed(SCHEDULE_PREFIX, name));
        self.len += 1;
    }

    /// Whether nothing is written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many records are written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The bytes of the keys and values written (what the disk guard counts).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Everything stored, read once at start-up.
pub struct Snapshot<'a> {
    /// Every job record, in creation order, read as it is consumed: a restore
    /// never holds every decoded record at once.
    pub jobs: Box<dyn Iterator<Item = Result<JobRecord, StoreError>> + 'a>,
    /// Every idempotency key and the job it names.
    pub idempotency: Vec<(String, JobId)>,
    /// Every schedule.
    pub schedules: Vec<ScheduleEntry>,
}

fn job_key(id: &JobId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = JOB_PREFIX;
    k[1..].copy_from_slice(id.as_bytes());
    k
}

fn prefixed(prefix: u8, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(prefix);
    k.extend_from_slice(key.as_bytes());
    k
}

/// Drives crossbeam-epoch's collector after a batch of `ops` writes: each
/// step pins, moves this thread's deferred frees to the global queue, tries to
/// advance the epoch and frees up to eight expired bags (of 64 frees each).
fn reclaim(ops: usize) {
    for _ in 0..RECLAIM_BASE_STEPS + ops / RECLAIM_OPS_PER_STEP {
        crossbeam_epoch::pin().flush();
    }
}

/// Collection steps after every batch, however small.
const RECLAIM_BASE_STEPS: usize = 2;
/// One more step per this many writes in the batch.
const RECLAIM_OPS_PER_STEP: usize = 256;

fn idem_key(key: &str) -> Vec<u8> {
    prefixed(IDEM_PREFIX, key)
}

impl Store {
    /// Opens (or creates) the store in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // The engine flushes and fsyncs after every group of writes.
            .flush_every_ms(None)
            .open()?;
        let log_path = dir.join("db");
        let log_file = File::open(&log_path).map_err(|source| StoreError::Sync {
            path: log_path.clone(),
            source,
        })?;
        Ok(Store {
            db,
            log_file,
            log_path,
            syncs: Default::default(),
            blobs: std::sync::Mutex::new(Blobs {
                dir: dir.join("blobs"),
                seen_mtime: None,
                synced: Default::default(),
            }),
        })
    }

    /// Applies a group of writes atomically (not yet durable: see [`Store::sync`]).
    pub fn apply(&self, writes: Writes) -> Result<(), StoreError> {
        if writes.len > 0 {
            let ops = writes.len;
            self.db.apply_batch(writes.batch)?;
            reclaim(ops);
        }
        Ok(())
    }

    /// Makes every applied write durable: sled's flush, then a real fsync.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.log_file
            .sync_data()
            .map_err(|source| StoreError::Sync {
                path: self.log_path.clone(),
                source,
            })?;
        let mut blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        blobs.sync().map_err(|source| StoreError::Sync {
            path: blobs.dir.clone(),
            source,
        })?;
        drop(blobs);
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Opens a store just closed in this process: sled's background threads
    /// let go of the directory lock shortly after the drop, so this polls for
    /// it, within a bound.
    #[cfg(test)]
    pub fn reopen_for_test(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir, 1 << 20) {
                Ok(store) => return store,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("reopening the store: {e}"),
            }
        }
    }

    /// How many syncs have completed since the store was opened.
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One job record.
    pub fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        match self.db.get(job_key(&id))? {
            Some(v) => Ok(Some(JobRecord::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Job records in creation order, starting after `after` (or at the first).
    pub fn scan_jobs(
        &self,
        after: Option<JobId>,
    ) -> impl Iterator<Item = Result<JobRecord, StoreError>> + '_ {
        let start = match after {
            Some(id) => {
                let mut k = job_key(&id).to_vec();
                k.push(0); // the smallest key after `id`'s
                k
            }
            None => vec![JOB_PREFIX],
        };
        self.db.range(start..vec![JOB_PREFIX + 1]).map(|kv| {
            let (_, v) = kv?;
            Ok(JobRecord::decode(&v)?)
        })
    }

    /// Reads everything, for rebuilding the in-memory model at start-up.
    pub fn snapshot(&self) -> Result<Snapshot<'_>, StoreError> {
        let jobs = Box::new(self.scan_jobs(None));
        let mut idempotency = Vec::new();
        for kv in self.db.scan_prefix([IDEM_PREFIX]) {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k[1..]).into_owned();
            let bytes: [u8; 16] = v
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::CorruptIdempotency(key.clone()))?;
            idempotency.push((key, JobId(uuid::Uuid::from_bytes(bytes))));
        }
        let schedules = self
            .db
            .scan_prefix([SCHEDULE_PREFIX])
            .map(|kv| Ok(ScheduleEntry::decode(&kv?.1)?))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Snapshot {
            jobs,
            idempotency,
            schedules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Job;

    fn rec() -> JobRecord {
        JobRecord {
            job: Job {
                id: JobId::generate().to_string(),
                kind: "k".into(),
                ..Default::default()
            },
            lease: None,
        }
    }

    #[test]
    fn large_records_land_in_blob_files_that_sync_makes_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let mut big = rec();
        big.job.payload = vec![7; 300 << 10];
        let mut w = Writes::default();
        w.put_job(&big);
        store.apply(w).unwrap();
        store.sync().unwrap();
        let blobs = store.blobs.lock().unwrap();
        assert!(
            !blobs.synced.is_empty(),
            "a 300 KiB record is a blob file, and it was synced"
        );
        drop(blobs);
        assert_eq!(
            store.get_job(big.id()).unwrap().unwrap().job.payload.len(),
            300 << 10
        );
    }

    #[test]
    fn disk_full_is_told_apart_from_other_failures() {
        let sync = |e: std::io::Error| StoreError::Sync {
            path: "db".into(),
            source: e,
        };
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(sync(enospc).is_disk_full());
        // What sled 0.34 returns on ENOSPC: the OS error wrapped in a custom one.
        let wrapped = std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            std::io::Error::from_raw_os_error(libc::ENOSPC).to_string(),
        );
        assert!(StoreError::Sled(sled::Error::Io(wrapped)).is_disk_full());
        assert!(!sync(std::io::Error::from_raw_os_error(libc::EIO)).is_disk_full());
        assert!(!StoreError::CorruptIdempotency("k".into()).is_disk_full());
    }

    #[test]
    fn writes_survive_reopen_in_creation_order() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<_> = (0..5).map(|_| rec()).collect();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let mut w = Writes::default();
            for r in recs.iter().rev() {
                w.put_job(r);
            }
            w.put_idempotency("key-1", recs[2].id());
            store.apply(w).unwrap();
            store.sync().unwrap();
        }
        let store = Store::reopen_for_test(dir.path());
        let snap = store.snapshot().unwrap();
        assert_eq!(snap.jobs.collect::<Result<Vec<_>, _>>().unwrap(), recs);
        assert_eq!(snap.idempotency, vec![("key-1".to_string(), recs[2].id())]);
        let after: Vec<_> = store
            .scan_jobs(Some(recs[1].id()))
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(after, recs[2..].to_vec());
        assert_eq!(store.get_job(recs[4].id()).unwrap(), Some(recs[4].clone()));
        assert_eq!(store.get_job(JobId::generate()).unwrap(), None);
    }
}
