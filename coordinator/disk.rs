//! Free space on the data directory's disk, and the guard that keeps sled
//! from running out of it.
//!
//! sled 0.34 keeps a global error after a failed write: once it has hit
//! `ENOSPC`, every later write fails until the database is reopened (the
//! engine then reopens it; see [`crate::coordinator::recovery`]). So the
//! coordinator refuses *new work* — `SubmitJob(s)`, `RetryJob`, `PutSchedule`,
//! `TriggerSchedule` — with `RESOURCE_EXHAUSTED` unless, after it, the disk
//! still has room to finish every unfinished job (each job's lease and
//! completion rewrite its record: [`FINISH_RESERVE`] disk bytes are kept per
//! byte of unfinished record) plus `min_free_disk`. The writes that finish
//! accepted work (leases, completions, retries, expiries, schedule fires,
//! cancels) are always made: that reserve is theirs.
//!
//! Checking is cheap. [`Budget`] (pure) decides from the last `statvfs`
//! reading and the bytes written since, and asks for a new reading at most
//! every [`PROBE_EVERY`], or sooner once the writes since may have used half
//! of the headroom above the limit. sled's log takes 2–3 bytes of disk per
//! byte of record (measured on tmpfs with fresh inserts of 100 to 1,000
//! bytes, in batches of 1 to 1,000); [`AMPLIFICATION`] counts 4.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest a reading is trusted.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Disk bytes counted per byte of record written (sled's log, measured 2–3).
pub const AMPLIFICATION: u64 = 4;
/// Disk bytes kept free per byte of an unfinished job's record: its lease and
/// its completion each rewrite the record (completing 18 MiB of queued 64 KiB
/// records took 15 MiB of disk on tmpfs; sled reclaims the old versions).
pub const FINISH_RESERVE: u64 = 4;
/// Bytes counted for a request that writes one or two small records
/// (`RetryJob`, `TriggerSchedule`) beyond its own encoded size.
pub const RECORD_OVERHEAD: u64 = 512;

/// Why new work is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// After this request, the disk would lack room to finish the accepted
    /// work and keep `min_free_disk` free.
    #[error(
        "disk full: {free} free on the disk of the data directory {dir}; this request needs about {need}, finishing the work already accepted needs about {reserved}, and min_free_disk ({min}) must stay free; new work is refused until space is freed (work already accepted still completes)",
        free = human(*available), need = human(*needed), reserved = human(*reserved), min = human(*min_free), dir = dir.display()
    )]
    Full {
        /// The data directory.
        dir: PathBuf,
        /// Bytes free, as estimated now.
        available: u64,
        /// Disk bytes this request would take, finishing it included.
        needed: u64,
        /// Disk bytes kept for finishing the unfinished jobs.
        reserved: u64,
        /// The `min_free_disk` setting.
        min_free: u64,
    },
}

/// The shortfall [`Budget::admit`] found; [`DiskGuard`] adds the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// Bytes free, as estimated now.
    pub available: u64,
    /// Disk bytes the request would take, finishing it included.
    pub needed: u64,
    /// Disk bytes kept for finishing the unfinished jobs.
    pub reserved: u64,
}

/// The pure decision: from the last reading of the free space and the bytes
/// written since, whether new work fits and when to read again.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Bytes that must stay free; 0 turns the guard off.
    min_free: u64,
    /// When the free space was last read (successfully or not).
    probed_at: Option<Instant>,
    /// Bytes free at the last successful reading; `None` when unknown.
    available: Option<u64>,
    /// Record bytes written since that reading.
    written: u64,
    /// Record bytes admitted since the last [`Budget::wrote`], not yet written.
    reserved: u64,
}

impl Budget {
    /// A budget keeping `min_free` bytes free (0: no limit, never reads).
    pub fn new(min_free: u64) -> Budget {
        Budget {
            min_free,
            probed_at: None,
            available: None,
            written: 0,
            reserved: 0,
        }
    }

    /// Whether the guard is on.
    pub fn enabled(&self) -> bool {
        self.min_free > 0
    }

    /// Whether the free space should be read now: never read yet, the reading
    /// is older than [`PROBE_EVERY`], or the writes since may have used half
    /// the headroom above `min_free`.
    pub fn probe_due(&self, now: Instant) -> bool {
        if !self.enabled() {
            return false;
        }
        let Some(at) = self.probed_at else {
            return true;
        };
        if now.saturating_duration_since(at) >= PROBE_EVERY {
            return true;
        }
        let Some(available) = self.available else {
            return false;
        };
        let used = (self.written + self.reserved).saturating_mul(AMPLIFICATION);
        let headroom = available.saturating_sub(self.min_free);
        used > 0 && used >= headroom / 2
    }

