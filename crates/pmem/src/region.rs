//! Persistent regions: open/recover a pool, failure-atomic transactions, group commit,
//! checkpoints.
//!
//! Commit path: the transaction's written pages (found by [`crate::tracker`]) are diffed against
//! their twins in 64-byte lines; each changed line contributes its changed bytes to one redo
//! record (epoch, LSN, CRC32C) appended to the log area with `pwrite`; one `fdatasync` makes it
//! durable. Committers that arrive while a sync runs wait for the next one, which covers all of
//! them (group commit). The pool's data area is never written before commit: the region lives
//! in a private anonymous copy, and committed lines reach the data area only at a checkpoint,
//! when the log is full or the region is closed: all records are synced, the lines they
//! changed are written from memory (from the twin if the current transaction has since
//! changed the page), synced, then the other header slot names a new epoch and the log is
//! reused from its start.
//!
//! Recovery (in [`PersistentRegion::open`]) reads the data area, replays the log's valid prefix
//! of the current epoch into memory, and ends with a checkpoint. A crash anywhere in it leaves
//! the same header and log, so running it again gives the same result.
//!
//! Where it stops working: one transaction at a time per region (the body runs under a lock;
//! only the durability wait overlaps), a transaction's record must fit in the log area, and
//! the region is held in RAM in full.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::changelog::{ChangeLog, ChangeLogId, ChangeLogInfo, ChangeStore};
use crate::failpoint;
use crate::layout::{Header, Record, RecordBuilder, SlotError, HEADER_BYTES, LINE_BYTES, SLOTS_BYTES};
use crate::storage::{FileStorage, Storage};
use crate::tracker::{Dirty, TrackError, Tracker};
use crate::uffd_wp::UffdError;

/// Errors of persistent regions.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    /// An I/O operation on the pool failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file does not start with a clustermem pool header.
    #[error("not a clustermem pool (bad magic in both header slots); refusing to touch it")]
    NotAPool,
    /// The pool was written by another layout version.
    #[error("pool layout version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// Both header slots fail their checksum.
    #[error("pool header is damaged (checksum mismatch in both header slots); refusing to touch it")]
    HeaderChecksum,
    /// The pool holds a region of another size than requested.
    #[error("pool holds a region of {pool} bytes, but {requested} bytes were requested")]
    SizeMismatch {
        /// Size recorded in the pool.
        pool: u64,
        /// Size asked for.
        requested: u64,
    },
    /// The file's length disagrees with its header: truncated or damaged.
    #[error("pool file is {actual} bytes but its header implies {expected}: truncated or damaged; refusing to touch it")]
    LengthMismatch {
        /// Length found.
        actual: u64,
        /// Length the header implies.
        expected: u64,
    },
    /// A size argument is unusable.
    #[error("invalid size {bytes}: {why}")]
    InvalidSize {
        /// The size given.
        bytes: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// Write tracking could not be set up (userfaultfd, mmap).
    #[error(transparent)]
    Track(#[from] TrackError),
    /// A transaction's record is larger than the whole log area.
    #[error("transaction changed too much: its {record_bytes}-byte record exceeds the {log_bytes}-byte log; use a larger log")]
    TxTooLarge {
        /// Size of the record.
        record_bytes: u64,
        /// Size of the log area.
        log_bytes: u64,
    },
    /// An earlier failure (sync error, tracking failure) left the region unusable.
    #[error(
        "region is unusable after an earlier failure ({0}); reopen the pool to recover its committed state"
    )]
    Broken(String),
    /// Change logs need a side file or storage, which this region was opened without.
    #[error("this region has no change-log storage (open it from a path or pass RegionOptions::changes)")]
    NoChangeLogStorage,
    /// No change log with that id, or it was already undone.
    #[error("no change log {0} to undo (unknown or already undone)")]
    UnknownChangeLog(u64),
    /// A range outside the region.
    #[error("range {start}..{end} is outside the {len}-byte region")]
    BadRange {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// Region length.
        len: usize,
    },
}

impl PmemError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> PmemError {
        let what = what.into();
        move |source| PmemError::Io { what, source }
    }
}

impl From<UffdError> for PmemError {
    fn from(e: UffdError) -> Self {
        PmemError::Track(TrackError::Uffd(e))
    }
}

/// Outcome of a failed [`PersistentRegion::transaction`].
#[derive(Debug, thiserror::Error)]
pub enum TxError<E> {
    /// The closure returned an error; the region was restored.
    #[error("transaction aborted: {0}")]
    Aborted(E),
    /// Commit failed; the region was restored unless the error is [`PmemError::Broken`].
    #[error(transparent)]
    Pmem(#[from] PmemError),
}

/// Options for opening a region.
#[derive(Debug, Clone, Default)]
pub struct RegionOptions {
    /// Size of the redo log area when creating a pool (default: a quarter of the region,
    /// between 1 MiB and 64 MiB). Ignored when the pool exists: its header decides.
    pub log_bytes: Option<u64>,
    /// Where change logs live for a region opened with [`PersistentRegion::open_storage`]
    /// (a region opened from a path uses the file `PATH.changes`).
    pub changes: Option<Arc<dyn Storage>>,
}

/// Counters of a region's activity.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct RegionStats {
    /// Transactions that committed a record.
    pub commits: u64,
    /// Transactions rolled back.
    pub aborts: u64,
    /// `fdatasync` calls (commits and checkpoints).
    pub fdatasyncs: u64,
    /// Bytes appended to the redo log.
    pub log_bytes: u64,
    /// Bytes that differed from their pre-transaction value, over all commits.
    pub changed_bytes: u64,
    /// Checkpoints taken (including the one ending each recovery).
    pub checkpoints: u64,
    /// Records replayed by the recovery at open.
    pub recovered_records: u64,
    /// Write-protect faults served.
    pub write_faults: u64,
}

#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    aborts: AtomicU64,
    fdatasyncs: AtomicU64,
    log_bytes: AtomicU64,
    changed_bytes: AtomicU64,
    checkpoints: AtomicU64,
    recovered_records: AtomicU64,
}

/// Durability state shared by committers and the background syncer.
#[derive(Debug, Default)]
struct Durability {
    /// Highest LSN written to the log.
    written: u64,
    /// Highest LSN known durable.
    durable: u64,
    /// A sync is running (its leader will update `durable`).
    syncing: bool,
    /// Highest LSN an asynchronous commit wants durable without anyone waiting.
    async_target: u64,
    failed: Option<String>,
    shutdown: bool,
}

