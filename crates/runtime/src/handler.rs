//! The fault handler: one thread that owns every page table, policy and host connection of a
//! runtime, so the fault path takes no lock.
//!
//! Data flows one way: fault -> page state -> request on the page's host link -> reply ->
//! `UFFDIO_COPY` (which wakes the faulting thread) -> eviction if over the local limit.
//! Faults from many threads are pipelined: the handler reads every pending fault, sends every
//! fetch, then installs replies as they come, so N threads get N fetches in flight.
//!
//! Page life cycle (flags in [`PageState`]):
//! - not resident: reads as zeros locally (never written back) or from its host (`ON_HOST`);
//! - `FETCHING`: a fetch is in flight; further faults on it just wait for the install;
//! - resident clean: installed write-protected, so the first store faults and marks it dirty;
//! - resident `DIRTY`: writable; evicting it write-protects first (a racing writer then waits
//!   in the fault queue), queues the write-back from the page itself, then drops it.
//!   Requests on a link are answered in order, so a later fetch of it sees the write.
//! - `LOST`: its host died; a touch gets `SIGBUS` (poisoned), never a silent zero page.
//! - `PREFETCHED`: requested or installed by a prefetch, not yet seen in use. A fault on it
//!   while in flight sets `WANTED`: a thread now waits for it, so it is never abandoned.
//!
//! Under async dirty tracking (`async_tracking.rs`) there are no write-protect faults and no
//! `DIRTY` pages: the kernel records stores, the flusher and eviction ask it with
//! `PAGEMAP_SCAN`, and eviction moves pages out instead of write-protecting them. (Nor does
//! the eviction policy or the prefetch accounting see first stores then.)

mod async_tracking;
mod colocate;
mod pointer_chase;
mod redundant;

use async_tracking::AsyncTracker;

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustermem_net::{FrameReader, RecvError};
use clustermem_proto::{Message, LINE_SIZE, PAGE_SIZE};
use clustermem_uffd::{CopyOutcome, Event, RegisterMode, Uffd};

use crate::dirty::{Twin, TwinPool, WritebackMode};
use crate::drop_pages::PageDropper;
use crate::policy::{EvictionPolicy, PageKey, PageMap};
use crate::prefetch::{PrefetchMode, StreamKey, Streams};
use crate::redundancy::{Coder, Redundancy};
use crate::stats::RuntimeStats;
use crate::transport::{self, Link, Pending};
use crate::wakeup::Wakeup;
use crate::RuntimeError;

/// Per-page flags, one byte a page.
struct PageState;
impl PageState {
    const ON_HOST: u8 = 1;
    const RESIDENT: u8 = 2;
    const DIRTY: u8 = 4;
    const FETCHING: u8 = 8;
    const LOST: u8 = 16;
    /// Requested or installed by a prefetch and not yet known to be used.
    const PREFETCHED: u8 = 32;
    /// A thread faulted on it while its prefetch was in flight and waits for the install.
    const WANTED: u8 = 64;
    /// Whether it gets written tells the write predictor nothing: it was installed dirty on
    /// a prediction, or a flush made it clean after it was written. (A predicted page's diff
    /// could tell, but only in line mode: the predictor learns from its unpredicted samples
    /// alone, so that both write-back modes take the same faults.)
    const UNTRACKED: u8 = 128;

    /// Whether a page in `state` is held only by its hosts: not here, not on its way, not
    /// lost (what a fetch may be sent for).
    fn only_on_host(state: u8) -> bool {
        state & Self::ON_HOST != 0 && state & (Self::RESIDENT | Self::FETCHING | Self::LOST) == 0
    }
}

/// Wire bytes of a whole-page write-back (header, slab and page ids, data): what a
/// page-granular system sends per dirty page.
const PAGE_FRAME_BYTES: u64 = (clustermem_proto::HEADER_LEN + 16 + PAGE_SIZE) as u64;

/// Past 1/TWIN_SHARE of local memory in twins, the pages holding them are flushed early.
const TWIN_SHARE: usize = 8;

/// Pages the periodic flusher writes back per round of the handler loop: faults are served
/// between chunks, and the send buffers stay a few MiB instead of growing (and being faulted
/// in afresh) to hold every dirty page at once.
const FLUSH_CHUNK_PAGES: usize = 512;

/// How far over the local-memory limit one round of the handler loop may go before it evicts.
const EVICTION_SLACK_PAGES: usize = 64;

/// How long eviction waits after a woken thread resumes for its next fault.
const EVICTION_DEFER: Duration = Duration::from_micros(10);

/// Fresh pages filled with zeros at once for a program writing fresh memory in order.
const ZERO_RUN: usize = 16;
/// Streams of fresh memory written in order followed per region (see `zero_tails`).
const ZERO_STREAMS: usize = 4;

/// A new connection to host (index) that was found dead.
type RedialResult = (usize, Result<(Link, FrameReader), RuntimeError>);

/// How long a reconnection to a host whose connection dropped may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that fails again this many times in a row without a single answer between
/// is given up: the host is dead.
const MAX_RECONNECTS_IN_A_ROW: u32 = 3;
/// A connection that failed after being up this long starts a fresh count of reconnections.
const STAYED_UP: Duration = Duration::from_secs(10);
/// How often a dead host is tried again.
const REDIAL_INTERVAL: Duration = Duration::from_secs(1);

/// How long the handler polls, rather than sleeps, for the rest of a read's shards after
/// one arrived.
const GATHER_SPIN: Duration = Duration::from_micros(30);

/// How long rebuilding waits after finding no host to rebuild onto.
const REBUILD_RETRY: Duration = Duration::from_secs(1);

/// How long a low-latency handler keeps busy-polling after its last fault.
const SPIN_WINDOW: Duration = Duration::from_micros(100);
/// How long after reading a fault any handler busy-polls for the reply while a read a thread
/// waits on is out: the thread is blocked anyway, and a handler asleep in `poll` costs ~8 us
/// more to wake on a VM. A remote fault's p50 in `bench random` (default mode) was 6 us lower
/// with it (45.9 -> 39.8 us, with and without alternating every 8 ms within one run).
const REPLY_SPIN: Duration = Duration::from_micros(50);

/// Requests from `Runtime`/`Region` handles to the handler thread.
pub(crate) enum Command {
    AddRegion {
        base: usize,
        len: usize,
        /// Allocate host memory now (true) or only when `Commit` asks (a reserved region).
        commit: bool,
        prefetch: PrefetchMode,
        redundancy: Redundancy,
        reply: Sender<Result<u32, RuntimeError>>,
        error: Arc<Mutex<Option<String>>>,
    },
    /// Make sure host memory backs pages `first..first + count` of a region.
    Commit {
        id: u32,
        first: usize,
        count: usize,
        reply: Sender<Result<(), RuntimeError>>,
    },
    /// Forget pages `first..first + count`: they read as zeros afterwards, locally and on
    /// their host.
    Discard {
        id: u32,
        first: usize,
        count: usize,
        reply: Sender<Result<(), RuntimeError>>,
    },
    RemoveRegion {
        id: u32,
        reply: Sender<()>,
    },
    Flush {
        id: u32,
        reply: Sender<Result<(), RuntimeError>>,
    },
    /// Stop evicting (until `ResumeEviction`) if a forked child may share the regions'
    /// pages, and say whether it may (see `Runtime::pause_eviction_for_fork`).
    PauseEvictionForFork {
        reply: Sender<bool>,
    },
    ResumeEviction,
    Shutdown,
}

/// One host slab: a copy or a shard of a slab-sized span of a region.
#[derive(Debug, Clone, Copy)]
struct SlabRef {
    host: usize,
    slab_id: u64,
    bytes: u64,
}

/// Whether a shard holds its data.
#[derive(Debug)]
enum ShardState {
    Live,
    /// Its host died; to be rebuilt elsewhere.
    Lost,
    /// Being copied onto a new host, stripe by stripe (`progress`, one entry per page of
    /// the shard's slab). `job` names the rebuild (see `RebuildJob::job`).
    Rebuilding {
        progress: Vec<redundant::Progress>,
        job: u64,
    },
}

#[derive(Debug)]
struct Shard {
    slab: SlabRef,
    state: ShardState,
}

/// Where a slab-sized span of a region lives: one shard per copy (none, replicate:N) or
/// per erasure shard (K data then M parity).
#[derive(Debug)]
struct Placement {
    shards: Vec<Shard>,
}

impl Placement {
    /// Shards that hold their data and can serve reads.
    fn live(&self) -> usize {
        self.shards.iter().filter(|s| matches!(s.state, ShardState::Live)).count()
    }
}

struct RegionState {
    base: usize,
    pages: Vec<u8>,
    /// One entry per slab-sized span; `None` until committed (reserved regions only).
    slabs: Vec<Option<Placement>>,
    redundancy: Redundancy,
    /// The erasure code, for erasure-coded regions.
    coder: Option<Coder>,
    slab_pages: usize,
    error: Arc<Mutex<Option<String>>>,
    /// Lost pages not yet named in `error`.
    lost: usize,
    /// Clean twins of dirty pages (line write-back only, and every dirty page of an
    /// erasure-coded region: its parity follows the change from the twin).
    twins: PageMap<usize, Twin>,
    /// Discarded pages of an erasure-coded region being zeroed on their hosts (in flight:
    /// a fault on one waits), each with the token of its zeroing.
    zeroing: HashMap<usize, u64>,
    prefetch: PrefetchMode,
    /// The miss streams of the threads faulting on it, for prefetching.
    streams: Streams,
    /// The last pages filled with zeros for write faults, one per stream of fresh memory
    /// written in order (usize::MAX: none), the least recent first: an allocator carving
    /// several extents at once (one per size class) writes several such streams
    /// interleaved, and one remembered page saw none of them.
    zero_tails: [usize; ZERO_STREAMS],
    /// Where a host-followed pointer chain stopped at its lead bound: the next address to
    /// follow from and its depth (see `pointer_chase`).
    stalled_chain: Option<(u64, u8)>,
}

impl RegionState {
    fn addr(&self, page: usize) -> usize {
        self.base + page * PAGE_SIZE
    }
    /// Whether host memory backs `page` (not so for a page of a reserved region that was
    /// never committed).
    fn committed(&self, page: usize) -> bool {
        self.slabs[page / self.slab_pages].is_some()
    }

    /// A live whole copy of `page` to read from (None: uncommitted, every copy lost, or its
    /// data shard lost: it must be decoded from its stripe), and the page's index there.
    fn read_copy(&self, page: usize) -> Option<(SlabRef, u64)> {
        let placement = self.slabs[page / self.slab_pages].as_ref()?;
        let (shard, slab_page) = self.redundancy.locate(page % self.slab_pages);
        let shard = match self.coder {
            Some(_) => Some(&placement.shards[self.redundancy.slot(shard, slab_page)])
                .filter(|s| matches!(s.state, ShardState::Live)),
            None => placement.shards.iter().find(|s| matches!(s.state, ShardState::Live)),
        }?;
        Some((shard.slab, slab_page as u64))
    }

    /// Whether `page`'s host copies can still be read (enough live shards).
    fn readable(&self, page: usize) -> bool {
        self.slabs[page / self.slab_pages].as_ref().is_some_and(|p| p.live() >= self.redundancy.needed())
    }
    fn record_loss(&mut self, page: usize, why: &str) {
        if self.pages[page] & PageState::LOST != 0 {
            return;
        }
        self.pages[page] |= PageState::LOST;
        self.lost += 1;
        let mut error = self.error.lock().unwrap_or_else(|e| e.into_inner());
        *error = Some(format!("{} page(s) lost, latest at {:#x}: {why}", self.lost, self.addr(page)));
    }
}

/// Where a flush's outcome goes.
type FlushReply = Sender<Result<(), RuntimeError>>;

/// Static configuration of a handler.
pub(crate) struct HandlerConfig {
    pub capacity_pages: usize,
    pub writeback: WritebackMode,
    /// Find written pages with `PAGEMAP_SCAN` (the userfaultfd has `WP_ASYNC` and `MOVE`).
    pub async_tracking: bool,
    /// Above this many changed lines a whole page is sent instead.
    pub line_threshold: u32,
    /// Dirty pages are written back at least this often (None: only on eviction and flush).
    pub flush_interval: Option<Duration>,
    /// A pointer prefetch later than this is dropped unless a thread waits for it.
    pub prefetch_deadline: Duration,
    pub low_latency: bool,
    pub slab_bytes: usize,
    pub request_timeout: Duration,
    /// Run first on every thread the handler starts (see `RuntimeConfig::on_handler_start`):
    /// what they allocate, the handler uses.
    pub on_thread_start: Option<fn()>,
}

