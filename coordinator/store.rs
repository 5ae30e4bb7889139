//! The durable store: one sled tree, records under key prefixes.
//!
//! | key | value |
//! |---|---|
//! | `j` + job id (16 bytes, big-endian) | the [`JobRecord`] |
//! | `i` + idempotency key | the job id it names (16 bytes) |
//! | `s` + schedule name | the [`ScheduleEntry`] |
//!
//! | `m` + `seq` | the sequence number of the last batch written to sled |
//!
//! A change that touches several records is one atomic [`Writes`] batch,
//! never a multi-tree transaction. Its atomicity and durability come from the
//! write-ahead log ([`crate::coordinator::wal`]), not from sled:
//!
//! 1. [`Store::apply`] stages a batch: it gets the next sequence number, its
//!    record joins the log's next commit, and its writes go to an in-memory
//!    overlay that every read of the store consults first. Nothing touches
//!    disk.
//! 2. [`Store::sync`] commits the log: one write and one `fdatasync` for every
//!    batch staged since the last commit (the engine's group commit).
//! 3. [`Store::settle`] then writes committed batches to sled as plain
//!    inserts and removes, with the sequence number last, and drops them from
//!    the overlay. sled thus never holds a write the log does not.
//! 4. Once the log holds [`CHECKPOINT_BYTES`], a [`Store::checkpoint`] makes
//!    sled itself durable (its `flush()`, which only issues
//!    `sync_file_range`, then a real `fsync`) and the log starts again at its
//!    beginning. Commits wait only for the last part of it (what was
//!    committed while sled was being flushed).
//!
//! Why not sled's `apply_batch`: for atomicity sled seals and writes its log
//! buffer twice per batch (before and after a batch manifest), each write a
//! `pwrite` plus a `sync_file_range` on sled's I/O thread pool, which wakes
//! every idle I/O thread for each; one batch per engine round made that
//! thousands of device writes and tens of thousands of thread wake-ups a
//! second, on top of the fsync a durable commit needs anyway.
//!
//! Opening the store replays the log: every record of it, in order, over what
//! sled recovered. sled holds every batch up to the last checkpoint (durably),
//! and perhaps some later ones, even with holes: a value in a blob file (below)
//! can be missing after a power loss while later writes are not. Every write
//! is a blind insert or removal, so replaying all the batches since the
//! checkpoint brings sled to the last committed batch exactly, whatever it
//! recovered of them. The sequence number sled stores only detects a gap: a
//! log that starts after it means batches in neither. The file is then zeroed,
//! so that no record of an abandoned pass can ever follow a new one.
//!
//! sled writes a log message too large for a quarter segment to its own file
//! under `blobs/`, and never fsyncs it. So a checkpoint also fsyncs every blob
//! file it has not synced yet, and the directory.
//!
//! sled 0.34 copies a leaf on every insert and hands the old copy to
//! crossbeam-epoch's global collector, which frees at most a few bags of
//! garbage each time some thread pins. A batch of a thousand inserts makes
//! garbage far faster than sled's own pins collect it, so without help the
//! old leaves pile up: one million 60-byte records written in batches of
//! 1,000 left 1,060 MiB resident, against 61 MiB when each batch is followed
//! by a couple of collection steps. [`Store::apply`] takes those steps.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::iter::Peekable;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use sled::IVec;

use crate::coordinator::ids::JobId;
use crate::coordinator::record::{JobRecord, RecordError};
use crate::coordinator::schedule::record::ScheduleEntry;
use crate::coordinator::wal::{self, Op, Wal, WalError};

/// A checkpoint follows the settling that finds the write-ahead log past this
/// many bytes. It bounds the log's file (this plus one growth step of
/// [`wal::GROWTH`]) and the replay at start-up.
pub const CHECKPOINT_BYTES: u64 = 8 << 20;

/// Where sled keeps the sequence number of the last batch written to it.
const SEQ_KEY: &[u8] = b"mseq";
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
    /// The write-ahead log failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// An earlier commit failed: this store takes nothing more until it is
    /// reopened.
    #[error("an earlier commit of the write-ahead log failed; the store must be reopened")]
    CommitFailed,
    /// The stored sequence number is not 8 bytes.
    #[error("corrupt sequence number record ({0} bytes)")]
    CorruptSequence(usize),
    /// The write-ahead log's first record to replay does not follow the last
    /// batch sled holds: batches in between are in neither.
    #[error(
        "the write-ahead log resumes at batch {found} but the store holds batches only up to \
         {stored}: batches in between are missing, so the coordinator will not start on \
         incomplete data"
    )]
    LogGap {
        /// The last batch sled holds.
        stored: u64,
        /// The first batch of the log after it.
        found: u64,
    },
}