    /// Records a reading of the free space taken at `now`.
    pub fn observe(&mut self, now: Instant, available: u64) {
        self.probed_at = Some(now);
        self.available = Some(available);
        self.written = 0;
    }

    /// Records a failed reading: the free space is unknown until the next one,
    /// which comes after [`PROBE_EVERY`].
    pub fn observe_failure(&mut self, now: Instant) {
        self.probed_at = Some(now);
        self.available = None;
        self.written = 0;
    }

    /// The free space now, as estimated from the reading and what was written
    /// and admitted since; `None` when unknown.
    pub fn estimated_free(&self) -> Option<u64> {
        let used = (self.written + self.reserved).saturating_mul(AMPLIFICATION);
        self.available.map(|a| a.saturating_sub(used))
    }

    /// Admits new work that writes about `bytes` of records, if the disk
    /// still has room after it to finish it and the `live` bytes of unfinished
    /// records, and keep `min_free` free; the bytes count against later
    /// requests until the next [`Budget::wrote`]. Unknown free space admits
    /// (the store itself reports a real failure).
    pub fn admit(&mut self, bytes: u64, live: u64) -> Result<(), Shortfall> {
        if !self.enabled() {
            return Ok(());
        }
        let Some(free) = self.estimated_free() else {
            return Ok(());
        };
        let reserved = live.saturating_mul(FINISH_RESERVE);
        let needed = bytes
            .saturating_mul(AMPLIFICATION)
            .saturating_add(bytes.saturating_mul(FINISH_RESERVE));
        if free
            < self
                .min_free
                .saturating_add(reserved)
                .saturating_add(needed)
        {
            return Err(Shortfall {
                available: free,
                needed,
                reserved,
            });
        }
        self.reserved += bytes;
        Ok(())
    }

    /// Records that a batch of `bytes` of records was written (it includes what
    /// was admitted since the last call).
    pub fn wrote(&mut self, bytes: u64) {
        self.written = self.written.saturating_add(bytes);
        self.reserved = 0;
    }
}

/// The [`Budget`] of one data directory, reading its free space with `statvfs`.
#[derive(Debug)]
pub struct DiskGuard {
    /// The data directory.
    dir: PathBuf,
    /// The decisions.
    budget: Budget,
    /// `min_free_disk`, for messages.
    min_free: u64,
}

impl DiskGuard {
    /// A guard keeping `min_free` bytes free on the disk of `dir` (0: off).
    pub fn new(dir: &Path, min_free: u64) -> DiskGuard {
        DiskGuard {
            dir: dir.to_path_buf(),
            budget: Budget::new(min_free),
            min_free,
        }
    }

    /// Reads the free space if the budget asks for it.
    pub fn refresh(&mut self, now: Instant) {
        if !self.budget.probe_due(now) {
            return;
        }
        match available(&self.dir) {
            Ok(bytes) => self.budget.observe(now, bytes),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the free disk space; admitting new work");
                self.budget.observe_failure(now);
            }
        }
    }

    /// Admits new work that writes about `bytes` of records while `live` bytes
    /// of unfinished records wait to be finished, or says why not.
    pub fn admit(&mut self, bytes: u64, live: u64) -> Result<(), DiskError> {
        self.budget.admit(bytes, live).map_err(|s| DiskError::Full {
            dir: self.dir.clone(),
            available: s.available,
            needed: s.needed,
            reserved: s.reserved,
            min_free: self.min_free,
        })
    }

    /// Records that a batch of `bytes` of records was written.
    pub fn wrote(&mut self, bytes: u64) {
        self.budget.wrote(bytes);
    }
}