/// Everything but the readers, so a reply borrowed from a reader can be applied to it.
struct Core {
    uffd: Arc<Uffd>,
    config: HandlerConfig,
    regions: HashMap<u32, RegionState>,
    /// (base, end, id), sorted by base, for address lookup.
    ranges: Vec<(usize, usize, u32)>,
    next_region: u32,
    policy: Box<dyn EvictionPolicy>,
    resident: usize,
    stats: Arc<RuntimeStats>,
    links: Vec<Link>,
    zero_page: Box<[u8]>,
    /// ZERO_RUN pages of zeros, for filling fresh memory ahead of a sequential writer.
    zero_run: Box<[u8]>,
    /// Flushes waiting for their barriers: id -> (barriers left, region, reply).
    flushes: HashMap<u64, (usize, u32, FlushReply)>,
    next_barrier: u64,
    poison_supported: bool,
    twins: TwinPool,
    /// Pages made dirty since the last periodic flush (may hold stale or repeated keys).
    dirty: Vec<PageKey>,
    /// Reused buffer for the lines of a sparse write-back.
    scratch: Vec<u8>,
    /// Reused buffer for the parity lines of an erasure-coded write-back.
    parity: Vec<u8>,
    /// An erasure-coded write-back's changed lines XOR their clean contents.
    delta: Vec<u8>,
    /// Tokens of zeroings (see `RegionState::zeroing`).
    next_zeroing: u64,
    twin_gate: TwinGate,
    write_predictor: WritePredictor,
    /// When a faulting thread was last woken by an install or a write-fault resolution (see
    /// the eviction deferral in the run loop).
    last_wake: Instant,
    /// Fault messages carry the faulting address within the page.
    exact_addresses: bool,
    /// Pointer prefetches in flight.
    chases: usize,
    /// `ChasePointers` requests in flight.
    host_chases: usize,
    /// Reused span table of a `ChasePointers` request.
    chase_spans: Vec<u8>,
    /// Reused stack of resident pages a pointer chain passes through: (region page, byte
    /// offset pointed to, depth).
    chase_work: Vec<(usize, Option<u16>, u8)>,
    /// Reused list of the pages a pointer chain goes on to.
    chase_starts: Vec<pointer_chase::ChaseStart>,
    /// Reused list of evicted pages' addresses, dropped together.
    dropped: Vec<usize>,
    dropper: PageDropper,
    /// State of the placement's random choices.
    rng: u64,
    /// Reads in flight that need several shards, by id.
    gathers: HashMap<u64, redundant::Gather>,
    /// When the last shard of such a read arrived.
    last_part: Instant,
    next_gather: u64,
    /// Lost shards to rebuild: (region, span, shard).
    rebuild_queue: VecDeque<(u32, usize, usize)>,
    /// Rebuilds under way.
    rebuilds: Vec<redundant::RebuildJob>,
    /// The last rebuild job's id.
    next_rebuild: u64,
    /// When no host could last take a rebuild: retried after REBUILD_RETRY, or sooner when
    /// a host comes back.
    rebuild_stalled: Option<Instant>,
    /// Set under async dirty tracking.
    tracker: Option<AsyncTracker>,
    /// Local memory kept for the ring of recent victims (async tracking only).
    ring_reserve: usize,
    /// A page holding data was evicted at least once: its data may live on a host only.
    evicted_data: bool,
    /// No eviction until a fork is over (see `Command::PauseEvictionForFork`).
    eviction_paused: bool,
    /// The periodic flusher stopped at its chunk limit: the next round goes on.
    flush_backlog: bool,
    /// While `poll_replies` applies a reply: its link and frame number, so an install from
    /// it can leave its bookkeeping for later (see `DeferredInstall`).
    reply_source: Option<(usize, u64)>,
    deferred: Option<DeferredInstall>,
}

/// While the handler shares a CPU with the thread it serves (`colocate`), a fetched page is
/// installed (and its thread woken) at once, but what follows (its twin, the dirty list, the
/// policy, the eviction it may call for) waits until the requests of the next faults are
/// sent: the handler runs again only at that thread's next fault, and all of this stood
/// between the fault and its request. The twin is copied from the reply, which stays in its
/// reader's buffer until the next receive on that link. Until the install is finished
/// (right after the next sends) nothing receives on any link, writes anything back, or runs
/// a command; only faults are read, served and sent.
struct DeferredInstall {
    region: u32,
    page: usize,
    dirty: bool,
    /// Where the twin's bytes are (link, frame number), if the page gets a twin.
    twin_from: Option<(usize, u64)>,
}

/// An error with its causes, for log lines.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Decides whether a page being dirtied gets a twin. Twins pay only for pages written
/// sparsely; for a write-dense phase (a sort, a sequential fill) they cost a page of cache and a
/// diff each for nothing. So while most recent diffs found dense pages, only one dirtied page
/// in TWIN_SAMPLE gets one (to notice when writes turn sparse again). Separately, when twins
/// hold more than 1/TWIN_SHARE of local memory the handler flushes early, which frees them.
#[derive(Debug)]
struct TwinGate {
    /// Exponentially weighted fraction of recent diffs that found a dense page.
    dense_fraction: f64,
    dirtied: u64,
}

const TWIN_SAMPLE: u64 = 16;

/// Predicts whether a page fetched for a read will be written before it is evicted. A
/// program that writes most of what it reads (Python's reference counts, a hash table being
/// updated) pays two faults per such page: the fetch, then a write-protect fault. While most
/// recent clean installs were written, fetched pages are installed writable and dirty at once
/// (in line mode their twin, when taken, makes an unwritten one cost no write-back bytes).
/// One in PREDICTOR_SAMPLE predicted installs stays clean, so the predictor keeps seeing
/// whether pages are still written.
const PREDICTOR_SAMPLE: u64 = 16;

#[derive(Debug, Default)]
struct WritePredictor {
    /// Exponentially weighted fraction of recent fetched pages that were written.
    written_fraction: f64,
    decisions: u64,
}

impl WritePredictor {
    fn observe(&mut self, written: bool) {
        self.written_fraction = 0.99 * self.written_fraction + if written { 0.01 } else { 0.0 };
    }

    /// Whether to install the next fetched page dirty.
    fn predicts_write(&mut self) -> bool {
        if self.written_fraction <= 0.8 {
            return false;
        }
        self.decisions += 1;
        !self.decisions.is_multiple_of(PREDICTOR_SAMPLE)
    }
}

impl TwinGate {
    fn admit(&mut self, config: &HandlerConfig) -> bool {
        if config.writeback != WritebackMode::Line {
            return false;
        }
        self.dirtied += 1;
        self.dense_fraction < 0.5 || self.dirtied.is_multiple_of(TWIN_SAMPLE)
    }

    fn observe(&mut self, dense: bool) {
        self.dense_fraction = 0.98 * self.dense_fraction + if dense { 0.02 } else { 0.0 };
    }
}

/// Queues a prefetch of `count` adjacent pages from `first` (all in one slab, and in one chunk
/// of an erasure-coded one) and marks them in flight: a read of a live copy, or an entry in
/// `coded` for pages to decode from their stripes (gathered by the caller). Returns the pages
/// queued (0 if none can be read).
fn send_prefetch(
    region: &mut RegionState,
    links: &mut [Link],
    coded: &mut Vec<(usize, usize)>,
    id: u32,
    first: usize,
    count: u32,
) -> u64 {
    match region.read_copy(first) {
        Some((slab, slab_page)) => links[slab.host].send(
            &Message::ReadPages { slab_id: slab.slab_id, first_page: slab_page, count },
            Pending::Prefetch { region: id, first, count },
        ),
        None if region.coder.is_some() && region.readable(first) => coded.push((first, count as usize)),
        None => return 0,
    }
    for p in first..first + count as usize {
        region.pages[p] |= PageState::FETCHING | PageState::PREFETCHED;
    }
    u64::from(count)
}

fn key(region: u32, page: usize) -> PageKey {
    (u64::from(region) << 40) | page as u64
}

fn unkey(k: PageKey) -> (u32, usize) {
    (u32::try_from(k >> 40).expect("24-bit region ids"), usize::try_from(k & ((1 << 40) - 1)).expect("fits"))
}

/// The handler thread's state.
pub(crate) struct Handler {
    core: Core,
    readers: Vec<FrameReader>,
    /// Reconnections of each link since its last answer.
    reconnects_in_a_row: Vec<u32>,
    /// When each link last failed: one that then stayed up a while starts a fresh count.
    last_link_failure: Vec<Option<Instant>>,
    /// Results of background connection attempts to dead hosts.
    redials: (Sender<RedialResult>, Receiver<RedialResult>),
    redialing: Vec<bool>,
    last_redial: Vec<Option<Instant>>,
    commands: Receiver<Command>,
    wakeup: Arc<Wakeup>,
    /// Where the handler runs while one thread faults (see `colocate`); None if its
    /// affinity cannot be read.
    colocation: Option<colocate::Colocation>,
}