impl StoreError {
    /// Whether the disk (or the user's quota on it) is full.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StoreError::Sled(sled::Error::Io(e)) => e,
            StoreError::Sync { source, .. } => source,
            StoreError::Wal(e) => match e.io() {
                Some(e) => e,
                None => return false,
            },
            _ => return false,
        };
        // sled wraps the OS error in a custom one of the same kind.
        matches!(
            io.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ) || matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
    }
}

/// The sled database, the write-ahead log in front of it, and the batches
/// between the two.
pub struct Store {
    /// The database (its default tree holds every record).
    db: sled::Db,
    /// Every batch, durable at each [`Store::sync`].
    wal: Wal,
    /// Batches staged and not yet written to sled.
    staged: Mutex<Staged>,
    /// The sequence number of the last batch committed to the log.
    committed: AtomicU64,
    /// Set when a commit failed: its records are gone, so no later commit,
    /// settling or checkpoint may run in this store (it must be reopened).
    failed: std::sync::atomic::AtomicBool,
    /// Held while batches are written to sled, so they go in order.
    settling: Mutex<()>,
    /// sled's log file, opened by us so that a checkpoint can fsync it.
    log_file: File,
    /// Its path, for error messages.
    log_path: PathBuf,
    /// How many syncs have completed: group commit keeps this far below the
    /// number of writes.
    syncs: AtomicU64,
    /// How many checkpoints have completed.
    checkpoints: AtomicU64,
    /// sled's blob directory and what `sync` knows of it.
    blobs: Mutex<Blobs>,
}

/// One write: a value, or `None` for a removal.
type Write = (IVec, Option<IVec>);

/// Batches staged by [`Store::apply`] until [`Store::settle`] writes them to sled.
#[derive(Default)]
struct Staged {
    /// The sequence number of the last batch staged.
    seq: u64,
    /// Log records of the batches not yet committed.
    records: Vec<u8>,
    /// Batches not yet written to sled, in order.
    unsettled: VecDeque<(u64, Vec<Write>)>,
    /// The newest staged write of each key not yet written to sled, and the
    /// batch it came in. Reads look here before sled.
    overlay: BTreeMap<IVec, (u64, Option<IVec>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The blob files already made durable.
struct Blobs {
    /// `dir/blobs`.
    dir: PathBuf,
    /// Names of blob files already fsynced.
    synced: std::collections::HashSet<std::ffi::OsString>,
}

impl Blobs {
    /// Fsyncs blob files created since the last call, and the directory. It
    /// lists the directory every time (checkpoints are rare): a directory's
    /// modification time can miss a file created in the same clock tick.
    fn sync(&mut self) -> std::io::Result<()> {
        let listing = match std::fs::read_dir(&self.dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = std::collections::HashSet::new();
        let mut fresh = false;
        for entry in listing {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_data()?,
                    // sled removed it (its value was replaced) since the listing.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                fresh = true;
            }
            present.insert(name);
        }
        if fresh {
            File::open(&self.dir)?.sync_all()?;
        }
        self.synced = present;
        Ok(())
    }
}

/// An atomic group of record writes.
#[derive(Default)]
pub struct Writes {
    /// The writes, in order.
    writes: Vec<Write>,
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
        self.insert(&job_key(&id), encoded);
    }

    /// Records that `key` names `id`.
    pub fn put_idempotency(&mut self, key: &str, id: JobId) {
        self.bytes += (1 + key.len() + 16) as u64;
        self.insert(&idem_key(key), id.as_bytes().to_vec());
    }

    /// Deletes a job record (retention).
    pub fn delete_job(&mut self, id: JobId) {
        self.remove(&job_key(&id));
    }

    /// Deletes the record of an idempotency key (with its job).
    pub fn delete_idempotency(&mut self, key: &str) {
        self.remove(&idem_key(key));
    }

    /// Writes (or overwrites) a schedule.
    pub fn put_schedule(&mut self, entry: &ScheduleEntry) {
        let value = entry.encode();
        self.bytes += (1 + entry.name().len() + value.len()) as u64;
        self.insert(&prefixed(SCHEDULE_PREFIX, entry.name()), value);
    }

    /// Deletes a schedule.
    pub fn delete_schedule(&mut self, name: &str) {
        self.bytes += (1 + name.len()) as u64;
        self.remove(&prefixed(SCHEDULE_PREFIX, name));
    }

    fn insert(&mut self, key: &[u8], value: Vec<u8>) {
        self.writes.push((IVec::from(key), Some(IVec::from(value))));
    }

    fn remove(&mut self, key: &[u8]) {
        self.writes.push((IVec::from(key), None));
    }

    /// Whether nothing is written.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The writes as the write-ahead log's operations.
    fn ops(&self) -> impl Iterator<Item = Op<'_>> {
        self.writes.iter().map(|(key, value)| match value {
            Some(value) => Op::Insert(key, value),
            None => Op::Remove(key),
        })
    }

