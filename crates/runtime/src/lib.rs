//! The clustermem compute-side runtime: regions of virtual memory whose pages live on memory
//! hosts, demand-paged over TCP with userfaultfd under a bound on local memory.
//!
//! ```no_run
//! use clustermem_runtime::{Runtime, RuntimeConfig};
//!
//! // No hosts given: an embedded memory host on loopback serves the pages.
//! let runtime = Runtime::start(RuntimeConfig { local_mem_bytes: 64 << 20, ..Default::default() })?;
//! let mut region = runtime.map(1 << 30)?; // 1 GiB, 64 MiB of it resident at most
//! region.as_mut_slice()[123_456_789] = 42;
//! region.flush()?; // written back and acknowledged
//! assert_eq!(region.as_slice()[123_456_789], 42);
//! # Ok::<(), clustermem_runtime::RuntimeError>(())
//! ```
//!
//! One [`Runtime`] has one userfaultfd and one fault-handler thread (see `handler.rs`) that
//! owns every page table, the eviction policy and the host connections: the fault path takes
//! no lock. Its regions share one local-memory budget.

mod dirty;
mod drop_pages;
mod handler;
pub mod policy;
mod prefetch;
pub mod quiet_thread;
mod redundancy;
mod stats;
mod transport;
mod wakeup;

use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use clustermem_host::{MemoryHost, RunningHost};
use clustermem_mmap::AnonMapping;
use clustermem_uffd::{Features, Uffd, UffdError};
use thiserror::Error;

pub use clustermem_proto::PAGE_SIZE;
pub use dirty::{DirtyTracking, WritebackMode};
pub use policy::PolicyKind;
pub use prefetch::PrefetchMode;
pub use redundancy::{ParseRedundancyError, Redundancy};
pub use stats::{Histogram, RuntimeStats, StatsSnapshot};