/// Longest a sync leader waits for running transactions to append before syncing.
const GROUP_COMMIT_WAIT: Duration = Duration::from_micros(100);

#[derive(Debug)]
struct Core {
    storage: Arc<dyn Storage>,
    /// Threads that began a transaction and have not yet appended (or aborted) it.
    committers: AtomicUsize,
    dur: Mutex<Durability>,
    cv: Condvar,
    n: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Core {
    /// Runs one `fdatasync` covering every record written so far; the caller must have seen
    /// `!syncing`.
    fn sync_round<'a>(&'a self, mut g: MutexGuard<'a, Durability>) -> MutexGuard<'a, Durability> {
        g.syncing = true;
        let target = g.written;
        drop(g);
        let r = self.storage.sync();
        let mut g = lock(&self.dur);
        g.syncing = false;
        match r {
            Ok(()) => {
                g.durable = g.durable.max(target);
                self.n.fdatasyncs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => g.failed = Some(format!("fdatasync of the log failed: {e}")),
        }
        self.cv.notify_all();
        g
    }

    /// Returns once record `lsn` is durable, syncing as the group leader when nobody is.
    fn wait_durable(&self, lsn: u64) -> Result<(), PmemError> {
        let mut g = lock(&self.dur);
        loop {
            if g.durable >= lsn {
                return Ok(());
            }
            if let Some(f) = &g.failed {
                return Err(PmemError::Broken(f.clone()));
            }
            if g.syncing {
                g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            if self.committers.load(Ordering::Relaxed) > 0 {
                // Group commit: transactions of other threads are about to append; one sync
                // after they do serves them too. Bounded, so a long transaction body does not
                // hold this commit back.
                drop(g);
                let start = Instant::now();
                while self.committers.load(Ordering::Relaxed) > 0 && start.elapsed() < GROUP_COMMIT_WAIT {
                    std::thread::yield_now();
                }
                g = lock(&self.dur);
                if g.durable >= lsn || g.syncing {
                    continue;
                }
            }
            g = self.sync_round(g);
        }
    }

    /// Background syncer: makes asynchronous commits durable even if nobody waits.
    fn syncer_loop(&self) {
        let mut g = lock(&self.dur);
        loop {
            if g.shutdown {
                return;
            }
            if g.async_target > g.durable && !g.syncing && g.failed.is_none() {
                g = self.sync_round(g);
            } else {
                g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}

/// Completes when an asynchronously committed transaction is durable.
#[derive(Debug)]
#[must_use = "an asynchronous commit is durable only once wait() returns"]
pub struct CommitHandle {
    core: Arc<Core>,
    lsn: u64,
}

impl CommitHandle {
    /// Blocks until the transaction is durable (sharing a sync with other committers).
    pub fn wait(self) -> Result<(), PmemError> {
        self.core.wait_durable(self.lsn)
    }

    /// Whether the transaction is already durable.
    pub fn is_durable(&self) -> bool {
        lock(&self.core.dur).durable >= self.lsn
    }
}

/// Lines changed since the last checkpoint: one bit per 64-byte line.
#[derive(Debug, Default)]
struct LineSet {
    bits: Vec<u64>,
    touched_words: Vec<usize>,
}

impl LineSet {
    fn new(lines: usize) -> Self {
        Self { bits: vec![0; lines.div_ceil(64)], touched_words: Vec::new() }
    }

    fn mark_line(&mut self, line: usize) {
        let w = &mut self.bits[line / 64];
        if *w == 0 {
            self.touched_words.push(line / 64);
        }
        *w |= 1 << (line % 64);
    }

    fn mark(&mut self, bytes: Range<usize>) {
        for line in crate::layout::lines_of(&bytes) {
            self.mark_line(line);
        }
    }
}

/// State owned by whoever runs a transaction (or a checkpoint).
#[derive(Debug)]
struct TxState {
    header: Header,
    next_lsn: u64,
    /// Append position in the log area.
    tail: u64,
    unapplied: LineSet,
    rec: RecordBuilder,
    new_lines: Vec<usize>,
    broken: Option<String>,
}

/// A persistent region: memory whose committed contents survive process exit and crashes.
///
/// Read it with [`PersistentRegion::read`]; change it inside [`PersistentRegion::transaction`]
/// or between [`PersistentRegion::tx_begin`] and [`Tx::commit`]. Outside a transaction the
/// pages are write-protected; a write through a raw pointer outside a transaction is not
/// refused but joins the next transaction (committed or rolled back with it).
#[derive(Debug)]
pub struct PersistentRegion {
    core: Arc<Core>,
    tx: Mutex<TxState>,
    tracker: Tracker,
    syncer: Option<JoinHandle<()>>,
    changes: Mutex<ChangeStore>,
}

/// Default log size for a region of `size` bytes.
fn default_log_bytes(size: u64) -> u64 {
    (size / 4).clamp(1 << 20, 64 << 20) / 4096 * 4096
}

fn check_size(size: u64) -> Result<(), PmemError> {
    if size == 0 || size % 4096 != 0 {
        return Err(PmemError::InvalidSize {
            bytes: size,
            why: "a region must be a non-zero multiple of 4096 bytes",
        });
    }
    if usize::try_from(size).is_err() || size > (1 << 46) {
        return Err(PmemError::InvalidSize { bytes: size, why: "too large for this machine" });
    }
    Ok(())
}

/// Writes an empty pool (zeroed data, zeroed log, header) to empty storage and syncs it.
fn format(storage: &dyn Storage, data_bytes: u64, log_bytes: u64) -> Result<(), PmemError> {
    if log_bytes < 4096 || log_bytes % 4096 != 0 {
        return Err(PmemError::InvalidSize {
            bytes: log_bytes,
            why: "the log must be a non-zero multiple of 4096 bytes",
        });
    }
    let h = Header { data_bytes, log_bytes, seq: 0, checkpoint_lsn: 1 };
    storage.set_len(h.file_bytes()).map_err(PmemError::io("sizing the new pool"))?;
    // Write the log area for real: later overwrites then need no block allocation, so each
    // commit's fdatasync flushes data only, with no journal commit.
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < log_bytes {
        let n = (log_bytes - off).min(zeros.len() as u64);
        storage
            .write_at(&zeros[..n as usize], h.log_offset() + off)
            .map_err(PmemError::io("zeroing the new log"))?;
        off += n;
    }
    storage.write_at(&h.encode(), h.slot_offset()).map_err(PmemError::io("writing the pool header"))?;
    storage.sync().map_err(PmemError::io("syncing the new pool"))
}

/// Reads and validates the header against `size`.
fn read_header(storage: &dyn Storage, size: Option<u64>) -> Result<Header, PmemError> {
    let len = storage.len().map_err(PmemError::io("reading the pool length"))?;
    if len < HEADER_BYTES {
        return Err(PmemError::NotAPool);
    }
    let mut slots = [0u8; SLOTS_BYTES];
    storage.read_at(&mut slots, 0).map_err(PmemError::io("reading the pool header"))?;
    let h = Header::choose(&slots).map_err(|e| match e {
        SlotError::Magic => PmemError::NotAPool,
        SlotError::Checksum => PmemError::HeaderChecksum,
        SlotError::Version(found) => {
            PmemError::UnsupportedVersion { found, supported: crate::layout::POOL_VERSION }
        }
    })?;
    if let Some(size) = size {
        if h.data_bytes != size {
            return Err(PmemError::SizeMismatch { pool: h.data_bytes, requested: size });
        }
    }
    check_size(h.data_bytes)?;
    if len != h.file_bytes() {
        return Err(PmemError::LengthMismatch { actual: len, expected: h.file_bytes() });
    }
    Ok(h)
}

/// Replays the log's valid prefix onto `mem` (the data area); returns the next LSN and the
/// number of records applied.
fn replay(
    storage: &dyn Storage,
    h: &Header,
    mem: &mut [u8],
    mut mark: impl FnMut(Range<usize>),
) -> Result<(u64, u64), PmemError> {
    let mut log = vec![0u8; usize::try_from(h.log_bytes).map_err(|_| PmemError::NotAPool)?];
    storage.read_at(&mut log, h.log_offset()).map_err(PmemError::io("reading the redo log"))?;
    let (mut off, mut lsn, mut applied) = (0usize, h.checkpoint_lsn, 0u64);
    while let Some(rec) = Record::decode(&log[off..], h.seq, lsn, h.data_bytes) {
        for e in rec.entries() {
            let at = usize::try_from(e.offset).expect("validated by decode");
            mem[at..at + e.bytes.len()].copy_from_slice(e.bytes);
            mark(at..at + e.bytes.len());
        }
        off += rec.len;
        lsn += 1;
        applied += 1;
    }
    Ok((lsn, applied))
}

/// The committed contents of the pool at `path` as recovery would find them, without
/// changing the file (no userfaultfd needed). For checkers and tools.
pub fn read_committed(path: &Path) -> Result<Vec<u8>, PmemError> {
    let file = File::open(path).map_err(PmemError::io(format!("opening {}", path.display())))?;
    read_committed_storage(&FileStorage::new(file))
}

/// [`read_committed`] over any storage.
pub fn read_committed_storage(storage: &dyn Storage) -> Result<Vec<u8>, PmemError> {
    let h = read_header(storage, None)?;
    let mut mem = vec![0u8; usize::try_from(h.data_bytes).expect("checked size")];
    storage.read_at(&mut mem, HEADER_BYTES).map_err(PmemError::io("reading the data area"))?;
    replay(storage, &h, &mut mem, |_| {})?;
    Ok(mem)
}

fn changes_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".changes");
    PathBuf::from(p)
}

/// Creates a pool file atomically: formatted under a temporary name, then linked into place
/// (never replacing a file that appeared meanwhile).
fn create_pool_file(path: &Path, size: u64, log_bytes: u64) -> Result<(), PmemError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".creating.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(PmemError::io(format!("creating {}", tmp.display())))?;
    let r = format(&FileStorage::new(file), size, log_bytes).and_then(|()| {
        std::fs::hard_link(&tmp, path)
            .map_err(PmemError::io(format!("linking the new pool to {}", path.display())))
    });
    let _ = std::fs::remove_file(&tmp);
    r?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(PmemError::io(format!("syncing directory {}", dir.display())))
}

impl PersistentRegion {
    /// Opens (creating if absent) the pool file at `path` holding a region of `size` bytes,
    /// recovering its committed state.
    ///
    /// # Arguments
    /// * `path` - the pool file; change logs go to `PATH.changes`.
    /// * `size` - region size in bytes, a non-zero multiple of 4096; must match an existing pool.
    pub fn open(path: impl AsRef<Path>, size: usize) -> Result<Self, PmemError> {
        Self::open_with(path, size, RegionOptions::default())
    }

    /// [`PersistentRegion::open`] with options.
    pub fn open_with(
        path: impl AsRef<Path>,
        size: usize,
        mut opts: RegionOptions,
    ) -> Result<Self, PmemError> {
        let path = path.as_ref();
        let size64 = size as u64;
        check_size(size64)?;
        if !path.exists() {
            let log = opts.log_bytes.unwrap_or_else(|| default_log_bytes(size64));
            create_pool_file(path, size64, log)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(PmemError::io(format!("opening {}", path.display())))?;
        if opts.changes.is_none() {
            opts.changes = Some(Arc::new(ChangeStore::lazy_file(changes_path(path))));
        }
        Self::open_storage(Arc::new(FileStorage::new(file)), size, opts)
    }

    /// Opens a region over any [`Storage`] (formatting it if empty), recovering its
    /// committed state.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        size: usize,
        opts: RegionOptions,
    ) -> Result<Self, PmemError> {
        let size64 = size as u64;
        check_size(size64)?;
        if storage.is_empty().map_err(PmemError::io("reading the pool length"))? {
            format(&*storage, size64, opts.log_bytes.unwrap_or_else(|| default_log_bytes(size64)))?;
        }
        let header = read_header(&*storage, Some(size64))?;
        let mut unapplied = LineSet::new(size / LINE_BYTES);
        let mut replayed = (0, 0);
        let tracker = Tracker::new::<PmemError>(size, |mem| {
            storage.read_at(mem, HEADER_BYTES).map_err(PmemError::io("reading the data area"))?;
            replayed = replay(&*storage, &header, mem, |r| unapplied.mark(r))?;
            Ok(())
        })?;
        let (next_lsn, records) = replayed;
        let core = Arc::new(Core {
            storage,
            committers: AtomicUsize::new(0),
            dur: Mutex::new(Durability {
                written: next_lsn - 1,
                durable: next_lsn - 1,
                ..Durability::default()
            }),
            cv: Condvar::new(),
            n: Counters::default(),
        });
        core.n.recovered_records.store(records, Ordering::Relaxed);
        let changes = ChangeStore::open(opts.changes)?;
        let mut region = Self {
            core: Arc::clone(&core),
            tx: Mutex::new(TxState {
                header,
                next_lsn,
                tail: 0,
                unapplied,
                rec: RecordBuilder::default(),
                new_lines: Vec::new(),
                broken: None,
            }),
            tracker,
            syncer: None,
            changes: Mutex::new(changes),
        };
        // End recovery with a checkpoint: replayed lines reach the data area and a new epoch
        // starts, so stale records beyond the replayed prefix can never be mistaken for new ones.
        {
            let mut st = lock(&region.tx);
            region.checkpoint_locked(&mut st, None)?;
        }
        region.syncer = Some(
            std::thread::Builder::new()
                .name("pmem-sync".into())
                .spawn(move || core.syncer_loop())
                .map_err(PmemError::io("starting the sync thread"))?,
        );
        Ok(region)
    }

    /// Region length in bytes.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether the region is empty (never: sizes are non-zero).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start of the region's memory. Reads through it race with transactions of other
    /// threads; writes through it outside a transaction join the next transaction.
    pub fn as_ptr(&self) -> *const u8 {
        self.tracker.base()
    }

    /// Runs `f` over the region's current contents (serialised with transactions). Calling
    /// it (or `log_changes`, `undo`, `checkpoint`) from inside a transaction on the same
    /// thread deadlocks: read through the transaction's slice instead.
    pub fn read<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let _g = lock(&self.tx);
        // SAFETY: holding the transaction lock excludes every transaction, so nothing writes
        // the mapping while the shared slice lives.
        f(unsafe { std::slice::from_raw_parts(self.tracker.base(), self.len()) })
    }

    /// A copy of the region's current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.read(<[u8]>::to_vec)
    }

    /// Activity counters.
    pub fn stats(&self) -> RegionStats {
        let n = &self.core.n;
        RegionStats {
            commits: n.commits.load(Ordering::Relaxed),
            aborts: n.aborts.load(Ordering::Relaxed),
            fdatasyncs: n.fdatasyncs.load(Ordering::Relaxed),
            log_bytes: n.log_bytes.load(Ordering::Relaxed),
            changed_bytes: n.changed_bytes.load(Ordering::Relaxed),
            checkpoints: n.checkpoints.load(Ordering::Relaxed),
            recovered_records: n.recovered_records.load(Ordering::Relaxed),
            write_faults: self.tracker.faults(),
        }
    }

    /// Begins a transaction (blocking while another one runs). Ends with [`Tx::commit`],
    /// [`Tx::commit_async`] or [`PersistentRegion::tx_end`]; dropping it aborts.
    pub fn tx_begin(&self) -> Result<Tx<'_>, PmemError> {
        self.core.committers.fetch_add(1, Ordering::Relaxed);
        let st = lock(&self.tx);
        let broken = match (&st.broken, self.tracker.failure()) {
            (Some(b), _) => Some(b.clone()),
            (None, Some(f)) => Some(format!("write tracking failed: {f}")),
            (None, None) => None,
        };
        if let Some(b) = broken {
            self.core.committers.fetch_sub(1, Ordering::Relaxed);
            return Err(PmemError::Broken(b));
        }
        Ok(Tx { region: self, st: Some(st) })
    }