impl Handler {
    pub(crate) fn new(
        uffd: Arc<Uffd>,
        config: HandlerConfig,
        policy: Box<dyn EvictionPolicy>,
        stats: Arc<RuntimeStats>,
        connections: Vec<(Link, FrameReader)>,
        commands: Receiver<Command>,
        wakeup: Arc<Wakeup>,
    ) -> Result<Self, RuntimeError> {
        let tracker =
            if config.async_tracking { Some(AsyncTracker::new(&uffd, config.capacity_pages)?) } else { None };
        let ring_reserve = tracker.as_ref().map_or(0, AsyncTracker::ring_pages);
        let poison_supported = uffd.features().contains(clustermem_uffd::Features::POISON);
        let exact_addresses = uffd.features().contains(clustermem_uffd::Features::EXACT_ADDRESS);
        let (links, readers): (Vec<Link>, Vec<FrameReader>) = connections.into_iter().unzip();
        let hosts = links.len();
        Ok(Self {
            core: Core {
                uffd,
                config,
                regions: HashMap::new(),
                ranges: Vec::new(),
                next_region: 1,
                policy,
                resident: 0,
                stats,
                links,
                zero_page: vec![0u8; PAGE_SIZE].into_boxed_slice(),
                zero_run: vec![0u8; ZERO_RUN * PAGE_SIZE].into_boxed_slice(),
                flushes: HashMap::new(),
                next_barrier: 0,
                poison_supported,
                twins: TwinPool::default(),
                dirty: Vec::new(),
                scratch: Vec::with_capacity(PAGE_SIZE),
                parity: Vec::new(),
                delta: Vec::new(),
                next_zeroing: 0,
                twin_gate: TwinGate { dense_fraction: 0.0, dirtied: 0 },
                write_predictor: WritePredictor::default(),
                last_wake: Instant::now(),
                exact_addresses,
                chases: 0,
                host_chases: 0,
                chase_starts: Vec::new(),
                chase_spans: Vec::new(),
                chase_work: Vec::new(),
                dropped: Vec::new(),
                dropper: PageDropper::default(),
                rng: 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()),
                gathers: HashMap::new(),
                last_part: Instant::now(),
                next_gather: 0,
                rebuild_queue: VecDeque::new(),
                rebuilds: Vec::new(),
                next_rebuild: 0,
                rebuild_stalled: None,
                tracker,
                ring_reserve,
                evicted_data: false,
                eviction_paused: false,
                flush_backlog: false,
                reply_source: None,
                deferred: None,
            },
            readers,
            reconnects_in_a_row: vec![0; hosts],
            last_link_failure: vec![None; hosts],
            redials: std::sync::mpsc::channel(),
            redialing: vec![false; hosts],
            last_redial: vec![None; hosts],
            commands,
            wakeup,
            colocation: colocate::Colocation::new(),
        })
    }

    /// Runs until a `Shutdown` command (or every handle is gone).
    pub(crate) fn run(mut self) {
        let mut events = [Event::Other(0); 64];
        let mut last_fault = Instant::now() - SPIN_WINDOW;
        let mut last_flush = Instant::now();
        loop {
            let mut progress = false;
            // No write-back while an install waits for its bookkeeping: its page is dirty,
            // and may be on the dirty list from before its last eviction, without its twin.
            if self.core.deferred.is_none() {
                if self.core.twins.in_use() > self.core.config.capacity_pages / TWIN_SHARE {
                    // Only the pages with twins: written back, their twins are freed, and the
                    // dirty pages without one stay writable (flushing them would cost each a
                    // write-protect fault on its next store, for no memory back).
                    self.core.write_back_dirty(None, usize::MAX, true);
                }
                let backlog = self.core.flush_backlog;
                if backlog || self.core.config.flush_interval.is_some_and(|i| last_flush.elapsed() >= i) {
                    if !backlog {
                        last_flush = Instant::now();
                    }
                    self.core.flush_backlog = !self.core.write_back_dirty(None, FLUSH_CHUNK_PAGES, false);
                    progress |= self.core.flush_backlog;
                }
            }
            // Before reading faults, so a fault on a late prefetch fetches its page itself.
            self.core.expire_chases();
            match self.core.uffd.read_events(&mut events) {
                Ok(n) => {
                    for ev in &events[..n] {
                        if let (Some(c), Event::PageFault { tid, .. }) = (self.colocation.as_mut(), ev) {
                            c.on_fault(*tid);
                        }
                        self.core.on_event(*ev);
                    }
                    if n > 0 {
                        progress = true;
                        last_fault = Instant::now();
                    }
                }
                Err(e) => {
                    eprintln!("clustermem: fault handler cannot read userfaultfd: {e}");
                    return;
                }
            }
            if self.core.deferred.is_some() {
                // The requests of the faults just read go out before the last install's
                // bookkeeping (see `DeferredInstall`).
                self.flush_links();
                self.finish_install();
            }
            match self.commands.try_recv() {
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return,
                Ok(cmd) => {
                    self.on_command(cmd);
                    progress = true;
                }
                Err(TryRecvError::Empty) => {}
            }
            // Fetches for new faults go out first; evictions then overlap their round trip
            // instead of delaying them. Right after an install the woken thread usually
            // faults again within microseconds, so eviction waits a moment for that fault
            // (and its fetch) rather than sit in front of it. (Only a read a thread may wait
            // for counts: the acknowledgement of the last eviction's write-back is nearly
            // always still due when the page is installed.)
            self.flush_links();
            let waiting = self.core.links.iter().any(|l| l.demand_reads > 0);
            if self.core.over_limit() > 0 && (waiting || self.core.last_wake.elapsed() >= EVICTION_DEFER) {
                self.core.enforce_limit();
                self.flush_links();
            }
            progress |= self.poll_replies();
            if self.core.deferred.is_some() {
                // Back to the fault queue first (the reply stays unread behind it).
                continue;
            }
            if let Some(c) =
                self.colocation.as_mut().filter(|_| self.core.links.iter().all(|l| l.demand_reads == 0))
            {
                let stats = &self.core.stats;
                c.follow(stats.remote_faults.load(Relaxed), stats.prefetch_issued.load(Relaxed));
            }
            self.check_timeouts();
            if !self.core.rebuild_queue.is_empty()
                && self.core.rebuild_stalled.is_none_or(|t| t.elapsed() >= REBUILD_RETRY)
            {
                self.start_rebuilds();
            }
            if !self.core.rebuilds.is_empty() {
                self.core.pump_rebuilds();
            }
            let rebuilding = self.core.rebuilds_pending();
            self.core.stats.spans_rebuilding.store(rebuilding as u64, Relaxed);
            if rebuilding == 0 {
                self.core.stats.rebuild_waiting_for_host.store(0, Relaxed);
            }
            if self.core.links.iter().any(|l| l.dead.is_some()) {
                self.redial_dead_hosts();
            }
            if progress {
                continue;
            }
            let fetching = self.core.links.iter().any(|l| !l.pending.is_empty() && l.dead.is_none());
            // On its thread's CPU the handler never spins idle: the thread's next fault wakes
            // it there without an interrupt, and spinning would only take the thread's turns.
            let low_latency = self.core.config.low_latency
                && !self.colocated()
                && (fetching || last_fault.elapsed() < SPIN_WINDOW);
            let awaited = last_fault.elapsed() < REPLY_SPIN
                && self.core.links.iter().any(|l| l.demand_reads > 0 && l.dead.is_none());
            if low_latency || awaited {
                std::hint::spin_loop();
                continue;
            }
            if self.core.gathers.values().any(redundant::Gather::partly_here)
                && self.core.last_part.elapsed() < GATHER_SPIN
            {
                // The other shards of a read are due any moment: sleeping now would cost a
                // wakeup per shard.
                std::thread::yield_now();
                continue;
            }
            self.sleep();
        }
    }

    /// Whether the handler runs on the CPU of the one thread that faults (see `colocate`).
    fn colocated(&self) -> bool {
        self.colocation.as_ref().is_some_and(colocate::Colocation::pinned)
    }

    /// Finishes a deferred install (see `DeferredInstall`). Its twin is the reply's page,
    /// read again from the reader; were the reply gone (it cannot be: nothing receives on its
    /// link before this runs), the page would go without a twin, which only makes its
    /// write-back a whole page.
    fn finish_install(&mut self) {
        let Some(d) = self.core.deferred.take() else { return };
        let reply = d.twin_from.and_then(|(h, frame)| {
            let reader = &self.readers[h];
            if reader.frames_received() == frame {
                reader.last_message()
            } else {
                None
            }
        });
        let twin = match reply {
            Some(Message::Pages { data, .. }) if data.len() == PAGE_SIZE => Some(data),
            _ => None,
        };
        debug_assert_eq!(twin.is_some(), d.twin_from.is_some(), "the reply stays readable");
        self.core.stats.deferred_installs.fetch_add(1, Relaxed);
        self.core.after_install(d.region, d.page, d.dirty, twin);
    }

    /// Sleeps until a fault, a command or a reply arrives.
    fn sleep(&mut self) {
        debug_assert!(self.core.deferred.is_none(), "finished before anything else receives");
        let mut fds = vec![
            libc::pollfd { fd: self.core.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.wakeup.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // Idle links are watched too: a host that exits closes them, and is found dead now
        // rather than at the next request (when a copy or shard it held may be needed).
        let (mut busy, mut idle) = (false, Vec::new());
        for (h, (link, reader)) in self.core.links.iter().zip(&self.readers).enumerate() {
            if link.dead.is_some() {
                continue;
            }
            if link.pending.is_empty() {
                idle.push((fds.len(), h));
            } else {
                busy = true;
            }
            fds.push(libc::pollfd { fd: reader.stream().as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let timeout_ms = match self.core.config.flush_interval {
            // An eviction was deferred: come back for it soon.
            _ if self.core.over_limit() > 0 => 1,
            _ if busy => 100,
            Some(interval) if !self.core.dirty.is_empty() || self.core.tracker.is_some() => {
                i32::try_from(interval.as_millis()).unwrap_or(1000).clamp(1, 1000)
            }
            _ => 1000,
        };
        // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if fds[1].revents != 0 {
            // Whatever it announced (a command, a redial's result) is taken from its channel
            // by the next round. Left set, it would make every later `poll` return at once:
            // the handler would never sleep again, and on its thread's CPU it would hold the
            // woken thread off for a whole time slice per fault.
            self.wakeup.drain();
        }
        for (i, h) in idle {
            if fds[i].revents != 0 && self.core.links[h].pending.is_empty() {
                // Nothing is due on it: an end of stream, a reset, or a frame nobody asked for.
                let past = Some(Instant::now() - Duration::from_nanos(1));
                match self.readers[h].recv(None, past) {
                    Ok((id, msg)) => self.core.on_reply(h, id, &msg),
                    Err(RecvError::TimedOut(_)) => {}
                    Err(e) => {
                        let why = format!("host {} failed: {e}", self.core.links[h].addr);
                        self.link_failed(h, &why);
                    }
                }
            }
        }
    }

    /// The connection to host `h` failed (reset, closed, a send error). The host may well be
    /// alive (a proxy or NAT dropped the connection, a transient network fault): reconnect,
    /// resume the session, which gets our slabs back, and replay every unanswered request in
    /// order. A host that refuses, or that no longer holds our slabs (it restarted), is dead.
    /// (It may hold one more than we count: a slab allocation in flight when the connection
    /// dropped; its replay allocates another, and the first stays with the session.)
    fn link_failed(&mut self, h: usize, why: &str) {
        // Its reader may be replaced below: a deferred install's reply is read first.
        self.finish_install();
        let link = &self.core.links[h];
        if link.dead.is_some() {
            return;
        }
        // An idle connection dropped by the network now and then (a NAT's idle timeout)
        // must not add up to giving a healthy host up; one dropped again at once does.
        if self.last_link_failure[h].replace(Instant::now()).is_some_and(|t| t.elapsed() >= STAYED_UP) {
            self.reconnects_in_a_row[h] = 0;
        }
        if self.reconnects_in_a_row[h] >= MAX_RECONNECTS_IN_A_ROW {
            let why = format!("{why} (after {MAX_RECONNECTS_IN_A_ROW} reconnections without an answer)");
            return self.core.host_died(h, &why);
        }
        self.reconnects_in_a_row[h] += 1;
        let expected = self.core.slabs_on(h);
        let addr = link.addr.to_string();
        match transport::connect(&addr, self.core.config.low_latency, link.session, RECONNECT_TIMEOUT) {
            Ok((fresh, reader, adopted)) if adopted >= expected => {
                let link = &mut self.core.links[h];
                // What the host offers now (it may have been upgraded or restarted).
                (link.capacity_bytes, link.chases_pointers, link.xors_lines) =
                    (fresh.capacity_bytes, fresh.chases_pointers, fresh.xors_lines);
                let replayed = link.resume_on(fresh.writer);
                self.readers[h] = reader;
                // A replayed read the host had answered sees the writes after it on this link:
                // a gather's parts would no longer be of one moment. Read them afresh.
                let gathers: HashSet<u64> = self.core.links[h]
                    .pending
                    .iter()
                    .filter_map(|(_, p, _)| match p {
                        Pending::Part { gather, .. } => Some(*gather),
                        _ => None,
                    })
                    .collect();
                for gid in gathers {
                    self.core.gather_restart(gid);
                }
                self.core.stats.reconnects.fetch_add(1, Relaxed);
                eprintln!("clustermem: {why}; reconnected, {replayed} unanswered request(s) sent again");
            }
            Ok((_, _, adopted)) => {
                let why = format!(
                    "{why}; on reconnecting it held {adopted} of our {expected} slabs (it restarted)"
                );
                self.core.host_died(h, &why);
            }
            // The host answered but would not resume yet (it has not noticed the old
            // connection is gone): the next failure on this link tries again.
            Err(RuntimeError::HostRefused { message, .. })
                if self.reconnects_in_a_row[h] < MAX_RECONNECTS_IN_A_ROW =>
            {
                eprintln!(
                    "clustermem: {why}; the host would not resume our session yet ({message}); retrying"
                );
            }
            Err(e) => self.core.host_died(h, &format!("{why}; reconnecting failed: {e}")),
        }
    }

    /// Tries, in the background, to reach dead hosts again: one that answers is a new
    /// instance (our slabs there are gone), a place for new slabs and rebuilt shards.
    fn redial_dead_hosts(&mut self) {
        for h in 0..self.core.links.len() {
            if self.core.links[h].dead.is_none()
                || self.redialing[h]
                || self.last_redial[h].is_some_and(|t| t.elapsed() < REDIAL_INTERVAL)
            {
                continue;
            }
            self.redialing[h] = true;
            self.last_redial[h] = Some(Instant::now());
            let (addr, low_latency) = (self.core.links[h].addr.to_string(), self.core.config.low_latency);
            let (results, wakeup) = (self.redials.0.clone(), Arc::clone(&self.wakeup));
            let on_start = self.core.config.on_thread_start;
            let spawned = crate::quiet_thread::spawn("redial", move || {
                if let Some(hook) = on_start {
                    hook();
                }
                // A new session: the dead instance's slabs are not ours to adopt.
                let result = transport::connect(
                    &addr,
                    low_latency,
                    transport::new_session(),
                    transport::CONNECT_TIMEOUT,
                );
                let _ = results.send((h, result.map(|(link, reader, _)| (link, reader))));
                wakeup.wake();
            });
            if spawned.is_err() {
                self.redialing[h] = false;
            }
        }
        while let Ok((h, result)) = self.redials.1.try_recv() {
            self.redialing[h] = false;
            if let Ok((link, reader)) = result {
                eprintln!("clustermem: memory host {} answers again (a new instance): it takes new and rebuilt slabs", link.addr);
                self.core.links[h] = link;
                self.readers[h] = reader;
                self.reconnects_in_a_row[h] = 0;
                self.core.rebuild_stalled = None;
            }
        }
    }

    fn flush_links(&mut self) {
        for h in 0..self.core.links.len() {
            // After a reconnection the replay is queued: send it now (a caller such as
            // `call` waits for a reply to it). Each failure counts towards giving up.
            while !self.core.links[h].writer.is_empty() && self.core.links[h].dead.is_none() {
                let link = &mut self.core.links[h];
                match link.writer.flush_to(self.readers[h].stream()) {
                    Ok(()) => break,
                    Err(e) => {
                        let why = format!("send to {} failed: {e}", link.addr);
                        self.link_failed(h, &why);
                    }
                }
            }
        }
    }

    /// Applies every reply already received. Returns whether any was.
    fn poll_replies(&mut self) -> bool {
        let mut any = false;
        // Installs defer their bookkeeping only while the handler shares its thread's CPU
        // (elsewhere the thread runs meanwhile, and replies would wait a round each).
        let defer = self.colocated();
        for h in 0..self.readers.len() {
            while !self.core.links[h].pending.is_empty() && self.core.links[h].dead.is_none() {
                let past = Some(Instant::now() - Duration::from_nanos(1));
                // The number this frame will have if one arrives.
                let frame = self.readers[h].frames_received() + 1;
                match self.readers[h].recv(None, past) {
                    Ok((id, msg)) => {
                        any = true;
                        self.reconnects_in_a_row[h] = 0;
                        self.core.reply_source = defer.then_some((h, frame));
                        self.core.on_reply(h, id, &msg);
                        self.core.reply_source = None;
                        if self.core.deferred.is_some() {
                            // Its reply must stay in the buffer until the install is finished.
                            return true;
                        }
                    }
                    Err(RecvError::TimedOut(_)) => break,
                    Err(e) => {
                        let why = format!("host {} failed: {e}", self.core.links[h].addr);
                        self.link_failed(h, &why);
                    }
                }
            }
        }
        any
    }

    fn check_timeouts(&mut self) {
        let timeout = self.core.config.request_timeout;
        for h in 0..self.core.links.len() {
            let link = &self.core.links[h];
            if link.dead.is_some() {
                continue;
            }
            // Silence this long with requests waiting (a prefetch or a write-back too) means
            // the host stopped answering: threads waiting behind it must not hang. Not the
            // age of the oldest request: behind a slow link, or after this thread was busy
            // a while, requests wait longer than the timeout on a host that answers all along
            // (the replies just drained by `poll_replies` count).
            if link.silent_for().is_some_and(|s| s > timeout) {
                let why = format!("host {} did not answer for {timeout:?} with requests waiting", link.addr);
                self.core.host_died(h, &why);
            }
        }
    }

    /// Sends `msg` to host `h` and waits for its reply, applying replies to earlier requests
    /// on the way. For rare control requests (slab allocation), not the fault path.
    fn call(&mut self, h: usize, msg: &Message<'_>) -> Result<OwnedReply, String> {
        debug_assert!(self.core.deferred.is_none(), "finished before anything else receives");
        if let Some(why) = &self.core.links[h].dead {
            return Err(why.clone());
        }
        self.core.links[h].send(msg, Pending::Ignore);
        let want = self.core.links[h].pending.back().map(|(id, _, _)| *id).expect("just sent");
        self.flush_links();
        let (timeout, sent) = (self.core.config.request_timeout, Instant::now());
        loop {
            if let Some(why) = &self.core.links[h].dead {
                return Err(why.clone());
            }
            // As in `check_timeouts`: the host is dead once it is silent this long, however
            // many replies to earlier requests come before ours.
            let deadline = self.core.links[h].last_heard.max(sent) + timeout;
            match self.readers[h].recv(None, Some(deadline)) {
                Ok((id, reply)) if id == want => {
                    self.core.links[h].ack();
                    return Ok(OwnedReply::from(&reply));
                }
                Ok((id, reply)) => self.core.on_reply(h, id, &reply),
                Err(RecvError::TimedOut(_)) => {
                    let why = format!(
                        "host {} did not answer for {timeout:?} with requests waiting",
                        self.core.links[h].addr
                    );
                    self.core.host_died(h, &why);
                }
                Err(e) => {
                    let why = format!("host {} failed: {e}", self.core.links[h].addr);
                    self.link_failed(h, &why);
                    self.flush_links();
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::AddRegion { base, len, commit, prefetch, redundancy, reply, error } => {
                let result = self.add_region(base, len, commit, prefetch, redundancy, error);
                let _ = reply.send(result);
            }
            Command::Commit { id, first, count, reply } => {
                let _ = reply.send(self.commit(id, first, count));
            }
            Command::Discard { id, first, count, reply } => {
                let _ = reply.send(self.core.discard(id, first, count));
            }
            Command::RemoveRegion { id, reply } => {
                self.core.remove_region(id);
                let _ = reply.send(());
            }
            Command::Flush { id, reply } => self.core.flush(id, reply),
            Command::PauseEvictionForFork { reply } => {
                // Pages the child shares cannot be moved out (async tracking) until the
                // parent writes them again: a quarter of local memory at most.
                let few =
                    (self.core.resident + self.core.twins.in_use()) * 4 <= self.core.config.capacity_pages;
                let shareable = !self.core.evicted_data && few;
                self.core.eviction_paused = shareable;
                let _ = reply.send(shareable);
            }
            Command::ResumeEviction => self.core.eviction_paused = false,
            Command::Shutdown => unreachable!("handled by the loop"),
        }
    }

    fn add_region(
        &mut self,
        base: usize,
        len: usize,
        commit: bool,
        prefetch: PrefetchMode,
        redundancy: Redundancy,
        error: Arc<Mutex<Option<String>>>,
    ) -> Result<u32, RuntimeError> {
        if matches!(redundancy, Redundancy::Erasure { .. }) && self.core.tracker.is_some() {
            return Err(RuntimeError::Config(format!(
                "--redundancy {redundancy} updates parity by the change of each written page, which \
                 needs the clean copy sync dirty tracking takes at its first store: use \
                 --dirty-tracking sync with it"
            )));
        }
        if let Some(old) = self.core.links.iter().find(|l| l.dead.is_none() && !l.xors_lines) {
            if matches!(redundancy, Redundancy::Erasure { .. }) {
                return Err(RuntimeError::Config(format!(
                    "--redundancy {redundancy} needs memory hosts that apply parity updates (XorLines); \
                     the host at {} is older: upgrade it, or use replicate:N",
                    old.addr
                )));
            }
        }
        let pages = len / PAGE_SIZE;
        let slab_pages = (self.core.config.slab_bytes / PAGE_SIZE).min(pages).max(1);
        let id = self.core.next_region;
        self.core.next_region += 1;
        self.core.regions.insert(
            id,
            RegionState {
                base,
                pages: vec![0; pages],
                slabs: (0..pages.div_ceil(slab_pages)).map(|_| None).collect(),
                slab_pages,
                redundancy,
                coder: Coder::new(redundancy),
                error,
                lost: 0,
                twins: PageMap::default(),
                zeroing: HashMap::new(),
                prefetch,
                streams: Streams::default(),
                stalled_chain: None,
                zero_tails: [usize::MAX; ZERO_STREAMS],
            },
        );
        let committed = if commit { self.commit(id, 0, pages) } else { Ok(()) };
        let mode = RegisterMode { missing: true, write_protect: true };
        // SAFETY: `Runtime::map`/`reserve` made this private anonymous mapping for this runtime
        // alone and keeps it mapped until `RemoveRegion` has unregistered it; this thread
        // serves its faults from now on.
        let registered =
            committed.and_then(|()| unsafe { self.core.uffd.register(base, len, mode) }.map_err(Into::into));
        if let Err(e) = registered {
            let region = self.core.regions.remove(&id).expect("inserted above");
            for s in region.slabs.into_iter().flatten().flat_map(|p| p.shards) {
                if !matches!(s.state, ShardState::Lost) {
                    self.core.free_slab(s.slab);
                }
            }
            return Err(e);
        }
        let pos = self.core.ranges.partition_point(|r| r.0 < base);
        self.core.ranges.insert(pos, (base, base + len, id));
        Ok(id)
    }

    /// Starts rebuilding queued lost shards, each onto a new slab on a live host that holds
    /// no other shard of its span, up to REBUILDS_AT_ONCE at a time.
    fn start_rebuilds(&mut self) {
        while self.core.rebuilds.len() < redundant::REBUILDS_AT_ONCE {
            let Some((id, span, shard)) = self.core.rebuild_queue.pop_front() else { return };
            let Some(region) = self.core.regions.get(&id) else { continue };
            let Some(p) = region.slabs[span].as_ref() else { continue };
            if !matches!(p.shards[shard].state, ShardState::Lost) || p.live() < region.redundancy.needed() {
                continue;
            }
            let span_pages = (region.pages.len() - span * region.slab_pages).min(region.slab_pages);
            let stripes = region.redundancy.shard_pages(span_pages);
            let bytes = p.shards[shard].slab.bytes;
            let mut used: Vec<usize> = p
                .shards
                .iter()
                .filter(|s| !matches!(s.state, ShardState::Lost))
                .map(|s| s.slab.host)
                .collect();
            let erasure = region.coder.is_some();
            if erasure {
                used.extend(self.core.hosts_without_xor_lines());
            }
            let Some(host) = self.core.place(bytes, &used) else {
                let older =
                    erasure && self.core.hosts_without_xor_lines().any(|h| self.core.links[h].dead.is_none());
                self.rebuild_waits_for_a_host(if older {
                    "no live memory host able to hold erasure shards (some are older, without XorLines: upgrade them) holds none of its span"
                } else {
                    "no live memory host holds none of its span"
                });
                self.core.rebuild_queue.push_front((id, span, shard));
                return;
            };
            match self.alloc_slab(host, bytes, id) {
                Ok(slab_id) => {
                    let Some(p) = self.core.regions.get_mut(&id).and_then(|r| r.slabs[span].as_mut()) else {
                        continue;
                    };
                    self.core.next_rebuild += 1;
                    let job = self.core.next_rebuild;
                    p.shards[shard] = Shard {
                        slab: SlabRef { host, slab_id, bytes },
                        state: ShardState::Rebuilding {
                            progress: vec![redundant::Progress::Todo; stripes],
                            job,
                        },
                    };
                    self.core.rebuilds.push(redundant::RebuildJob::new(id, span, shard, job));
                    self.core.stats.rebuild_waiting_for_host.store(0, Relaxed);
                }
                Err(e) => {
                    self.rebuild_waits_for_a_host(&format!("allocating a slab to rebuild onto failed: {e}"));
                    self.core.rebuild_queue.push_back((id, span, shard));
                    return;
                }
            }
        }
    }

    /// No host can take a lost shard now: the span keeps working degraded, and rebuilding
    /// is retried every REBUILD_RETRY and as soon as a host comes back. Said once per stall.
    fn rebuild_waits_for_a_host(&mut self, why: &str) {
        self.core.rebuild_stalled = Some(Instant::now());
        if self.core.stats.rebuild_waiting_for_host.swap(1, Relaxed) == 0 {
            eprintln!(
                "clustermem: cannot rebuild lost redundancy yet ({why}): reads and writes go on with less \
                 redundancy; retrying every {REBUILD_RETRY:?} and when a host comes back"
            );
        }
    }

    /// Allocates a slab of `bytes` on host `host` for region `region`.
    fn alloc_slab(&mut self, host: usize, bytes: u64, region: u32) -> Result<u64, RuntimeError> {
        match self.call(host, &Message::AllocSlab { bytes, region: u64::from(region) }) {
            Ok(OwnedReply::SlabAllocated(slab_id)) => {
                self.core.links[host].allocated_bytes += bytes;
                Ok(slab_id)
            }
            Ok(OwnedReply::Error(message)) => {
                let addr = self.core.links[host].addr.to_string();
                Err(RuntimeError::HostRefused { addr, message })
            }
            Ok(OwnedReply::Other(reply)) => {
                Err(RuntimeError::Protocol(format!("unexpected reply to AllocSlab: {reply}")))
            }
            Err(why) => Err(RuntimeError::HostFailed(why)),
        }
    }

    /// Allocates host memory for every slab-sized span of region `id` that pages
    /// `first..first + count` touch and that has none yet: all of them or, on failure, none.
    fn commit(&mut self, id: u32, first: usize, count: usize) -> Result<(), RuntimeError> {
        let mut allocated = Vec::new();
        let result = self.commit_spans(id, first, count, &mut allocated);
        if let (Err(_), Some(region)) = (&result, self.core.regions.get_mut(&id)) {
            // (A span placed degraded has shards never placed: nothing to free.)
            let slabs: Vec<SlabRef> = allocated
                .iter()
                .filter_map(|&span| region.slabs[span].take())
                .flat_map(|p| {
                    p.shards.into_iter().filter(|s| !matches!(s.state, ShardState::Lost)).map(|s| s.slab)
                })
                .collect();
            for s in slabs {
                self.core.free_slab(s);
            }
        }
        result
    }

    fn commit_spans(
        &mut self,
        id: u32,
        first: usize,
        count: usize,
        allocated: &mut Vec<usize>,
    ) -> Result<(), RuntimeError> {
        let region =
            self.core.regions.get(&id).ok_or_else(|| RuntimeError::Config(format!("no region {id}")))?;
        let (pages, slab_pages) = (region.pages.len(), region.slab_pages);
        if count == 0 || first.checked_add(count).is_none_or(|end| end > pages) {
            return Err(RuntimeError::Config(format!(
                "pages {first}+{count} outside a region of {pages} pages"
            )));
        }
        let redundancy = region.redundancy;
        for span in first / slab_pages..=(first + count - 1) / slab_pages {
            if self.core.regions[&id].slabs[span].is_some() {
                continue;
            }
            let span_pages = (pages - span * slab_pages).min(slab_pages);
            let bytes = (redundancy.shard_pages(span_pages) * PAGE_SIZE) as u64;
            let mut shards: Vec<Shard> = Vec::with_capacity(redundancy.shards());
            let result = (|| {
                while shards.len() < redundancy.shards() {
                    let mut used: Vec<usize> = shards.iter().map(|s| s.slab.host).collect();
                    if matches!(redundancy, Redundancy::Erasure { .. }) {
                        used.extend(self.core.hosts_without_xor_lines());
                    }
                    let placed = self.core.place(bytes, &used);
                    if placed.is_none() && shards.len() >= redundancy.needed() {
                        // Hosts were lost: the span starts as one that lost the rest would
                        // (readable, written on), and they are rebuilt when hosts allow.
                        break;
                    }
                    let host = placed.ok_or_else(|| {
                        let erasure = matches!(redundancy, Redundancy::Erasure { .. });
                        let live = self.core.links.iter().filter(|l| l.dead.is_none() && (l.xors_lines || !erasure)).count();
                        if redundancy.shards() > 1 {
                            RuntimeError::Config(format!(
                                "--redundancy {redundancy} needs {} live memory hosts for each slab; {live} are up",
                                redundancy.shards()
                            ))
                        } else {
                            RuntimeError::NoLiveHost
                        }
                    })?;
                    let slab_id = self.alloc_slab(host, bytes, id)?;
                    shards.push(Shard { slab: SlabRef { host, slab_id, bytes }, state: ShardState::Live });
                }
                Ok(())
            })();
            if let Err(e) = result {
                for shard in shards {
                    self.core.free_slab(shard.slab);
                }
                return Err(e);
            }
            // Never placed: no host (`usize::MAX`), nothing to free.
            for slot in shards.len()..redundancy.shards() {
                shards.push(Shard {
                    slab: SlabRef { host: usize::MAX, slab_id: 0, bytes },
                    state: ShardState::Lost,
                });
                self.core.rebuild_queue.push_back((id, span, slot));
            }
            let region = self.core.regions.get_mut(&id).expect("checked above");
            region.slabs[span] = Some(Placement { shards });
            allocated.push(span);
        }
        Ok(())
    }
}

/// A reply copied out of the reader's buffer, for control requests.
#[derive(Debug)]
enum OwnedReply {
    SlabAllocated(u64),
    Error(String),
    Other(String),
}

impl From<&Message<'_>> for OwnedReply {
    fn from(m: &Message<'_>) -> Self {
        match m {
            Message::SlabAllocated { slab_id } => Self::SlabAllocated(*slab_id),
            Message::Error { message, .. } => Self::Error((*message).to_string()),
            other => Self::Other(format!("{other:?}")),
        }
    }
}

impl Core {
    fn lookup(&self, addr: usize) -> Option<(u32, usize)> {
        let pos = self.ranges.partition_point(|r| r.0 <= addr);
        let &(base, end, id) = self.ranges.get(pos.checked_sub(1)?)?;
        (addr < end).then(|| (id, (addr - base) / PAGE_SIZE))
    }

    fn on_event(&mut self, ev: Event) {
        let Event::PageFault { addr, exact_addr, write, write_protect, tid } = ev else { return };
        let started = Instant::now();
        let Some((id, page)) = self.lookup(addr) else {
            // Not ours (a region being removed): wake, the thread will refault elsewhere.
            let _ = self.uffd.wake(addr, PAGE_SIZE);
            return;
        };
        if PageState::only_on_host(self.regions[&id].pages[page]) && self.rescue(id, page) {
            // Moved back from the ring of recent victims.
            return;
        }
        let region = self.regions.get_mut(&id).expect("ranges and regions agree");
        let state = region.pages[page];
        if state & PageState::LOST != 0 && state & PageState::RESIDENT == 0 {
            self.poison(addr);
        } else if state & PageState::RESIDENT != 0 {
            // (A resident page whose host copy was lost still holds its data here: the program
            // goes on with it until it is evicted.)
            if write_protect && state & PageState::DIRTY == 0 {
                if state & PageState::PREFETCHED != 0 {
                    self.stats.prefetch_used.fetch_add(1, Relaxed);
                }
                region.pages[page] =
                    (state | PageState::DIRTY) & !(PageState::PREFETCHED | PageState::UNTRACKED);
                if state & PageState::UNTRACKED == 0 {
                    self.write_predictor.observe(true);
                }
                if region.coder.is_some() || self.twin_gate.admit(&self.config) {
                    // SAFETY: the page is resident and still write-protected (its writer
                    // waits for us), so it is readable and stable while copied.
                    let clean = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) };
                    region.twins.insert(page, self.twins.take(clean));
                }
                self.dirty.push(key(id, page));
                self.policy.touch(key(id, page));
                self.stats.write_faults.fetch_add(1, Relaxed);
                if let Err(e) = self.uffd.write_protect(addr, PAGE_SIZE, false, true) {
                    eprintln!("clustermem: cannot unprotect {addr:#x}: {}", chain(&e));
                }
                // The twin may put us over the limit: the eviction waits for the writer's
                // next fault too, rather than run (and flush its TLB) while it works.
                self.last_wake = Instant::now();
                self.enforce_limit_if_far_over();
            } else {
                // Already served (the fault raced an install): just wake.
                let _ = self.uffd.wake(addr, PAGE_SIZE);
            }
        } else if state & PageState::FETCHING != 0 {
            // The install of the fetch in flight wakes this thread too; a prefetch in flight
            // is now needed, so it will not be abandoned.
            region.pages[page] = (state | PageState::WANTED) & !PageState::PREFETCHED;
            if state & PageState::PREFETCHED != 0 {
                self.stats.prefetch_waits.fetch_add(1, Relaxed);
                self.stats.prefetch_used.fetch_add(1, Relaxed);
                if region.prefetch != PrefetchMode::Off {
                    self.prefetch_on_wait(id, page, tid);
                }
            }
        } else if state & PageState::ON_HOST != 0 {
            region.pages[page] |= PageState::FETCHING;
            if region.read_copy(page).is_none() && region.coder.is_some() && region.readable(page) {
                // Its data shard is lost: decoded from the rest of its stripe.
                let prefetch = region.prefetch != PrefetchMode::Off;
                self.gather_pages(id, page, 1, redundant::GatherFor::Fault { write, started });
                if prefetch {
                    self.prefetch_after(id, page, tid);
                }
                return;
            }
            let Some((slab, slab_page)) = region.read_copy(page) else {
                region.pages[page] &= !PageState::FETCHING;
                region.record_loss(page, "every copy of it is on a lost host");
                self.poison(addr);
                return;
            };
            let link = &mut self.links[slab.host];
            let offset = self.exact_addresses.then(|| (exact_addr - addr) as u16);
            link.send(
                &Message::ReadPages { slab_id: slab.slab_id, first_page: slab_page, count: 1 },
                Pending::Fetch { region: id, page, write, started, offset },
            );
            if region.prefetch != PrefetchMode::Off {
                self.prefetch_after(id, page, tid);
            }
        } else {
            // Never written back: the host copy is zeros, so no network trip.
            self.stats.zero_faults.fetch_add(1, Relaxed);
            let stream = region.zero_tails.iter().position(|&t| t.wrapping_add(1) == page);
            let sequential = write && stream.is_some();
            let run = if sequential {
                1 + (1..ZERO_RUN)
                    .take_while(|k| region.pages.get(page + k) == Some(&0) && region.committed(page + k))
                    .count()
            } else {
                1
            };
            if write {
                // The stream it continues (or, for a new one, the least recent) moves last.
                let i = stream.unwrap_or(0);
                region.zero_tails[i..].rotate_left(1);
                region.zero_tails[ZERO_STREAMS - 1] = page + run - 1;
            }
            if run > 1 && self.install_zero_run(id, page, run) {
                return;
            }
            let zeros = std::mem::take(&mut self.zero_page);
            self.install(id, page, &zeros, write);
            self.zero_page = zeros;
        }
    }

    /// Fills `n` fresh pages from `first` with zeros in one copy, writable and dirty (under
    /// async tracking: protected, the kernel letting each first store in): a program writing
    /// fresh memory in order (an allocator carving new memory, a buffer being filled) would
    /// otherwise take a fault per page. Their twins are "all zeros" (no buffer), so one never
    /// written costs nothing at write-back. Returns false if the copy failed (nothing was
    /// installed).
    fn install_zero_run(&mut self, id: u32, first: usize, n: usize) -> bool {
        let Some(region) = self.regions.get_mut(&id) else { return false };
        // Async tracking: protected, so a page never written is not sent (the kernel lets
        // the first store in without us).
        let sync_tracking = self.tracker.is_none();
        let copied =
            self.uffd.copy(region.addr(first), &self.zero_run[..n * PAGE_SIZE], !sync_tracking, true);
        if !matches!(copied, Ok(CopyOutcome::Installed)) {
            return false;
        }
        for page in first..first + n {
            region.pages[page] |= PageState::RESIDENT;
            if sync_tracking {
                region.pages[page] |= PageState::DIRTY;
                if self.config.writeback == WritebackMode::Line || region.coder.is_some() {
                    region.twins.insert(page, Twin::Zeros);
                }
                self.dirty.push(key(id, page));
            }
            self.policy.insert(key(id, page));
        }
        self.resident += n;
        self.last_wake = Instant::now();
        self.enforce_limit_if_far_over();
        true
    }

    fn poison(&self, addr: usize) {
        let result = if self.poison_supported {
            self.uffd.poison(addr, PAGE_SIZE)
        } else {
            Err(clustermem_uffd::UffdError::MissingFeature("UFFDIO_POISON (Linux 6.6+)"))
        };
        if let Err(e) = result {
            // Without poison the thread cannot be failed from here; it stays blocked rather
            // than read a wrong page. Say so loudly.
            eprintln!(
                "clustermem: a page at {addr:#x} is lost and cannot be poisoned ({}); the thread touching it stays blocked",
                chain(&e)
            );
        }
    }

    /// After the faulting page's own fetch has been queued (critical page first), follows the
    /// miss stream of the faulting thread (`tid`), or else the region's: fetches ahead of a
    /// sequential or strided trend, in runs of adjacent pages per request.
    fn prefetch_after(&mut self, id: u32, page: usize, tid: u32) {
        let streams = &mut self.regions.get_mut(&id).expect("caller checked").streams;
        let Some((key, prediction)) = streams.on_miss(page, tid) else {
            return;
        };
        if prediction.window_consumed {
            // The stream ran off the end of the windows: every page of them was used.
            if let Some((first, delta, count)) = streams.find(key).and_then(|s| s.window.take()) {
                self.mark_used(id, first, delta, count);
            }
        }
        self.issue_window(id, prediction, key);
    }

    /// Thread `tid` waits for `page` of region `id`, a prefetch in flight: if its stream (or
    /// the region's) reached it, the window's pages before it were used, and the next window
    /// may be due.
    fn prefetch_on_wait(&mut self, id: u32, page: usize, tid: u32) {
        for key in [StreamKey::Thread(tid), StreamKey::Shared] {
            let streams = &mut self.regions.get_mut(&id).expect("caller checked").streams;
            // Only a stream that issued windows follows them up (the shared one runs beside
            // the threads' without issuing while they predict).
            let Some(stream) = streams.find(key) else { continue };
            let Some((first, delta, count)) = stream.window else { continue };
            let passed = (page as i64 - first as i64) / delta;
            if (page as i64 - first as i64) % delta == 0 && (0..count as i64).contains(&passed) {
                let passed = passed as usize;
                stream.window = Some((page, delta, count - passed));
                self.mark_used(id, first, delta, passed);
            }
            let streams = &mut self.regions.get_mut(&id).expect("caller checked").streams;
            if let Some(prediction) = streams.find(key).and_then(|s| s.stream.on_wait(page)) {
                self.issue_window(id, prediction, key);
                return;
            }
        }
    }

    /// Counts the prefetched pages among `count` pages at `first + k * delta` as used.
    fn mark_used(&mut self, id: u32, first: usize, delta: i64, count: usize) {
        let region = self.regions.get_mut(&id).expect("caller checked");
        for k in 0..count as i64 {
            let Ok(p) = usize::try_from(first as i64 + k * delta) else { break };
            if p < region.pages.len() && region.pages[p] & PageState::PREFETCHED != 0 {
                region.pages[p] &= !PageState::PREFETCHED;
                self.stats.prefetch_used.fetch_add(1, Relaxed);
            }
        }
    }

    /// Fetches the pages of a predicted window that are on a host and not already here or
    /// coming, adjacent ones in one request, and extends stream `key`'s window over them.
    fn issue_window(&mut self, id: u32, prediction: crate::prefetch::Prediction, key: StreamKey) {
        let region = self.regions.get_mut(&id).expect("caller checked");
        let (delta, depth) = (prediction.delta, prediction.depth);
        let mut run: Option<(usize, u32)> = None; // (first page, pages) of adjacent fetchable pages
        let mut coded = Vec::new();
        let mut issued = 0u64;
        let mut first_window_page = None;
        let mut window_pages = 0;
        for k in 0..depth as i64 {
            let Ok(p) = usize::try_from(prediction.start + k * delta) else { break };
            if p >= region.pages.len() {
                break;
            }
            first_window_page.get_or_insert(p);
            window_pages += 1;
            let fetchable = PageState::only_on_host(region.pages[p]);
            // One read: the same slab, and the same chunk of an erasure-coded one.
            let same_run = |a: usize, b: usize| {
                a / region.slab_pages == b / region.slab_pages
                    && region.redundancy.same_chunk(a % region.slab_pages, b % region.slab_pages)
            };
            // Extend the run while pages are adjacent (delta 1) and in the same slab.
            match run {
                Some((first, n)) if fetchable && delta == 1 && same_run(first, p) && n < 64 => {
                    run = Some((first, n + 1));
                }
                _ => {
                    if let Some((first, n)) = run.take() {
                        issued += send_prefetch(region, &mut self.links, &mut coded, id, first, n);
                    }
                    if fetchable {
                        run = Some((p, 1));
                    }
                }
            }
        }
        if let Some((first, n)) = run {
            issued += send_prefetch(region, &mut self.links, &mut coded, id, first, n);
        }
        // A window issued on a wait continues the one before: account for both together.
        if let (Some(first), Some(stream)) = (first_window_page, region.streams.find(key)) {
            stream.window = match stream.window {
                Some((old, d, n)) if d == delta && old as i64 + n as i64 * d == first as i64 => {
                    Some((old, d, n + window_pages))
                }
                _ => Some((first, delta, window_pages)),
            };
        }
        for (first, n) in coded {
            self.gather_pages(id, first, n, redundant::GatherFor::Prefetch);
        }
        self.stats.prefetch_issued.fetch_add(issued, Relaxed);
    }

    /// A prefetch of `page` will not be installed. If a thread faulted on it meanwhile, that
    /// thread asked for it: fetch it for the thread (or fail it, if its host is dead).
    /// Otherwise the page just faults normally when touched.
    fn drop_prefetch(&mut self, id: u32, page: usize) {
        let Some(region) = self.regions.get_mut(&id) else { return };
        let state = region.pages[page];
        if state & (PageState::FETCHING | PageState::RESIDENT) != PageState::FETCHING {
            return;
        }
        region.pages[page] &= !(PageState::FETCHING | PageState::PREFETCHED | PageState::WANTED);
        if state & PageState::WANTED == 0 {
            return;
        }
        region.pages[page] |= PageState::FETCHING;
        self.refetch(id, page, false, Instant::now(), "every copy of it is on a lost host");
    }

    /// Installs `data`, fetched for a fault (a `write` fault or not) on `page` of region `id`,
    /// and counts the fault: dirty at once when a write is predicted; nothing when the page was
    /// served meanwhile. With `source` (`data` is the page of that reply, see
    /// `DeferredInstall`) the bookkeeping after the copy is deferred.
    fn install_fetched(
        &mut self,
        id: u32,
        page: usize,
        data: &[u8],
        write: bool,
        started: Instant,
        source: Option<(usize, u64)>,
    ) {
        self.stats.remote_faults.fetch_add(1, Relaxed);
        self.stats.pages_fetched.fetch_add(1, Relaxed);
        match self.regions.get(&id).map(|r| r.pages[page]) {
            Some(s) if s & PageState::FETCHING != 0 => {
                let predicted = !write && self.tracker.is_none() && self.write_predictor.predicts_write();
                self.install_from(id, page, data, write || predicted, source);
                if let Some(r) = self.regions.get_mut(&id).filter(|_| predicted) {
                    if r.pages[page] & PageState::DIRTY != 0 {
                        r.pages[page] |= PageState::UNTRACKED;
                        self.stats.predicted_writes.fetch_add(1, Relaxed);
                    }
                }
            }
            // Served since (a fault racing an install), or the region is gone. (A discard
            // drops the replies to reads of its pages: see `forget_reads`.)
            _ => {}
        }
        self.stats.fault_service.record(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }

    /// Installs the prefetched pages `data` from `first` of region `id` that are still
    /// awaited, a run of adjacent ones with one copy. Cold in the policy: a wrong guess must
    /// not push out the working set.
    fn install_prefetched(&mut self, id: u32, first: usize, data: &[u8]) {
        let count = data.len() / PAGE_SIZE;
        self.stats.pages_fetched.fetch_add(count as u64, Relaxed);
        let mut i = 0;
        while i < count {
            let waiting = |k: usize| {
                self.regions.get(&id).is_some_and(|r| {
                    r.pages[first + k] & (PageState::FETCHING | PageState::RESIDENT) == PageState::FETCHING
                })
            };
            let mut n = 0;
            while i + n < count && waiting(i + n) {
                n += 1;
            }
            if n > 0 {
                self.install_run(id, first + i, &data[i * PAGE_SIZE..(i + n) * PAGE_SIZE]);
            }
            i += n.max(1);
        }
    }

    /// Installs `data`, several pages from `first` of region `id`, with one copy: clean, or
    /// dirty when writes are predicted. If the copy fails part-way (a page was there after
    /// all), each page is installed alone, clean.
    fn install_run(&mut self, id: u32, first: usize, data: &[u8]) {
        let Some(region) = self.regions.get_mut(&id) else { return };
        let pages = data.len() / PAGE_SIZE;
        let dirty = pages > 1 && self.tracker.is_none() && self.write_predictor.predicts_write();
        if pages == 1
            || !matches!(self.uffd.copy(region.addr(first), data, !dirty, true), Ok(CopyOutcome::Installed))
        {
            // Page by page, as the run was meant: pages the failed copy mapped writable must
            // be tracked dirty.
            for (k, chunk) in data.chunks_exact(PAGE_SIZE).enumerate() {
                self.install(id, first + k, chunk, dirty);
                if let Some(r) = self.regions.get_mut(&id).filter(|_| dirty) {
                    r.pages[first + k] |= PageState::UNTRACKED;
                }
            }
            return;
        }
        for (page, chunk) in (first..first + pages).zip(data.chunks_exact(PAGE_SIZE)) {
            region.pages[page] &= !(PageState::FETCHING | PageState::WANTED);
            region.pages[page] |= PageState::RESIDENT;
            if dirty {
                region.pages[page] |= PageState::DIRTY | PageState::UNTRACKED;
                if region.coder.is_some() || self.twin_gate.admit(&self.config) {
                    region.twins.insert(page, self.twins.take(chunk));
                }
                self.dirty.push(key(id, page));
            }
            self.policy.insert(key(id, page));
        }
        if dirty {
            self.stats.predicted_writes.fetch_add(pages as u64, Relaxed);
        }
        self.resident += pages;
        self.last_wake = Instant::now();
        self.enforce_limit_if_far_over();
    }

    /// Installs `data` as page `page` of region `id`; dirty if it was a write fault. (Under
    /// async tracking a page installed writable is simply found written by the next scan.)
    fn install(&mut self, id: u32, page: usize, data: &[u8], write: bool) {
        self.install_from(id, page, data, write, None);
    }

    /// As `install`; with `source` (the reply's link and frame, where `data` stays until
    /// the next receive on that link), the bookkeeping after the copy is deferred.
    fn install_from(&mut self, id: u32, page: usize, data: &[u8], write: bool, source: Option<(usize, u64)>) {
        let Some(region) = self.regions.get_mut(&id) else { return };
        let addr = region.addr(page);
        let dirty = write && self.tracker.is_none();
        region.pages[page] &= !(PageState::FETCHING | PageState::WANTED);
        region.pages[page] |= PageState::RESIDENT | if dirty { PageState::DIRTY } else { 0 };
        self.last_wake = Instant::now();
        if let Err(e) = self.uffd.copy(addr, data, !write, true) {
            eprintln!("clustermem: cannot install page at {addr:#x}: {}", chain(&e));
            region.pages[page] &= !(PageState::RESIDENT | PageState::DIRTY);
            // The page is back on its host only: its waiting threads retry (and fault
            // again) rather than sleep for ever (ENOMEM passes; a gone mapping has no one).
            let _ = self.uffd.wake(addr, PAGE_SIZE);
            return;
        }
        // The twin is taken after the copy has woken the thread: it is a copy of `data`, the
        // host's bytes, which the thread's stores to the page do not touch, and a copy into
        // a twin buffer (cold: twins cycle through an eighth of local memory) took ~1 us off
        // the fault path (a fault's p50 0.7-1.0 us lower in `bench random --low-latency`,
        // the two orders alternating every 256 faults in one run).
        let twin = dirty && (region.coder.is_some() || self.twin_gate.admit(&self.config));
        if let Some(source) = source {
            debug_assert!(self.deferred.is_none(), "one install per reply");
            self.deferred =
                Some(DeferredInstall { region: id, page, dirty, twin_from: twin.then_some(source) });
            return;
        }
        self.after_install(id, page, dirty, twin.then_some(data));
    }

    /// The bookkeeping of an installed page: its twin (a copy of `twin`, the host's bytes),
    /// the dirty list, the policy, and an eviction if far over the limit.
    fn after_install(&mut self, id: u32, page: usize, dirty: bool, twin: Option<&[u8]>) {
        if let (Some(data), Some(region)) = (twin, self.regions.get_mut(&id)) {
            region.twins.insert(page, self.twins.take(data));
        }
        if dirty {
            self.dirty.push(key(id, page));
        }
        self.policy.insert(key(id, page));
        self.resident += 1;
        self.enforce_limit_if_far_over();
    }

    /// Pages (resident, twins and the ring of recent victims) over the local-memory limit.
    fn over_limit(&self) -> usize {
        (self.resident + self.twins.in_use() + self.ring_reserve).saturating_sub(self.config.capacity_pages)
    }

    /// The run loop evicts once per round, after sending the round's fetches; a round that
    /// installs many pages evicts at once past this slack, so the limit is never far exceeded.
    fn enforce_limit_if_far_over(&mut self) {
        if self.over_limit() > EVICTION_SLACK_PAGES {
            self.enforce_limit();
        }
    }

    /// Evicts until resident pages and twins fit the local-memory limit. Victims are dropped
    /// together at the end, in one system call and one TLB flush (see `drop_pages`).
    fn enforce_limit(&mut self) {
        if self.eviction_paused {
            return;
        }
        if self.tracker.is_some() {
            self.enforce_limit_moving();
            return;
        }
        let mut dropped = std::mem::take(&mut self.dropped);
        while self.over_limit() > 0 {
            let Some(victim) = self.policy.evict() else { break };
            match self.evict(victim) {
                Some(Some(addr)) => dropped.push(addr),
                Some(None) => {}
                // Over the limit for now rather than spin on a page that cannot leave.
                None => break,
            }
        }
        // SAFETY: these pages lie in mappings this runtime owns (no region was removed since
        // they were chosen); dropping them only makes the next touch fault to us.
        unsafe { self.dropper.drop_pages(&mut dropped) };
        dropped.clear();
        self.dropped = dropped;
    }

    /// Gives one resident page back: write-protect, write back if dirty, and mark it gone.
    /// Returns the address the caller must then drop (`MADV_DONTNEED`), Some(None) if its
    /// region is gone, or None if the page could not be evicted (it stays resident and
    /// tracked). Until the drop a reader still sees the page; a writer faults (it is
    /// write-protected) and is served after the drop, by a fetch.
    fn evict(&mut self, victim: PageKey) -> Option<Option<usize>> {
        let (id, page) = unkey(victim);
        let Some(region) = self.regions.get_mut(&id) else { return Some(None) };
        let addr = region.addr(page);
        let state = region.pages[page];
        debug_assert!(state & PageState::RESIDENT != 0);
        if state & PageState::DIRTY != 0 {
            // Write-protect first: a writer racing the write-back now waits in the fault
            // queue, and sees the page refetched with its store still to make.
            if let Err(e) = self.uffd.write_protect(addr, PAGE_SIZE, true, true) {
                eprintln!("clustermem: cannot write-protect {addr:#x} for eviction: {}", chain(&e));
                self.policy.put_back(victim);
                return None;
            }
            self.write_back(id, page);
        }
        if state & (PageState::DIRTY | PageState::UNTRACKED | PageState::PREFETCHED) == 0 {
            // Installed clean and never written.
            self.write_predictor.observe(false);
        }
        self.forget_evicted(id, page);
        Some(Some(addr))
    }

    /// Marks page `page` of region `id`, just evicted, not resident.
    fn forget_evicted(&mut self, id: u32, page: usize) {
        let region = self.regions.get_mut(&id).expect("caller checked");
        if region.pages[page] & PageState::PREFETCHED != 0 {
            self.stats.prefetch_wasted.fetch_add(1, Relaxed);
        }
        self.evicted_data |= region.pages[page] & PageState::ON_HOST != 0;
        region.pages[page] &=
            !(PageState::RESIDENT | PageState::DIRTY | PageState::PREFETCHED | PageState::UNTRACKED);
        self.resident -= 1;
        self.stats.pages_evicted.fetch_add(1, Relaxed);
    }

    /// Queues the write-back of a resident, write-protected page of region `id`: the lines
    /// that changed since its twin, or the whole page (page mode, no twin, or past the
    /// threshold). Nothing is sent for a page written back to its clean contents.
    fn write_back(&mut self, id: u32, page: usize) {
        let addr = self.regions[&id].addr(page);
        // SAFETY: the page is resident and write-protected, so it is readable and no store
        // changes it while it is diffed and copied into the send buffers.
        let data = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) };
        self.write_back_data(id, page, data);
    }

    /// Queues the write-back of page `page` of region `id`, whose contents are now `data`
    /// (stable while this runs): see [`Core::write_back`].
    fn write_back_data(&mut self, id: u32, page: usize, data: &[u8]) {
        let region = self.regions.get_mut(&id).expect("caller checked");
        let twin = region.twins.remove(&page);
        if !region.committed(page) {
            // A reserved region's page outside every committed range (the program wrote
            // memory it never allocated): there is no host memory to keep it in.
            if let Some(t) = twin {
                self.twins.release(t);
            }
            region.record_loss(page, "written outside every committed range of a reserved region");
            return;
        }
        let mask = twin.map_or(u64::MAX, |t| self.twins.diff(data, t));
        // An erasure-coded page's parity follows its change: the changed lines XOR their
        // clean contents. Every dirty page of such a region has a twin, so a page without
        // one was never written back (its hosts hold zeros).
        let mut delta = std::mem::take(&mut self.delta);
        delta.clear();
        if region.coder.is_some() {
            if twin.is_none() && region.pages[page] & PageState::ON_HOST != 0 {
                region.record_loss(page, "internal error: an erasure-coded page was written without a twin");
                self.delta = delta;
                return;
            }
            let clean = twin.map_or(&[0u8; PAGE_SIZE][..], |t| self.twins.clean(t));
            let mut rest = mask;
            while rest != 0 {
                let at = rest.trailing_zeros() as usize * LINE_SIZE;
                rest &= rest - 1;
                delta.extend(
                    data[at..at + LINE_SIZE].iter().zip(&clean[at..at + LINE_SIZE]).map(|(a, b)| a ^ b),
                );
            }
        }
        if let Some(t) = twin {
            self.twins.release(t);
        }
        if !region.readable(page) {
            region.record_loss(page, "every copy of it is on a lost host");
            self.delta = delta;
            return;
        }
        if mask == 0 {
            self.stats.clean_write_backs_skipped.fetch_add(1, Relaxed);
            self.delta = delta;
            return;
        }
        let lines = mask.count_ones();
        // Pages first written from zeros are being initialised, densely by nature; they say
        // nothing about how the program updates its data.
        if matches!(twin, Some(Twin::Slot(_))) {
            self.twin_gate.observe(lines > self.config.line_threshold);
        }
        let bytes = self.send_write_back(id, page, data, mask, &delta);
        self.delta = delta;
        self.stats.pages_written_back.fetch_add(1, Relaxed);
        self.stats.dirty_lines_written.fetch_add(u64::from(lines), Relaxed);
        self.stats.bytes_written_back.fetch_add(bytes, Relaxed);
        self.stats.page_granular_bytes.fetch_add(PAGE_FRAME_BYTES, Relaxed);
        self.regions.get_mut(&id).expect("checked above").pages[page] |= PageState::ON_HOST;
    }

    /// Writes back the dirty pages of region `only` (or of every region), or only those with
    /// a twin (`twinned`), and marks them clean and write-protected again; runs of adjacent
    /// pages are protected with one ioctl. Stops after about `limit` pages; returns whether
    /// every such page was written back.
    fn write_back_dirty(&mut self, only: Option<u32>, limit: usize, twinned: bool) -> bool {
        if self.tracker.is_some() {
            return self.write_back_written(only, limit);
        }
        let mut keys = std::mem::take(&mut self.dirty);
        // Stable sort: what an earlier chunk left is sorted already, and merging it with the
        // keys dirtied since is linear in it.
        keys.sort();
        keys.dedup();
        let mut written = 0;
        let mut keep = Vec::new();
        let mut run_start = 0;
        while run_start < keys.len() {
            if written >= limit {
                keep.extend_from_slice(&keys[run_start..]);
                break;
            }
            let (id, first) = unkey(keys[run_start]);
            if only.is_some_and(|o| o != id) {
                keep.push(keys[run_start]);
                run_start += 1;
                continue;
            }
            let Some(region) = self.regions.get(&id) else {
                run_start += 1;
                continue;
            };
            let dirty = |p: usize| {
                region.pages[p] & (PageState::DIRTY | PageState::RESIDENT)
                    == (PageState::DIRTY | PageState::RESIDENT)
            };
            // Asked for: with `twinned`, only the pages holding a twin.
            let wanted = |p: usize| !twinned || region.twins.contains_key(&p);
            if !dirty(first) {
                run_start += 1;
                continue;
            }
            if !wanted(first) {
                keep.push(keys[run_start]);
                run_start += 1;
                continue;
            }
            let mut run_end = run_start + 1;
            while run_end < keys.len()
                && run_end - run_start < limit - written
                && keys[run_end] == keys[run_end - 1] + 1
                && dirty(unkey(keys[run_end]).1)
                && wanted(unkey(keys[run_end]).1)
            {
                run_end += 1;
            }
            let pages = run_end - run_start;
            let addr = region.addr(first);
            if let Err(e) = self.uffd.write_protect(addr, pages * PAGE_SIZE, true, true) {
                eprintln!("clustermem: cannot write-protect {addr:#x} for write-back: {}", chain(&e));
                keep.extend_from_slice(&keys[run_start..run_end]);
                run_start = run_end;
                continue;
            }
            for page in first..first + pages {
                self.write_back(id, page);
                let state = &mut self.regions.get_mut(&id).expect("checked").pages[page];
                *state = (*state & !PageState::DIRTY) | PageState::UNTRACKED;
            }
            self.stats.pages_flushed.fetch_add(pages as u64, Relaxed);
            written += pages;
            run_start = run_end;
        }
        let done = written < limit || keep.iter().all(|&k| only.is_some_and(|o| o != unkey(k).0));
        keep.append(&mut self.dirty);
        self.dirty = keep;
        done
    }

    fn on_reply(&mut self, h: usize, id: u64, msg: &Message<'_>) {
        let Some((want, pending, sent)) = self.links[h].ack() else {
            self.host_died(h, "host sent a reply nobody asked for");
            return;
        };
        if want != id {
            self.host_died(h, &format!("host answered request {id}, expected {want}"));
            return;
        }
        match (pending, msg) {
            // A reply of the wrong length is handled as a refusal, below.
            (Pending::Fetch { region, page, write, started, offset }, Message::Pages { data, .. })
                if data.len() == PAGE_SIZE =>
            {
                self.stats.bytes_fetched.fetch_add(data.len() as u64, Relaxed);
                // The reply is this page: its bookkeeping may wait (see `DeferredInstall`).
                let source = self.reply_source.take();
                self.install_fetched(region, page, data, write, started, source);
                if self.regions.get(&region).is_some_and(|r| r.prefetch == PrefetchMode::Pointer) {
                    self.chase_from_fault(region, page, offset);
                }
            }
            (Pending::Chase(chase), Message::Pages { data, .. }) if data.len() == PAGE_SIZE => {
                self.chase_arrived(chase, data, sent);
            }
            (Pending::ChaseList(request), Message::Chain { addresses }) => {
                self.chain_arrived(request, addresses);
            }
            (Pending::ChaseList(_), _) => self.host_chases -= 1,
            (Pending::Chase(chase), _) => {
                self.chases -= 1;
                self.drop_prefetch(chase.region, chase.page);
            }
            (Pending::Prefetch { region, first, count }, Message::Pages { data, .. })
                if data.len() == count as usize * PAGE_SIZE =>
            {
                self.stats.bytes_fetched.fetch_add(data.len() as u64, Relaxed);
                self.install_prefetched(region, first, data);
            }
            (Pending::Prefetch { region, first, count }, _) => {
                // A refused prefetch costs nothing: the pages fault normally later.
                for page in first..first + count as usize {
                    self.drop_prefetch(region, page);
                }
            }
            (Pending::Zero { region, page, token }, Message::Pages { data, .. })
                if data.len() == PAGE_SIZE =>
            {
                self.stats.bytes_fetched.fetch_add(data.len() as u64, Relaxed);
                self.zero_on_hosts(region, page, token, data);
            }
            (Pending::Zero { region, page, token }, _) => self.zero_retry(region, page, token),
            (Pending::WriteBack { .. }, Message::Ok) | (Pending::Ignore, _) => {}
            (Pending::Part { gather, shard }, msg) => self.on_part(gather, shard, msg),
            (Pending::Barrier(token), _) => self.barrier_passed(token),
            (Pending::Fetch { region, page, .. } | Pending::WriteBack { region, page }, reply) => {
                let why = format!("host {} refused: {reply:?}", self.links[h].addr);
                if let Some(r) = self.regions.get_mut(&region) {
                    r.pages[page] &= !PageState::FETCHING;
                    r.record_loss(page, &why);
                    let addr = r.addr(page);
                    self.poison(addr);
                }
            }
        }
    }

    /// A flush's barrier was answered (or its host died): the flush is done once every host
    /// has passed it, successfully unless pages of its region were lost.
    fn barrier_passed(&mut self, token: u64) {
        let Some(entry) = self.flushes.get_mut(&token) else { return };
        entry.0 -= 1;
        if entry.0 > 0 {
            return;
        }
        let (_, id, reply) = self.flushes.remove(&token).expect("present");
        let error =
            self.regions.get(&id).and_then(|r| r.error.lock().unwrap_or_else(|e| e.into_inner()).clone());
        let _ = reply.send(error.map_or(Ok(()), |e| Err(RuntimeError::HostFailed(e))));
    }

    /// Marks host `h` dead. Its shards are lost: spans with enough left are rebuilt
    /// elsewhere, and requests in flight to it are re-sent to surviving copies or shards;
    /// pages with too few left are lost, and threads waiting for them are poisoned so none
    /// hangs.
    fn host_died(&mut self, h: usize, why: &str) {
        if self.links[h].dead.is_some() {
            return;
        }
        eprintln!("clustermem: {why}");
        self.stats.hosts_lost.fetch_add(1, Relaxed);
        self.links[h].dead = Some(why.to_string());
        let pending = self.links[h].abandon();
        self.shards_lost(h, why);
        for (_, pending, _) in pending {
            match pending {
                Pending::Fetch { region, page, write, started, .. } => {
                    self.refetch(region, page, write, started, why);
                }
                Pending::WriteBack { region, page } => {
                    // Copies on live hosts got it too; with none left the data is gone.
                    if let Some(r) = self.regions.get_mut(&region) {
                        if !r.readable(page) && r.pages[page] & PageState::LOST == 0 {
                            r.record_loss(page, why);
                        }
                    }
                }
                Pending::Part { gather, shard } => self.part_lost(gather, shard),
                Pending::Zero { region, page, token } => self.zero_retry(region, page, token),
                Pending::Prefetch { region, first, count } => {
                    for page in first..first + count as usize {
                        self.drop_prefetch(region, page);
                    }
                }
                Pending::Chase(chase) => {
                    self.chases -= 1;
                    self.drop_prefetch(chase.region, chase.page);
                }
                Pending::ChaseList(_) => self.host_chases -= 1,
                Pending::Barrier(token) => self.barrier_passed(token),
                Pending::Ignore => {}
            }
        }
    }

    /// Chooses a live host outside `exclude` for a new slab of `bytes`: the freer of two picked
    /// at random (power of two choices), which spreads slabs evenly without herding every
    /// client onto the one emptiest host. None if no such host has room.
    fn place(&mut self, bytes: u64, exclude: &[usize]) -> Option<usize> {
        let free = |l: &Link| l.capacity_bytes.saturating_sub(l.allocated_bytes);
        let live: Vec<usize> =
            (0..self.links.len()).filter(|h| !exclude.contains(h) && self.links[*h].dead.is_none()).collect();
        let candidates: Vec<usize> =
            live.iter().copied().filter(|&h| free(&self.links[h]) >= bytes).collect();
        if candidates.is_empty() {
            // None has room by our count: ask the freest, whose refusal says how full it is.
            return live.into_iter().max_by_key(|&h| free(&self.links[h]));
        }
        let mut pick = || {
            // xorshift64: placement needs spread, not cryptographic randomness.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            candidates[(self.rng % candidates.len() as u64) as usize]
        };
        let (a, b) = (pick(), pick());
        Some(if free(&self.links[a]) >= free(&self.links[b]) { a } else { b })
    }

    /// Hosts that cannot hold erasure shards (older ones, without `XorLines`).
    fn hosts_without_xor_lines(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.links.len()).filter(|&h| !self.links[h].xors_lines)
    }

    fn free_slab(&mut self, s: SlabRef) {
        let link = &mut self.links[s.host];
        link.allocated_bytes -= s.bytes;
        if link.dead.is_none() {
            link.send(&Message::FreeSlab { slab_id: s.slab_id }, Pending::Ignore);
        }
    }

    /// Drops the replies still due to reads of pages `first..first + count` of region `id`
    /// (being discarded): each page may be written, written back and fetched anew before an
    /// old reply arrives, which would install what the page held before the discard. A
    /// thread asleep on such a read is woken by the discard and faults anew; the other pages
    /// of a prefetch cut short fault normally (or are fetched for a thread waiting on them).
    fn forget_reads(&mut self, id: u32, first: usize, count: usize) {
        let discarded = first..first + count;
        let overlaps = |from: usize, n: usize| from < discarded.end && discarded.start < from + n;
        let mut cut_short = Vec::new();
        for link in &mut self.links {
            for (_, pending, _) in &mut link.pending {
                match *pending {
                    Pending::Fetch { region, page, .. } if region == id && discarded.contains(&page) => {}
                    Pending::Chase(c) if c.region == id && discarded.contains(&c.page) => self.chases -= 1,
                    Pending::Prefetch { region, first: from, count: n }
                        if region == id && overlaps(from, n as usize) =>
                    {
                        cut_short.extend((from..from + n as usize).filter(|p| !discarded.contains(p)));
                    }
                    _ => continue,
                }
                pending.ignore(&mut link.demand_reads);
            }
        }
        self.gathers.retain(|_, g| match g.installs() {
            Some((region, from, n)) if region == id && overlaps(from, n) => {
                cut_short.extend((from..from + n).filter(|p| !discarded.contains(p)));
                false
            }
            _ => true,
        });
        for page in cut_short {
            self.drop_prefetch(id, page);
        }
    }

    /// Forgets pages `first..first + count` of region `id`, as munmap or MADV_DONTNEED of
    /// private anonymous memory would: they read as zeros afterwards. Local copies, twins and
    /// the host's copies are dropped, and so are the replies to reads of them in flight.
    fn discard(&mut self, id: u32, first: usize, count: usize) -> Result<(), RuntimeError> {
        let region =
            self.regions.get_mut(&id).ok_or_else(|| RuntimeError::Config(format!("no region {id}")))?;
        let pages = region.pages.len();
        if count == 0 || first.checked_add(count).is_none_or(|end| end > pages) {
            return Err(RuntimeError::Config(format!(
                "pages {first}+{count} outside a region of {pages} pages"
            )));
        }
        // Dropped first: if the kernel refuses (locked memory), nothing has changed.
        let addr = region.addr(first);
        // SAFETY: the range lies in a mapping this runtime owns; dropping its pages only makes
        // the next touch fault back to us, and we serve such a fault with zeros.
        if unsafe { libc::madvise(addr as *mut libc::c_void, count * PAGE_SIZE, libc::MADV_DONTNEED) } != 0 {
            return Err(RuntimeError::Os {
                what: "madvise(MADV_DONTNEED)",
                source: std::io::Error::last_os_error(),
            });
        }
        self.forget_reads(id, first, count);
        let region = self.regions.get_mut(&id).expect("checked above");
        let (redundancy, slab_pages, pages) = (region.redundancy, region.slab_pages, region.pages.len());
        // The stripe rows of span `span` the discard covers whole: dropped on every host as
        // they are (for copies, every page).
        let whole_rows = move |span: usize| {
            let start = span * slab_pages;
            let span_pages = (pages - start).min(slab_pages);
            let (a, b) = (first.max(start) - start, (first + count).min(start + span_pages) - start);
            redundancy.whole_rows(span_pages, a, b)
        };
        // Threads waiting for a page in flight are served zeros below: the reply to a
        // prefetch of a discarded page is dropped, and would leave them asleep. An
        // erasure-coded page outside the whole stripe rows the hosts discard is zeroed on its
        // hosts through its parity first, and a thread touching it meanwhile waits.
        let mut waiting = Vec::new();
        let mut to_zero = Vec::new();
        for page in first..first + count {
            let whole = whole_rows(page / slab_pages).contains(&(page % slab_pages / redundancy.row_pages()));
            if !whole && region.zeroing.contains_key(&page) {
                continue; // Its zeroing in flight finishes it.
            }
            region.zeroing.remove(&page);
            let state = std::mem::take(&mut region.pages[page]);
            if state & PageState::RESIDENT != 0 {
                self.policy.remove(key(id, page));
                self.resident -= 1;
            }
            if !whole && state & PageState::ON_HOST != 0 {
                region.pages[page] = PageState::ON_HOST | PageState::FETCHING | (state & PageState::WANTED);
                to_zero.push(page);
            } else if state & PageState::WANTED != 0 && state & PageState::RESIDENT == 0 {
                waiting.push(page);
            }
            if let Some(t) = region.twins.remove(&page) {
                self.twins.release(t);
            }
        }
        let zeros = std::mem::take(&mut self.zero_page);
        for page in waiting {
            self.install(id, page, &zeros, false);
        }
        self.zero_page = zeros;
        // Any other thread still asleep on a page of the range (its fetch was dropped above)
        // retries its access and faults anew, on a page that now reads as zeros.
        if let Err(e) = self.uffd.wake(addr, count * PAGE_SIZE) {
            eprintln!("clustermem: cannot wake threads on a discarded range at {addr:#x}: {}", chain(&e));
        }
        let region = self.regions.get_mut(&id).expect("checked above");
        // The hosts give the memory back; sent after any write-back of these pages on the same
        // connections, so it cannot be overtaken by one.
        for span in first / slab_pages..=(first + count - 1) / slab_pages {
            let rows = whole_rows(span);
            let slab_range = rows.start * redundancy.row_stripes()..rows.end * redundancy.row_stripes();
            let Some(placement) = region.slabs[span].as_mut().filter(|_| !slab_range.is_empty()) else {
                continue;
            };
            for shard in &mut placement.shards {
                if matches!(shard.state, ShardState::Lost) {
                    continue;
                }
                redundant::written_during_rebuild(&mut shard.state, slab_range.clone());
                let count = u32::try_from(slab_range.len()).expect("a slab span fits in u32");
                self.links[shard.slab.host].send(
                    &Message::DiscardPages {
                        slab_id: shard.slab.slab_id,
                        first_page: slab_range.start as u64,
                        count,
                    },
                    Pending::Ignore,
                );
            }
        }
        for page in to_zero {
            self.zero_start(id, page);
        }
        Ok(())
    }

    fn remove_region(&mut self, id: u32) {
        let Some(region) = self.regions.remove(&id) else { return };
        let len = region.pages.len() * PAGE_SIZE;
        if let Err(e) = self.uffd.unregister(region.base, len) {
            eprintln!("clustermem: unregistering region {id}: {}", chain(&e));
        }
        self.ranges.retain(|r| r.2 != id);
        for (page, &s) in region.pages.iter().enumerate() {
            if s & PageState::RESIDENT != 0 {
                self.policy.remove(key(id, page));
                self.resident -= 1;
            }
        }
        for (_, twin) in region.twins {
            self.twins.release(twin);
        }
        for s in region.slabs.into_iter().flatten().flat_map(|p| p.shards) {
            if !matches!(s.state, ShardState::Lost) {
                self.free_slab(s.slab);
            }
        }
    }

    /// Writes back every dirty page of region `id` (they stay resident, clean) and replies
    /// once every host has acknowledged.
    fn flush(&mut self, id: u32, reply: Sender<Result<(), RuntimeError>>) {
        if !self.regions.contains_key(&id) {
            let _ = reply.send(Err(RuntimeError::Protocol(format!("no region {id}"))));
            return;
        }
        self.write_back_dirty(Some(id), usize::MAX, false);
        if let Some(err) = self.regions[&id].error.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            let _ = reply.send(Err(RuntimeError::HostFailed(err)));
            return;
        }
        self.next_barrier += 1;
        let token = self.next_barrier;
        let mut barriers = 0;
        for link in self.links.iter_mut().filter(|l| l.dead.is_none()) {
            link.send(&Message::GetStats, Pending::Barrier(token));
            barriers += 1;
        }
        if barriers == 0 {
            let _ = reply.send(Err(RuntimeError::NoLiveHost));
        } else {
            self.flushes.insert(token, (barriers, id, reply));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_predictor_follows_the_program_and_keeps_sampling() {
        let mut p = WritePredictor::default();
        assert!(!p.predicts_write(), "no evidence, no prediction");
        for _ in 0..500 {
            p.observe(true);
        }
        let dirty = (0..160).filter(|_| p.predicts_write()).count();
        assert_eq!(dirty, 150, "one in {PREDICTOR_SAMPLE} installs stays clean to keep watching");
        // The program turns to reading: a few hundred unwritten pages switch it off.
        for _ in 0..300 {
            p.observe(false);
        }
        assert!(!p.predicts_write());
    }
}