/// What went wrong in the runtime, with what to do about it where we know.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// userfaultfd is missing, not permitted, or lacks a feature.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A memory host could not be reached.
    #[error("memory host {addr} unreachable: {why}")]
    HostUnreachable {
        /// The address tried.
        addr: String,
        /// Why it failed.
        why: String,
    },
    /// Something answered at a host's address, but not the clustermem protocol.
    #[error("{addr} answered, but not as a clustermem memory host (is it the right address and port? `clustermem host --listen ADDR` starts one): {why}")]
    NotAHost {
        /// The address tried.
        addr: String,
        /// What was wrong with its answer.
        why: String,
    },
    /// A memory host refused a request (e.g. it is full).
    #[error("memory host {addr} refused: {message}")]
    HostRefused {
        /// The host.
        addr: String,
        /// The host's explanation.
        message: String,
    },
    /// A memory host died or broke the protocol while serving.
    #[error("memory host failed: {0}")]
    HostFailed(String),
    /// Every host is dead.
    #[error("no live memory host is left")]
    NoLiveHost,
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A bad argument.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The embedded memory host could not start.
    #[error("cannot start the embedded memory host")]
    EmbeddedHost(#[from] clustermem_host::HostError),
    /// The fault handler thread is gone.
    #[error("the fault handler has stopped")]
    HandlerGone,
    /// The system refused memory or a thread.
    #[error("{what}")]
    Os {
        /// What was attempted.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// How a runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Memory hosts (`host:port`). Empty: start an embedded host on loopback.
    pub hosts: Vec<String>,
    /// Bound on resident region memory, in bytes (at least one page).
    pub local_mem_bytes: u64,
    /// Busy-poll while faults are outstanding (and briefly after), trading a core for latency.
    pub low_latency: bool,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Size of the slabs a region is spread over.
    pub slab_bytes: usize,
    /// A host silent this long while requests wait on it is declared dead (counted from its
    /// last answer, or from the oldest waiting request's send if that came later).
    pub request_timeout: Duration,
    /// Capacity of the embedded host, when no hosts are given (None:
    /// [`default_embedded_capacity`]).
    pub embedded_capacity_bytes: Option<u64>,
    /// Write back changed 64-byte lines (default) or whole pages.
    pub writeback: WritebackMode,
    /// How written pages are found: write-protect faults (`Sync`, needed for line
    /// write-back) or the kernel's asynchronous tracking with `PAGEMAP_SCAN` (`Async`, whole
    /// pages only).
    pub dirty_tracking: DirtyTracking,
    /// With line write-back, send the whole page when more lines than this changed (0..=64).
    pub line_threshold: u32,
    /// Write dirty pages back at least this often, not only on eviction (None: never).
    pub flush_interval: Option<Duration>,
    /// Prefetching of the regions `Runtime::map` makes (`map_with_prefetch` picks per region).
    pub prefetch: PrefetchMode,
    /// Redundancy of the regions `Runtime::map` makes (`map_with` picks per region): each
    /// slab's copies or shards go on distinct hosts, so it needs that many hosts.
    pub redundancy: Redundancy,
    /// Run first on the fault-handler thread and the threads it starts (e.g. to mark them, for
    /// an allocator hook that must never route their allocations into region memory the
    /// handler serves and uses).
    pub on_handler_start: Option<fn()>,
    /// A pointer prefetch not back within this long is abandoned: its page stays not present
    /// and faults normally, unless a thread already waits for it.
    pub prefetch_deadline: Duration,
}

/// An embedded host's capacity unless told otherwise: 64 GiB, or the machine's RAM and swap if
/// less, so that a program outgrowing the machine is refused memory ("host is full") rather
/// than have its host OOM-killed. (Reads /proc/meminfo: asked only where a host is started.)
pub fn default_embedded_capacity() -> u64 {
    const MOST: u64 = 64 << 30;
    clustermem_host::machine_memory().map_or(MOST, |m| m.min(MOST))
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            hosts: Vec::new(),
            local_mem_bytes: 256 << 20,
            low_latency: false,
            policy: PolicyKind::default(),
            slab_bytes: 64 << 20,
            request_timeout: Duration::from_secs(10),
            embedded_capacity_bytes: None,
            writeback: WritebackMode::default(),
            dirty_tracking: DirtyTracking::default(),
            line_threshold: 48,
            flush_interval: Some(Duration::from_millis(100)),
            prefetch: PrefetchMode::default(),
            redundancy: Redundancy::None,
            on_handler_start: None,
            prefetch_deadline: Duration::from_millis(5),
        }
    }
}

/// A running runtime: its fault handler and (if no hosts were given) its embedded host.
#[derive(Debug)]
pub struct Runtime {
    commands: Sender<handler::Command>,
    wakeup: Arc<wakeup::Wakeup>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<RuntimeStats>,
    hosts: Vec<String>,
    prefetch: PrefetchMode,
    redundancy: Redundancy,
    // Dropped after the handler has stopped (field order), so its connections close first.
    _embedded: Option<RunningHost>,
}

