//! The cluster memory of one process: a reserved region (the arena) carved into the program's
//! large allocations, and the bookkeeping behind them.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, OnceLock};

use clustermem_runtime::{Region, Runtime, RuntimeError, PAGE_SIZE};

use crate::arena::Arena;
use crate::small::SmallHeap;

/// The live state, once the constructor has started the runtime.
pub(crate) static STATE: OnceLock<State> = OnceLock::new();
/// Set in a child made by `fork`: the runtime's thread did not survive the fork, and its
/// parent's cluster memory is either not mapped in it (the arena is MADV_DONTFORK) or an
/// ordinary copy (`SHARED_WITH_CHILD`).
pub(crate) static FORKED: AtomicBool = AtomicBool::new(false);
/// Set from just before a fork whose child gets a copy of the arena until the parent is
/// past it (in the child: for good).
pub(crate) static SHARED_WITH_CHILD: AtomicBool = AtomicBool::new(false);
/// The arena's bounds, readable from a signal handler.
pub(crate) static ARENA_BASE: AtomicUsize = AtomicUsize::new(0);
pub(crate) static ARENA_LEN: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on threads whose memory must never be routed: the fault handler (it serves region
    /// memory, so it cannot live in it) and the constructor while it starts the runtime.
    static BYPASS: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as one whose mappings stay ordinary.
pub(crate) fn set_bypass(on: bool) {
    BYPASS.with(|b| b.set(on));
}

/// Whether the calling thread's memory stays ordinary (see `set_bypass` and `bypassed`).
pub(crate) fn bypassing() -> bool {
    BYPASS.with(Cell::get)
}

/// Says why the hosts refused memory the program asked for (it gets ENOMEM): at most one
/// line a second, with how many more were refused meanwhile, since a program may retry
/// every allocation (python retried 229,267 mmaps when a host was lost).
pub(crate) fn say_refused(what: std::fmt::Arguments<'_>) {
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if LAST_SECOND.swap(now, Relaxed) == now {
        SINCE.fetch_add(1, Relaxed);
        return;
    }
    match SINCE.swap(0, Relaxed) {
        0 => eprintln!("clustermem: {what}"),
        more => eprintln!("clustermem: {what} ({more} more refused since the last such line)"),
    }
}

/// Runs `f` (a call into the runtime) with this thread's allocations kept ordinary: the
/// reply channel and the thread's parking state that std allocates for a blocking call are
/// touched by the fault handler, which must never fault on region memory itself (it would
/// wait for itself).
pub(crate) fn bypassed<T>(f: impl FnOnce() -> T) -> T {
    let before = BYPASS.with(|b| b.replace(true));
    let result = f();
    BYPASS.with(|b| b.set(before));
    result
}

/// The state, when this thread's memory is to be routed into cluster memory.
pub(crate) fn active() -> Option<&'static State> {
    if FORKED.load(Relaxed) || BYPASS.with(Cell::get) {
        return None;
    }
    STATE.get()
}

/// Why an allocation could not be placed in cluster memory.
#[derive(Debug)]
pub(crate) enum PlaceError {
    /// The arena's address space is used up: the mapping stays ordinary memory.
    ArenaFull,
    /// The hosts refused the memory (full, or gone): the program gets ENOMEM.
    Refused(RuntimeError),
}

#[derive(Debug)]
struct Book {
    arena: Arena,
    /// Slab spans that have host memory.
    committed: Vec<bool>,
    /// Blocks handed out by malloc and friends: start offset -> length.
    blocks: BTreeMap<usize, usize>,
    /// End of the highest byte ever handed out (the arena's high-water mark).
    high_water: usize,
}

/// The arena and its books. Offsets are relative to `base`; lengths whole pages.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) runtime: &'static Runtime,
    region: Region<'static>,
    pub(crate) base: usize,
    pub(crate) len: usize,
    /// Mappings and allocations of at least this many bytes are routed.
    pub(crate) min_bytes: usize,
    span_bytes: usize,
    book: Mutex<Book>,
    warned_full: AtomicBool,
    /// Malloc blocks below `min_bytes` (glibc's allocator only).
    pub(crate) small: SmallHeap,
}

pub(crate) fn page_round(len: usize) -> Option<usize> {
    len.checked_add(PAGE_SIZE - 1).map(|l| l & !(PAGE_SIZE - 1))
}