/// The bytes available to this (unprivileged or not) process on the disk of `dir`.
pub fn available(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a valid
    // out-pointer, both alive for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// `bytes` for people: `512 B`, `3.1 MiB`, `2.0 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn off_when_min_free_is_zero() {
        let mut b = Budget::new(0);
        assert!(!b.probe_due(Instant::now()));
        assert_eq!(b.admit(u64::MAX / 8, u64::MAX / 8), Ok(()));
    }

    #[test]
    fn reads_first_then_admits_above_the_limit_only() {
        let t0 = Instant::now();
        let mut b = Budget::new(10 * MIB);
        assert!(b.probe_due(t0), "the first decision needs a reading");
        assert_eq!(b.admit(MIB, 0), Ok(()), "unknown free space admits");
        b.wrote(0);
        b.observe(t0, 12 * MIB);
        // 1 KiB of records counts 4 KiB written and 4 KiB to finish: it fits.
        assert_eq!(b.admit(1024, 0), Ok(()));
        // 256 KiB counts 2 MiB: it would leave less than the 10 MiB limit.
        let refused = b.admit(256 << 10, 0).unwrap_err();
        assert_eq!(refused.needed, 2 * MIB);
        assert_eq!(
            refused.available,
            12 * MIB - 4096,
            "the admitted KiB counts"
        );
        // Below the limit, even a tiny request is refused.
        b.observe(at(t0, 300), 9 * MIB);
        assert!(b.admit(1, 0).is_err());
        // Space freed: admitted again.
        b.observe(at(t0, 600), 100 * MIB);
        assert_eq!(b.admit(MIB, 0), Ok(()));
    }

    #[test]
    fn keeps_room_to_finish_the_accepted_work() {
        let mut b = Budget::new(MIB);
        b.observe(Instant::now(), 10 * MIB);
        // 2 MiB of unfinished records keep 8 MiB: 1 KiB of new work (8 KiB) still fits.
        assert_eq!(b.admit(1024, 2 * MIB), Ok(()));
        // 2.25 MiB keep 9 MiB: with the 1 MiB limit, nothing fits any more.
        let refused = b.admit(1024, 9 * MIB / 4).unwrap_err();
        assert_eq!(refused.reserved, 9 * MIB);
        assert_eq!(refused.needed, 8 * 1024);
        assert_eq!(refused.available, 10 * MIB - 4096);
    }

    #[test]
    fn admitted_bytes_count_once_after_they_are_written() {
        let t0 = Instant::now();
        let mut b = Budget::new(MIB);
        b.observe(t0, 4 * MIB);
        b.admit(100 << 10, 0).unwrap();
        b.admit(100 << 10, 100 << 10).unwrap();
        // Admitted, not yet written: counted at AMPLIFICATION.
        assert_eq!(b.estimated_free(), Some(4 * MIB - 800 * 1024));
        // The round wrote what was admitted plus 10 KiB of other records.
        b.wrote(210 << 10);
        assert_eq!(b.estimated_free(), Some(4 * MIB - 840 * 1024));
    }

    #[test]
    fn reads_again_after_the_interval_or_when_writes_eat_half_the_headroom() {
        let t0 = Instant::now();
        let mut b = Budget::new(MIB);
        b.observe(t0, 9 * MIB); // 8 MiB of headroom
        assert!(!b.probe_due(at(t0, 10)));
        assert!(b.probe_due(t0 + PROBE_EVERY));
        b.wrote(MIB - 1); // counts just under 4 MiB
        assert!(!b.probe_due(at(t0, 10)));
        b.wrote(1); // 4 MiB: half the headroom
        assert!(b.probe_due(at(t0, 10)));
        b.observe(at(t0, 10), 5 * MIB);
        assert!(!b.probe_due(at(t0, 20)), "a fresh reading resets the count");
    }

    #[test]
    fn below_the_limit_only_time_or_a_write_asks_for_a_reading() {
        let t0 = Instant::now();
        let mut b = Budget::new(MIB);
        b.observe(t0, MIB / 2);
        assert!(b.admit(10, 0).is_err());
        assert!(!b.probe_due(at(t0, 10)), "refused work writes nothing");
        b.wrote(10);
        assert!(
            b.probe_due(at(t0, 10)),
            "any write when no headroom is left"
        );
    }

    #[test]
    fn a_failed_reading_admits_and_waits_the_interval() {
        let t0 = Instant::now();
        let mut b = Budget::new(MIB);
        b.observe(t0, 0);
        assert!(b.admit(1, 0).is_err());
        b.observe_failure(at(t0, 250));
        assert_eq!(b.admit(1, 0), Ok(()));
        assert!(!b.probe_due(at(t0, 300)));
        assert!(b.probe_due(at(t0, 250) + PROBE_EVERY));
    }

    #[test]
    fn the_refusal_says_the_disk_is_full_and_names_the_numbers() {
        let mut g = DiskGuard::new(Path::new("/var/lib/rota"), 256 * MIB);
        g.budget.observe(Instant::now(), 100 * MIB);
        let msg = g.admit(300, 1000).unwrap_err().to_string();
        assert!(msg.starts_with("disk full: 100.0 MiB free"), "{msg}");
        assert!(msg.contains("/var/lib/rota"), "{msg}");
        assert!(msg.contains("min_free_disk (256.0 MiB)"), "{msg}");
        assert!(msg.contains("request needs about 2.3 KiB"), "{msg}");
        assert!(msg.contains("accepted needs about 3.9 KiB"), "{msg}");
    }

    #[test]
    fn reads_the_free_space_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let free = available(dir.path()).unwrap();
        assert!(free > 0);
        assert!(available(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