impl Runtime {
    /// Opens a userfaultfd, connects to the hosts (or starts the embedded one) and starts the
    /// fault handler.
    pub fn start(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        if config.local_mem_bytes < PAGE_SIZE as u64 {
            return Err(RuntimeError::Config(format!(
                "local memory of {} bytes is less than one page",
                config.local_mem_bytes
            )));
        }
        // Poison (6.6+) lets a lost page fail its thread with SIGBUS instead of hanging it.
        let available = Uffd::available_features()?;
        let poison = if available.contains(Features::POISON) { Features::POISON } else { Features::empty() };
        // The exact faulting address (5.18+) tells pointer prefetch which pointers matter.
        let exact = if available.contains(Features::EXACT_ADDRESS) {
            Features::EXACT_ADDRESS
        } else {
            Features::empty()
        };
        // The faulting thread's id (4.14+) gives each thread a miss stream of its own.
        let thread_id =
            if available.contains(Features::THREAD_ID) { Features::THREAD_ID } else { Features::empty() };
        let tracking = match config.dirty_tracking {
            DirtyTracking::Sync => Features::empty(),
            DirtyTracking::Async => {
                if config.writeback == WritebackMode::Line {
                    return Err(RuntimeError::Config(
                        "line write-back diffs each page against a twin taken at its first store, \
                         which async dirty tracking never sees: use page write-back with it \
                         (--writeback page) or sync dirty tracking"
                            .into(),
                    ));
                }
                for (feature, name) in [
                    (Features::WP_ASYNC, "UFFD_FEATURE_WP_ASYNC (Linux 6.7+), for async dirty tracking"),
                    (Features::MOVE, "UFFDIO_MOVE (Linux 6.8+), for async dirty tracking"),
                ] {
                    if !available.contains(feature) {
                        return Err(UffdError::MissingFeature(name).into());
                    }
                }
                Features::WP_ASYNC.union(Features::MOVE)
            }
        };
        let uffd = Arc::new(Uffd::open(
            Features::PAGEFAULT_FLAG_WP.union(poison).union(exact).union(thread_id).union(tracking),
        )?);
        if config.redundancy.shards() > config.hosts.len().max(1) {
            return Err(RuntimeError::Config(format!(
                "--redundancy {} puts each slab on {} distinct memory hosts; {} given{}",
                config.redundancy,
                config.redundancy.shards(),
                config.hosts.len(),
                if config.hosts.is_empty() { " (the embedded host is one): pass --hosts" } else { "" }
            )));
        }
        let (embedded, hosts) = if config.hosts.is_empty() {
            let capacity = config.embedded_capacity_bytes.unwrap_or_else(default_embedded_capacity);
            let host = MemoryHost::bind("127.0.0.1:0", capacity)?.spawn();
            let addr = host.addr().to_string();
            (Some(host), vec![addr])
        } else {
            (None, config.hosts.clone())
        };
        let connections = hosts
            .iter()
            .map(|addr| {
                transport::connect(
                    addr,
                    config.low_latency,
                    transport::new_session(),
                    transport::CONNECT_TIMEOUT,
                )
                .map(|(link, reader, _)| (link, reader))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stats = Arc::new(RuntimeStats::default());
        let on_handler_start = config.on_handler_start;
        let (tx, rx) = mpsc::channel();
        let wakeup =
            Arc::new(wakeup::Wakeup::new().map_err(|source| RuntimeError::Os { what: "eventfd", source })?);
        let handler = handler::Handler::new(
            uffd,
            handler::HandlerConfig {
                capacity_pages: usize::try_from(config.local_mem_bytes / PAGE_SIZE as u64)
                    .unwrap_or(usize::MAX),
                low_latency: config.low_latency,
                writeback: config.writeback,
                async_tracking: config.dirty_tracking == DirtyTracking::Async,
                line_threshold: config.line_threshold.min(dirty::MAX_LINES),
                flush_interval: config.flush_interval.filter(|d| !d.is_zero()),
                prefetch_deadline: config.prefetch_deadline,
                slab_bytes: config.slab_bytes.max(PAGE_SIZE),
                request_timeout: config.request_timeout,
                on_thread_start: on_handler_start,
            },
            config
                .policy
                .build(usize::try_from(config.local_mem_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX)),
            Arc::clone(&stats),
            connections,
            rx,
            Arc::clone(&wakeup),
        )?;
        let thread = quiet_thread::spawn("uffd-handler", move || {
            if let Some(hook) = on_handler_start {
                hook();
            }
            handler.run();
        })
        .map_err(|source| RuntimeError::Os { what: "spawning the fault handler", source })?;
        Ok(Self {
            commands: tx,
            wakeup,
            thread: Some(thread),
            stats,
            hosts,
            prefetch: config.prefetch,
            redundancy: config.redundancy,
            _embedded: embedded,
        })
    }

    /// Before a `fork`: whether the child may get a copy of every region as plain memory
    /// (`MADV_DOFORK`), complete because every page holding data is resident here (none was
    /// ever evicted) and few (a quarter of local memory at most). If so, eviction stops
    /// until [`Runtime::resume_eviction`], so that no page leaves while the kernel copies
    /// the page tables; call it after the fork, in the parent. (The child gets no runtime:
    /// its copy is ordinary memory, and its faults are the kernel's.)
    pub fn pause_eviction_for_fork(&self) -> bool {
        let (reply, rx) = mpsc::channel();
        self.command(handler::Command::PauseEvictionForFork { reply }).is_ok() && rx.recv().unwrap_or(false)
    }

    /// Ends [`Runtime::pause_eviction_for_fork`]'s pause.
    pub fn resume_eviction(&self) {
        let _ = self.command(handler::Command::ResumeEviction);
    }

    fn command(&self, cmd: handler::Command) -> Result<(), RuntimeError> {
        self.commands.send(cmd).map_err(|_| RuntimeError::HandlerGone)?;
        self.wakeup.wake();
        Ok(())
    }

    /// Maps a region of `len` bytes (rounded up to whole pages) backed by the hosts, with
    /// host memory allocated for all of it now (a full host fails here, not later), and the
    /// runtime's prefetch mode.
    pub fn map(&self, len: usize) -> Result<Region<'_>, RuntimeError> {
        self.add_region(len, true, self.prefetch, self.redundancy)
    }

    /// As [`Runtime::map`], with its own prefetching and redundancy.
    pub fn map_with(
        &self,
        len: usize,
        prefetch: PrefetchMode,
        redundancy: Redundancy,
    ) -> Result<Region<'_>, RuntimeError> {
        self.add_region(len, true, prefetch, redundancy)
    }