impl State {
    pub(crate) fn new(
        runtime: &'static Runtime,
        region: Region<'static>,
        min_bytes: usize,
        span_bytes: usize,
    ) -> Self {
        let (base, len) = (region.as_ptr() as usize, region.len());
        Self {
            runtime,
            book: Mutex::new(Book {
                arena: Arena::new(len),
                committed: vec![false; len.div_ceil(span_bytes)],
                blocks: BTreeMap::new(),
                high_water: 0,
            }),
            region,
            base,
            len,
            min_bytes,
            span_bytes,
            warned_full: AtomicBool::new(false),
            small: SmallHeap::new(len),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The arena's first and one-past-last addresses.
    pub(crate) fn bounds(&self) -> (usize, usize) {
        (self.base, self.base + self.len)
    }

    /// Whether `addr..addr + len` overlaps the arena.
    pub(crate) fn overlaps(&self, addr: usize, len: usize) -> bool {
        addr < self.base + self.len && addr.saturating_add(len) > self.base
    }

    /// Whether `addr..addr + len` lies inside the arena.
    pub(crate) fn contains(&self, addr: usize, len: usize) -> bool {
        addr >= self.base && addr.checked_add(len).is_some_and(|end| end <= self.base + self.len)
    }

    /// Makes sure host memory backs `off..off + len` (called with the book locked, so two
    /// threads never commit one span twice).
    fn commit(&self, book: &mut Book, off: usize, len: usize) -> Result<(), RuntimeError> {
        let spans = off / self.span_bytes..=(off + len - 1) / self.span_bytes;
        if book.committed[spans.clone()].iter().all(|&c| c) {
            return Ok(());
        }
        let start = spans.start() * self.span_bytes;
        let end = ((spans.end() + 1) * self.span_bytes).min(self.len);
        bypassed(|| self.region.commit(start, end - start))?;
        book.committed[spans].fill(true);
        Ok(())
    }

    /// Places `len` bytes (whole pages), aligned to `align`, and returns their address. The
    /// memory reads as zeros.
    pub(crate) fn allocate(&self, len: usize, align: usize) -> Result<usize, PlaceError> {
        let mut book = self.book();
        let Some(off) = book.arena.alloc(len, align.max(PAGE_SIZE)) else {
            if !self.warned_full.swap(true, Relaxed) {
                eprintln!(
                    "clustermem: the cluster-memory arena ({} bytes of address space) is used up; \
                     further large mappings of this process are ordinary local memory \
                     (raise it with `clustermem run --arena SIZE`)",
                    self.len
                );
            }
            return Err(PlaceError::ArenaFull);
        };
        if let Err(e) = self.commit(&mut book, off, len) {
            book.arena.release(off, len);
            return Err(PlaceError::Refused(e));
        }
        book.high_water = book.high_water.max(off + len);
        Ok(self.base + off)
    }

    /// Marks `addr..addr + len` (inside the arena) as handed out, whatever it held: for a
    /// MAP_FIXED mapping over the arena. Its contents are discarded (it reads as zeros).
    pub(crate) fn allocate_at(&self, addr: usize, len: usize) -> Result<(), RuntimeError> {
        let off = addr - self.base;
        bypassed(|| self.region.discard(off, len))?;
        let mut book = self.book();
        book.arena.release(off, len);
        let taken = book.arena.take(off, len);
        debug_assert!(taken, "just released");
        self.commit(&mut book, off, len)?;
        book.high_water = book.high_water.max(off + len);
        Ok(())
    }

    /// Grows the allocation `addr..addr + old` to `new` bytes in place if the pages after it
    /// are free (and can be committed).
    pub(crate) fn grow_in_place(&self, addr: usize, old: usize, new: usize) -> bool {
        let off = addr - self.base;
        if off + new > self.len {
            return false;
        }
        let mut book = self.book();
        if !book.arena.take(off + old, new - old) {
            return false;
        }
        if self.commit(&mut book, off + old, new - old).is_err() {
            book.arena.release(off + old, new - old);
            return false;
        }
        book.high_water = book.high_water.max(off + new);
        true
    }

    /// Frees `addr..addr + len` (inside the arena): its memory is dropped here and on the host
    /// and the range can be handed out again.
    pub(crate) fn free(&self, addr: usize, len: usize) -> Result<(), RuntimeError> {
        self.discard(addr, len)?;
        self.book().arena.release(addr - self.base, len);
        Ok(())
    }

    /// Drops the contents of `addr..addr + len` (inside the arena); it stays handed out.
    pub(crate) fn discard(&self, addr: usize, len: usize) -> Result<(), RuntimeError> {
        bypassed(|| self.region.discard(addr - self.base, len))
    }

    /// Records a malloc block.
    pub(crate) fn add_block(&self, addr: usize, len: usize) {
        self.book().blocks.insert(addr - self.base, len);
    }

    /// The length of the malloc block at `addr`, if one starts there.
    pub(crate) fn block_len(&self, addr: usize) -> Option<usize> {
        self.book().blocks.get(&(addr - self.base)).copied()
    }

    /// Changes (or with `None` forgets) the recorded length of the malloc block at `addr`.
    pub(crate) fn set_block(&self, addr: usize, len: Option<usize>) -> Option<usize> {
        let mut book = self.book();
        match len {
            Some(len) => book.blocks.insert(addr - self.base, len),
            None => book.blocks.remove(&(addr - self.base)),
        }
    }

    /// The arena's high-water mark: bytes of address space ever handed out.
    pub(crate) fn high_water(&self) -> usize {
        self.book().high_water
    }

    /// The first data loss of the region, if any.
    pub(crate) fn region_error(&self) -> Option<String> {
        self.region.error()
    }
}