    /// Commits a transaction begun with [`PersistentRegion::tx_begin`] and waits until durable.
    pub fn tx_end(&self, tx: Tx<'_>) -> Result<(), PmemError> {
        tx.commit()
    }

    /// Runs `f` as a failure-atomic transaction over the region's bytes and waits until it is
    /// durable. If `f` returns `Err` the region is restored and `TxError::Aborted` returned;
    /// if it panics the region is restored and the panic resumed.
    pub fn transaction<R, E>(&self, f: impl FnOnce(&mut [u8]) -> Result<R, E>) -> Result<R, TxError<E>> {
        let (r, handle) = self.transaction_async(f)?;
        if let Some(h) = handle {
            h.wait()?;
        }
        Ok(r)
    }

    /// Like [`PersistentRegion::transaction`] but returns once the record is written; the
    /// handle (`None` if nothing changed) completes when it is durable.
    pub fn transaction_async<R, E>(
        &self,
        f: impl FnOnce(&mut [u8]) -> Result<R, E>,
    ) -> Result<(R, Option<CommitHandle>), TxError<E>> {
        let mut tx = self.tx_begin()?;
        match catch_unwind(AssertUnwindSafe(|| f(tx.as_mut_slice()))) {
            Ok(Ok(r)) => Ok((r, tx.commit_async_opt()?)),
            Ok(Err(e)) => {
                tx.abort();
                Err(TxError::Aborted(e))
            }
            Err(panic) => {
                tx.abort();
                resume(panic)
            }
        }
    }