    /// As [`Runtime::map`], prefetching as `prefetch` says: e.g. `Pointer` for a region that
    /// holds a linked structure, `Off` for one only ever accessed at random.
    pub fn map_with_prefetch(&self, len: usize, prefetch: PrefetchMode) -> Result<Region<'_>, RuntimeError> {
        self.add_region(len, true, prefetch, self.redundancy)
    }

    /// Reserves a region of `len` bytes of address space with no host memory yet: call
    /// [`Region::commit`] on the ranges the program will use. For allocators that carve a
    /// large arena into allocations (`clustermem run`). A page written outside every committed
    /// range cannot be kept: it is reported lost when evicted.
    pub fn reserve(&self, len: usize) -> Result<Region<'_>, RuntimeError> {
        self.add_region(len, false, self.prefetch, self.redundancy)
    }

    fn add_region(
        &self,
        len: usize,
        commit: bool,
        prefetch: PrefetchMode,
        redundancy: Redundancy,
    ) -> Result<Region<'_>, RuntimeError> {
        if len == 0 {
            return Err(RuntimeError::Config("a region needs at least one byte".into()));
        }
        let len = len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        if len / PAGE_SIZE >= 1 << 40 {
            return Err(RuntimeError::Config(format!("region of {len} bytes is too large")));
        }
        let map = AnonMapping::new(len)
            .map_err(|source| RuntimeError::Os { what: "mmap of the region", source })?;
        let error = Arc::new(Mutex::new(None));
        let (reply, rx) = mpsc::channel();
        let id = self
            .command(handler::Command::AddRegion {
                base: map.as_ptr() as usize,
                len,
                commit,
                prefetch,
                redundancy,
                reply,
                error: Arc::clone(&error),
            })
            .and_then(|()| rx.recv().map_err(|_| RuntimeError::HandlerGone)?)?;
        Ok(Region { runtime: self, id, map, error })
    }

    /// Counters of this runtime (live; reset them between phases with `reset`).
    pub fn stats(&self) -> &RuntimeStats {
        &self.stats
    }

    /// The memory hosts in use (the embedded host's loopback address when none was given).
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.command(handler::Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A region of memory whose pages live on memory hosts. Read and write it as ordinary memory;
/// it is unmapped and its host memory freed on drop.
#[derive(Debug)]
pub struct Region<'rt> {
    runtime: &'rt Runtime,
    id: u32,
    /// Unmapped when the region drops, after `Drop` has had the handler unregister it.
    map: AnonMapping,
    error: Arc<Mutex<Option<String>>>,
}