    /// How many records are written.
    pub fn len(&self) -> usize {
        self.writes.len()
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
    /// Opens (or creates) the store in `dir`, replays its write-ahead log and
    /// checkpoints. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // Commits go through the write-ahead log; sled is flushed at checkpoints.
            .flush_every_ms(None)
            .open()?;
        let (wal, records) = Wal::open(dir)?;
        let stored = match db.get(SEQ_KEY)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::CorruptSequence(v.len()))?,
            ),
            None => 0,
        };
        if let Some(first) = records.first() {
            if first.seq > stored + 1 {
                return Err(StoreError::LogGap {
                    stored,
                    found: first.seq,
                });
            }
        }
        let mut seq = stored;
        let replayed = records.len();
        for record in records {
            let ops = wal::decode(&record.ops).ok_or_else(|| WalError::Malformed {
                path: dir.join(wal::FILE_NAME),
                seq: record.seq,
            })?;
            for op in &ops {
                match *op {
                    wal::Op::Insert(k, v) => db.insert(k, v)?,
                    wal::Op::Remove(k) => db.remove(k)?,
                };
            }
            reclaim(ops.len());
            seq = seq.max(record.seq);
        }
        db.insert(SEQ_KEY, &seq.to_be_bytes()[..])?;
        if replayed > 0 {
            tracing::info!(
                batches = replayed,
                new = seq - stored,
                "replayed the write-ahead log"
            );
        }
        let log_path = dir.join("db");
        let log_file = File::open(&log_path).map_err(|source| StoreError::Sync {
            path: log_path.clone(),
            source,
        })?;
        let store = Store {
            db,
            wal,
            staged: Mutex::new(Staged {
                seq,
                ..Staged::default()
            }),
            committed: AtomicU64::new(seq),
            failed: Default::default(),
            settling: Mutex::new(()),
            log_file,
            log_path,
            syncs: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            blobs: Mutex::new(Blobs {
                dir: dir.join("blobs"),
                synced: Default::default(),
            }),
        };
        // What sled read back (some of it perhaps only from the page cache)
        // and what was replayed is made durable before the log is overwritten.
        store.checkpoint()?;
        store.wal.lock().clear(CHECKPOINT_BYTES + wal::GROWTH)?;
        Ok(store)
    }

    /// Stages a group of writes as one atomic batch: every read of the store
    /// sees it at once; [`Store::sync`] makes it durable.
    pub fn apply(&self, writes: Writes) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut staged = lock(&self.staged);
        let staged = &mut *staged;
        staged.seq += 1;
        let seq = staged.seq;
        wal::encode(&mut staged.records, seq, writes.ops());
        for (key, value) in &writes.writes {
            staged.overlay.insert(key.clone(), (seq, value.clone()));
        }
        staged.unsettled.push_back((seq, writes.writes));
        Ok(())
    }

    /// Makes every staged batch durable: one commit of the write-ahead log.
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut log = self.wal.lock();
        self.check_failed()?;
        let (records, last) = {
            let mut staged = lock(&self.staged);
            (std::mem::take(&mut staged.records), staged.seq)
        };
        if let Err(e) = log.commit(&records) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        self.committed.fetch_max(last, Ordering::SeqCst);
        drop(log);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the committed batches to sled and drops them from the overlay;
    /// checkpoints if the log has grown past [`CHECKPOINT_BYTES`]. The engine
    /// calls it every round, off the commit path.
    pub fn settle(&self) -> Result<(), StoreError> {
        let _settling = lock(&self.settling);
        self.check_failed()?;
        self.settle_committed()?;
        if self.wal.lock().len() >= CHECKPOINT_BYTES {
            self.checkpoint_settling()?;
        }
        Ok(())
    }

    /// Makes sled itself durable with every committed batch in it (its flush,
    /// then a real fsync of its log file and of any new blob file), so the
    /// write-ahead log starts again from its beginning.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let _settling = lock(&self.settling);
        self.check_failed()?;
        self.checkpoint_settling()
    }

    /// `Err` once a commit has failed in this store.
    fn check_failed(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::CommitFailed);
        }
        Ok(())
    }

    /// [`Store::checkpoint`], with `settling` held.
    fn checkpoint_settling(&self) -> Result<(), StoreError> {
        // The bulk first, while commits go on; then, with commits held until
        // the log restarts (everything in it must be in sled), what was
        // committed meanwhile.
        self.settle_committed()?;
        self.make_sled_durable()?;
        let mut log = self.wal.lock();
        self.settle_committed()?;
        self.make_sled_durable()?;
        log.restart();
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// sled's flush (which only issues `sync_file_range`), then a real fsync
    /// of its log file and of any new blob file.
    fn make_sled_durable(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.log_file
            .sync_data()
            .map_err(|source| StoreError::Sync {
                path: self.log_path.clone(),
                source,
            })?;
        let mut blobs = lock(&self.blobs);
        blobs.sync().map_err(|source| StoreError::Sync {
            path: blobs.dir.clone(),
            source,
        })?;
        Ok(())
    }

    /// Writes every committed, unsettled batch to sled, in order, then the
    /// last one's sequence number. `settling` must be held.
    fn settle_committed(&self) -> Result<(), StoreError> {
        let committed = self.committed.load(Ordering::SeqCst);
        let batches: Vec<(u64, Vec<Write>)> = {
            let mut staged = lock(&self.staged);
            let ready = staged
                .unsettled
                .iter()
                .take_while(|(seq, _)| *seq <= committed)
                .count();
            staged.unsettled.drain(..ready).collect()
        };
        let Some(&(last, _)) = batches.last() else {
            return Ok(());
        };
        let mut n = 0;
        for (_, writes) in &batches {
            for (key, value) in writes {
                match value {
                    Some(v) => self.db.insert(key, v.clone())?,
                    None => self.db.remove(key)?,
                };
            }
            n += writes.len();
        }
        self.db.insert(SEQ_KEY, &last.to_be_bytes()[..])?;
        let mut staged = lock(&self.staged);
        for (seq, writes) in &batches {
            for (key, _) in writes {
                if staged.overlay.get(key).is_some_and(|(s, _)| s == seq) {
                    staged.overlay.remove(key);
                }
            }
        }
        drop(staged);
        reclaim(n);
        Ok(())
    }

    /// The staged value of `key`: `None` if it has no staged write,
    /// `Some(None)` if its staged write is a removal.
    fn staged(&self, key: &[u8]) -> Option<Option<IVec>> {
        lock(&self.staged).overlay.get(key).map(|(_, v)| v.clone())
    }

    /// Opens a store just closed in this process: sled's background threads
    /// let go of the directory lock shortly after the drop, so this polls for
    /// it, within a bound.
    #[cfg(test)]
    pub fn reopen_for_test(dir: &Path) -> Store {
        Store::try_reopen_for_test(dir).unwrap_or_else(|e| panic!("reopening the store: {e}"))
    }

    /// [`Store::reopen_for_test`], returning the error that is not sled's
    /// lock (or the last one, after the bound).
    #[cfg(test)]
    pub fn try_reopen_for_test(dir: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir, 1 << 20) {
                Err(StoreError::Sled(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                opened => return opened,
            }
        }
    }

    /// Holds the log's lock as a checkpoint does, so that commits wait.
    #[cfg(test)]
    pub fn hold_log_for_test(&self) -> std::sync::MutexGuard<'_, wal::LogFile> {
        self.wal.lock()
    }

    /// How many syncs have completed since the store was opened.
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// How many checkpoints have completed since the store was opened (the
    /// one at opening included).
    pub fn checkpoint_count(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }

    /// One job record.
    pub fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let key = job_key(&id);
        let value = match self.staged(&key) {
            Some(staged) => staged,
            None => self.db.get(key)?,
        };
        match value {
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
        self.range(start, vec![JOB_PREFIX + 1]).map(|kv| {
            let (_, v) = kv?;
            Ok(JobRecord::decode(&v)?)
        })
    }

    /// The records with keys in `start..end`, in key order: sled's, with the
    /// staged writes in the range as they are now (a handful: what the last
    /// commits have not yet written to sled) over them.
    fn range(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
    ) -> impl Iterator<Item = Result<(IVec, IVec), StoreError>> + '_ {
        let staged: Vec<Write> = lock(&self.staged)
            .overlay
            .range::<[u8], _>((Bound::Included(&start[..]), Bound::Excluded(&end[..])))
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect();
        Merged {
            sled: self.db.range(start..end).peekable(),
            staged: staged.into_iter().peekable(),
        }
    }

    /// The records whose keys start with `prefix` (a single byte below 255).
    fn prefix(&self, prefix: u8) -> impl Iterator<Item = Result<(IVec, IVec), StoreError>> + '_ {
        self.range(vec![prefix], vec![prefix + 1])
    }

    /// Reads everything, for rebuilding the in-memory model at start-up.
    pub fn snapshot(&self) -> Result<Snapshot<'_>, StoreError> {
        let jobs = Box::new(self.scan_jobs(None));
        let mut idempotency = Vec::new();
        for kv in self.prefix(IDEM_PREFIX) {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k[1..]).into_owned();
            let bytes: [u8; 16] = v
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::CorruptIdempotency(key.clone()))?;
            idempotency.push((key, JobId(uuid::Uuid::from_bytes(bytes))));
        }
        let schedules = self
            .prefix(SCHEDULE_PREFIX)
            .map(|kv| Ok(ScheduleEntry::decode(&kv?.1)?))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Snapshot {
            jobs,
            idempotency,
            schedules,
        })
    }
}