    /// Starts recording changes to `range`: [`ChangeLog::stop`] persists the pre-images of
    /// the lines that changed meanwhile, so they can be undone with [`PersistentRegion::undo`].
    pub fn log_changes(&self, range: Range<usize>) -> Result<ChangeLog<'_>, PmemError> {
        if range.start > range.end || range.end > self.len() {
            return Err(PmemError::BadRange { start: range.start, end: range.end, len: self.len() });
        }
        let before = self.read(|m| m[range.clone()].to_vec());
        Ok(ChangeLog::new(self, range, before))
    }

    /// Undoes change log `id`: one transaction writes back its pre-images, then the log is
    /// marked undone. A crash in between leaves it not undone; undoing again is harmless.
    pub fn undo(&self, id: ChangeLogId) -> Result<(), PmemError> {
        let lines = lock(&self.changes).lines_of(id)?;
        self.transaction(|mem| {
            for (off, bytes) in &lines {
                mem[*off..*off + bytes.len()].copy_from_slice(bytes);
            }
            Ok::<(), PmemError>(())
        })
        .map_err(|e| match e {
            TxError::Aborted(e) | TxError::Pmem(e) => e,
        })?;
        lock(&self.changes).mark_undone(id)
    }

    /// Change logs recorded in this pool.
    pub fn change_logs(&self) -> Result<Vec<ChangeLogInfo>, PmemError> {
        lock(&self.changes).list()
    }

    pub(crate) fn store_change_log(
        &self,
        range: &Range<usize>,
        before: &[u8],
    ) -> Result<ChangeLogId, PmemError> {
        // Hold the transaction lock while comparing so no transaction runs in between.
        let g = lock(&self.tx);
        // SAFETY: the transaction lock excludes writers while the slice lives.
        let now = unsafe { std::slice::from_raw_parts(self.tracker.base().add(range.start), range.len()) };
        let r = lock(&self.changes).append(range.start, before, now);
        drop(g);
        r
    }

    /// Applies every committed line to the data area and starts a new log epoch.
    pub fn checkpoint(&self) -> Result<(), PmemError> {
        let mut st = lock(&self.tx);
        if let Some(b) = &st.broken {
            return Err(PmemError::Broken(b.clone()));
        }
        let dirty = self.tracker.dirty();
        self.checkpoint_locked(&mut st, Some(&dirty))
    }

    /// The checkpoint proper. `dirty`: pages the running transaction has written, whose
    /// committed contents are in their twins.
    fn checkpoint_locked(&self, st: &mut TxState, dirty: Option<&Dirty>) -> Result<(), PmemError> {
        let r = self.checkpoint_inner(st, dirty);
        if let Err(e) = &r {
            st.broken = Some(format!("checkpoint failed: {e}"));
        }
        r
    }

    fn checkpoint_inner(&self, st: &mut TxState, dirty: Option<&Dirty>) -> Result<(), PmemError> {
        let core = &self.core;
        let written = lock(&core.dur).written;
        core.wait_durable(written)?;
        let pb = self.tracker.page_bytes();
        let base = self.tracker.base();
        let words = std::mem::take(&mut st.unapplied.touched_words);
        for &w in &words {
            let mut bits = std::mem::take(&mut st.unapplied.bits[w]);
            while bits != 0 {
                let first = bits.trailing_zeros() as usize;
                let run = (bits >> first).trailing_ones() as usize;
                let off = (w * 64 + first) * LINE_BYTES;
                let len = run * LINE_BYTES;
                let page = u32::try_from(off / pb).expect("page index fits u32");
                let src = match dirty.and_then(|d| d.twin(page)) {
                    Some(twin) => &twin[off % pb..off % pb + len],
                    // SAFETY: pages outside the running transaction are write-protected and
                    // unchanged while we hold the transaction lock; the range is in the mapping
                    // (a 64-line word never crosses a page of >= 4 KiB).
                    None => unsafe { std::slice::from_raw_parts(base.add(off), len) },
                };
                core.storage
                    .write_at(src, HEADER_BYTES + off as u64)
                    .map_err(PmemError::io("writing committed lines to the data area"))?;
                failpoint::hit("ckpt-data-written");
                bits &= !(((1u128 << run) - 1) as u64).wrapping_shl(first as u32);
            }
        }
        core.storage.sync().map_err(PmemError::io("syncing the data area"))?;
        core.n.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        failpoint::hit("ckpt-data-synced");
        let new = Header { seq: st.header.seq + 1, checkpoint_lsn: st.next_lsn, ..st.header };
        core.storage
            .write_at(&new.encode(), new.slot_offset())
            .map_err(PmemError::io("writing the pool header"))?;
        failpoint::hit("ckpt-header-written");
        core.storage.sync().map_err(PmemError::io("syncing the pool header"))?;
        core.n.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        failpoint::hit("ckpt-header-synced");
        st.header = new;
        st.tail = 0;
        core.n.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn resume<T>(panic: Box<dyn Any + Send>) -> T {
    resume_unwind(panic)
}

impl Drop for PersistentRegion {
    fn drop(&mut self) {
        // A clean close leaves an empty log, so the next open has nothing to replay.
        {
            let mut st = lock(&self.tx);
            if st.broken.is_none() {
                let dirty = self.tracker.dirty();
                let _ = self.checkpoint_locked(&mut st, Some(&dirty));
            }
        }
        lock(&self.core.dur).shutdown = true;
        self.core.cv.notify_all();
        if let Some(h) = self.syncer.take() {
            let _ = h.join();
        }
    }
}

/// A running transaction. Dropping it without committing aborts it.
#[derive(Debug)]
pub struct Tx<'r> {
    region: &'r PersistentRegion,
    st: Option<MutexGuard<'r, TxState>>,
}