impl Region<'_> {
    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the region is empty (never: regions have at least one page).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// The region as bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `base..base+len` is mapped for the life of `self`; faults are served.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }

    /// The region as mutable bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len()) }
    }

    /// The region as 64-bit atomics, for sharing between threads.
    pub fn as_atomic_u64s(&self) -> &[AtomicU64] {
        // SAFETY: page-aligned, mapped for the life of `self`, and AtomicU64 has the size and
        // alignment of u64; all access through the slice is atomic.
        unsafe { std::slice::from_raw_parts(self.as_ptr().cast::<AtomicU64>(), self.len() / 8) }
    }

    /// Writes every dirty page back and returns once the hosts have acknowledged it.
    pub fn flush(&self) -> Result<(), RuntimeError> {
        let (reply, rx) = mpsc::channel();
        self.runtime.command(handler::Command::Flush { id: self.id, reply })?;
        rx.recv().map_err(|_| RuntimeError::HandlerGone)?
    }

    /// Makes sure host memory backs `offset..offset + len` (page-aligned); a full host fails
    /// here. Idempotent.
    pub fn commit(&self, offset: usize, len: usize) -> Result<(), RuntimeError> {
        let (first, count) = self.page_range(offset, len)?;
        let (reply, rx) = mpsc::channel();
        self.runtime.command(handler::Command::Commit { id: self.id, first, count, reply })?;
        rx.recv().map_err(|_| RuntimeError::HandlerGone)?
    }

    /// Frees `offset..offset + len` (page-aligned), as `munmap` or `MADV_DONTNEED` would free
    /// anonymous memory: it reads as zeros afterwards, and neither local memory nor the host
    /// keeps a copy. The range stays mapped and usable.
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), RuntimeError> {
        let (first, count) = self.page_range(offset, len)?;
        let (reply, rx) = mpsc::channel();
        self.runtime.command(handler::Command::Discard { id: self.id, first, count, reply })?;
        rx.recv().map_err(|_| RuntimeError::HandlerGone)?
    }

    fn page_range(&self, offset: usize, len: usize) -> Result<(usize, usize), RuntimeError> {
        let fits = offset.checked_add(len).is_some_and(|end| end <= self.len());
        if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 || !fits {
            return Err(RuntimeError::Config(format!(
                "range {offset:#x}+{len:#x} is not a page-aligned, non-empty part of a region of {:#x} bytes",
                self.len()
            )));
        }
        Ok((offset / PAGE_SIZE, len / PAGE_SIZE))
    }

    /// The first data loss this region suffered (a host died with pages of it), if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Region<'_> {
    fn drop(&mut self) {
        let (reply, rx) = mpsc::channel();
        if self.runtime.command(handler::Command::RemoveRegion { id: self.id, reply }).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// Whether the process may use userfaultfd, with the reason if not: for a clear error before
/// any work starts.
pub fn check_userfaultfd() -> Result<(), RuntimeError> {
    let available = Uffd::available_features()?;
    if !available.contains(Features::PAGEFAULT_FLAG_WP) {
        return Err(UffdError::MissingFeature("write-protect support (Linux 5.7+)").into());
    }
    Ok(())
}

/// Whether this kernel offers async dirty tracking (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+, and
/// `UFFDIO_MOVE`, 6.8+) to this process.
pub fn async_dirty_tracking_available() -> bool {
    Uffd::available_features().is_ok_and(|f| f.contains(Features::WP_ASYNC.union(Features::MOVE)))
}