/// sled's records in a range with the staged writes over them, in key order:
/// a staged value replaces sled's, a staged removal hides it.
struct Merged<S: Iterator<Item = sled::Result<(IVec, IVec)>>> {
    sled: Peekable<S>,
    staged: Peekable<std::vec::IntoIter<Write>>,
}

impl<S: Iterator<Item = sled::Result<(IVec, IVec)>>> Iterator for Merged<S> {
    type Item = Result<(IVec, IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let sled_key = match self.sled.peek() {
                Some(Ok((k, _))) => Some(k.clone()),
                Some(Err(_)) => {
                    let Some(Err(e)) = self.sled.next() else {
                        unreachable!("peeked an error")
                    };
                    return Some(Err(e.into()));
                }
                None => None,
            };
            let staged_first = match (&sled_key, self.staged.peek()) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(s), Some((k, _))) => k <= s,
            };
            if !staged_first {
                return self.sled.next().map(|kv| Ok(kv?));
            }
            let (key, value) = self.staged.next().expect("peeked");
            if sled_key.as_ref() == Some(&key) {
                self.sled.next();
            }
            if let Some(v) = value {
                return Some(Ok((key, v)));
            }
        }
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
    fn large_records_land_in_blob_files_that_a_checkpoint_makes_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let mut big = rec();
        big.job.payload = vec![7; 300 << 10];
        let mut w = Writes::default();
        w.put_job(&big);
        store.apply(w).unwrap();
        store.sync().unwrap();
        store.checkpoint().unwrap();
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

    fn ids(it: impl Iterator<Item = Result<JobRecord, StoreError>>) -> Vec<JobId> {
        it.map(|r| r.unwrap().id()).collect()
    }

    fn put(store: &Store, recs: &[&JobRecord]) {
        let mut w = Writes::default();
        for r in recs {
            w.put_job(r);
        }
        store.apply(w).unwrap();
    }

    #[test]
    fn staged_writes_are_read_before_they_reach_sled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let recs: Vec<_> = (0..4).map(|_| rec()).collect();
        put(&store, &[&recs[0], &recs[2]]);
        store.sync().unwrap();
        store.settle().unwrap();
        assert!(lock(&store.staged).overlay.is_empty(), "settled");
        // Staged only: a new job between the two in sled, a change, a removal.
        let mut changed = recs[2].clone();
        changed.job.kind = "changed".into();
        let mut w = Writes::default();
        w.put_job(&recs[1]);
        w.put_job(&changed);
        w.put_job(&recs[3]);
        w.delete_job(recs[0].id());
        store.apply(w).unwrap();
        let check = |store: &Store| {
            assert_eq!(store.get_job(recs[0].id()).unwrap(), None);
            assert_eq!(store.get_job(recs[1].id()).unwrap(), Some(recs[1].clone()));
            assert_eq!(store.get_job(recs[2].id()).unwrap(), Some(changed.clone()));
            assert_eq!(
                ids(store.scan_jobs(None)),
                [recs[1].id(), recs[2].id(), recs[3].id()]
            );
            assert_eq!(
                ids(store.scan_jobs(Some(recs[1].id()))),
                [recs[2].id(), recs[3].id()]
            );
        };
        check(&store);
        store.sync().unwrap();
        check(&store);
        store.settle().unwrap();
        assert!(lock(&store.staged).overlay.is_empty(), "settled");
        check(&store);
    }

    #[test]
    fn a_crash_keeps_every_committed_batch_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<_> = (0..3).map(|_| rec()).collect();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            put(&store, &[&recs[0]]);
            store.sync().unwrap();
            store.settle().unwrap(); // in sled, not checkpointed
            put(&store, &[&recs[1]]);
            store.sync().unwrap(); // in the log only
            put(&store, &[&recs[2]]); // staged only: never acknowledged
        }
        let store = Store::reopen_for_test(dir.path());
        assert_eq!(ids(store.scan_jobs(None)), [recs[0].id(), recs[1].id()]);
        // The replay was checkpointed: a second reopen reads the same.
        drop(store);
        let store = Store::reopen_for_test(dir.path());
        assert_eq!(ids(store.scan_jobs(None)), [recs[0].id(), recs[1].id()]);
    }

    #[test]
    fn the_replay_brings_sled_to_the_last_record_and_refuses_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<_> = (0..4).map(|_| rec()).collect();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            for r in &recs[..2] {
                put(&store, &[r]);
                store.sync().unwrap();
            }
            store.checkpoint().unwrap(); // sled holds batches 1 and 2
        }
        let log = |batches: &[(u64, &JobRecord)]| {
            let mut bytes = Vec::new();
            for (seq, r) in batches {
                let mut w = Writes::default();
                w.put_job(r);
                wal::encode(&mut bytes, *seq, w.ops());
            }
            std::fs::write(dir.path().join(wal::FILE_NAME), bytes).unwrap();
        };
        // Batch 2 again (already in sled, skipped) then 3: replayed.
        log(&[(2, &recs[1]), (3, &recs[2])]);
        let store = Store::reopen_for_test(dir.path());
        assert_eq!(
            ids(store.scan_jobs(None)),
            ids(recs[..3].iter().cloned().map(Ok))
        );
        drop(store);
        // Batch 5 after 3: batch 4 is in neither, so the store will not open.
        log(&[(5, &recs[3])]);
        let Err(err) = Store::try_reopen_for_test(dir.path()) else {
            panic!("opened over a gap in the log");
        };
        assert!(
            matches!(
                err,
                StoreError::LogGap {
                    stored: 3,
                    found: 5
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("batches in between are missing"),
            "{err}"
        );
    }

    #[test]
    fn a_full_log_is_checkpointed_and_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let opened = store.checkpoint_count();
        let mut recs = Vec::new();
        while store.checkpoint_count() == opened {
            let mut r = rec();
            r.job.payload = vec![1; 64 << 10];
            put(&store, &[&r]);
            store.sync().unwrap();
            store.settle().unwrap();
            recs.push(r.id());
            assert!(recs.len() < 1000, "no checkpoint after {} bytes", 64 * 1000);
        }
        assert_eq!(store.wal.lock().len(), 0, "the log starts again");
        let file = std::fs::metadata(dir.path().join(wal::FILE_NAME))
            .unwrap()
            .len();
        assert!(
            file <= CHECKPOINT_BYTES + wal::GROWTH,
            "log file {file} bytes"
        );
        drop(store);
        let store = Store::reopen_for_test(dir.path());
        assert_eq!(ids(store.scan_jobs(None)), recs);
    }

    #[test]
    fn a_write_sled_lost_behind_its_stored_number_is_replayed_and_the_log_is_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = rec();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            put(&store, &[&first]);
            store.sync().unwrap();
            store.checkpoint().unwrap(); // batch 1 durable in sled; the log starts again
            first.job.kind = "second".into();
            put(&store, &[&first]);
            store.sync().unwrap(); // batch 2 in the log
            store.settle().unwrap(); // and in sled, which stores 2
                                     // What a power loss can leave: sled stores 2 but lost batch 2's write
                                     // (a value in a blob file that was never fsynced).
            let mut older = first.clone();
            older.job.kind = "k".into();
            store
                .db
                .insert(job_key(&first.id()), older.encode())
                .unwrap();
        }
        let store = Store::reopen_for_test(dir.path());
        assert_eq!(store.get_job(first.id()).unwrap(), Some(first.clone()));
        let log = std::fs::read(dir.path().join(wal::FILE_NAME)).unwrap();
        assert!(
            !log.is_empty() && log.iter().all(|b| *b == 0),
            "the log is zeroed at opening"
        );
    }
}