impl Tx<'_> {
    /// The region's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the transaction holds the region's transaction lock for its whole life, and
        // the returned borrow is tied to `&mut self`, so this is the only live access.
        unsafe { std::slice::from_raw_parts_mut(self.region.tracker.base(), self.region.len()) }
    }

    /// The region's start, for code that works with raw pointers; valid for `len()` bytes
    /// until the transaction ends.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.region.tracker.base()
    }

    /// Commits and waits until durable.
    pub fn commit(self) -> Result<(), PmemError> {
        match self.commit_async_opt()? {
            Some(h) => {
                h.wait()?;
                failpoint::hit("log-synced");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Commits and returns once the record is written (not yet durable); the handle's
    /// `wait()` returns when it is. Nothing changed: the handle is already complete.
    pub fn commit_async(self) -> Result<CommitHandle, PmemError> {
        let core = Arc::clone(&self.region.core);
        Ok(match self.commit_async_opt()? {
            Some(h) => {
                let mut g = lock(&core.dur);
                g.async_target = g.async_target.max(h.lsn);
                drop(g);
                core.cv.notify_all();
                h
            }
            None => CommitHandle { core, lsn: 0 },
        })
    }

    /// Rolls the transaction back.
    pub fn abort(mut self) {
        self.abort_inner();
    }

    fn abort_inner(&mut self) {
        let Some(mut st) = self.st.take() else { return };
        let mut dirty = self.region.tracker.dirty();
        self.region.restore(&mut st, &mut dirty);
        self.region.core.n.aborts.fetch_add(1, Ordering::Relaxed);
        self.region.core.committers.fetch_sub(1, Ordering::Relaxed);
    }

    fn commit_async_opt(mut self) -> Result<Option<CommitHandle>, PmemError> {
        let mut st = self.st.take().expect("transaction still open");
        let region = self.region;
        let r = region.commit_locked(&mut st);
        drop(st);
        region.core.committers.fetch_sub(1, Ordering::Relaxed);
        r.map(|lsn| lsn.map(|lsn| CommitHandle { core: Arc::clone(&region.core), lsn }))
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        self.abort_inner();
    }
}

impl PersistentRegion {
    /// Diffs the written pages against their twins, appends the changed bytes as one redo
    /// record and re-protects the pages. Returns the record's LSN (`None`: nothing changed).
    /// On failure the transaction is rolled back.
    fn commit_locked(&self, st: &mut TxState) -> Result<Option<u64>, PmemError> {
        let mut dirty = self.tracker.dirty();
        if let Some(f) = self.tracker.failure() {
            let why = format!("write tracking failed: {f}");
            st.broken = Some(why.clone());
            return Err(PmemError::Broken(why));
        }
        if dirty.pages().is_empty() {
            return Ok(None);
        }
        let pb = self.tracker.page_bytes();
        let base = self.tracker.base();
        st.rec.reset();
        st.new_lines.clear();
        let mut changed = 0u64;
        for &page in dirty.pages() {
            let twin = dirty.twin(page).expect("dirty page has a twin");
            let page_off = page as usize * pb;
            // SAFETY: inside the mapping; the transaction lock makes us the only writer.
            let live = unsafe { std::slice::from_raw_parts(base.add(page_off), pb) };
            for (l, (new, old)) in
                live.chunks_exact(LINE_BYTES).zip(twin.chunks_exact(LINE_BYTES)).enumerate()
            {
                if new == old {
                    continue;
                }
                let differs = |(a, b): (&u8, &u8)| a != b;
                let first = new.iter().zip(old).position(differs).expect("lines differ");
                let last = new.iter().zip(old).rposition(differs).expect("lines differ");
                changed += new.iter().zip(old).filter(|&(a, b)| a != b).count() as u64;
                let line_off = page_off + l * LINE_BYTES;
                st.rec.push((line_off + first) as u64, &new[first..=last]);
                st.new_lines.push(line_off / LINE_BYTES);
            }
        }
        if st.rec.is_empty() {
            // Written but unchanged: nothing to log.
            self.reprotect(st, &mut dirty)?;
            return Ok(None);
        }
        let total = st.rec.len() as u64;
        if total > st.header.log_bytes {
            self.restore(st, &mut dirty);
            return Err(PmemError::TxTooLarge { record_bytes: total, log_bytes: st.header.log_bytes });
        }
        if st.tail + total > st.header.log_bytes {
            if let Err(e) = self.checkpoint_locked(st, Some(&dirty)) {
                self.restore(st, &mut dirty);
                return Err(e);
            }
        }
        let lsn = st.next_lsn;
        let at = st.header.log_offset() + st.tail;
        let seq = st.header.seq;
        let storage = &self.core.storage;
        let record = st.rec.finish(seq, lsn);
        if failpoint::fires("log-torn") {
            let _ = storage.write_at(&record[..record.len() / 2], at);
            failpoint::crash_now();
        }
        if let Err(e) = storage.write_at(record, at) {
            self.restore(st, &mut dirty);
            return Err(PmemError::Io { what: "appending to the redo log".into(), source: e });
        }
        failpoint::hit("log-written");
        st.tail += total;
        st.next_lsn += 1;
        lock(&self.core.dur).written = lsn;
        let lines = std::mem::take(&mut st.new_lines);
        for &line in &lines {
            st.unapplied.mark_line(line);
        }
        st.new_lines = lines;
        self.reprotect(st, &mut dirty)?;
        let n = &self.core.n;
        n.commits.fetch_add(1, Ordering::Relaxed);
        n.log_bytes.fetch_add(total, Ordering::Relaxed);
        n.changed_bytes.fetch_add(changed, Ordering::Relaxed);
        Ok(Some(lsn))
    }

    /// Copies every written page's twin back and re-protects it.
    fn restore(&self, st: &mut TxState, dirty: &mut Dirty) {
        let pb = self.tracker.page_bytes();
        for &page in dirty.pages() {
            let twin = dirty.twin(page).expect("dirty page has a twin");
            // SAFETY: pages in the dirty set are unprotected (the handler unprotects before
            // releasing the dirty lock, which we hold), the range is inside the mapping, and
            // the transaction lock excludes other accesses.
            unsafe {
                std::ptr::copy_nonoverlapping(twin.as_ptr(), self.tracker.base().add(page as usize * pb), pb);
            };
        }
        let _ = self.reprotect(st, dirty);
    }

    /// Write-protects the written pages again and forgets their twins.
    fn reprotect(&self, st: &mut TxState, dirty: &mut Dirty) -> Result<(), PmemError> {
        let r = self.tracker.protect_pages(dirty.pages());
        dirty.clear();
        r.map_err(|e| {
            let why = format!("re-protecting written pages failed: {e}");
            st.broken = Some(why.clone());
            PmemError::Broken(why)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::storage::SimDisk;

    const SIZE: usize = 64 << 10;

    fn sim_region(disk: &SimDisk, log_bytes: u64) -> Result<PersistentRegion, PmemError> {
        let opts = RegionOptions { log_bytes: Some(log_bytes), changes: Some(Arc::new(SimDisk::new())) };
        PersistentRegion::open_storage(Arc::new(disk.clone()), SIZE, opts)
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("clustermem-pmem-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(changes_path(&p));
        p
    }

    fn put(mem: &mut [u8], at: usize, v: u64) {
        mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn committed_data_survives_reopen_of_a_file() {
        let p = tmp("reopen.pool");
        let r = PersistentRegion::open(&p, SIZE).unwrap();
        r.transaction(|m| {
            put(m, 100, 7);
            put(m, 40_000, 9);
            Ok::<_, ()>(())
        })
        .unwrap();
        let s = r.stats();
        assert_eq!(s.commits, 1);
        // Two 8-byte values in two lines: the record carries only changed bytes.
        assert!(s.log_bytes < 80, "{s:?}");
        drop(r);
        let r = PersistentRegion::open(&p, SIZE).unwrap();
        r.read(|m| {
            assert_eq!(m[100..108], 7u64.to_le_bytes());
            assert_eq!(m[40_000..40_008], 9u64.to_le_bytes());
        });
    }

    #[test]
    fn uncheckpointed_commits_are_replayed_from_the_log() {
        let disk = SimDisk::new();
        let r = sim_region(&disk, 16 << 10).unwrap();
        for i in 0..10u64 {
            r.transaction(|m| {
                put(m, (i as usize) * 4096 + 8, i + 1);
                Ok::<_, ()>(())
            })
            .unwrap();
        }
        let expected = r.snapshot();
        // Crash now: only synced bytes (the log) survive; the data area was never written.
        let after = disk.crash(&mut SplitMix64::new(1));
        std::mem::forget(r);
        assert_eq!(read_committed_storage(&after).unwrap(), expected);
        let r2 = sim_region(&after, 16 << 10).unwrap();
        assert_eq!(r2.snapshot(), expected);
        assert_eq!(r2.stats().recovered_records, 10);
    }

    #[test]
    fn abort_on_error_and_on_panic_restores_contents() {
        let disk = SimDisk::new();
        let r = sim_region(&disk, 16 << 10).unwrap();
        r.transaction(|m| {
            put(m, 0, 1);
            Ok::<_, ()>(())
        })
        .unwrap();
        let before = r.snapshot();
        let e = r.transaction(|m| {
            m.fill(0xAA);
            Err::<(), _>("no")
        });
        assert!(matches!(e, Err(TxError::Aborted("no"))));
        assert_eq!(r.snapshot(), before);
        let p = catch_unwind(AssertUnwindSafe(|| {
            r.transaction(|m| -> Result<(), ()> {
                m[5000] = 3;
                panic!("inside a transaction")
            })
        }));
        assert!(p.is_err());
        assert_eq!(r.snapshot(), before);
        // Dropping an explicit transaction aborts it too; tx_end commits.
        let mut tx = r.tx_begin().unwrap();
        tx.as_mut_slice()[9] = 9;
        drop(tx);
        assert_eq!(r.snapshot(), before);
        let mut tx = r.tx_begin().unwrap();
        tx.as_mut_slice()[9] = 9;
        r.tx_end(tx).unwrap();
        assert_eq!(r.snapshot()[9], 9);
        assert_eq!(r.stats().aborts, 3);
        // And nothing of the aborted writes reached storage.
        std::mem::forget(r);
        assert_eq!(read_committed_storage(&disk.crash(&mut SplitMix64::new(2))).unwrap()[5000], 0);
    }

    #[test]
    fn a_write_outside_a_transaction_joins_the_next_one() {
        let disk = SimDisk::new();
        let r = sim_region(&disk, 16 << 10).unwrap();
        // SAFETY: test-only write inside the region, no transaction running on other threads.
        unsafe { *r.as_ptr().cast_mut().add(77) = 5 };
        assert_eq!(r.snapshot()[77], 5);
        // Aborting the next transaction rolls it back...
        r.tx_begin().unwrap().abort();
        assert_eq!(r.snapshot()[77], 0);
        // ...committing it makes it durable.
        // SAFETY: as above.
        unsafe { *r.as_ptr().cast_mut().add(77) = 6 };
        r.tx_begin().unwrap().commit().unwrap();
        std::mem::forget(r);
        assert_eq!(read_committed_storage(&disk.crash(&mut SplitMix64::new(3))).unwrap()[77], 6);
    }

    #[test]
    fn a_full_log_checkpoints_and_too_large_a_transaction_is_refused() {
        let disk = SimDisk::new();
        let r = sim_region(&disk, 4096).unwrap();
        for i in 0..400usize {
            r.transaction(|m| {
                put(m, (i * 72) % (SIZE - 8), i as u64);
                Ok::<_, ()>(())
            })
            .unwrap();
        }
        assert!(r.stats().checkpoints > 2);
        let expected = r.snapshot();
        let e = r.transaction(|m| {
            m.fill(1);
            Ok::<_, ()>(())
        });
        assert!(matches!(e, Err(TxError::Pmem(PmemError::TxTooLarge { .. }))), "{e:?}");
        assert_eq!(r.snapshot(), expected);
        std::mem::forget(r);
        assert_eq!(read_committed_storage(&disk.crash(&mut SplitMix64::new(4))).unwrap(), expected);
    }

    #[test]
    fn header_damage_is_refused_with_a_clear_error_and_nothing_is_changed() {
        let p = tmp("damage.pool");
        drop(PersistentRegion::open(&p, SIZE).unwrap());
        let good = std::fs::read(&p).unwrap();
        let check = |bytes: &[u8], size: usize, want: &str| {
            std::fs::write(&p, bytes).unwrap();
            let e = PersistentRegion::open(&p, size).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert_eq!(std::fs::read(&p).unwrap(), bytes, "a refused pool must be left untouched");
        };
        let mut bad = good.clone();
        bad[..SLOTS_BYTES].fill(0x11);
        check(&bad, SIZE, "not a clustermem pool");
        let mut bad = good.clone();
        bad[20] ^= 1;
        bad[512 + 20] ^= 1;
        check(&bad, SIZE, "checksum");
        let mut bad = good.clone();
        for slot in [0usize, 512] {
            bad[slot + 8] = 9;
            let crc = crc32c::crc32c(&bad[slot..slot + 48]);
            bad[slot + 48..slot + 52].copy_from_slice(&crc.to_le_bytes());
        }
        check(&bad, SIZE, "version 9 is not supported");
        check(&good, SIZE * 2, "holds a region of 65536 bytes, but 131072");
        check(&good[..good.len() - 4096], SIZE, "truncated or damaged");
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(PersistentRegion::open(&p, SIZE), Err(PmemError::NotAPool)));
        assert!(matches!(
            PersistentRegion::open(tmp("odd.pool"), 1000),
            Err(PmemError::InvalidSize { bytes: 1000, .. })
        ));
    }

    #[test]
    fn change_log_undo_restores_pre_images_after_reopen() {
        let p = tmp("changes.pool");
        let r = PersistentRegion::open(&p, SIZE).unwrap();
        r.transaction(|m| {
            put(m, 1000, 1);
            Ok::<_, ()>(())
        })
        .unwrap();
        let log = r.log_changes(960..2000).unwrap();
        r.transaction(|m| {
            put(m, 1000, 2);
            put(m, 1900, 3);
            put(m, 3000, 4); // outside the logged range: not undone
            Ok::<_, ()>(())
        })
        .unwrap();
        let id = log.stop().unwrap();
        drop(r);
        let r = PersistentRegion::open(&p, SIZE).unwrap();
        assert_eq!(r.change_logs().unwrap(), vec![ChangeLogInfo { id, lines: 2, undone: false }]);
        r.undo(id).unwrap();
        r.read(|m| {
            assert_eq!(m[1000..1008], 1u64.to_le_bytes());
            assert_eq!(m[1900..1908], [0; 8]);
            assert_eq!(m[3000..3008], 4u64.to_le_bytes());
        });
        assert!(matches!(r.undo(id), Err(PmemError::UnknownChangeLog(_))));
        drop(r);
        let r = PersistentRegion::open(&p, SIZE).unwrap();
        assert!(r.change_logs().unwrap()[0].undone);
        assert_eq!(r.snapshot()[1000], 1);
    }

    #[test]
    fn group_commit_from_several_threads_keeps_every_commit() {
        let p = tmp("group.pool");
        let r = PersistentRegion::open(&p, SIZE).unwrap();
        std::thread::scope(|s| {
            for t in 0..4usize {
                let r = &r;
                s.spawn(move || {
                    for i in 0..50usize {
                        if i % 2 == 0 {
                            r.transaction(|m| {
                                put(m, (t * 50 + i) * 64, (t * 1000 + i) as u64 + 1);
                                Ok::<_, ()>(())
                            })
                            .unwrap();
                        } else {
                            let mut tx = r.tx_begin().unwrap();
                            put(tx.as_mut_slice(), (t * 50 + i) * 64, (t * 1000 + i) as u64 + 1);
                            let h = tx.commit_async().unwrap();
                            h.wait().unwrap();
                        }
                    }
                });
            }
        });
        let s = r.stats();
        assert_eq!(s.commits, 200);
        drop(r);
        let m = read_committed(&p).unwrap();
        for t in 0..4usize {
            for i in 0..50usize {
                let at = (t * 50 + i) * 64;
                assert_eq!(m[at..at + 8], ((t * 1000 + i) as u64 + 1).to_le_bytes());
            }
        }
    }

    #[test]
    fn an_async_commit_becomes_durable_without_waiting() {
        let disk = SimDisk::new();
        let r = sim_region(&disk, 16 << 10).unwrap();
        let mut tx = r.tx_begin().unwrap();
        tx.as_mut_slice()[0] = 1;
        let h = tx.commit_async().unwrap();
        // The background syncer completes it; poll without blocking on the handle.
        while !h.is_durable() {
            std::thread::yield_now();
        }
        std::mem::forget(r);
        assert_eq!(read_committed_storage(&disk.crash(&mut SplitMix64::new(5))).unwrap()[0], 1);
    }

    /// Random transactions on a simulated disk, crashed at a random write (torn, reordered
    /// unsynced writes), with crashes during recovery too: the recovered state must be exactly
    /// the state after transaction k, acknowledged <= k <= last begun.
    #[test]
    fn simulated_disk_crashes_recover_an_exact_committed_prefix() {
        let (mut lost_unsynced, mut unacked_survived) = (0, 0);
        for seed in 0..120u64 {
            let (k, acked, last) = sim_case(seed);
            lost_unsynced += usize::from(k < last);
            unacked_survived += usize::from(k > acked);
        }
        // The cases must cover both sides of the window, or they prove little.
        assert!(lost_unsynced > 5 && unacked_survived > 5, "{lost_unsynced} {unacked_survived}");
    }

    /// Returns (recovered k, acknowledged k, last k begun).
    fn sim_case(seed: u64) -> (usize, usize, usize) {
        let mut rng = SplitMix64::new(seed);
        let disk = SimDisk::new();
        let log = 4096 * (1 + rng.below(4));
        let r = sim_region(&disk, log).unwrap();
        disk.fail_after_writes(rng.below(200));
        let mut states = vec![r.snapshot()];
        let mut acked = 0usize;
        let mut handles = Vec::new();
        for _ in 0..rng.below(80) {
            let abort = rng.below(5) == 0;
            let mut next = None;
            let tx_seed = rng.next_u64();
            let body = |m: &mut [u8]| {
                let mut t = SplitMix64::new(tx_seed);
                let most = if t.below(8) == 0 { 300 } else { 6 };
                for _ in 0..1 + t.below(most) {
                    let at = t.below((SIZE - 8) as u64) as usize;
                    put(m, at, t.next_u64());
                }
                next = Some(m.to_vec());
                if abort {
                    Err(())
                } else {
                    Ok(())
                }
            };
            let res = if rng.below(3) == 0 {
                r.transaction_async(body).map(|((), h)| handles.extend(h))
            } else {
                r.transaction(body)
            };
            match res {
                Ok(()) => {
                    states.push(next.expect("body ran"));
                    if handles.is_empty() || rng.below(2) == 0 {
                        let ok = handles.drain(..).all(|h: CommitHandle| h.wait().is_ok());
                        if !ok {
                            break;
                        }
                        acked = states.len() - 1;
                    }
                }
                Err(TxError::Aborted(())) => {}
                Err(TxError::Pmem(_)) => {
                    // The disk died mid-commit: this one may or may not have made it.
                    if let Some(n) = next {
                        states.push(n);
                    }
                    break;
                }
            }
        }
        let mut img = disk.crash(&mut rng);
        std::mem::forget(r);
        // Crash during recovery, a few times, then recover for real.
        for _ in 0..rng.below(3) {
            img.fail_after_writes(rng.below(12));
            if let Ok(r) = sim_region(&img, log) {
                std::mem::forget(r);
            }
            img = img.crash(&mut rng);
        }
        let got = read_committed_storage(&img).unwrap();
        let k = states.iter().rposition(|s| *s == got);
        assert!(
            matches!(k, Some(k) if k >= acked),
            "seed {seed}: recovered state is not a committed prefix >= {acked} (of {})",
            states.len() - 1
        );
        let r = sim_region(&img, log).unwrap();
        assert_eq!(r.snapshot(), got, "seed {seed}: open and read_committed disagree");
        (k.unwrap_or(0), acked, states.len() - 1)
    }
}
